"""The lab CLI as a user runs it (`python -m ftlab.cli lab ...` as a subprocess), and
snapshots of what a lab leaves on the machine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest

from ftlab import netns
from ftlab.preflight import is_lab_namespace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabCli:
    lab_dir: str
    engine_port: int

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "ftlab.cli", "lab", "--lab-dir", self.lab_dir, *args]
        if args[:1] == ("up",):
            argv += ["--engine-port", str(self.engine_port)]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lab_cli(kvm):
    _no_lab_running()
    parent = tempfile.mkdtemp(prefix="fte2e-", dir="/var/tmp")
    os.chmod(parent, 0o755)              # QEMU (libvirt-qemu) traverses into the lab dir
    cli = LabCli(os.path.join(parent, "lab"), _free_port())
    yield cli
    # Whatever the test did, leave nothing behind.
    cli.run("down", timeout=120)
    os.rmdir(parent)


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _lab_processes(lab_dir: str) -> set[tuple[int, str]]:
    """Processes that belong to a lab: started with the lab dir or a lab module on their
    command line, or living in one of the lab's namespaces."""
    lab_netns = {os.stat(os.path.join(netns.NETNS_DIR, n)).st_ino
                 for n in netns.lab_namespaces() if is_lab_namespace(n)}
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            in_lab_ns = os.stat(f"/proc/{entry}/ns/net").st_ino in lab_netns
        except OSError:
            continue
        if lab_dir in cmd or "ftlab.supervisor" in cmd or in_lab_ns:
            found.add((int(entry), cmd.strip()[:200]))
    return found


@dataclass(frozen=True)
class Snapshot:
    namespaces: frozenset[str]    # the lab's names only: other tests may run beside it
    root_links: frozenset[str]    # bridges, veths, taps of the root namespace
    shm: frozenset[str]
    processes: frozenset[tuple[int, str]]
    lab_dir_exists: bool


def snapshot(lab_dir: str) -> Snapshot:
    return Snapshot(
        namespaces=frozenset(n for n in netns.lab_namespaces() if is_lab_namespace(n)),
        root_links=frozenset(_links()),
        shm=frozenset(n for n in os.listdir("/dev/shm") if is_lab_namespace(n)),
        processes=frozenset(_lab_processes(lab_dir)),
        lab_dir_exists=os.path.exists(lab_dir))


@pytest.fixture
def take_snapshot():
    return snapshot


def _no_lab_running() -> None:
    if any(is_lab_namespace(n) for n in netns.lab_namespaces()):
        pytest.fail("a vdsm-ft lab is already running on this machine (ftlab-wire / "
                    "ftlab-host* namespaces exist); run `vdsm-ft lab down` first")


@pytest.fixture
def no_lab(kvm):
    """For a test that brings up a lab of its own (bench/nemesis.py does)."""
    _no_lab_running()


@pytest.fixture(scope="module")
def lab_up(kvm):
    """One lab for a whole test module, brought up with `vdsm-ft lab up` as a user does
    and removed with `lab down` when the module ends. Module scope: pytest tears it down
    before the next module's tests start, so it never runs beside `lab_cli`'s lab."""
    _no_lab_running()
    parent = tempfile.mkdtemp(prefix="fte2e-", dir="/var/tmp")
    os.chmod(parent, 0o755)
    cli = LabCli(os.path.join(parent, "lab"), _free_port())
    try:
        up = cli.run("up", timeout=700)
        if up.returncode != 0:
            pytest.fail(f"lab up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        yield cli
    finally:
        down = cli.run("down", timeout=180)
        assert down.returncode == 0, f"lab down failed:\n{down.stdout}\n{down.stderr}"
        os.rmdir(parent)
