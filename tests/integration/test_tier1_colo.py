"""Tier 1: real COLO between two KVM QEMUs started by libvirtd from the generated XML.

The guest is the idle one (firmware, no OS): nested KVM here cannot run a Linux guest at
speed, and TCG deadlocks COLO (docs/colo-facts.md, "What this lab's machines run").
Data is checked at the block layer: host-side `qemu-io` writes go through the primary's
quorum node, the path guest writes take. A write counts as acknowledged once a
checkpoint has completed after it; a write after the last checkpoint on a primary that
dies must be rolled back on the survivor.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from ftlab import guest, netns
from ftlab.colopair import ColoPair, Member
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.host import LabHost
from vdsm_ft import colo, copyback
from vdsm_ft.qmp import QmpTimeout

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BLOCK = 64 * 1024
MiB = 1 << 20


def three_hosts(prefix: str) -> Iterator[list[LabHost]]:
    """Lab hosts `<prefix>-a`, `-b`, `-c` on wire `<prefix>-wire`, removed afterwards."""
    wire = f"{prefix}-wire"
    base = tempfile.mkdtemp(prefix=f"ftlab-{prefix}-", dir="/tmp")
    os.chmod(base, 0o755)
    made = [LabHost(f"{prefix}-{n}", i + 1, base, wire=wire).up()
            for i, n in enumerate("abc")]
    yield made
    for h in made:
        h.down()
    netns.delete(netns.netns_name(wire))
    shutil.rmtree(base, ignore_errors=True)


def idle_pair(hosts: list[LabHost], prefix: str, qemu: str | None = None
              ) -> Iterator[ColoPair]:
    """A fresh idle VM whose engine XML is what oVirt would send, disk on host a; both
    members on `qemu` (default: the lab's choice, ftlab.qemubuild)."""
    vm_id = str(uuid.uuid4())
    disk = guest.install_disk(guest.build_idle_disk(64 * MiB),
                              hosts[0].path("images", f"{vm_id}.qcow2"))
    # SeaBIOS logs to the serial port; both members write the same file, which nothing
    # reads.
    xml = guest.idle_guest_xml(f"{prefix}-{vm_id[:8]}", disk, mac=guest.guest_mac(1),
                               serial_log=hosts[0].path("images", f"{vm_id}.serial"),
                               vm_id=vm_id)
    made = ColoPair(xml, qemu)
    yield made
    made.destroy_all()
    os.unlink(disk)


@pytest.fixture(scope="module")
def hosts(kvm):
    yield from three_hosts("t1")


@pytest.fixture
def pair(hosts):
    yield from idle_pair(hosts, "t1")


def _checkpoint_after(member: Member, cursor: int, timeout: float = 10.0) -> None:
    """Wait until a whole checkpoint (STOP then RESUME) began after `cursor`."""
    try:
        stop = member.qmp.wait_event("STOP", timeout, since=cursor)
        member.qmp.wait_event("RESUME", timeout, since=stop.seq + 1)
    except QmpTimeout as e:
        # A rare CI failure had only "no STOP event": say what COLO was doing.
        migrate = member.qmp.execute("query-migrate")
        raise AssertionError(
            f"{e}; colo {colo.colo_status(member.qmp)}, migration "
            f"{migrate.get('status')} {migrate.get('error-desc', '')}, events since: "
            f"{[(ev.name, ev.data) for ev in member.qmp.events(cursor)]}") from e


def write_covered(member: Member, offset: int, pattern: int) -> None:
    """A write that a completed checkpoint has covered: acknowledged."""
    cursor = member.qmp.cursor()
    write_pattern(member.qmp, member.layout, member.layout.disks[0], offset, BLOCK, pattern)
    _checkpoint_after(member, cursor)


def write_uncovered(member: Member, offset: int, pattern: int) -> int:
    """A write just after a checkpoint ended; returns the cursor to prove none followed."""
    member.qmp.wait_event("RESUME", 10.0, since=member.qmp.cursor())
    cursor = member.qmp.cursor()
    write_pattern(member.qmp, member.layout, member.layout.disks[0], offset, BLOCK, pattern)
    return cursor


def holds(member: Member, offset: int, pattern: int) -> bool:
    return pattern_matches(member.qmp, member.layout, member.layout.disks[0], offset,
                           BLOCK, pattern)


def protected_pair(pair: ColoPair, hosts, delay_ms: int = 2000
                   ) -> tuple[Member, Member]:
    primary = pair.start_primary(hosts[0])
    secondary, ep = pair.start_secondary(hosts[1], primary, generation=1)
    pair.protect(primary, secondary, ep, checkpoint_delay_ms=delay_ms)
    return primary, secondary


def test_protect_reaches_protected_with_replication_and_checkpoints(pair, hosts):
    primary, secondary = protected_pair(pair, hosts, delay_ms=200)

    assert colo.colo_status(primary.qmp)["mode"] == "primary"
    assert colo.colo_status(secondary.qmp)["mode"] == "secondary"
    disk = primary.layout.disks[0]
    assert colo.quorum_children(primary.qmp, disk.quorum) == {
        "children.0": disk.primary_child, "children.1": disk.nbd_node}
    cursor = primary.qmp.cursor()
    time.sleep(2.0)
    passes = [e.data["pass"] for e in primary.qmp.events(cursor, "MIGRATION_PASS")]
    assert len(passes) >= 3, passes
    assert passes == sorted(passes) and len(set(passes)) == len(passes)


_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def connected_tcp_nagle(pid: int) -> dict[tuple[int, int], int]:
    """(local port, remote port) -> TCP_NODELAY of each connected TCP socket QEMU `pid`
    holds, read from a copy of its fd (pidfd_getfd: the option lives on the socket)."""
    found: dict[tuple[int, int], int] = {}
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            copy = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            assert copy >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=copy)
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                        sock.type == socket.SOCK_STREAM:
                    try:
                        remote = sock.getpeername()[1]
                    except OSError:      # a listener
                        continue
                    found[(sock.getsockname()[1], remote)] = sock.getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def test_every_colo_connection_has_nagle_off_whichever_qemu_runs(pair, hosts):
    """A checkpoint is a chain of small messages and the secondary's output is small
    packets: with Nagle on, each waits out the peer's 40 ms delayed ACK
    (docs/benchmarks.md). The migration socket is the agent's (vdsm_ft/migsocket.py),
    the others QEMU's own, asked for with nodelay."""
    primary, secondary = protected_pair(pair, hosts)
    ep = pair.endpoints(primary, hosts[1], 1)
    colo_ports = {ep.migration_port, ep.nbd_port, *ep.mirror_ports, *ep.compare_ports}
    links = 1 + len(primary.layout.disks) + len(ep.mirror_ports) + len(ep.compare_ports)
    for member in (primary, secondary):
        deadline = time.monotonic() + 5.0   # the secondary's chardevs reconnect each 1 s
        while True:
            sockets = connected_tcp_nagle(member.pid())
            colo_links = {k: v for k, v in sockets.items() if colo_ports & set(k)}
            if len(colo_links) == links or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(colo_links) == links, sockets
        assert ep.migration_port in {p for k in colo_links for p in k}, sockets
        assert all(colo_links.values()), f"{member.name}: Nagle on at {colo_links}"


def test_primary_killed_secondary_takes_over_with_checkpointed_data(pair, hosts):
    primary, secondary = protected_pair(pair, hosts)
    write_covered(primary, 0, 0xA1)
    cursor = write_uncovered(primary, 1 * MiB, 0xB2)

    primary.kill()
    assert primary.qmp.events(cursor, "STOP") == [], "a checkpoint ran after the write"
    colo.failover_secondary(secondary.qmp, secondary.layout)

    status = colo.colo_status(secondary.qmp)
    assert (status["mode"], status["last-mode"]) == ("none", "secondary")
    assert colo.run_state(secondary.qmp) == "running"
    assert holds(secondary, 0, 0xA1), "an acknowledged write was lost"
    assert not holds(secondary, 1 * MiB, 0xB2), "an unacknowledged write survived"
    assert holds(secondary, 1 * MiB, 0x00), "rolled-back region is not as before"
    assert not holds(secondary, 2 * MiB, 0xA1), "negative control: never written"


def test_secondary_killed_primary_carries_on_and_later_writes_land(pair, hosts):
    primary, secondary = protected_pair(pair, hosts)
    write_covered(primary, 0, 0xC3)

    secondary.kill()
    colo.failover_primary(primary.qmp, primary.layout)

    status = colo.colo_status(primary.qmp)
    assert (status["mode"], status["last-mode"]) == ("none", "primary")
    assert colo.run_state(primary.qmp) == "running"
    disk = primary.layout.disks[0]
    assert colo.quorum_children(primary.qmp, disk.quorum) == {
        "children.0": disk.primary_child}
    write_pattern(primary.qmp, primary.layout, disk, 3 * MiB, BLOCK, 0xD4)
    assert holds(primary, 0, 0xC3)
    assert holds(primary, 3 * MiB, 0xD4)
    assert not holds(primary, 4 * MiB, 0xD4), "negative control: never written"


def test_a_primary_cut_off_with_nobody_to_fail_it_over_stops_at_its_next_checkpoint(
        pair, hosts):
    """A primary whose link to the secondary is cut (no RST: a blackhole) and whose agent
    is dead, so that nobody kills it or sends x-colo-lost-heartbeat. Its vCPUs must stop
    by its next checkpoint and stay stopped: the survivor's copy-back onto the image this
    primary opened starts copyback.FENCE_WINDOW_S after the claim, and a guest that still
    ran would write that image meanwhile (patch 0006, docs/qemu.md experiment 20)."""
    primary, secondary = protected_pair(pair, hosts, delay_ms=colo.DEFAULT_CHECKPOINT_DELAY_MS)
    write_covered(primary, 0, 0xE1)
    wire, port = hosts[0].wire, f"r{hosts[0].index}"
    cursor = primary.qmp.cursor()
    netns.ip("link", "set", port, "down", netns=wire)
    try:
        cut = time.monotonic()
        # Events, not query-status: the stop's flush waits on the NBD child, with the
        # BQL, until a yank (the agent's first failover step, out of band) cuts it.
        bound = colo.DEFAULT_CHECKPOINT_DELAY_MS / 1000 + 1.0
        time.sleep(copyback.FENCE_WINDOW_S + 1.0)
        # A checkpoint that ended just as the link went down may show a RESUME; the
        # last word must be a STOP, within the checkpoint delay of the cut.
        last = [e for e in primary.qmp.events(cursor) if e.name in ("STOP", "RESUME")]
        assert last and last[-1].name == "STOP", \
            f"the cut-off primary runs: {[(e.name, e.received - cut) for e in last]}"
        assert last[-1].received - cut < bound, last[-1].received - cut
        assert primary.qmp.execute_oob("query-yank") is not None   # QEMU is alive
    finally:
        netns.ip("link", "set", port, "up", netns=wire)
    # A failover still brings it back: the checkpoint's stop is COLO's to end.
    secondary.kill()
    colo.failover_primary(primary.qmp, primary.layout)
    assert colo.run_state(primary.qmp) == "running"
    assert holds(primary, 0, 0xE1)


def test_reprotect_twice_a_to_b_to_c(pair, hosts):
    a_host, b_host, c_host = hosts
    a, b = protected_pair(pair, hosts)
    write_covered(a, 0, 0x11)
    lost = write_uncovered(a, 1 * MiB, 0x22)
    a.kill()
    assert a.qmp.events(lost, "STOP") == []
    colo.failover_secondary(b.qmp, b.layout)
    assert holds(b, 0, 0x11) and not holds(b, 1 * MiB, 0x22)

    # B, now the only copy, takes a write unprotected, then protects onto C.
    write_pattern(b.qmp, b.layout, b.layout.disks[0], 2 * MiB, BLOCK, 0x33)
    c, ep = pair.start_secondary(c_host, b, generation=2)
    pair.protect(b, c, ep)
    assert colo.colo_status(b.qmp)["mode"] == "primary"
    assert colo.colo_status(c.qmp)["mode"] == "secondary"
    write_covered(b, 3 * MiB, 0x44)
    lost = write_uncovered(b, 4 * MiB, 0x55)
    b.kill()
    assert b.qmp.events(lost, "STOP") == []
    colo.failover_secondary(c.qmp, c.layout)

    status = colo.colo_status(c.qmp)
    assert (status["mode"], status["last-mode"]) == ("none", "secondary")
    for offset, pattern in ((0, 0x11), (2 * MiB, 0x33), (3 * MiB, 0x44)):
        assert holds(c, offset, pattern), f"acknowledged {pattern:#x} lost on C"
    assert not holds(c, 1 * MiB, 0x22) and not holds(c, 4 * MiB, 0x55)
    assert not holds(c, 5 * MiB, 0x11), "negative control: never written"
