"""Failover time of the COLO core, ours (`vdsm_ft.colo`) side by side with raw QMP.

What is timed, for every run: from the moment `os.kill(qemu, SIGKILL)` of one member
returned, until the survivor runs outside COLO: its `query-colo-status` says mode
`none` and `query-status` says `running`.

- ours: the time `colo.failover_secondary` / `colo.failover_primary` takes to return
  (it only returns once it has seen both, after its yank and cleanup);
- raw: a hand-driven minimal sequence over a bare socket (`colo_rawqmp`), then a poll
  every POLL_S until both hold.

Detection is NOT included: the failover starts right after the kill returns (the agent
benchmarks add heartbeat detection and arbitration). Each run is a fresh pair on the
same two lab hosts (idle KVM guest, 64 MiB disk, one NIC, x-checkpoint-delay 2000 ms),
killed 300 ms after a completed checkpoint; ours and raw alternate, so drift in the
machine's load hits both alike.

    .venv/bin/python bench/colo_failover.py [--runs 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import time

from colo_lab import BenchError, BenchLab
from colo_rawqmp import RawQmp
from colo_report import dump_json, fmt, machine, print_machine, summary

from ftlab.colopair import Member
from vdsm_ft import colo

CHECKPOINT_DELAY_MS = 2000
KILL_AFTER_RESUME_S = 0.3
POLL_S = 0.002
RAW_TIMEOUT_S = 5.0


def _poll_out_of_colo(raw: RawQmp) -> None:
    deadline = time.monotonic() + RAW_TIMEOUT_S
    while not (raw.execute("query-colo-status")["mode"] == "none"
               and raw.execute("query-status")["status"] == "running"):
        if time.monotonic() > deadline:
            raise BenchError(f"raw failover: still in COLO after {RAW_TIMEOUT_S}s")
        time.sleep(POLL_S)


def raw_failover_secondary(raw: RawQmp, survivor: Member) -> None:
    """The minimum of docs/colo-facts.md, "Failover sequences": stop the NBD server,
    lost-heartbeat, poll."""
    raw.execute("nbd-server-stop")
    raw.execute("x-colo-lost-heartbeat")
    _poll_out_of_colo(raw)


def raw_failover_primary(raw: RawQmp, survivor: Member) -> None:
    """The documented primary sequence (docs/colo-facts.md, "Failover sequences"; with
    `blockdev-del` for the NBD node, as the new upstream doc has it), in our layout's
    names."""
    disk = survivor.layout.disks[0]
    raw.execute("x-blockdev-change", {"parent": disk.quorum, "child": "children.1"})
    raw.execute("blockdev-del", {"node-name": disk.nbd_node})
    for nic in survivor.layout.nics:
        for obj in (nic.compare, nic.iothread, nic.filter_mirror, nic.filter_redirect_in,
                    nic.filter_redirect_out):
            raw.execute("object-del", {"id": obj})
    raw.execute("x-colo-lost-heartbeat")
    _poll_out_of_colo(raw)


def one_run(lab: BenchLab, generation: int, killed: str, driver: str) -> float:
    """One fresh pair, one kill, one failover; returns the failover time in ms."""
    pair, primary, secondary = lab.protected(generation, CHECKPOINT_DELAY_MS)
    try:
        victim, survivor = (primary, secondary) if killed == "primary" else (secondary,
                                                                           primary)
        # A quiet moment: a whole checkpoint done, the next one ~1.7 s away.
        stop = primary.qmp.wait_event("STOP", 10.0, since=primary.qmp.cursor())
        resume = primary.qmp.wait_event("RESUME", 10.0, since=stop.seq + 1)
        raw = None
        if driver == "raw":
            survivor.qmp.close()     # QEMU's monitor socket takes one client at a time
            raw = RawQmp(survivor.layout.qmp_socket).connect()
        time.sleep(max(0.0, resume.received + KILL_AFTER_RESUME_S - time.monotonic()))
        victim.kill()
        t0 = time.monotonic()
        if raw is None:
            if killed == "primary":
                colo.failover_secondary(survivor.qmp, survivor.layout)
            else:
                colo.failover_primary(survivor.qmp, survivor.layout)
        elif killed == "primary":
            raw_failover_secondary(raw, survivor)
        else:
            raw_failover_primary(raw, survivor)
        elapsed = (time.monotonic() - t0) * 1000
        # Outside the timing: the survivor really is the live, unprotected VM.
        if raw is None:
            status, state = colo.colo_status(survivor.qmp), colo.run_state(survivor.qmp)
        else:
            status = raw.execute("query-colo-status")
            state = raw.execute("query-status")["status"]
            raw.close()
        expected = "secondary" if killed == "primary" else "primary"
        if (status["mode"], status["last-mode"], state) != ("none", expected, "running"):
            raise BenchError(f"{driver} failover after {killed} kill ended in {status}, "
                             f"{state}")
        return elapsed
    finally:
        lab.drop_pair(pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per kind and driver")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print(f"failover time: SIGKILL returned -> survivor `mode none` and running; "
          f"detection excluded; {args.runs} runs per kind and driver, fresh pair each")
    samples: dict[str, dict[str, list[float]]] = {
        k: {"ours": [], "raw": []} for k in ("primary", "secondary")}
    generation = 0
    with BenchLab("bf") as lab:
        for i in range(args.runs):
            for killed in ("primary", "secondary"):
                drivers = ("ours", "raw") if i % 2 == 0 else ("raw", "ours")
                for driver in drivers:
                    generation += 1
                    ms = one_run(lab, generation, killed, driver)
                    samples[killed][driver].append(ms)
                    print(f"  run {i + 1:2}  {killed:9} killed  {driver:4}  {ms:7.1f} ms",
                          flush=True)
    result = {"machine": info, "runs": args.runs, "samples_ms": samples, "summary": {}}
    print()
    for killed, survivor in (("primary", "secondary takes over"),
                             ("secondary", "primary continues")):
        ours, raw = summary(samples[killed]["ours"]), summary(samples[killed]["raw"])
        result["summary"][killed] = {"ours": ours, "raw": raw}
        print(f"{killed} killed ({survivor}):")
        print(f"  ours (vdsm_ft.colo): {fmt(ours)}")
        print(f"  raw QMP by hand:     {fmt(raw)}")
        print(f"  ours - raw: p50 {ours['p50'] - raw['p50']:+.1f} ms, "
              f"p90 {ours['p90'] - raw['p90']:+.1f} ms, max {ours['max'] - raw['max']:+.1f} ms;"
              f" ratio p50 {ours['p50'] / raw['p50']:.2f}x  (target: within +50 ms of raw)")
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
