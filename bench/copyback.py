"""Copy-back after a failover: time versus disk size, the cut-over, the write rate.

Each run: a fresh idle VM whose qcow2 disk is half filled with data (32 of 64 MiB, 128
of 256, 512 of 1024) is protected from host a onto host b; a's QEMU is SIGKILLed; b
takes over (`colo.failover_secondary`) and runs on its replica. Then, on b:

- copy time: from `copyback.start` until `copyback.pivot` returned (mirror READY, final
  flush, cut-over, graph verified), unthrottled;
- cut-over: `block-job-complete` until every job concluded (the guest's disk I/O waits,
  its vCPUs run), and the STOP events QEMU sent meanwhile (the guest's pauses: none
  since the cut-over stopped stopping the VM; the stop-bracketed cut-over before it
  paused the guest 19 ms p50, docs/benchmarks.md);
- write rate: host-side `qemu-io` writes through the guest's disk device (HMP, the path
  guest writes take), 1 MiB each, cycling through the disk's second half (written
  once before, so that no case pays for cluster allocation), on a 1 GiB disk: with no copy running (baseline, WRITE_SECONDS), during an unthrottled copy
  (until it is in sync), and during a copy from the start throttled to THROTTLE_MIB_S
  ([storage] copyback_rate; WRITE_SECONDS).

    .venv/bin/python bench/copyback.py [--runs 3] [--runs-1g 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from colo_lab import MiB, BenchError, BenchLab
from colo_report import dump_json, fmt, machine, print_machine, summary

from ftlab.colopair import ColoPair, Member
from ftlab.diskprobe import write_pattern_hmp
from vdsm_ft import colo, copyback, domains, domxml

SIZES_MIB = (64, 256, 1024)
THROTTLE_MIB_S = 32
WRITE_SECONDS = 4.0
WRITE_MIB = 1
READY_TIMEOUT_S = 900.0


def survivor(lab: BenchLab, generation: int, size_mib: int) -> tuple[ColoPair, Member]:
    pair = lab.new_pair(size_mib * MiB, fill=size_mib * MiB // 2)
    primary = pair.start_primary(lab.hosts[0])
    secondary, ep = pair.start_secondary(lab.hosts[1], primary, generation)
    pair.protect(primary, secondary, ep)
    pid = primary.pid()
    primary.kill()
    primary.qmp.close()
    colo.failover_secondary(secondary.qmp, secondary.layout)
    deadline = time.monotonic() + 10
    while domains.process_alive(pid):   # the old primary's image lock goes with it
        if time.monotonic() > deadline:
            raise BenchError(f"killed QEMU {pid} still runs")
        time.sleep(0.05)
    return pair, secondary


def targets(pair: ColoPair) -> tuple[copyback.Target, ...]:
    return copyback.targets(domxml.layout_from_domxml(pair.engine_xml, "/"))


def copy_run(lab: BenchLab, generation: int, size_mib: int) -> tuple[float, float, int]:
    pair, b = survivor(lab, generation, size_mib)
    try:
        to = targets(pair)
        t0 = time.monotonic()
        copyback.start(b.qmp, b.layout, to, 0)
        copyback.wait_ready(b.qmp, to, READY_TIMEOUT_S, interval=0.05)
        cursor = b.qmp.cursor()
        result = copyback.pivot(b.qmp, b.layout, to)
        took = (time.monotonic() - t0) * 1000
        copyback.verify(b.qmp, b.layout, to)
        return took, result.cutover_ms, len(b.qmp.events(cursor, "STOP"))
    finally:
        lab.drop_pair(pair)


REGION = (512 * MiB, 1024 * MiB)   # the never-filled half of the 1 GiB disk


def write_rate(b: Member, to: tuple[copyback.Target, ...] | None) -> tuple[float, float]:
    """MiB/s of 1 MiB writes, cycling through REGION, for up to WRITE_SECONDS; with `to`,
    only while that copy is not yet in sync. Returns (rate, seconds measured).

    The writes go through the guest device (HMP qemu-io -d), as in the figures of
    docs/benchmarks.md: no COLO runs here, and an NBD export would wake the throttled
    copy (ftlab/diskprobe.py write_pattern_hmp). HMP qemu-io reports errors to the
    domain log, not in its reply, so every offset stays inside the disk."""
    disk = b.layout.disks[0]
    span = (REGION[1] - REGION[0]) // (WRITE_MIB * MiB)
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < WRITE_SECONDS:
        if to is not None and copyback.progress(b.qmp, to).ready:
            break
        offset = REGION[0] + (n % span) * WRITE_MIB * MiB
        write_pattern_hmp(b.qmp, disk, offset, WRITE_MIB * MiB, 0x40 + n % 64)
        n += 1
    took = time.monotonic() - t0
    if n == 0:
        raise BenchError("the copy was in sync before the first write")
    return n * WRITE_MIB / took, took


def _restart_copy(b: Member, to: tuple[copyback.Target, ...], rate: int) -> None:
    """Drop the finished mirror and copy again from the start at `rate`."""
    cursor = b.qmp.cursor()
    copyback.abort(b.qmp, to)
    for t in to:
        b.qmp.wait_event("JOB_STATUS_CHANGE", 30.0, since=cursor,
                         match=lambda d, j=t.job: d["id"] == j and d["status"] == "concluded")
    copyback.start(b.qmp, b.layout, to, rate)


def rate_run(lab: BenchLab, generation: int) -> dict[str, Any]:
    pair, b = survivor(lab, generation, 1024)
    try:
        to = targets(pair)
        # Every case overwrites allocated clusters: a first write would allocate them.
        write_pattern_hmp(b.qmp, b.layout.disks[0], REGION[0], REGION[1] - REGION[0],
                          0x3F)
        base, base_s = write_rate(b, None)
        copyback.start(b.qmp, b.layout, to, 0)
        free, free_s = write_rate(b, to)
        copyback.wait_ready(b.qmp, to, READY_TIMEOUT_S, interval=0.05)
        _restart_copy(b, to, THROTTLE_MIB_S * MiB)
        throttled, thr_s = write_rate(b, to)
        return {"baseline": base, "baseline_s": base_s, "unthrottled": free,
                "unthrottled_s": free_s, "throttled": throttled, "throttled_s": thr_s,
                "copy_percent_at_end": copyback.progress(b.qmp, to).percent}
    finally:
        lab.drop_pair(pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs at 64 and 256 MiB")
    parser.add_argument("--runs-1g", type=int, default=2, help="runs at 1 GiB")
    parser.add_argument("--rate-runs", type=int, default=2, help="write-rate runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print("copy-back after a primary SIGKILL: start -> READY -> pivot (unthrottled); "
          "disk half filled; fresh pair each run")
    times: dict[str, list[float]] = {str(s): [] for s in SIZES_MIB}
    cutovers: list[float] = []
    stops = 0
    rates: list[dict[str, Any]] = []
    generation = 0
    with BenchLab("bcb") as lab:
        for size in SIZES_MIB:
            for i in range(args.runs_1g if size >= 1024 else args.runs):
                generation += 1
                ms, cutover, stopped = copy_run(lab, generation, size)
                times[str(size)].append(ms)
                cutovers.append(cutover)
                stops += stopped
                print(f"  {size:5} MiB  run {i + 1}  copy-back {ms:8.1f} ms  "
                      f"cut-over {cutover:6.1f} ms  guest stops {stopped}", flush=True)
        for i in range(args.rate_runs):
            generation += 1
            r = rate_run(lab, generation)
            rates.append(r)
            print(f"  write rate run {i + 1}: no copy {r['baseline']:6.1f} MiB/s "
                  f"({r['baseline_s']:.1f} s); during an unthrottled copy "
                  f"{r['unthrottled']:6.1f} MiB/s ({r['unthrottled_s']:.2f} s, until it "
                  f"was in sync); during a copy at {THROTTLE_MIB_S} MiB/s "
                  f"{r['throttled']:6.1f} MiB/s ({r['throttled_s']:.1f} s, copy at "
                  f"{r['copy_percent_at_end']}%)", flush=True)
    result: dict[str, Any] = {"machine": info, "copy_ms": times, "cutover_ms": cutovers,
                              "guest_stops": stops,
                              "write_rates_mib_s": rates, "summary": {}}
    print()
    for size, values in times.items():
        if not values:
            continue
        result["summary"][f"copy-{size}"] = s = summary(values)
        print(f"copy-back {int(size):5} MiB: {fmt(s, keys=('min', 'p50', 'max'))}")
    if cutovers:
        result["summary"]["cutover"] = s = summary(cutovers)
        print(f"cut-over          : {fmt(s, keys=('min', 'p50', 'max'))}; guest stops "
              f"in all runs: {stops}")
    for key in ("baseline", "unthrottled", "throttled") if rates else ():
        s = summary([r[key] for r in rates])
        result["summary"][f"write-{key}"] = s
        print(f"write rate {key:11}: {fmt(s, unit='MiB/s', keys=('min', 'p50', 'max'))}")
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
