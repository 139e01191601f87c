"""Where a lab keeps its files, and `lab.json`, the state that every `vdsm-ft lab`
command reads.

The supervisor writes `lab.json` (atomically, mode 0644: it names files but holds no
secret). The engine password lives only in `engine-password` (0600) and in the
poller's 0600 settings file.

    <lab dir>/lab.json            state: endpoints, pids, paths (LabState)
    <lab dir>/supervisor.pid      the supervisor process (fake engine, VDSM stand-ins)
    <lab dir>/poller.pid          the poller process
    <lab dir>/control.sock        the supervisor's control socket (0600)
    <lab dir>/engine-password     the engine admin password (0600)
    <lab dir>/hosts/<host>/       each lab host (ftlab.host.LabHost)
    <lab dir>/pki/                the lab CA, host and poller certificates; pki/etcd/ etcd's
                                  certificates and its users' passwords (0600 files)
    <lab dir>/poller.conf         the poller's settings (0600: it holds the password)
    <lab dir>/etcd/  engine/  cache/  logs/
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

DEFAULT_LAB_DIR = "/var/lib/vdsm-ft-lab"
LAB_DIR_ENV = "VDSM_FT_LAB_DIR"
HOST_PREFIX = "host"                 # lab hosts are host1, host2, ... (netns ftlab-host1 ...)
DEFAULT_HOSTS = 3
MAX_HOSTS = 9
DEFAULT_ENGINE_PORT = 8443
ENGINE_USER = "admin@internal"
HOOK_NAME = "50_ft"                  # the script name in hooks/<point>/ that VDSM reports
# What the engine keeps back on each lab host for the host itself: oVirt's default
# vds_static.reserved_mem (321 MiB), not the fake engine's 1 GiB, so that a share of a
# small machine still holds the demo's VMs.
HOST_RESERVED_MEMORY = 321 << 20


def host_memory(hosts: int, meminfo: str = "/proc/meminfo") -> int:
    """The memory (bytes) each of `hosts` lab hosts advertises to the engine: an equal
    share of this machine's MemTotal. The lab hosts share one machine, so each claims
    only its part, and placement's 2x-VM-memory rule (engine_plugin/placement.py) meets
    the machine's real limits instead of a figure no VM count here could reach."""
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 // hosts
    raise LabStateError(f"{meminfo} has no MemTotal line")


class LabStateError(RuntimeError):
    """No lab here, or its state file is unreadable."""


def lab_dir(explicit: str | None = None) -> str:
    return os.path.abspath(explicit or os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


def host_name(index: int) -> str:
    return f"{HOST_PREFIX}{index}"


@dataclass
class HostInfo:
    name: str
    index: int
    address: str
    netns: str
    uri: str
    dir: str
    agent_config: str
    run_dir: str


@dataclass
class LabState:
    state: str                       # starting | ready | failed
    lab_dir: str
    error: str = ""
    hosts: list[HostInfo] = field(default_factory=list)
    engine_url: str = ""
    engine_user: str = ENGINE_USER
    engine_ca: str = ""              # the engine's CA, for ovirtsdk4's ca_file
    password_file: str = ""
    lab_ca: str = ""                 # the lab CA (agents' mutual TLS)
    client_cert: str = ""            # a client certificate of the lab CA (the poller's)
    client_key: str = ""
    etcd_endpoints: list[str] = field(default_factory=list)
    supervisor_pid: int = 0
    poller_pid: int = 0
    control_socket: str = ""
    started_at: float = 0.0

    def host(self, name: str) -> HostInfo:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabStateError(f"no lab host {name!r}; the lab has "
                            f"{', '.join(h.name for h in self.hosts)}")


class LabPaths:
    """The files of the lab in `root` (see the module docstring)."""

    def __init__(self, root: str):
        self.root = root
        self.state = os.path.join(root, "lab.json")
        self.supervisor_pid = os.path.join(root, "supervisor.pid")
        self.poller_pid = os.path.join(root, "poller.pid")
        self.control = os.path.join(root, "control.sock")
        self.password = os.path.join(root, "engine-password")
        self.poller_conf = os.path.join(root, "poller.conf")
        self.hosts = os.path.join(root, "hosts")
        self.pki = os.path.join(root, "pki")
        self.etcd = os.path.join(root, "etcd")
        self.engine = os.path.join(root, "engine")
        self.cache = os.path.join(root, "cache")
        self.logs = os.path.join(root, "logs")


def is_lab_dir(root: str) -> bool:
    """True if `root` was made by `lab up` (so `lab down` may remove it)."""
    paths = LabPaths(root)
    return any(os.path.exists(p) for p in (paths.state, paths.supervisor_pid, paths.logs))


def write_state(state: LabState) -> None:
    paths = LabPaths(state.lab_dir)
    tmp = paths.state + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(state), f, indent=2)
    os.replace(tmp, paths.state)


def read_state(root: str) -> LabState:
    path = LabPaths(root).state
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LabStateError(f"no lab in {root} (no {path}); run `vdsm-ft lab up` first") \
            from None
    except (OSError, ValueError) as e:
        raise LabStateError(f"cannot read {path}: {e}; run `vdsm-ft lab down` to clear "
                            "the remains") from None
    hosts = [HostInfo(**h) for h in data.pop("hosts", [])]
    return LabState(hosts=hosts, **data)


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def write_pid(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(f"{pid}\n")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has exited; only its parent has not reaped it yet.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
