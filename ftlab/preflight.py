"""Pre-flight checks of `vdsm-ft lab up`: everything the lab needs, checked before
anything starts, each failure saying what to install or free."""
from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
from dataclasses import dataclass

from ftlab import netns
from ftlab.vdsmdriver import HOOKS_DIR
from ftlab.labstate import (DEFAULT_LAB_DIR, HOST_PREFIX, MAX_HOSTS, LabPaths, host_name,
                            is_lab_dir, pid_alive, read_pid)
from vdsm_ft.layout import run_dir_refusal

MIN_FREE_MEMORY = 4 << 30

# binary -> Debian package that provides it
BINARIES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "ip": "iproute2",
    "tc": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "openssl": "openssl",
}
# Python module -> how to get it
MODULES = {
    "libvirt": "apt-get install python3-libvirt (and a venv made with "
               "--system-site-packages)",
    "lxml": "apt-get install python3-lxml",
    "ovirtsdk4": "pip install 'vdsm-ft[test]' (ovirt-engine-sdk-python)",
    "etcd3gw": "pip install 'vdsm-ft[test]' (etcd3gw)",
    "qemu.qmp": "pip install 'vdsm-ft[test]' (qemu.qmp)",
}
QEMU_USER = "libvirt-qemu"


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}\n    fix: {self.fix}"


class PreflightFailed(RuntimeError):
    def __init__(self, problems: list[Problem]):
        super().__init__("pre-flight checks failed:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def _which(binary: str) -> str | None:
    return shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", ""))


def free_memory() -> int:
    """MemAvailable, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def lab_leftovers(root: str) -> list[str]:
    """What a previous lab (maybe crashed) left behind."""
    found = [ns for ns in netns.lab_namespaces() if is_lab_namespace(ns)]
    if netns.link_exists(netns.ROOT_LINK):
        found.append(f"link {netns.ROOT_LINK}")
    paths = LabPaths(root)
    for pidfile in (paths.supervisor_pid, paths.poller_pid):
        if pid_alive(read_pid(pidfile)):
            found.append(f"process {read_pid(pidfile)} ({os.path.basename(pidfile)})")
    if os.path.exists(root) and is_lab_dir(root):
        found.append(root)
    found += [os.path.join("/dev/shm", n) for n in shm_dirs()]
    return found


def is_lab_namespace(ns: str) -> bool:
    """The lab's own namespaces: ftlab-wire, ftlab-client and ftlab-host<N> (tests use
    other names)."""
    if ns in (netns.WIRE_NS, netns.CLIENT_NS):
        return True
    suffix = ns[len(netns.PREFIX + HOST_PREFIX):]
    return ns.startswith(netns.PREFIX + HOST_PREFIX) and suffix.isdigit() \
        and 1 <= int(suffix) <= MAX_HOSTS


def shm_dirs() -> list[str]:
    """The agents' overlay dirs of lab hosts (/dev/shm/ftlab-host<N>)."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if is_lab_namespace(n))


def port_busy(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check(root: str, engine_port: int, hosts: int) -> list[Problem]:
    problems: list[Problem] = []
    if os.geteuid() != 0:
        problems.append(Problem("not running as root (the lab makes network namespaces, "
                                "bridges and libvirtds)", "run it with sudo, or as root"))
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        problems.append(Problem("/dev/kvm is missing or not usable: the idle test guest runs "
                                "under KVM (COLO deadlocks under TCG on QEMU 7.2)",
                                "enable virtualization (or nested virtualization) for this "
                                "machine, and load kvm_intel or kvm_amd"))
    missing: dict[str, list[str]] = {}
    for binary, package in BINARIES.items():
        if _which(binary) is None:
            missing.setdefault(package, []).append(binary)
    for package, binaries in sorted(missing.items()):
        problems.append(Problem(f"missing {', '.join(binaries)}",
                                f"apt-get install -y {package}"))
    for module, fix in MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            problems.append(Problem(f"Python module {module} not importable", fix))
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        problems.append(Problem(f"no user {QEMU_USER} (QEMU's user under libvirtd)",
                                "apt-get install -y libvirt-daemon-system"))
    if not os.path.isdir(HOOKS_DIR):
        problems.append(Problem(f"the VDSM hook scripts are not at {HOOKS_DIR}: the lab runs "
                                "from a source checkout",
                                "install with `pip install -e '.[test]'` from the checkout"))
    if not 2 <= hosts <= MAX_HOSTS:
        problems.append(Problem(f"{hosts} hosts asked", f"use 2..{MAX_HOSTS} hosts (3 for "
                                "the demo: a crash, then re-protection onto a third host)"))
    free = free_memory()
    if free < MIN_FREE_MEMORY:
        problems.append(Problem(f"only {free / (1 << 30):.1f} GiB of memory available; the lab "
                                f"needs {MIN_FREE_MEMORY >> 30} GiB",
                                "stop other VMs or services, or use a bigger machine"))
    if port_busy(engine_port):
        problems.append(Problem(f"port {engine_port} on 127.0.0.1 (the fake engine's HTTPS) is "
                                "in use", "free it, or pass --engine-port PORT"))
    blocked = _untraversable(root)
    if blocked:
        problems.append(Problem(f"{blocked} is not searchable by other users, so QEMU "
                                f"(user {QEMU_USER}) cannot reach the lab's disk images",
                                f"chmod o+x {blocked}, or choose another --lab-dir"))
    # Each lab agent's run dir is <lab dir>/hosts/<host>/ft/run (ftlab/hostagent.py).
    too_long = run_dir_refusal(os.path.join(os.path.abspath(root), "hosts",
                                            host_name(hosts), "ft", "run"))
    if too_long:
        problems.append(Problem(f"the lab directory is too long for its agents' run "
                                f"directories: {too_long}", "choose a shorter --lab-dir"))
    if os.path.exists(root) and not is_lab_dir(root):
        problems.append(Problem(f"{root} exists and is not a lab directory",
                                "choose a new path with --lab-dir (lab up makes it; lab down "
                                "removes it)"))
    leftovers = lab_leftovers(root)
    if leftovers:
        problems.append(Problem("a previous lab is still here (or its remains after a crash): "
                                + ", ".join(leftovers),
                                f"run `vdsm-ft lab down{_dir_arg(root)}` first"))
    return problems


def _untraversable(root: str) -> str | None:
    """The first existing ancestor of `root` that others may not search, if any."""
    path = os.path.dirname(root)
    while True:
        if os.path.isdir(path) and not os.stat(path).st_mode & 0o001:
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _dir_arg(root: str) -> str:
    return "" if root == DEFAULT_LAB_DIR else f" --lab-dir {root}"


def run(root: str, engine_port: int, hosts: int) -> None:
    problems = check(root, engine_port, hosts)
    if problems:
        raise PreflightFailed(problems)
