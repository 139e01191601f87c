"""Where a COLO checkpoint's pause goes, from QEMU's own trace events.

Both members' QEMUs get a few trace events switched on over QMP (`trace-event-set-state`;
QEMU 7.2's `log` backend, which Debian's and the project's builds use, then writes each
event to QEMU's stderr, which libvirt keeps in `/var/log/libvirt/qemu/<domain>.log`, as
`<tid>@<seconds>.<microseconds>:<event> <args>` because libvirt passes
`-msg timestamp=on`). The events are the checkpoint protocol's marks in
`migration/colo.c` (`colo_do_checkpoint_transaction` on the primary,
`colo_incoming_process_checkpoint` on the secondary) and the RAM phases beside them.

One checkpoint on one side is the run of marks that ends at its `stop => run` change;
its phases are the gaps between successive marks, named "mark -> next mark". A phase
after the side's `run => stop` mark is paid inside the guest's pause; the rest are not
(Debian's 7.2 asks the secondary before it stops the primary; the project's build stops
first, patch 0006 in docs/qemu.md).
"""
from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Iterable

from vdsm_ft.qmp import Qmp

# The marks; the repeated per-section loadvm event only counts at its EOF section
# (section type 0), which ends the RAM stream and, later, the device state.
TRACE_EVENTS = ("colo_vm_state_change", "colo_send_message", "colo_receive_message",
                "colo_flush_ram_cache_begin", "colo_flush_ram_cache_end",
                "savevm_state_complete_precopy", "migration_bitmap_sync_start",
                "migration_bitmap_sync_end", "qemu_loadvm_state_section")

_LINE = re.compile(r"^\d+@(\d+)\.(\d{6}):(\w+) ?(.*)$")
_QUOTED = re.compile(r"'([^']*)'")
STOP_MARK, RUN_MARK = "run => stop", "stop => run"

# What each phase of the checkpoint protocol does, from migration/colo.c in 7.2.
MEANING = {
    "receive checkpoint-reply -> send vmstate-send": "primary's disk replication checkpoint",
    "send vmstate-send -> savevm complete": "primary saves device state to its buffer",
    "savevm complete -> bitmap sync": "RAM save begins",
    "bitmap sync -> bitmap synced": "dirty bitmap sync",
    "bitmap synced -> send vmstate-size": "dirty RAM saved and sent",
    "send vmstate-size -> receive vmstate-received":
        "device state sent; secondary finishes its RAM load and reads it",
    "receive vmstate-received -> receive vmstate-loaded":
        "compare notified; secondary flushes its RAM cache, loads devices, resets overlays",
    "receive vmstate-loaded -> stop => run": "primary's vm_start",
    "send checkpoint-request -> receive checkpoint-reply": "round trip; secondary stops",
    "run => stop -> send checkpoint-reply": "secondary's vm_stop",
    "receive vmstate-send -> loadvm EOF": "secondary loads the RAM stream into its cache",
    "loadvm EOF -> receive vmstate-size": "RAM stream done",
    "receive vmstate-size -> send vmstate-received": "secondary reads the device state",
    "send vmstate-received -> flush RAM cache": "",
    "flush RAM cache -> RAM cache flushed": "secondary copies dirty pages into guest RAM",
    "RAM cache flushed -> loadvm EOF": "secondary loads device state",
    "loadvm EOF -> stop => run":
        "secondary resets its active and hidden overlays, notifies its filters, vm_start",
}


@dataclasses.dataclass(frozen=True)
class Mark:
    at: float          # seconds, QEMU's gettimeofday
    name: str


def enable(qmp: Qmp) -> None:
    """Switch the marks' trace events on in a running QEMU."""
    for event in TRACE_EVENTS:
        qmp.execute("trace-event-set-state", {"name": event, "enable": True})


def _mark_name(event: str, args: str) -> str | None:
    quoted = _QUOTED.findall(args)
    if event == "colo_vm_state_change" and len(quoted) == 2:
        return f"{quoted[0]} => {quoted[1]}"
    if event in ("colo_send_message", "colo_receive_message") and quoted:
        return f"{event.split('_')[1]} {quoted[0]}"
    if event == "qemu_loadvm_state_section":
        return "loadvm EOF" if args.strip() == "0" else None
    return {"colo_flush_ram_cache_begin": "flush RAM cache",
            "colo_flush_ram_cache_end": "RAM cache flushed",
            "savevm_state_complete_precopy": "savevm complete",
            "migration_bitmap_sync_start": "bitmap sync",
            "migration_bitmap_sync_end": "bitmap synced"}.get(event)


def parse(lines: Iterable[str]) -> list[Mark]:
    """The marks in a QEMU log, in order; other lines are skipped."""
    marks = []
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            continue
        name = _mark_name(m.group(3), m.group(4))
        if name is not None:
            marks.append(Mark(int(m.group(1)) + int(m.group(2)) / 1e6, name))
    return marks


def checkpoints(marks: list[Mark]) -> list[list[Mark]]:
    """The marks of each whole checkpoint: from the first mark after a `stop => run`
    up to and including the next one. The marks before the first `stop => run` are
    dropped, since that checkpoint may have begun before tracing was on."""
    out: list[list[Mark]] = []
    current: list[Mark] | None = None
    for mark in marks:
        if current is not None:
            current.append(mark)
        if mark.name == RUN_MARK:
            if current:
                out.append(current)
            current = []
    return out


@dataclasses.dataclass
class Phase:
    name: str
    in_pause: bool
    ms: list[float]


def breakdown(per_checkpoint: list[list[Mark]]) -> list[Phase]:
    """Each phase's durations (ms) over the checkpoints, in protocol order."""
    phases: dict[str, Phase] = {}
    for marks in per_checkpoint:
        paused = False
        for before, after in zip(marks, marks[1:]):
            paused = paused or before.name == STOP_MARK
            name = f"{before.name} -> {after.name}"
            phase = phases.setdefault(name, Phase(name, paused, []))
            phase.ms.append((after.at - before.at) * 1000)
    return list(phases.values())


def pause_ms(marks: list[Mark]) -> float | None:
    """`run => stop` to `stop => run` of one checkpoint, from the trace."""
    stops = [m.at for m in marks if m.name == STOP_MARK]
    return (marks[-1].at - stops[0]) * 1000 if stops else None


def report(side: str, per_checkpoint: list[list[Mark]]) -> list[str]:
    """Printable lines: each phase's p50 and max, its share of the p50 pause."""
    pauses = [p for p in map(pause_ms, per_checkpoint) if p is not None]
    if not pauses:
        return [f"  {side}: no whole traced checkpoint"]
    total = statistics.median(pauses)
    lines = [f"  {side}: {len(pauses)} checkpoints, traced pause p50 {total:.2f} ms"]
    for phase in breakdown(per_checkpoint):
        p50 = statistics.median(phase.ms)
        share = f"{100 * p50 / total:5.1f} %" if phase.in_pause else "  (run)"
        meaning = MEANING.get(phase.name, "")
        lines.append(f"    {p50:7.2f} ms p50 {max(phase.ms):7.2f} max {share}  "
                     f"{phase.name}" + (f"  [{meaning}]" if meaning else ""))
    return lines
