"""Block-level data checks on a live VM, the tier 1 stand-in for a guest's own writes.

Both directions export the quorum node over NBD on a unix socket in the VM's run dir
and run the host's `qemu-io` on it. A write then takes the path guest writes take below
the device (quorum -> children) and, like a guest's, waits for the replica's NBD child
without holding QEMU's main lock. HMP `qemu-io` held it through that wait, so a
checkpoint that needs the lock (patches 0001 and 0006) could not start while the
secondary's NBD export waited for that checkpoint: a deadlock of the harness, not of
COLO, seen once each patch made checkpoints more frequent or earlier. A read's exit
code says whether the pattern matched; nothing depends on parsing QEMU's log.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from typing import Any, Protocol

from vdsm_ft.layout import Disk, VmLayout

PROBE_EXPORT = "ft-probe"


class Monitor(Protocol):
    """`vdsm_ft.qmp.Qmp`, or `ftlab.monitor.LibvirtMonitor` when the agent holds QMP."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def hmp(self, command_line: str) -> str: ...


class ProbeError(RuntimeError):
    """The probe itself failed (not: the data did not match)."""


def write_pattern(q: Monitor, layout: VmLayout, disk: Disk, offset: int, length: int,
                  pattern: int, timeout: float = 30.0) -> None:
    """Write `pattern` over [offset, offset+length) of the live VM's disk, through its
    quorum node; returns once every child has it."""
    with exported(q, layout.unix_socket(PROBE_EXPORT), disk.quorum, writable=True) as image:
        proc = subprocess.run(
            ["qemu-io", "--image-opts", image, "-c",
             f"write -P {pattern:#x} {offset} {length}"],
            capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or f"wrote {length}/{length} bytes" not in proc.stdout:
        raise ProbeError(f"qemu-io write on {disk.quorum} failed: "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")


def guest_device(q: Monitor, disk: Disk) -> str:
    """The QOM path of the guest device on the disk's quorum node (libvirt names the
    device after the engine disk's alias, vdsm_ft/domxml.disks_on_nodes)."""
    for b in q.execute("query-block"):
        if b.get("inserted", {}).get("node-name") == disk.quorum and b.get("qdev"):
            return b["qdev"]
    raise ProbeError(f"no guest device uses block node {disk.quorum}")


def write_pattern_hmp(q: Monitor, disk: Disk, offset: int, length: int,
                      pattern: int) -> None:
    """`write_pattern` through the guest device's own BlockBackend (HMP qemu-io -d),
    for a VM outside COLO only (HMP holds the main lock through the write). Unlike the
    NBD export it attaches nothing to the quorum node: an attach or detach drains the
    node, which wakes a throttled copy-back from its rate-limit sleep."""
    reply = q.hmp(f'qemu-io -d {guest_device(q, disk)} '
                  f'"write -P {pattern:#x} {offset} {length}"')
    if reply.strip():
        raise ProbeError(f"qemu-io write on {disk.quorum} failed: {reply.strip()}")


def pattern_matches(q: Monitor, layout: VmLayout, disk: Disk, offset: int, length: int,
                    pattern: int, timeout: float = 30.0) -> bool:
    """True if every byte of [offset, offset+length) on the live VM equals `pattern`."""
    return node_matches(q, layout.unix_socket(PROBE_EXPORT), disk.quorum, offset, length,
                        pattern, timeout)


def image_node(q: Monitor, image: str) -> str:
    """The format node a VM has on `image` (a VM libvirt built, with its own names)."""
    for n in q.execute("query-named-block-nodes", {"flat": True}):
        if n["file"] == image and n["drv"] not in ("file", "host_device"):
            return n["node-name"]
    raise ProbeError(f"no format node on {image} in the VM")


def image_matches(image: str, offset: int, length: int, pattern: int,
                  fmt: str = "qcow2", timeout: float = 30.0) -> bool:
    """The same check on an image that no QEMU holds open for writing."""
    return _qemu_io_read(["-f", fmt, image], offset, length, pattern, timeout)


def _qemu_io_read(image_args: list[str], offset: int, length: int, pattern: int,
                  timeout: float) -> bool:
    proc = subprocess.run(
        ["qemu-io", "-r", *image_args, "-c", f"read -P {pattern:#x} {offset} {length}"],
        capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0 and "Pattern verification failed" not in proc.stdout:
        return True
    if "Pattern verification failed" in proc.stdout:
        return False
    raise ProbeError(f"qemu-io read failed: {proc.stderr.strip() or proc.stdout}")


def node_matches(q: Monitor, sock: str, node: str, offset: int, length: int,
                 pattern: int, timeout: float = 30.0) -> bool:
    """`pattern_matches` on any block node, exported over NBD on unix socket `sock`."""
    with exported(q, sock, node) as image:
        return _qemu_io_read(["--image-opts", image], offset, length, pattern, timeout)


@contextlib.contextmanager
def exported(q: Monitor, sock: str, node: str, writable: bool = False) -> Iterator[str]:
    """Block node `node` of a live VM, exported over NBD on unix socket `sock` (read-only
    unless `writable`) while the block runs; yields QEMU `--image-opts` that open it."""
    q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    try:
        q.execute("block-export-add", {"type": "nbd", "id": PROBE_EXPORT,
                                       "node-name": node, "name": PROBE_EXPORT,
                                       "writable": writable})
        yield f"driver=nbd,server.type=unix,server.path={sock},export={PROBE_EXPORT}"
    finally:
        try:
            q.execute("block-export-del", {"id": PROBE_EXPORT, "mode": "hard"})
        finally:
            q.execute("nbd-server-stop")
            if os.path.exists(sock):
                os.unlink(sock)
