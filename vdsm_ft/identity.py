"""After a failover, move the survivor into a domain that carries the VM's identity.

The survivor is the secondary's domain (`<vm>-ft-secondary`, a derived UUID, no oVirt
metadata), which the engine can only import as an external VM. libvirt cannot change a
running domain's UUID, so the survivor is live-migrated on its own host, over a unix
socket, into a new domain made from the primary XML (`domxml.identity_xml`): the VM's
name, UUID and metadata, on the same replica images, without the secondary's network
filters. VDSM then adopts it as the VM and the engine moves the VM to this host
(docs/engine-view.md).

The images are shared the way a migration on shared storage shares them: QEMU opens
the destination's nodes inactive (no writes, no image locks) while it waits in
`-incoming`, the source inactivates its nodes (flushed, locks released) when the
migration completes, and only then the destination activates them. The image is never
written by two QEMUs.

The new domain is started running, never paused: a paused domain with the VM's UUID
that VDSM adopts is reported Paused from another host, and the engine destroys it
(docs/engine-view.md). libvirt's start-up `cont` then only arms QEMU's autostart, which
needs the project's QEMU (packaging/qemu/patches/0004-*: plain QEMU 7.2 activates the
images at that `cont`, and fails on the source's locks); the destination runs by itself
when the migration completes.

Two traps (measured by hand; docs/engine-view.md, "After a failover: the survivor becomes
the VM"): the ex-secondary still has the `x-colo` capability, which would make this
migration start a new COLO pair with both copies running, so it is switched off and checked
first; and the replication driver's commit of the overlays into the replica after failover
must have finished, or the destination would open a replica that lacks the last writes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from vdsm_ft.layout import VmLayout
from vdsm_ft.qmp import Qmp, QmpCommandError, QmpError

log = logging.getLogger(__name__)

COMMIT_TIMEOUT = 60.0
MIGRATE_TIMEOUT = 120.0
RUNNING_TIMEOUT = 5.0
# The local copy is memory-to-memory; QEMU's default 128 MiB/s cap would only stretch it.
LOCAL_BANDWIDTH = 8 << 30
# QEMU stops the source for the last pass once it expects to send the rest within this.
DOWNTIME_LIMIT_MS = 50


class IdentityError(Exception):
    """The local migration did not happen; the message names the step and QEMU's answer."""


@dataclass(frozen=True)
class Moved:
    pause_ms: float | None      # the guest's pause: source STOP to destination RESUME
    downtime_ms: float          # QEMU's own figure (source side: stop to stream end)
    total_ms: float             # the migration, first byte to completion


def _wait(what: str, probe: Any, timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise IdentityError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def run_state(q: Qmp) -> str:
    return q.execute("query-status")["status"]


def replication_committed(src: Qmp, layout: VmLayout) -> bool:
    """True once every disk's replication node writes straight to its replica.

    On failover the replication driver commits the active and hidden overlays into the
    replica with an internal job (not in query-jobs); when it ends, the active overlay is
    replaced by the replica in the graph, so the replication node's child is the replica.
    """
    graph = src.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    ids = {n["name"]: n["id"] for n in graph["nodes"]}
    for disk in layout.disks:
        repl = ids.get(f"ft-repl{disk.index}")
        if repl is None:
            raise IdentityError(f"the survivor has no replication node ft-repl{disk.index}: "
                                "it is not an ex-secondary")
        children = {names[e["child"]] for e in graph["edges"] if e["parent"] == repl}
        if children != {disk.parent}:
            return False
    return True


def wait_committed(src: Qmp, layout: VmLayout, timeout: float = COMMIT_TIMEOUT) -> None:
    _wait("the replication commit into the replica",
          lambda: replication_committed(src, layout), timeout)


def start_failure(message: str) -> str:
    """Why the new domain did not start, with the likely cause when QEMU took the
    images' locks at libvirt's start-up `cont` (a QEMU without patch 0004)."""
    if "lock" not in message:
        return f"the new domain did not start: {message}"
    return (f"the new domain did not start: {message}; its QEMU activated the images "
            "while waiting for the migration, so it lacks packaging/qemu/patches/"
            "0004-monitor-cont-in-inmigrate-only-arms-autostart.patch (docs/qemu.md)")


def _capability(q: Qmp, name: str) -> bool:
    return next((c["state"] for c in q.execute("query-migrate-capabilities")
                 if c["capability"] == name), False)


def migrate_local(src: Qmp, dst: Qmp, socket_path: str,
                  timeout: float = MIGRATE_TIMEOUT) -> Moved:
    """Migrate `src` into `dst` (waiting in `-incoming defer`, autostart armed by
    libvirt's start-up `cont`) over `socket_path`, and wait until `dst` runs.

    On failure before the source completed, the source runs on and IdentityError is
    raised; a failure after it completed is raised as IdentityError too, and the caller
    must kill the destination before it resumes the source (`resume_source`).
    """
    state = run_state(dst)
    if state != "inmigrate":
        raise IdentityError(f"the new domain is {state!r}, not waiting in inmigrate")
    src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-colo", "state": False},
        {"capability": "events", "state": True}]})
    if _capability(src, "x-colo"):
        raise IdentityError("x-colo is still on in the survivor: a migration now would "
                            "start a new COLO pair with both copies running")
    dst.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}]})
    saved = src.execute("query-migrate-parameters")
    src.execute("migrate-set-parameters", {"max-bandwidth": LOCAL_BANDWIDTH,
                                           "downtime-limit": DOWNTIME_LIMIT_MS})
    if os.path.lexists(socket_path):
        os.unlink(socket_path)          # left by an attempt that was cut short
    src_cursor, dst_cursor = src.cursor(), dst.cursor()
    try:
        dst.execute("migrate-incoming", {"uri": f"unix:{socket_path}"})
        src.execute("migrate", {"uri": f"unix:{socket_path}"})
        event = src.wait_event("MIGRATION", timeout, since=src_cursor,
                               match=lambda d: d["status"] in ("completed", "failed",
                                                               "cancelled"))
    except QmpError as exc:
        _abort(src, saved)
        raise IdentityError(f"local migration: {exc}") from None
    info = src.execute("query-migrate")
    if event.data["status"] != "completed":
        _abort(src, saved)
        raise IdentityError(f"local migration ended {event.data['status']}: "
                            f"{info.get('error-desc', 'no error given')}")
    try:
        done = dst.wait_event("MIGRATION", RUNNING_TIMEOUT, since=dst_cursor,
                              match=lambda d: d["status"] in ("completed", "failed"))
        if done.data["status"] != "completed":
            raise IdentityError("the new domain could not load the migration stream")
        # A `cont` here would be a second start: QEMU answers a running VM's `cont`
        # with STOP and RESUME events, which libvirt passes on to VDSM.
        resumed = dst.wait_event("RESUME", RUNNING_TIMEOUT, since=dst_cursor)
    except QmpError as exc:
        raise IdentityError(f"the new domain did not run after the migration: {exc}") \
            from None
    stops = src.events(since=src_cursor, name="STOP")
    pause = (resumed.qemu_time - stops[-1].qemu_time) * 1000 if stops else None
    return Moved(pause_ms=pause, downtime_ms=float(info.get("downtime", 0)),
                 total_ms=float(info.get("total-time", 0)))


def _abort(src: Qmp, saved: dict[str, Any]) -> None:
    """The migration failed before completing: the source runs on as it was."""
    for command, args in (("migrate_cancel", None),
                          ("migrate-set-parameters",
                           {k: saved[k] for k in ("max-bandwidth", "downtime-limit")
                            if k in saved})):
        try:
            src.execute(command, args)
        except QmpCommandError as exc:
            log.debug("%s: %s", command, exc)
    try:
        resume_source(src)
    except (IdentityError, QmpError) as exc:
        log.warning("the survivor did not resume after a failed local migration: %s", exc)


def resume_source(src: Qmp) -> None:
    """Run the source again (its images are reactivated by `cont`). Only once the
    destination is known dead: two running copies would both write the replica."""
    _wait("the migration to end", lambda: src.execute("query-migrate").get("status")
          not in ("active", "setup", "device", "pre-switchover", "cancelling"),
          RUNNING_TIMEOUT)
    if run_state(src) != "running":
        src.execute("cont")
    _wait("the survivor running", lambda: run_state(src) == "running", RUNNING_TIMEOUT)
