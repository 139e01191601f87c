"""The local identity migration after a failover (vdsm_ft/identity.py), with the real agents.

Per run: a fresh idle KVM guest started through the real hooks on one lab host, protected
by the agents onto the next, a block written and covered by two checkpoints, then the
primary's QEMU SIGKILLed. The survivor's agent promotes the secondary and migrates it on
its own host into the domain with the VM's own name, UUID and metadata.

What is timed, per run:
- **pause**: the survivor's `last_failover.identity_pause_ms`, the guest's pause in the
  local migration: from the source's STOP event to the new domain's RESUME event, both
  stamped by QEMU on the same host's clock;
- **failover**: the agent's `last_failover.duration_ms` (detection to running outside
  COLO), which the local migration follows;
- **kill->own identity**: from right before the kill until the survivor's agent reports
  the VM in `Need Secondary` running as its own domain (polled every POLL_S from the
  client namespace: the reply lies within one poll of the moment).
Every run also checks that the covered block reads back through the new domain and that
the secondary's domain is gone.

    .venv/bin/python bench/identity_migration.py [--runs 10] [--json F]
"""
from __future__ import annotations

import argparse
import os
import time

from colo_lab import BenchError
from colo_report import dump_json, machine, print_machine, summary

from ftlab.agentlab import MiB, AgentLab
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.monitor import LibvirtMonitor
from vdsm_ft.api import Role, VmState
from vdsm_ft.layout import Disk, VmLayout

HOSTS = ("bi-a", "bi-b", "bi-c")
POLL_S = 0.02
BLOCK = 64 * 1024
TIMEOUT_S = 30.0


def one_run(lab: AgentLab, run: int) -> dict[str, float]:
    primary, survivor = HOSTS[run % 3], HOSTS[(run + 1) % 3]
    vm = lab.start_vm(primary)
    try:
        lab.protect(vm, primary, survivor, attempts=3)
        disk = Disk(index=0, image="", size=64 * MiB)
        primary_dir = os.path.join(lab.agent(primary).run_dir, "vms", vm.vm_id)
        write_pattern(LibvirtMonitor(lab.host(primary).uri, vm.name),
                      VmLayout(vm.vm_id, vm.name, primary_dir, (disk,)), disk, 0, BLOCK,
                      0x40 + run)
        lab.wait_checkpoints(primary, vm.vm_id)
        pid = lab.qemu_pid(primary, vm.name)
        if pid is None:
            raise BenchError(f"no QEMU for {vm.name} on {primary}")
        t0 = time.monotonic()
        os.kill(pid, 9)
        deadline = t0 + TIMEOUT_S
        while True:
            st = lab.status(survivor, vm.vm_id)
            if st.state is VmState.NEED_SECONDARY:
                seen = time.monotonic()
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{vm.name}: survivor still {st.state.value} after "
                                 f"{TIMEOUT_S:.0f}s: {st.reason}")
            time.sleep(POLL_S)
        lf = st.last_failover
        if st.role is not Role.PRIMARY or lf is None or lf.domain != vm.name \
                or lf.identity_pause_ms is None:
            raise BenchError(f"{vm.name}: not moved into its own identity: {st.reason}")
        if lab.qemu_pid(survivor, vm.secondary_name) is not None:
            raise BenchError(f"{vm.name}: the secondary's domain is still there")
        mon = LibvirtMonitor(lab.host(survivor).uri, vm.name)
        run_dir = os.path.join(lab.agent(survivor).run_dir, "vms", vm.vm_id)
        if not pattern_matches(mon, VmLayout(vm.vm_id, vm.name, run_dir, (disk,)), disk,
                               0, BLOCK, 0x40 + run):
            raise BenchError(f"{vm.name}: the covered block did not read back")
        return {"pause_ms": lf.identity_pause_ms, "failover_ms": lf.duration_ms,
                "kill_to_identity_ms": (seen - t0) * 1000}
    finally:
        lab.remove_vm(vm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print(f"identity migration: idle KVM guest, primary QEMU SIGKILLed, {args.runs} runs; "
          f"survivor's agent polled every {POLL_S * 1000:.0f} ms")
    runs: list[dict[str, float]] = []
    with AgentLab("bi") as lab:
        for i in range(args.runs):
            try:
                r = one_run(lab, i)
            except BenchError:
                print(lab.agent_logs(60), flush=True)
                raise
            runs.append(r)
            print(f"  run {i + 1:2}  pause {r['pause_ms']:6.1f} ms  failover "
                  f"{r['failover_ms']:6.1f} ms  kill->own identity "
                  f"{r['kill_to_identity_ms']:7.1f} ms", flush=True)
    result = {"machine": info, "poll_s": POLL_S, "runs": runs,
              "summary": {k: summary([r[k] for r in runs])
                          for k in ("pause_ms", "failover_ms", "kill_to_identity_ms")}}
    print()
    for key, label in (("pause_ms", "guest pause (STOP->RESUME)"),
                       ("failover_ms", "failover (detect->live)"),
                       ("kill_to_identity_ms", "kill -> own identity")):
        s = result["summary"][key]
        print(f"  {label:<28} n={s['n']:<3} p50 {s['p50']:7.1f}  max {s['max']:7.1f} ms")
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
