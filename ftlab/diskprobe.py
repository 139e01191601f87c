"""Block-level data checks on a live VM, the tier 1 stand-in for a guest's own writes.

Writes go through HMP `qemu-io` on the guest device's backend, which is the path guest
writes take (device -> quorum -> children). Reads export the quorum node read-only over
NBD on a unix socket and check the pattern with the host's `qemu-io`, whose exit code
says whether the pattern matched; nothing depends on parsing QEMU's log.
"""
from __future__ import annotations

import os
import subprocess
from typing import Any, Protocol

from vdsm_ft.layout import Disk, VmLayout

PROBE_EXPORT = "ft-probe"


class Monitor(Protocol):
    """`vdsm_ft.qmp.Qmp`, or `ftlab.monitor.LibvirtMonitor` when the agent holds QMP."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def hmp(self, command_line: str) -> str: ...


class ProbeError(RuntimeError):
    """The probe itself failed (not: the data did not match)."""


def write_pattern(q: Monitor, disk: Disk, offset: int, length: int, pattern: int) -> None:
    backend = f"/machine/peripheral/{disk.device}/virtio-backend"
    reply = q.hmp(f'qemu-io -d {backend} "write -P {pattern:#x} {offset} {length}"')
    if reply.strip():
        raise ProbeError(f"qemu-io write on {disk.device} failed: {reply.strip()}")


def pattern_matches(q: Monitor, layout: VmLayout, disk: Disk, offset: int, length: int,
                    pattern: int, timeout: float = 30.0) -> bool:
    """True if every byte of [offset, offset+length) on the live VM equals `pattern`."""
    sock = layout.unix_socket(PROBE_EXPORT)
    q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    try:
        q.execute("block-export-add", {"type": "nbd", "id": PROBE_EXPORT,
                                       "node-name": disk.quorum, "name": PROBE_EXPORT,
                                       "writable": False})
        image = f"driver=nbd,server.type=unix,server.path={sock},export={PROBE_EXPORT}"
        proc = subprocess.run(
            ["qemu-io", "-r", "--image-opts", image,
             "-c", f"read -P {pattern:#x} {offset} {length}"],
            capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return True
        if "Pattern verification failed" in proc.stdout:
            return False
        raise ProbeError(f"qemu-io read failed: {proc.stderr.strip() or proc.stdout}")
    finally:
        try:
            q.execute("block-export-del", {"id": PROBE_EXPORT, "mode": "hard"})
        finally:
            q.execute("nbd-server-stop")
            if os.path.exists(sock):
                os.unlink(sock)
