"""COLO checkpoint pause and checkpoint rate at several x-checkpoint-delay values.

One pair of the idle KVM guest (128 MiB RAM, 64 MiB disk, one NIC, no OS: SeaBIOS
waiting, so almost no memory is dirtied between checkpoints) is protected through
`vdsm_ft.colo`, then for each delay:

- `colo.set_checkpoint_delay` on the primary (QEMU checkpoints at once on a change;
  that checkpoint and the first one of the protection are left out),
- a window of WINDOW seconds is recorded from the QMP event logs of both members.

Pause = RESUME minus STOP, each taken from QEMU's own event timestamp, for every
STOP/RESUME pair that lies wholly in the window, on the primary and on the secondary.
Rate = completed checkpoints (primary STOP/RESUME pairs) in the window, times
60 / window; the MIGRATION_PASS count over the same window is printed beside it.

With --tls the pair runs COLO over TLS (lab CA, `[agent] colo_tls_dir`): migration
stream, NBD and the mirror/compare sockets.

With --phases both QEMUs also trace the checkpoint protocol (bench/colo_phases.py), and
each window prints where the pause went on each side, phase by phase.

    .venv/bin/python bench/colo_checkpoints.py [--tls] [--phases] [--json out.json]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import colo_phases
from colo_lab import BenchError, BenchLab
from colo_report import dump_json, fmt, machine, print_machine, summary

from ftlab.colopair import Member
from vdsm_ft import colo
from vdsm_ft.qmp import Qmp

# delay (ms) -> window (s): long enough for a meaningful count, except at 20 s where a
# 90 s window still holds only ~4 checkpoints (the count is small by nature).
WINDOWS = {200: 20.0, 2000: 60.0, 20000: 90.0}
SETTLE_TIMEOUT_S = 30.0


def pauses(q: Qmp, since: int, until: int) -> list[float]:
    """STOP->RESUME durations (ms, QEMU timestamps) wholly within log positions."""
    out, stop = [], None
    for event in q.events(since)[:until - since]:
        if event.name == "STOP":
            stop = event
        elif event.name == "RESUME" and stop is not None:
            out.append((event.qemu_time - stop.qemu_time) * 1000)
            stop = None
    return out


class TraceLog:
    """A member's QEMU log (where its trace events land), read from an offset on."""

    def __init__(self, member: Member) -> None:
        self.path = member.host.path("log", "qemu", f"{member.name}.log")
        colo_phases.enable(member.qmp)

    def offset(self) -> int:
        with open(self.path, "rb") as f:
            return f.seek(0, 2)

    def checkpoints(self, start: int, end: int) -> list[list[colo_phases.Mark]]:
        with open(self.path, "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
        return colo_phases.checkpoints(colo_phases.parse(text.splitlines()))


def measure(pri: Qmp, sec: Qmp, delay_ms: int, window: float,
            logs: list[TraceLog]) -> dict[str, Any]:
    cursor = pri.cursor()
    colo.set_checkpoint_delay(pri, delay_ms)
    # The checkpoint the change triggers is not one of the new period's.
    stop = pri.wait_event("STOP", SETTLE_TIMEOUT_S, since=cursor)
    pri.wait_event("RESUME", SETTLE_TIMEOUT_S, since=stop.seq + 1)
    time.sleep(0.05)   # the secondary's RESUME trails the primary's
    p0, s0 = pri.cursor(), sec.cursor()
    starts = [log.offset() for log in logs]
    time.sleep(window)
    p1, s1 = pri.cursor(), sec.cursor()
    traced = [log.checkpoints(start, log.offset()) for log, start in zip(logs, starts)]
    if colo.colo_status(pri)["mode"] != "primary" or colo.colo_status(sec)["mode"] != "secondary":
        raise BenchError(f"the pair left COLO during the {delay_ms} ms window")
    pri_pauses, sec_pauses = pauses(pri, p0, p1), pauses(sec, s0, s1)
    passes = len([e for e in pri.events(p0)[:p1 - p0] if e.name == "MIGRATION_PASS"])
    return {"delay_ms": delay_ms, "window_s": window, "checkpoints": len(pri_pauses),
            "per_minute": len(pri_pauses) * 60 / window, "migration_passes": passes,
            "primary_pause_ms": pri_pauses, "secondary_pause_ms": sec_pauses,
            "traced": dict(zip(("primary", "secondary"), traced))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every window (e.g. 0.2 for a quick look)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--tls", action="store_true", help="COLO over TLS")
    parser.add_argument("--phases", action="store_true",
                        help="trace the checkpoint protocol and print its phases")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print(f"COLO transport: {'TLS' if args.tls else 'plain TCP'}")
    results = []
    with BenchLab("bc") as lab:
        if args.tls:
            lab.enable_colo_tls()
        pair, primary, secondary = lab.protected(1, delay_ms=2000)
        logs = [TraceLog(primary), TraceLog(secondary)] if args.phases else []
        for delay, window in WINDOWS.items():
            r = measure(primary.qmp, secondary.qmp, delay, window * args.scale, logs)
            traced = r.pop("traced")
            results.append(r)
            print(f"x-checkpoint-delay {delay:5} ms, {r['window_s']:.0f} s window: "
                  f"{r['checkpoints']} checkpoints = {r['per_minute']:.1f}/min "
                  f"({r['migration_passes']} MIGRATION_PASS)", flush=True)
            if not r["primary_pause_ms"]:
                print("  no complete checkpoint in the window: no pause to report")
                continue
            keys = ("p50", "p99", "max")
            print(f"  pause primary:   {fmt(summary(r['primary_pause_ms']), keys=keys)}")
            if r["secondary_pause_ms"]:
                print(f"  pause secondary: {fmt(summary(r['secondary_pause_ms']), keys=keys)}")
            for side, per_checkpoint in traced.items():
                print("\n".join(colo_phases.report(side, per_checkpoint)))
                r[f"{side}_phases"] = {phase.name: phase.ms for phase in
                                       colo_phases.breakdown(per_checkpoint)}
        lab.drop_pair(pair)
    if args.json:
        dump_json(args.json, {"machine": info, "tls": args.tls, "results": results})


if __name__ == "__main__":
    main()
