"""Start libvirtd and virtlogd when none is running (these machines have no systemd).

Only what this module started is stopped again, so a developer's own daemons survive.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

import libvirt

SYSTEM_URI = "qemu:///system"


class LibvirtdError(RuntimeError):
    """libvirtd could not be started or reached."""


def _reachable(uri: str) -> bool:
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def _pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@dataclass
class Libvirtd:
    """The system libvirtd, started here if it was not running."""

    uri: str = SYSTEM_URI
    run_dir: str = "/run/libvirt"
    started: list[str] = field(default_factory=list)

    def ensure(self, timeout: float = 30.0) -> "Libvirtd":
        if _reachable(self.uri):
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        for name in ("virtlogd", "libvirtd"):
            pidfile = os.path.join(self.run_dir, f"{name}.pid")
            pid = _pid(pidfile)
            if pid and os.path.exists(f"/proc/{pid}"):
                continue
            proc = subprocess.run([f"/usr/sbin/{name}", "-d", "-p", pidfile],
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise LibvirtdError(f"{name} failed to start: {proc.stderr.strip()}")
            self.started.append(pidfile)
        deadline = time.monotonic() + timeout
        while not _reachable(self.uri):
            if time.monotonic() > deadline:
                raise LibvirtdError(f"libvirtd did not answer on {self.uri} within {timeout}s; "
                                    "see /var/log/libvirt/libvirtd.log")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for pidfile in reversed(self.started):
            pid = _pid(pidfile)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.started.clear()
