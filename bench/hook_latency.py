"""The before_vm_start hook's added latency, run exactly as VDSM runs it.

The VDSM stand-in (`ftlab.vdsm.Vdsm.run_hooks`) runs the real
`hooks/before_vm_start/50_ft` inside a lab host (nsenter into its network and mount
namespaces) with a real agent and a real 3-member etcd: the XML in a temp file named by
`_hook_domxml`, the custom properties as env vars, `vmId`, VDSM's rc rules. Timed: the
whole `run_hooks` call (temp file written, script run, XML read back), i.e. what the
hook adds to a VM start. Variants, round-robin so that load hits all alike:

- `true`: a hook that is `/bin/true`: the cost of running any hook here (fork, exec,
  nsenter into the lab host);
- `python noop`: `#!/usr/bin/python3` + `pass`: the interpreter's start;
- `qemu --version`: a hook that only runs `qemu-system-x86_64 --version`, as 50_ft does
  for ft=true (it picks the COLO-safe machine type by QEMU version);
- `ft unset`: the real 50_ft, no `ft` property: it asks the agent over its unix socket
  whether the VM's storage-domain image is current (one etcd read there);
- `ft=false`: the same with `ft=false` (a VM whose FT was turned off);
- `ft=true`: the real 50_ft with `ft=true`: XML rewrite, arbiter (etcd) check, run dir,
  register with the agent over its unix socket. A fresh vmId every run; the VM is
  never started, and destroy hooks (not timed) make the agent forget it.

    .venv/bin/python bench/hook_latency.py [--runs 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import stat
import time
import uuid

from colo_report import dump_json, machine, print_machine, summary

from ftlab import guest
from ftlab.agentlab import AgentLab
from ftlab.vdsm import Vdsm
from ftlab.vdsmdriver import HOOK_PYTHONPATH, HOOKS_DIR as HOOKS

HOST = "bh-a"
BASELINES = {
    "true": "#!/bin/sh\nexec /bin/true\n",
    "python noop": "#!/usr/bin/python3\npass\n",
    "qemu --version": "#!/bin/sh\nexec /usr/bin/qemu-system-x86_64 --version >/dev/null\n",
}
VARIANTS = tuple(BASELINES) + ("ft unset", "ft=false", "ft=true")


def _hooks_dir(base: str, script: str) -> str:
    directory = os.path.join(base, "before_vm_start")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "50_bench")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs per variant")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with AgentLab("bh") as lab:
        host = lab.host(HOST)
        env = dict(os.environ, VDSM_FT_CONFIG=lab.agent(HOST).config_path)
        vdsms = {name: Vdsm(_hooks_dir(os.path.join(lab.base, "hooks-" + str(i)), script),
                            host.uri, env=env, pythonpath=HOOK_PYTHONPATH,
                            hook_timeout=60, wrap=host.nsenter)
                 for i, (name, script) in enumerate(BASELINES.items())}
        real = lab.vdsm[HOST]
        assert real.hooks_dir == HOOKS
        disk = lab.new_disk(HOST, "bench")
        for i in range(args.runs + 1):          # run 0 warms the page cache, not counted
            for variant in VARIANTS:
                vm_id = str(uuid.uuid4())
                xml = guest.idle_guest_xml(f"bh-{vm_id[:8]}", disk, mac=guest.guest_mac(4),
                                           vm_id=vm_id)
                custom = {"ft=true": {"ft": "true"}, "ft=false": {"ft": "false"}}.get(
                    variant, {})
                runner = vdsms.get(variant, real)
                t0 = time.monotonic()
                outcome = runner.run_hooks("before_vm_start", xml, vm_id, custom)
                ms = (time.monotonic() - t0) * 1000
                if variant == "ft=true":
                    if "registered with the agent" not in outcome.runs[0].stderr:
                        raise SystemExit(f"ft=true hook did not register: {outcome.runs}")
                    for point in ("before_vm_destroy", "after_vm_destroy"):
                        real.run_hooks(point, None, vm_id, custom)
                elif variant in ("ft unset", "ft=false") and outcome.data != xml:
                    raise SystemExit(f"the {variant} hook changed the XML")
                if i:
                    samples[variant].append(ms)
        print(f"\nbefore_vm_start, whole hook run as VDSM does it, inside lab host {HOST} "
              f"(nsenter), {args.runs} runs each:")
        result = {"machine": info, "runs": args.runs, "samples_ms": samples, "summary": {}}
        for variant in VARIANTS:
            s = summary(samples[variant])
            result["summary"][variant] = s
            print(f"  {variant:<15} p50 {s['p50']:6.1f}  p90 {s['p90']:6.1f}  "
                  f"p99 {s['p99']:6.1f}  max {s['max']:6.1f} ms")
        ft, noop = result["summary"]["ft=true"], result["summary"]["python noop"]
        unset, true = result["summary"]["ft unset"], result["summary"]["true"]
        off = result["summary"]["ft=false"]
        print(f"  ft unset - python noop: p50 {unset['p50'] - noop['p50']:+.1f} ms; "
              f"ft=false - python noop: p50 {off['p50'] - noop['p50']:+.1f} ms; "
              f"ft=true - python noop: p50 {ft['p50'] - noop['p50']:+.1f} ms")
        print(f"  lab wrap (nsenter, fork/exec; not on a real host): p50 {true['p50']:.1f} ms")
        print(f"  target: <= 100 ms p99 added to a VM start -> ft=true p99 {ft['p99']:.1f} ms "
              f"({'met' if ft['p99'] <= 100 else 'NOT met'}), ft unset p99 "
              f"{unset['p99']:.1f} ms ({'met' if unset['p99'] <= 100 else 'NOT met'})")
        print("\nwhere the real hook's time goes: one extra run of each with "
              "PYTHONPROFILEIMPORTTIME=1 (not timed above):")
        profiler = Vdsm(HOOKS, host.uri, env=dict(env, PYTHONPROFILEIMPORTTIME="1"),
                        pythonpath=HOOK_PYTHONPATH, hook_timeout=60, wrap=host.nsenter)
        result["imports_ms"] = {}
        for variant, custom in (("ft unset", {}), ("ft=false", {"ft": "false"}),
                                ("ft=true", {"ft": "true"})):
            vm_id = str(uuid.uuid4())
            xml = guest.idle_guest_xml(f"bh-{vm_id[:8]}", disk, mac=guest.guest_mac(4),
                                       vm_id=vm_id)
            outcome = profiler.run_hooks("before_vm_start", xml, vm_id, custom)
            if custom.get("ft") == "true":
                for point in ("before_vm_destroy", "after_vm_destroy"):
                    real.run_hooks(point, None, vm_id, custom)
            top = _top_imports(outcome.runs[0].stderr)
            result["imports_ms"][variant] = top
            total = sum(ms for _, ms in top)
            print(f"  {variant}: top-level imports {total:.1f} ms in all; largest: "
                  + ", ".join(f"{name} {ms:.1f}" for name, ms in top[:6]))
    if args.json:
        dump_json(args.json, result)


def _top_imports(stderr: str) -> list[tuple[str, float]]:
    """Top-level modules and their cumulative import time (ms), from Python's
    `-X importtime` lines: `import time: self [us] | cumulative | name`."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        if name.startswith("  "):
            continue            # nested: counted in its top-level importer's cumulative
        out.append((name.strip(), int(cumulative) / 1000))
    return sorted(out, key=lambda x: -x[1])


if __name__ == "__main__":
    main()
