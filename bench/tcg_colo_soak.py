"""Evidence for the TCG secondary-corruption fix: the Linux test guest protected under
TCG, serving load across failovers, with every guest's serial console scanned.

One configuration per run (NIC model, x-checkpoint-delay). The Linux test guest
(`ftlab.guest`) runs on the given emulator (default: the project's COLO build) as a
COLO pair on two lab hosts (`ftlab.colopair`, `vdsm_ft.colo`). A client in its own
namespace asks the guest's HTTP counter back to back (`ftlab.counterclient`) and keeps
one TCP echo connection open (`ftlab.echoclient`) for the whole run. The run is cut
into FAILOVERS + 1 protected segments of equal checkpoint counts (at least CHECKPOINTS
in all, counted as STOP/RESUME pairs on the primary); between segments one member's
QEMU is SIGKILLed, primary and secondary in turn, the survivor is failed over at once
(`colo.failover_secondary` / `failover_primary`) and re-protected onto the other host.

Afterwards every member's serial console (secondaries each log to their own file) is
scanned for kernel errors (`guest.console_errors`: "is not a head", BUG, Oops, panic,
Call Trace, ...); a secondary's console must also never show a boot ("Linux version").
The run prints one line per segment and a verdict:

    clean: <n> consoles, <n> checkpoints, <n> failovers, no kernel error
    CORRUPTION: <member>: <first error lines>

and exits 1 on corruption or a broken client view (a lost, repeated or unanswered
counter value, or a broken echo connection).

    flock /tmp/vdsm-ft-tests.lock .venv/bin/python bench/tcg_colo_soak.py \\
        --nic virtio --delay 200 [--checkpoints 200] [--failovers 3] [--keep-logs DIR]
        [--failover-after-ms MS] [--reprotect-after-s S] [--trace 'colo_*' ...]
        [--kill-after-checkpoint-ms MS]

By default a kill comes as soon as a segment's checkpoint count is reached (0-500 ms
after a checkpoint); --kill-after-checkpoint-ms puts it that long after the end of the
next checkpoint instead, e.g. late in the interval, where a survivor that is behind the
client loses most.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from colo_lab import BenchError, BenchLab, wait_serving  # noqa: E402
from colo_report import dump_json, machine, print_machine, summary  # noqa: E402

from ftlab import counterclient, echoclient, guest, netns, qemubuild  # noqa: E402
from ftlab.colopair import ColoPair, Member  # noqa: E402
from vdsm_ft import colo  # noqa: E402

GUEST_IP = "10.78.0.10"
CLIENT_IP = "10.78.0.200"
BOOT_TIMEOUT_S = 90.0
AFTER_FAILOVER_S = 3.0          # the survivor serves alone this long before re-protection
CHECKPOINT_BUDGET_S = 5.0       # per checkpoint beyond the delay, for the segment timeout


def _checkpoints(member: Member, cursor: int) -> list[float]:
    """Pauses (ms) of the checkpoints completed on `member` since `cursor`."""
    pauses, stop = [], None
    for event in member.qmp.events(cursor):
        if event.name == "STOP":
            stop = event.qemu_time
        elif event.name == "RESUME" and stop is not None:
            pauses.append((event.qemu_time - stop) * 1000)
            stop = None
    return pauses


def _trace(member: Member, patterns: list[str]) -> None:
    """QEMU trace events on, into the domain's log (the build's "log" trace backend)."""
    for pattern in patterns:
        member.qmp.execute("trace-event-set-state", {"name": pattern, "enable": True})


def _run_segment(pair: ColoPair, primary: Member, host, generation: int, delay_ms: int,
                 target: int, trace: list[str]) -> tuple[Member, list[float], float]:
    secondary, ep = pair.start_secondary(host, primary, generation)
    _trace(secondary, trace)
    t0 = time.monotonic()
    pair.protect(primary, secondary, ep, checkpoint_delay_ms=delay_ms)
    protect_s = time.monotonic() - t0
    cursor = primary.qmp.cursor()
    deadline = time.monotonic() + target * (delay_ms / 1000 + CHECKPOINT_BUDGET_S) + 60
    while len(pauses := _checkpoints(primary, cursor)) < target:
        if time.monotonic() > deadline:
            raise BenchError(f"generation {generation}: only {len(pauses)} of {target} "
                             f"checkpoints within the segment's time budget")
        mode = colo.colo_status(primary.qmp)["mode"]
        if mode != "primary":
            raise BenchError(f"generation {generation}: the primary left COLO (mode "
                             f"{mode}) after {len(pauses)} checkpoints")
        time.sleep(0.5)
    return secondary, pauses, protect_s


def scan(pair: ColoPair) -> list[dict[str, Any]]:
    """Every member's console: its kernel errors, and a secondary's boots."""
    found = []
    for m in pair.members:
        path = pair.console_log(m)
        text = ""
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                text = f.read().decode(errors="replace")
        errors = guest.console_errors(text)
        if m.was_secondary:
            errors += [ln.strip() for ln in text.splitlines() if "Linux version" in ln]
        role = f"secondary gen {m.generation}" if m.was_secondary else "first primary"
        found.append({"member": f"{m.host.name}/{m.name} ({role})", "log": path,
                      "bytes": len(text), "errors": errors})
    return found


def _after_next_checkpoint(primary: Member, ms: int, timeout: float) -> None:
    """Return `ms` after the primary's next RESUME (the end of a checkpoint)."""
    primary.qmp.wait_event("RESUME", timeout, since=primary.qmp.cursor())
    time.sleep(ms / 1000)


def soak(lab: BenchLab, client_ns: str, nic: str, delay_ms: int, checkpoints: int,
         failovers: int, emulator: str, failover_after_ms: int = 0,
         reprotect_after_s: float = AFTER_FAILOVER_S,
         trace: list[str] | None = None,
         kill_after_checkpoint_ms: int | None = None) -> dict[str, Any]:
    pair, serial_log = lab.new_linux_pair(GUEST_IP, nic, emulator)
    primary = pair.start_primary(lab.hosts[0])
    _trace(primary, trace or [])
    boot_s = wait_serving(serial_log, client_ns, GUEST_IP, BOOT_TIMEOUT_S)
    if boot_s is None:
        raise BenchError(f"the Linux guest did not serve within {BOOT_TIMEOUT_S:.0f} s")
    print(f"guest serving {boot_s:.1f} s after domain start ({nic}, TCG)", flush=True)
    client = counterclient.CounterClient(client_ns, GUEST_IP)
    echo = echoclient.EchoClient(client_ns, GUEST_IP)
    per_segment = math.ceil(checkpoints / (failovers + 1))
    free, pauses, gaps, segments = lab.hosts[1], [], [], []
    try:
        for seg in range(failovers + 1):
            secondary, seg_pauses, protect_s = _run_segment(
                pair, primary, free, seg + 1, delay_ms, per_segment, trace or [])
            pauses += seg_pauses
            line = (f"generation {seg + 1}: {primary.host.name} -> {secondary.host.name}, "
                    f"protected in {protect_s:.1f} s, {len(seg_pauses)} checkpoints, "
                    f"pause p50 {summary(seg_pauses)['p50']:.0f} ms")
            if seg == failovers:
                print(line, flush=True)
                segments.append({"protect_s": protect_s, "checkpoints": len(seg_pauses)})
                break
            kill = "primary" if seg % 2 == 0 else "secondary"
            if kill_after_checkpoint_ms is not None:
                _after_next_checkpoint(primary, kill_after_checkpoint_ms,
                                       delay_ms / 1000 + CHECKPOINT_BUDGET_S)
            t_kill = time.monotonic()
            if kill == "primary":
                primary.kill()
                time.sleep(failover_after_ms / 1000)     # as detection + arbitration take
                colo.failover_secondary(secondary.qmp, secondary.layout)
                free, primary = primary.host, secondary
            else:
                secondary.kill()
                time.sleep(failover_after_ms / 1000)
                colo.failover_primary(primary.qmp, primary.layout)
                free = secondary.host
            time.sleep(reprotect_after_s)
            seen = client.snapshot()
            gap = counterclient.gap_ms(seen, t_kill)
            around = [{"t_ms": round((r.t - t_kill) * 1000), "value": r.value,
                       "error": r.error} for r in seen if abs(r.t - t_kill) < 2.0]
            gaps.append({"killed": kill, "gap_ms": gap, "replies_around": around})
            print(f"{line}; {kill} killed, client gap "
                  f"{'none measured' if gap is None else f'{gap:.0f} ms'}", flush=True)
            segments.append({"protect_s": protect_s, "checkpoints": len(seg_pauses),
                             "killed": kill, "gap_ms": gap})
    finally:
        replies = client.stop()
        echoes = echo.stop()
        consoles = scan(pair)
    values = [r.value for r in replies if r.value is not None]
    return {"nic": nic, "delay_ms": delay_ms, "failover_after_ms": failover_after_ms,
            "kill_after_checkpoint_ms": kill_after_checkpoint_ms,
            "reprotect_after_s": reprotect_after_s,
            "boot_s": boot_s, "segments": segments,
            "checkpoints": len(pauses), "pause_ms": summary(pauses) if pauses else None,
            "failovers": len(gaps), "gaps": gaps, "consoles": consoles,
            "requests_ok": len(values), "request_errors": len(replies) - len(values),
            "repeated": len(counterclient.forks(replies)),
            "skipped": sum(b - a - 1 for a, b in zip(values, values[1:]) if b > a + 1),
            "echo": echoclient.fate(echoes),
            "echo_broken": any(e.error for e in echoes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nic", choices=guest.NIC_MODELS, default="virtio")
    parser.add_argument("--delay", type=int, default=200, help="x-checkpoint-delay, ms")
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--failover-after-ms", type=int, default=0,
                        help="wait this long after the kill before failing over (the "
                        "agents' detection and arbitration take ~100-400 ms)")
    parser.add_argument("--reprotect-after-s", type=float, default=AFTER_FAILOVER_S,
                        help="how long the survivor runs alone before re-protection")
    parser.add_argument("--kill-after-checkpoint-ms", type=int,
                        help="kill this long after the end of the primary's next "
                        "checkpoint (default: as soon as the segment's count is reached)")
    parser.add_argument("--trace", action="append", default=[],
                        help="QEMU trace event pattern to turn on in every member, e.g. "
                        "'colo_*' (into the domain logs, kept with --keep-logs)")
    parser.add_argument("--emulator", help="QEMU binary (default: the project's COLO "
                        "build, scripts/build-qemu --variant colo)")
    parser.add_argument("--keep-logs", help="copy every console log into this directory")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    emulator = args.emulator or qemubuild.ft_emulator().path
    info = machine()
    print_machine(info)
    print(f"emulator {emulator}" if args.emulator else qemubuild.describe())
    with BenchLab("s3") as lab:
        client_ns = netns.add_client("s3-client", CLIENT_IP, 1,
                                     wire=netns.netns_name(lab.wire))
        try:
            result = soak(lab, client_ns, args.nic, args.delay, args.checkpoints,
                          args.failovers, emulator, args.failover_after_ms,
                          args.reprotect_after_s, args.trace,
                          args.kill_after_checkpoint_ms)
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                for c in result["consoles"]:
                    if c["log"] and os.path.exists(c["log"]):
                        shutil.copy(c["log"], args.keep_logs)
                for host in lab.hosts:        # the domain logs, with any trace events
                    for log in glob.glob(host.path("log", "qemu", "*.log")):
                        shutil.copy(log, os.path.join(args.keep_logs,
                                                      f"{host.name}-{os.path.basename(log)}"))
        finally:
            netns.delete(client_ns)
    bad = [c for c in result["consoles"] if c["errors"]]
    gaps = ", ".join(f"{g['killed']} {g['gap_ms']:.0f} ms" if g["gap_ms"] is not None
                     else f"{g['killed']} none" for g in result["gaps"])
    print(f"client: {result['requests_ok']} replies, {result['request_errors']} errors, "
          f"{result['repeated']} repeated, {result['skipped']} skipped; gaps: {gaps}")
    print(f"echo connection: {result['echo']}")
    if bad:
        for c in bad:
            print(f"CORRUPTION: {c['member']}: " + " | ".join(c["errors"][:5]))
    else:
        print(f"clean: {len(result['consoles'])} consoles, {result['checkpoints']} "
              f"checkpoints, {result['failovers']} failovers, no kernel error "
              f"({args.nic}, x-checkpoint-delay {args.delay} ms)")
    if args.json:
        dump_json(args.json, {"machine": info, "emulator": emulator, **result})
    client_ok = not (result["request_errors"] or result["repeated"] or result["skipped"]
                     or result["echo_broken"])
    return 0 if not bad and client_ok else 1


if __name__ == "__main__":
    sys.exit(main())
