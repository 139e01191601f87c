"""Host-loss failover time by where the etcd leader was (issue 17), in one run.

The `host` fault of bench/agent_failover.py (the primary's whole host crashes: QEMU,
libvirtd, agent and its etcd member if it has one; a fresh VM per run, protected a -> b
by the real agents, the host revived between runs), in three cases:

- `leader`: the lost host ran the etcd leader (moved there first with `move-leader`), so
  the survivor's claim cannot commit before the other members elect a new one;
- `follower`: the lost host ran a follower (the leader moved to host c first);
- `none`: the lost host ran no etcd member (a 4-host lab whose members run on b, c, d).

Per case, p50 / p90 / p99 / max of:
- **total**: from right before the crash until the survivor runs outside COLO, polled
  through libvirt's monitor every 2 ms (bench/agent_failover.py's `ColoPoller`);
- **detection**: crash -> the survivor's agent suspects its peer;
- **arbitration**: suspicion -> the live claim won (`last_failover.arbitration_ms`);
- **promotion**: claim won -> running outside COLO (the agent's `duration_ms` minus
  arbitration).

With `--soak-minutes M` it instead holds two protected VMs (a -> b, b -> c) on a
3-host lab with those etcd timings for M minutes and counts what an idle lab should never
show: etcd elections (the members' raft term, sampled every SOAK_SAMPLE_S) and failovers
or VMs out of Protected (the agents' status), with the machine's load average over the
soak, since a stalled member is what would start a false election.

    .venv/bin/python bench/host_loss_etcd.py [--runs 20] [--cases leader,follower,none]
        [--etcd-heartbeat-ms 25 --etcd-election-ms 250] [--soak-minutes M] [--json F]
"""
from __future__ import annotations

import argparse
import os
import time

from agent_failover import A, agent_run, line
from colo_lab import BenchError
from colo_report import dump_json, fmt, machine, print_machine, subset, summary

from ftlab.agentlab import AgentLab
from ftlab.etcd import ELECTION_MS, HEARTBEAT_MS
from vdsm_ft.api import VmState

CASES = ("leader", "follower", "none")
TARGET_P99_MS = 300.0
KEYS = ("total_ms", "detection_ms", "arbitration_ms", "promotion_ms")
SOAK_SAMPLE_S = 10.0


def run_case(lab: AgentLab, case: str) -> dict:
    """One `host` fault with the etcd leader placed for `case`."""
    leader_on = {"leader": lab.etcd_member(A), "follower": lab.etcd_member("ba-c"),
                 "none": None}[case]
    r = agent_run(lab, "host", leader_on)
    if r["arbitration_ms"] is None:
        raise BenchError("the survivor's agent did not report arbitration_ms")
    r["promotion_ms"] = r["agent_ms"] - r["arbitration_ms"]
    if case == "leader" and not r["etcd_leader_was_lost"]:
        raise BenchError("the etcd leader was not on the lost host in a `leader` run")
    return r


def soak(minutes: float, timing: tuple[int, int]) -> dict:
    """Two protected VMs held for `minutes`; elections, failovers and state changes seen."""
    with AgentLab("ba", etcd_timing_ms=timing) as lab:
        pairs = [("ba-a", "ba-b"), ("ba-b", "ba-c")]
        vms = []
        for primary, secondary in pairs:
            vm = lab.start_vm(primary)
            lab.protect(vm, primary, secondary, attempts=3)
            vms.append((vm, primary))
        first = lab.etcd_raft_term()
        samples, bad, loads = 0, [], []
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(SOAK_SAMPLE_S)
            samples += 1
            loads.append(os.getloadavg()[0])
            for vm, primary in vms:
                st = lab.status(primary, vm.vm_id)
                if st.state is not VmState.PROTECTED or st.failovers:
                    bad.append(f"{vm.name}: {st.state.value}, {st.failovers} failovers, "
                               f"{st.reason}")
        last = lab.etcd_raft_term()
    elections = None if first is None or last is None else last - first
    return {"minutes": minutes, "samples": samples, "raft_term_first": first,
            "raft_term_last": last, "elections": elections, "not_protected": bad,
            "load_1min": summary(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per case")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--etcd-heartbeat-ms", type=int, default=HEARTBEAT_MS)
    parser.add_argument("--etcd-election-ms", type=int, default=ELECTION_MS)
    parser.add_argument("--soak-minutes", type=float,
                        help="hold two protected VMs this long instead, and count elections")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    cases = subset(parser, args.cases, CASES, "--cases")
    info = machine()
    print_machine(info)
    timing = (args.etcd_heartbeat_ms, args.etcd_election_ms)
    print(f"etcd --heartbeat-interval {timing[0]} ms --election-timeout {timing[1]} ms; "
          "agent heartbeat 50 ms, timeout 150 ms")
    if args.soak_minutes:
        r = soak(args.soak_minutes, timing)
        print(f"soak {r['minutes']:.0f} min, {r['samples']} samples: etcd elections "
              f"{r['elections']} (raft term {r['raft_term_first']} -> {r['raft_term_last']}); "
              f"{len(r['not_protected'])} samples with a VM not Protected or failed over")
        print(f"  load average (1 min): {fmt(r['load_1min'], unit='')}")
        for entry in r["not_protected"][:10]:
            print(f"  {entry}")
        if args.json:
            dump_json(args.json, {"machine": info, "etcd_heartbeat_ms": timing[0],
                                  "etcd_election_ms": timing[1], "soak": r})
        return
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    labs = [(("leader", "follower"), dict(hosts=3)),
            (("none",), dict(hosts=4, etcd_hosts=(1, 2, 3)))]
    for lab_cases, shape in labs:
        mine = [c for c in lab_cases if c in cases]
        if not mine:
            continue
        with AgentLab("ba", etcd_timing_ms=timing, **shape) as lab:
            for i in range(args.runs):
                for case in mine:
                    try:
                        r = run_case(lab, case)
                    except BenchError:
                        print(lab.agent_logs(80), flush=True)
                        raise
                    runs[case].append(r)
                    print(f"  run {i + 1:2}  {case:8}  total {r['total_ms']:6.1f}  "
                          f"detection {r['detection_ms']:6.1f}  arbitration "
                          f"{r['arbitration_ms']:6.1f}  promotion {r['promotion_ms']:6.1f} ms",
                          flush=True)
    result: dict = {"machine": info, "etcd_heartbeat_ms": timing[0],
                    "etcd_election_ms": timing[1], "runs": runs, "summary": {}}
    print()
    for case in cases:
        s = {k: summary([r[k] for r in runs[case]]) for k in KEYS}
        result["summary"][case] = s
        met = "met" if s["total_ms"]["p99"] <= TARGET_P99_MS else "NOT met"
        print(f"{case}: target total p99 <= {TARGET_P99_MS:.0f} ms -> {met}")
        for k in KEYS:
            print(line(k.removesuffix("_ms"), s[k], width=12))
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
