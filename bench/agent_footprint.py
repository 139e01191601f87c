"""The agent's CPU and memory per protected VM, on the primary's and the secondary's host.

One pair of lab hosts with real agents (and a third host for the etcd quorum). For
0, 1, 2 and 4 protected idle VMs (started through the real hooks, protected a -> b by the
agents, x-checkpoint-delay 2000 ms: ~30 checkpoints a minute each), after a settle time
the agent process of each host is sampled over a window:

- memory: VmRSS from /proc/<pid>/status at the window's end;
- CPU: utime + stime from /proc/<pid>/stat over the window (all threads), as a
  percentage of one core and as CPU ms per second.

Per-VM increments are (value at n VMs - value at 0) / n.

    .venv/bin/python bench/agent_footprint.py [--window 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import time

from colo_report import dump_json, machine, print_machine

from ftlab.agentlab import AgentLab, LabVm
from vdsm_ft.api import VmState

A, B = "bm-a", "bm-b"
COUNTS = (0, 1, 2, 4)
SETTLE_S = 10.0
TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])      # utime, stime (fields 14, 15)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def sample(pids: dict[str, int], window: float) -> dict[str, dict[str, float]]:
    start = {h: cpu_ticks(p) for h, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    out = {}
    for host, pid in pids.items():
        cpu_s = (cpu_ticks(pid) - start[host]) / TICK
        out[host] = {"rss_kib": rss_kib(pid), "cpu_ms_per_s": cpu_s * 1000 / elapsed,
                     "cpu_pct": cpu_s * 100 / elapsed, "threads": threads(pid)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds per count")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print(f"agent footprint: {args.window:.0f} s window per count, after {SETTLE_S:.0f} s "
          f"settle; CPU from /proc/<pid>/stat (clock tick {1000 / TICK:.0f} ms)")
    results: dict[int, dict[str, dict[str, float]]] = {}
    with AgentLab("bm") as lab:
        pids = {h: lab.agent(h).proc.pid for h in (A, B)}
        vms: list[LabVm] = []
        try:
            for count in COUNTS:
                while len(vms) < count:
                    vm = lab.start_vm(A)
                    vms.append(vm)
                    lab.protect(vm, A, B, attempts=3)    # as the poller asks again
                time.sleep(SETTLE_S)
                for vm in vms:      # every pair still protected: nothing failed over
                    lab.wait_status(A, vm.vm_id, VmState.PROTECTED, timeout=5)
                results[count] = sample(pids, args.window)
                line = "  ".join(
                    f"{h}: RSS {r['rss_kib'] / 1024:6.1f} MiB, CPU {r['cpu_pct']:5.2f} % "
                    f"({r['threads']} threads)" for h, r in results[count].items())
                print(f"  {count} VM{'s' if count != 1 else ' '}  {line}", flush=True)
        finally:
            for vm in vms:
                lab.remove_vm(vm)
        failures = list(lab.protect_failures)
    print()
    result = {"machine": info, "window_s": args.window, "counts": results, "per_vm": {},
              "protect_failures": failures}
    for reason in failures:
        print(f"  a protect attempt failed and was asked again: {reason}")
    for host, role in ((A, "primary"), (B, "secondary")):
        base = results[0][host]
        for count in COUNTS[1:]:
            r = results[count][host]
            per = {"rss_kib": (r["rss_kib"] - base["rss_kib"]) / count,
                   "cpu_pct": (r["cpu_pct"] - base["cpu_pct"]) / count}
            result["per_vm"].setdefault(role, {})[count] = per
            print(f"  {role:9} agent, {count} VMs: per VM {per['rss_kib'] / 1024:+6.2f} MiB "
                  f"RSS, {per['cpu_pct']:+5.2f} % of a core")
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
