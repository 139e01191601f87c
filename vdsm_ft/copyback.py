"""Copy-back: make the VM's storage-domain image current again after a failover
(docs/decisions.md, D2).

A survivor that was the secondary runs on its host's replica; the image the engine names
stays as it was at the failover. Copy-back mirrors the survivor's quorum onto that image
(`blockdev-mirror`, rate-limited, `replaces` the quorum's child), then completes the job,
which swaps the child for the image inside one drained section, and verifies the block
graph. The guest never stops: its vCPUs run and only its disk I/O waits for the swap. Afterwards the survivor's
graph is quorum -> `ft-sd<N>` -> the engine's file or block device, as for a VM
started from the engine XML (there the node is `ft-disk<N>`).

Resume: the mirror job lives in QEMU, not in the agent, so a restarted agent finds it
(`query-jobs`) and keeps waiting; nothing is copied twice. A QEMU that dies mid-copy takes
its job with it: the image is then half old, half new, and only the replica is whole, so
`start` is always a full copy (sync=full), never an incremental one.

Only the winner of the failover may start: the old primary still has the image open for
writing until it is fenced. `old_primary_fenced` is the proof, from the arbiter.
"""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdsm_ft.colo import COMPARE_TIMEOUT_MS, DEFAULT_CHECKPOINT_DELAY_MS, quorum_children
from vdsm_ft.layout import Disk, VmLayout
from vdsm_ft.qmp import Qmp, QmpCommandError

log = logging.getLogger(__name__)

JOB_FMT = "ft-copyback{}"
# The cut-over waits for the mirror to be this close before it pauses the guest, so the
# pause flushes at most this much (at full speed: the throttle is lifted for it).
PIVOT_MAX_REMAINING = 4 << 20
# By THE TIMING RULE (docs/arbiter.md) a side that did not win the generation has killed
# its QEMU before colo-compare's hold time has passed since the fault; an old primary
# whose agent is dead too has stopped its guest at its next checkpoint (QEMU patch 0006,
# docs/qemu.md). The fault precedes the winner's claim. One more second covers clock
# granularity and the kill or stop itself.
FENCE_WINDOW_S = max(COMPARE_TIMEOUT_MS, DEFAULT_CHECKPOINT_DELAY_MS) / 1000 + 1.0


class CopybackError(Exception):
    """The copy-back failed; the message names the step, the disk and QEMU's answer."""


class NotYetSafe(CopybackError):
    """The arbiter does not (yet) prove that the old primary can no longer write."""


@dataclass(frozen=True)
class Target:
    """The engine's image of one disk: where the copy goes."""

    index: int
    image: str
    fmt: str

    @property
    def node(self) -> str:
        """The image's format node (not `ft-disk<N>`: a VM restarted on its replica as a
        primary has that one on the replica)."""
        return Disk(index=self.index, image=self.image, size=0).storage_child

    @property
    def file_node(self) -> str:
        return f"{self.node}-file"

    @property
    def job(self) -> str:
        return JOB_FMT.format(self.index)


@dataclass(frozen=True)
class Progress:
    done: int          # bytes copied (sums every disk's job)
    total: int         # bytes to copy; grows while the guest writes
    ready: bool        # every job is in sync and mirrors each new write

    @property
    def percent(self) -> int:
        if self.total <= 0:
            return 100 if self.ready else 0
        return min(100, int(100 * self.done / self.total))


@dataclass(frozen=True)
class PivotResult:
    cutover_ms: float  # block-job-complete until every job concluded: guest I/O waits
    flushed: int       # bytes left to copy when the cut-over began


def targets(engine_layout: VmLayout) -> tuple[Target, ...]:
    """The engine's images, from `domxml.layout_from_domxml(engine_xml, ...)`."""
    return tuple(Target(d.index, d.image, d.fmt) for d in engine_layout.disks)


def old_primary_fenced(claim: tuple[str, float] | None, me: str, generation: int,
                       now: float | None = None) -> float:
    """Seconds until the old primary is provably fenced (0: it is now).

    `claim` is `Arbiter.live_claim(vm, generation)`. Raises NotYetSafe when this host did
    not win the generation: then the other side may be live and writing.
    """
    if claim is None:
        raise NotYetSafe(f"generation {generation} has no live claim; the copy-back waits "
                         "until this side has won it")
    holder, claimed_at = claim
    if holder != me:
        raise NotYetSafe(f"{holder}, not this host ({me}), won generation {generation}; "
                         "its copy is the live one")
    now = time.time() if now is None else now
    return max(0.0, claimed_at + FENCE_WINDOW_S - now)


def _protocol(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CopybackError(f"the storage-domain image {path} is not reachable from this "
                            f"host ({exc.strerror}); connect the storage domain here, "
                            "then the copy-back retries") from None
    return "host_device" if stat.S_ISBLK(mode) else "file"


def _jobs(q: Qmp) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in q.execute("query-jobs")}


def _node_names(q: Qmp) -> set[str]:
    return {n["node-name"] for n in q.execute("query-named-block-nodes", {"flat": True})}


def _open_target(q: Qmp, t: Target) -> None:
    nodes = _node_names(q)
    if t.file_node in nodes and _filename(q, t.file_node) != t.image:
        raise CopybackError(f"node {t.file_node} has {_filename(q, t.file_node)} open, "
                            f"not the storage-domain image {t.image}")
    try:
        if t.file_node not in nodes:
            q.execute("blockdev-add", {"driver": _protocol(t.image), "node-name": t.file_node,
                                       "filename": t.image})
        if t.node not in nodes:
            q.execute("blockdev-add", {"driver": t.fmt, "node-name": t.node,
                                       "file": t.file_node})
    except QmpCommandError as exc:
        hint = (" (another QEMU, e.g. the old primary, still holds it: the copy-back "
                "never writes beside a live writer)" if "lock" in exc.desc else "")
        raise CopybackError(f"cannot open the storage-domain image {t.image}: "
                            f"{exc.desc}{hint}") from None


def _replaced_child(q: Qmp, disk: Disk, t: Target) -> str | None:
    """The quorum child the copy replaces, or None if the image already is the child."""
    children = list(quorum_children(q, disk.quorum).values())
    if children == [t.node]:
        return None
    if len(children) != 1:
        raise CopybackError(f"quorum {disk.quorum} has children {children}: a copy-back "
                            "needs the survivor's single replica child")
    return children[0]


def start(q: Qmp, layout: VmLayout, to: tuple[Target, ...], rate: int) -> bool:
    """Start (or find running) a mirror of each disk's quorum onto its engine image.

    `rate` in bytes/s, 0 for unlimited. Returns True if every job was already in QEMU
    (an agent restart: resumed, nothing started again). A disk whose quorum is already
    on its image (a cut-over that ended for some disks only) is left as it is.
    """
    jobs = _jobs(q)
    resumed = True
    for disk, t in zip(layout.disks, to):
        job = jobs.get(t.job)
        if job is not None and job["status"] in ("running", "ready", "paused"):
            q.execute("block-job-set-speed", {"device": t.job, "speed": rate})
            continue
        if job is not None:              # concluded or aborted by an earlier run
            q.execute("block-job-dismiss", {"id": t.job})
        child = _replaced_child(q, disk, t)
        if child is None:
            continue
        resumed = False
        _open_target(q, t)
        try:
            # `replaces`: at completion QEMU puts the image where the replica is in the
            # quorum (quorum_recurse_can_replace), in a drained section, no VM stop.
            q.execute("blockdev-mirror", {"job-id": t.job, "device": disk.quorum,
                                          "target": t.node, "sync": "full", "speed": rate,
                                          "replaces": child, "auto-dismiss": False,
                                          "on-target-error": "report"})
        except QmpCommandError as exc:
            raise CopybackError(f"copy-back of disk {disk.index} onto {t.image} did not "
                                f"start: {exc.desc}") from None
    return resumed


def set_rate(q: Qmp, to: tuple[Target, ...], rate: int) -> None:
    for t in to:
        q.execute("block-job-set-speed", {"device": t.job, "speed": rate})


def progress(q: Qmp, to: tuple[Target, ...]) -> Progress:
    jobs = _jobs(q)
    done = total = 0
    ready = True
    for t in to:
        job = jobs.get(t.job)
        if job is None:
            raise CopybackError(f"copy-back job {t.job} is not in QEMU (QEMU restarted?)")
        if job["status"] in ("concluded", "aborting", "null") or job.get("error"):
            raise CopybackError(f"copy-back onto {t.image} ended before it was in sync: "
                                f"{job.get('error', job['status'])}")
        done += job["current-progress"]
        total += job["total-progress"]
        ready = ready and job["status"] == "ready"
    return Progress(done, total, ready)


def wait_ready(q: Qmp, to: tuple[Target, ...], timeout: float,
               on_progress: Callable[[Progress], None] | None = None,
               interval: float = 0.5) -> Progress:
    """Block until every job is READY; report progress every `interval` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        p = progress(q, to)
        if on_progress is not None:
            on_progress(p)
        if p.ready:
            return p
        if time.monotonic() > deadline:
            raise CopybackError(f"copy-back not in sync within {timeout:.0f}s "
                                f"({p.percent}%: {p.done} of {p.total} bytes); raise "
                                "[storage] copyback_rate or the timeout")
        time.sleep(interval)


def _wait_close(q: Qmp, to: tuple[Target, ...], timeout: float) -> None:
    """Let the mirrors catch up with recent writes at full speed, guest still running."""
    set_rate(q, to, 0)
    deadline = time.monotonic() + timeout
    while True:
        p = progress(q, to)
        if p.total - p.done <= PIVOT_MAX_REMAINING or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def pivot(q: Qmp, layout: VmLayout, to: tuple[Target, ...],
          timeout: float = 30.0) -> PivotResult:
    """Cut each quorum over to its engine image, with the guest running.

    No `stop`: a paused domain that VDSM adopts after a failover is reported Paused from
    the survivor's host while the engine still has the VM on the dead one, and the engine
    then destroys it (docs/engine-view.md, "COLO's own pauses"). `block-job-complete`
    copies what is left and swaps the quorum's child in one drained section; a job that
    fails there swaps nothing.
    """
    _wait_close(q, to, timeout)
    before = progress(q, to)
    cursor = q.cursor()
    began = time.monotonic()
    pending = [t for t in to if t.job in _jobs(q)]
    for t in pending:
        q.execute("block-job-complete", {"device": t.job})
    for t in pending:
        q.wait_event("JOB_STATUS_CHANGE", timeout, since=cursor,
                     match=lambda d, j=t.job: d["id"] == j and d["status"] == "concluded")
    took = (time.monotonic() - began) * 1000.0
    jobs = _jobs(q)
    for t in pending:
        q.execute("block-job-dismiss", {"id": t.job})
    for t in pending:
        if jobs[t.job].get("error"):
            raise CopybackError(f"copy-back onto {t.image} failed at the cut-over: "
                                f"{jobs[t.job]['error']}")
    verify(q, layout, to)
    return PivotResult(took, before.total - before.done)


def _filename(q: Qmp, node: str) -> str | None:
    for n in q.execute("query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return n["file"]
    return None


def verify(q: Qmp, layout: VmLayout, to: tuple[Target, ...]) -> None:
    """Each quorum's only child is the engine's image, opened at the engine's path."""
    for disk, t in zip(layout.disks, to):
        children = quorum_children(q, disk.quorum)
        if list(children.values()) != [t.node]:
            raise CopybackError(f"after the pivot quorum {disk.quorum} has children "
                                f"{children}, not only {t.node}")
        opened = _filename(q, t.file_node)
        if opened != t.image:
            raise CopybackError(f"{t.file_node} has {opened!r} open, not the engine's "
                                f"image {t.image}")


def on_engine_image(q: Qmp, layout: VmLayout, to: tuple[Target, ...]) -> bool:
    """True if the pivot already happened (an agent restarted just after it)."""
    try:
        verify(q, layout, to)
    except CopybackError:
        return False
    return True


def drop_replica_nodes(q: Qmp, layout: VmLayout) -> None:
    """Close the replica's nodes (replication, overlays, parent) once nothing uses them,
    so the replica files can be removed."""
    present = _node_names(q)
    for disk in layout.disks:
        # A survivor still in the secondary's domain has the replication chain; one that
        # moved into the VM's own domain (vdsm_ft/identity.py) has ft-disk<N> on it.
        for base in (f"ft-repl{disk.index}", f"ft-active{disk.index}",
                     f"ft-hidden{disk.index}", disk.parent, disk.primary_child):
            for node in (base, f"{base}-file"):
                if node not in present:
                    continue
                try:
                    q.execute("blockdev-del", {"node-name": node})
                except QmpCommandError as exc:  # still in use: leave it, say why
                    log.warning("copy-back: %s stays open: %s", node, exc.desc)


def abort(q: Qmp, to: tuple[Target, ...]) -> None:
    """Cancel a copy-back that must not finish (the VM stops); the image stays stale."""
    jobs = _jobs(q)
    for t in to:
        if t.job in jobs:
            try:
                q.execute("block-job-cancel", {"device": t.job, "force": True})
            except QmpCommandError as exc:
                log.debug("copy-back cancel %s: %s", t.job, exc.desc)


QEMU_IMG = "qemu-img"


def copy_offline(replica_disk: Disk, t: Target, timeout: float) -> None:
    """Copy a replica no QEMU has open onto the engine's image (the survivor's QEMU is
    gone: a crash, or a stop before the copy-back was in sync). Every block is written,
    zeros too (-n: the image exists, so qemu-img does not assume it reads as zeros)."""
    argv = [QEMU_IMG, "convert", "-n", "-f", replica_disk.fmt, "-O", t.fmt,
            replica_disk.image, t.image]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CopybackError(f"the offline copy of {replica_disk.image} onto {t.image} did "
                            f"not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise CopybackError(f"the offline copy of {replica_disk.image} onto {t.image} "
                            f"failed: {proc.stderr.strip()}")
