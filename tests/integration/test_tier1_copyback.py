"""Tier 1: after a failover, the copy-back makes the engine's image current again.

Real COLO between KVM QEMUs started by the lab hosts' libvirtd (same idle guest and
block-level checks as test_tier1_colo). The engine's image sits in host a's directory,
which every lab host reaches at the same path, as hosts reach a storage domain.
"""
from __future__ import annotations

import os
import time

import pytest

from ftlab import guest
from ftlab.colopair import ColoPair, Member
from ftlab.diskprobe import image_matches, image_node, node_matches, write_pattern
from ftlab.monitor import LibvirtMonitor
from tests.integration.test_tier1_colo import (BLOCK, MiB, holds, idle_pair,
                                               protected_pair, three_hosts, write_covered,
                                               write_uncovered)
from vdsm_ft import colo, copyback, domains, domxml, ftvalue

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

THROTTLE = 8 * MiB      # bytes/s: the 64 MiB copy takes seconds, so writes land mid-copy


@pytest.fixture(scope="module")
def hosts(kvm):
    yield from three_hosts("t1cb")


@pytest.fixture
def pair(hosts):
    yield from idle_pair(hosts, "t1cb")


def _targets(pair: ColoPair) -> tuple[copyback.Target, ...]:
    return copyback.targets(domxml.layout_from_domxml(pair.engine_xml, "/"))


def _crash(member: Member) -> None:
    """SIGKILL a member's QEMU and wait until it is gone (its image locks with it:
    the agent's copy-back waits out the fencing window for the same reason)."""
    pid = member.pid()
    member.kill()
    member.qmp.close()
    deadline = time.monotonic() + 10.0
    while domains.process_alive(pid):
        assert time.monotonic() < deadline, "killed QEMU still runs"
        time.sleep(0.05)


def _fail_over_to_b(pair: ColoPair, hosts) -> tuple[Member, list[tuple[int, int]]]:
    """a primary, b secondary; covered writes, one uncovered; a crashes; b takes over.
    Returns b and the (offset, pattern) writes that must survive."""
    a, b = protected_pair(pair, hosts)
    write_covered(a, 0, 0xA1)
    write_covered(a, 1 * MiB, 0xA2)
    lost = write_uncovered(a, 2 * MiB, 0xB2)
    _crash(a)
    assert a.qmp.events(lost, "STOP") == [], "a checkpoint ran after the write"
    colo.failover_secondary(b.qmp, b.layout)
    # The survivor's own writes are acknowledged: nothing else holds the data.
    write_pattern(b.qmp, b.layout, b.layout.disks[0], 3 * MiB, BLOCK, 0xC3)
    return b, [(0, 0xA1), (1 * MiB, 0xA2), (3 * MiB, 0xC3)]


def _writes_during_copy(b: Member, to, covered: list[tuple[int, int]],
                        seen: list[int]) -> None:
    """Overwrite an already-copied block and write new ones while the copy runs;
    `seen` gets the progress read before each write."""
    disk = b.layout.disks[0]
    for offset, pattern in ((0, 0xE0), (4 * MiB, 0xD4), (60 * MiB, 0xD5)):
        p = copyback.progress(b.qmp, to)
        assert not p.ready, f"the copy finished before the write at {offset} ({p})"
        seen.append(p.percent)
        write_pattern(b.qmp, b.layout, disk, offset, BLOCK, pattern)
        covered[:] = [(o, v) for o, v in covered if o != offset] + [(offset, pattern)]
        time.sleep(0.5)


def _start_normally(host, pair: ColoPair) -> LibvirtMonitor:
    """What VDSM does for ft=false: the engine's own XML, its <disk> on the image."""
    xml = pair.engine_xml.replace(">true</ovirt-vm:ft>", ">false</ovirt-vm:ft>")
    # This machine has no /dev/vhost-net; an oVirt host would.
    xml = xml.replace('<driver name="vhost" queues="1" />', '<driver name="qemu" />')
    assert ftvalue.parse(domxml.ft_property(xml)) is False
    conn = host.connect()
    try:
        domains.start(conn, xml)
    finally:
        conn.close()
    return LibvirtMonitor(host.uri, domxml.layout_from_domxml(xml, "/").name)


def test_copy_back_after_primary_crash_then_normal_start_reads_every_covered_write(
        pair, hosts):
    b, covered = _fail_over_to_b(pair, hosts)
    to = _targets(pair)
    image = to[0].image
    assert not image_matches(image, 3 * MiB, BLOCK, 0xC3, fmt=to[0].fmt), \
        "the image should be stale before the copy-back"

    assert copyback.start(b.qmp, b.layout, to, THROTTLE) is False
    seen: list[int] = []
    _writes_during_copy(b, to, covered, seen)
    copyback.wait_ready(b.qmp, to, 120.0, lambda p: seen.append(p.percent), interval=0.2)
    assert len(set(seen)) >= 3 and seen[-1] == 100, seen
    write_pattern(b.qmp, b.layout, b.layout.disks[0], 5 * MiB, BLOCK, 0xF5)   # while READY
    covered.append((5 * MiB, 0xF5))
    cursor = b.qmp.cursor()
    result = copyback.pivot(b.qmp, b.layout, to)
    assert 0 < result.cutover_ms < 1000, result
    # The guest never stopped: VDSM would report a stopped domain Paused, and an adoption
    # then makes the engine destroy the VM (docs/engine-view.md).
    assert b.qmp.events(cursor, "STOP") == [], "the cut-over stopped the guest"

    # The block graph: the quorum's only child is the engine's image, at its path.
    disk = b.layout.disks[0]
    children = colo.quorum_children(b.qmp, disk.quorum)
    assert list(children.values()) == [to[0].node], children
    files = {n["node-name"]: n["file"]
             for n in b.qmp.execute("query-named-block-nodes", {"flat": True})}
    assert files[to[0].file_node] == image
    copyback.drop_replica_nodes(b.qmp, b.layout)
    assert disk.parent not in files or disk.parent not in {
        n["node-name"] for n in b.qmp.execute("query-named-block-nodes", {"flat": True})}
    assert colo.run_state(b.qmp) == "running"

    write_pattern(b.qmp, b.layout, disk, 6 * MiB, BLOCK, 0x16)      # lands on the image directly
    covered.append((6 * MiB, 0x16))
    for offset, pattern in covered:
        assert holds(b, offset, pattern), f"{pattern:#x} at {offset} lost on the survivor"

    b.destroy()
    for offset, pattern in covered:
        assert image_matches(image, offset, BLOCK, pattern, fmt=to[0].fmt), \
            f"the storage-domain image lacks {pattern:#x} at {offset}"
    assert image_matches(image, 2 * MiB, BLOCK, 0x00, fmt=to[0].fmt), \
        "the rolled-back write reached the image"
    assert not image_matches(image, 7 * MiB, BLOCK, 0x16, fmt=to[0].fmt), \
        "negative control: never written"

    mon = _start_normally(hosts[1], pair)
    try:
        node = image_node(mon, image)
        sock = os.path.join(pair._run_dir(hosts[1]), "normal-probe.sock")
        for offset, pattern in covered:
            assert node_matches(mon, sock, node, offset, BLOCK, pattern), \
                f"the normal start reads {offset} without {pattern:#x}"
        assert not node_matches(mon, sock, node, 7 * MiB, BLOCK, 0x16)
    finally:
        conn = hosts[1].connect()
        try:
            domains.destroy(conn, domxml.layout_from_domxml(pair.engine_xml, "/").name)
        finally:
            conn.close()


def test_survivor_qemu_crash_mid_copy_loses_nothing_and_a_restart_copies_again(
        pair, hosts):
    b, covered = _fail_over_to_b(pair, hosts)
    to = _targets(pair)
    copyback.start(b.qmp, b.layout, to, 1 * MiB)
    _writes_during_copy(b, to, covered, [])
    assert not copyback.progress(b.qmp, to).ready
    _crash(b)

    # The replica is the whole truth: every covered write is in it; the image is not.
    replica = b.layout.disks[0].image
    for offset, pattern in covered:
        assert image_matches(replica, offset, BLOCK, pattern), \
            f"the replica lacks {pattern:#x} at {offset} after the crash"

    # Like any start of the last copy: QEMU on the replica, then the copy-back again.
    rerun = ColoPair(guest.idle_guest_xml(
        domxml.layout_from_domxml(pair.engine_xml, "/").name, replica,
        serial_log=hosts[1].path("replica", "rerun.serial"), vm_id=pair.vm_id))
    c = rerun.start_primary(hosts[1])
    try:
        assert copyback.start(c.qmp, c.layout, to, 0) is False, "a dead job resumed"
        copyback.wait_ready(c.qmp, to, 120.0)
        copyback.pivot(c.qmp, c.layout, to)
        copyback.verify(c.qmp, c.layout, to)
    finally:
        c.destroy()
    for offset, pattern in covered:
        assert image_matches(to[0].image, offset, BLOCK, pattern, fmt=to[0].fmt), \
            f"the image lacks {pattern:#x} at {offset}"
    assert not image_matches(to[0].image, 2 * MiB, BLOCK, 0xB2, fmt=to[0].fmt)


def test_copy_back_refused_while_the_old_primary_holds_the_image(pair, hosts):
    """A partitioned old primary that was not fenced still has the image open: the
    copy-back must not write beside it (QEMU's image lock says so)."""
    a, b = protected_pair(pair, hosts)
    to = _targets(pair)
    b.qmp.execute("stop")    # stands in for a secondary cut off from its primary
    with pytest.raises(copyback.CopybackError, match="still holds it"):
        copyback.start(b.qmp, b.layout, to, 0)
