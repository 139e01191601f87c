"""The lab's network: named network namespaces, the wires between them, and their removal.

Every namespace the lab makes is named `ftlab-<name>`, and the only link it adds to the
root namespace is `ftlab-root`, so `cleanup()` finds everything even after the lab
itself crashed. Bridges live inside a dedicated namespace (`ftlab-wire`), where the
root namespace's br_netfilter/iptables rules cannot drop bridged traffic.

Addresses (used only inside these namespaces, plus `ftlab-root`):
- replication/management network 10.77.0.0/24: root 10.77.0.1, host i 10.77.0.(10+i);
- guest network 10.78.0.0/24: pure L2 between the hosts' guest bridges and clients.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

PREFIX = "ftlab-"
WIRE_NS = PREFIX + "wire"
CLIENT = "client"                    # the demo's client on the guest segment
CLIENT_NS = PREFIX + CLIENT
ROOT_LINK = PREFIX + "root"          # root-namespace end of the management link
REP_BRIDGE = "rep"                   # inside WIRE_NS
GUEST_BRIDGE = "guest"               # inside WIRE_NS
REP_NET = "10.77.0"
GUEST_NET = "10.78.0"
ROOT_ADDRESS = f"{REP_NET}.1"
NETNS_DIR = "/run/netns"
IFNAMSIZ = 15


class NetnsError(RuntimeError):
    """A namespace or link operation failed; the message carries ip's own words."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def netns_name(name: str) -> str:
    full = PREFIX + name
    if not name or "/" in name or len(full) > 64:
        raise NetnsError(f"bad lab namespace name {name!r}")
    return full


def exists(netns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, netns))


def create(netns: str) -> None:
    """Create `netns` (idempotent) with its loopback up."""
    if not exists(netns):
        ip("netns", "add", netns)
    ip("link", "set", "lo", "up", netns=netns)


def link_exists(dev: str, netns: str | None = None) -> bool:
    return ip("link", "show", "dev", dev, netns=netns, check=False).returncode == 0


def veth(name: str, netns: str | None, peer: str, peer_netns: str | None) -> None:
    """A veth pair created directly in its two namespaces (no transient root names)."""
    for dev in (name, peer):
        if len(dev) > IFNAMSIZ:
            raise NetnsError(f"interface name {dev!r} is longer than {IFNAMSIZ} characters")
    if link_exists(name, netns):
        return
    argv = ["link", "add", name] + (["netns", netns] if netns else [])
    argv += ["type", "veth", "peer", "name", peer]
    if peer_netns:
        argv += ["netns", peer_netns]
    ip(*argv)


def bridge(name: str, netns: str) -> None:
    if not link_exists(name, netns):
        ip("link", "add", name, "type", "bridge", netns=netns)
        # No STP delay: a port must forward the moment a VM's tap joins.
        ip("link", "set", name, "type", "bridge", "forward_delay", "0", "stp_state", "0",
           netns=netns)
    ip("link", "set", name, "up", netns=netns)


def attach(dev: str, bridge_name: str, netns: str) -> None:
    ip("link", "set", dev, "master", bridge_name, netns=netns)
    ip("link", "set", dev, "up", netns=netns)


def add_address(dev: str, cidr: str, netns: str | None = None) -> None:
    if cidr.split("/")[0] not in ip("-o", "addr", "show", "dev", dev, netns=netns).stdout:
        ip("addr", "add", cidr, "dev", dev, netns=netns)
    ip("link", "set", dev, "up", netns=netns)


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids(netns: str) -> list[int]:
    """Every process whose network namespace is `netns` (what `ip netns pids` reports)."""
    target = _ns_id(os.path.join(NETNS_DIR, netns))
    if target is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_id(f"/proc/{entry}/ns/net") == target:
            found.append(int(entry))
    return found


def kill_all(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in `netns` until none is left (children may fork meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = pids(netns)
        if not alive:
            return
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {alive} in {netns} survived SIGKILL for {timeout}s")
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete(netns: str) -> None:
    """Kill everything inside `netns`, then remove it (its links and bridges go with it)."""
    if not exists(netns):
        return
    kill_all(netns)
    ip("netns", "delete", netns)


def lab_namespaces() -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(PREFIX))


def wire_up(wire: str = WIRE_NS) -> None:
    """A wire: both bridges; the default wire also gets the root namespace's management
    link (the fake engine and the poller run in the root namespace). Other wires (tests
    running beside a lab) stay unreachable from the root namespace, so their addresses
    cannot clash with the lab's."""
    create(wire)
    bridge(REP_BRIDGE, wire)
    bridge(GUEST_BRIDGE, wire)
    if wire == WIRE_NS:
        veth(ROOT_LINK, None, "root", wire)
        attach("root", REP_BRIDGE, wire)
        add_address(ROOT_LINK, f"{ROOT_ADDRESS}/24")


def join_rep(netns: str, index: int, wire: str = WIRE_NS, dev: str = "eth0") -> str:
    """Link `netns` to the replication network as host `index`; returns its address."""
    address = f"{REP_NET}.{10 + index}"
    veth(dev, netns, f"r{index}", wire)
    attach(f"r{index}", REP_BRIDGE, wire)
    add_address(dev, f"{address}/24", netns=netns)
    return address


def join_guest_bridge(netns: str, index: int, bridge_name: str, wire: str = WIRE_NS,
                      dev: str = "guest0") -> None:
    """A local bridge `bridge_name` in `netns` (where libvirt adds VM taps), wired to the
    shared guest segment."""
    bridge(bridge_name, netns)
    veth(dev, netns, f"g{index}", wire)
    attach(f"g{index}", GUEST_BRIDGE, wire)
    attach(dev, bridge_name, netns)


def add_client(name: str, address: str, index: int, wire: str = WIRE_NS) -> str:
    """A client namespace `ftlab-<name>` on the guest segment (e.g. a test's HTTP
    client); returns its name. Run things in it with `run_in`."""
    netns = netns_name(name)
    create(netns)
    veth("eth0", netns, f"c{index}", wire)
    attach(f"c{index}", GUEST_BRIDGE, wire)
    add_address("eth0", address if "/" in address else f"{address}/24", netns=netns)
    return netns


def run_in(netns: str, argv: list[str], timeout: float = 30.0,
           **kwargs) -> subprocess.CompletedProcess:
    """Run `argv` in `netns` (output captured as text; the caller checks returncode)."""
    return subprocess.run(["ip", "netns", "exec", netns] + list(argv), capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def cleanup() -> list[str]:
    """Remove every lab namespace (killing what runs inside) and the root link.
    Returns what was removed."""
    removed = []
    # Hosts first, the wire last: a host's processes die before its links vanish.
    for netns in sorted(lab_namespaces(), key=lambda n: n == WIRE_NS):
        delete(netns)
        removed.append(netns)
    if link_exists(ROOT_LINK):
        ip("link", "delete", ROOT_LINK)
        removed.append(ROOT_LINK)
    return removed


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _enter(netns: str) -> None:
    fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {netns} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsWorker:
    """Runs callables on one thread that lives in `netns`.

    A network namespace is per thread, so in-process clients (the agent API, the
    arbiter) can talk to hosts on a wire the root namespace cannot reach.
    """

    def __init__(self, netns: str):
        self.netns = netns
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"in-{netns}",
                                        initializer=_enter, initargs=(netns,))

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """`fn()` run on a thread inside `netns`; a socket it makes stays in that namespace,
    whichever thread uses it next (how in-process lab code listens on a host's address)."""
    worker = NetnsWorker(netns)
    try:
        return worker.call(fn)
    finally:
        worker.close()
