"""`vdsm-ft lab down`: remove everything a lab made, whether it is healthy or crashed.

It needs nothing from the lab but its directory's pid files and the lab's fixed names
(`ftlab-wire`, `ftlab-host<N>`, the root link `ftlab-root`, `/dev/shm/ftlab-host<N>`), so
it also works after the supervisor died or `lab up` failed half-way. Namespaces of
tests that run beside the lab (other `ftlab-*` names) are left alone.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

from ftlab import netns
from ftlab.labstate import LabPaths, is_lab_dir, pid_alive, read_pid
from ftlab.preflight import is_lab_namespace, shm_dirs

KILL_WAIT = 5.0


class NotALabDir(RuntimeError):
    """`lab down` was pointed at a directory that `lab up` did not make."""


def _stop(pid: int | None) -> bool:
    """SIGTERM, then SIGKILL after KILL_WAIT; True if the process was alive."""
    if not pid_alive(pid):
        return False
    assert pid is not None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return True


def lab_down(root: str) -> list[str]:
    """Remove the lab in `root`; returns what was removed, one item each."""
    if os.path.exists(root) and not is_lab_dir(root):
        raise NotALabDir(f"{root} is not a lab directory (no lab.json, supervisor.pid or "
                         "logs/); nothing was touched")
    removed: list[str] = []
    paths = LabPaths(root)
    # The supervisor first, so nothing restarts what is being removed.
    for name, pidfile in (("supervisor", paths.supervisor_pid), ("poller", paths.poller_pid)):
        pid = read_pid(pidfile)
        if _stop(pid):
            removed.append(f"{name} process {pid}")
    # Hosts before the wire: a host's processes die before its links vanish.
    for ns in sorted((n for n in netns.lab_namespaces() if is_lab_namespace(n)),
                     key=lambda n: n == netns.WIRE_NS):
        netns.delete(ns)
        removed.append(f"namespace {ns} and everything in it")
    if netns.link_exists(netns.ROOT_LINK):
        netns.ip("link", "delete", netns.ROOT_LINK)
        removed.append(f"link {netns.ROOT_LINK}")
    for name in shm_dirs():
        shutil.rmtree(os.path.join("/dev/shm", name), ignore_errors=True)
        removed.append(f"/dev/shm/{name}")
    if os.path.isdir(root):
        shutil.rmtree(root)
        removed.append(root)
    return removed
