"""The agents copy back by themselves after a failover (vdsm_ft.copyback): real agents in
lab hosts, real etcd, real COLO under KVM with the idle guest, data checked at the block
layer. The copy is throttled ([storage] copyback_rate) so that it is caught mid-way. It
runs after the survivor moved into the VM's own domain (vdsm_ft/identity.py), so the
survivor is addressed by the VM's name.
"""
from __future__ import annotations

import os
import time

import pytest

from ftlab import guest
from ftlab.agentlab import MiB, AgentLab, LabVm
from ftlab.diskprobe import image_matches, write_pattern_hmp
from ftlab.monitor import LibvirtMonitor
from ftlab.vdsm import HookError
from tests.integration.test_agent_failover import holds, monitor, write
from vdsm_ft import copyback, domains
from vdsm_ft.api import COPYING_BACK, AgentError, Role, VmState
from vdsm_ft.arbiter import Arbiter
from vdsm_ft.layout import Disk

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BLOCK = 64 * 1024
RATE = "2M"      # bytes/s: the 64 MiB disk takes ~30 s


@pytest.fixture(scope="module")
def lab(kvm):
    with AgentLab("agcb") as lab:
        for agent in lab.agents:
            agent.stop()
            agent.copyback_rate = RATE
            agent.start()
        yield lab


def _percent(reason: str) -> int:
    return int(reason.removeprefix(COPYING_BACK + ", ").rstrip("%"))


def _protected_and_covered(lab: AgentLab) -> tuple[LabVm, list[tuple[int, int]]]:
    """A VM protected from agcb-a onto agcb-b, with two blocks covered by checkpoints."""
    vm = lab.start_vm("agcb-a")
    lab.protect(vm, "agcb-a", "agcb-b")
    primary = monitor(lab, "agcb-a", vm, False)
    _write_mid_copy(primary, 0, 0xA1)
    _write_mid_copy(primary, 1 * MiB, 0xA2)
    lab.wait_checkpoints("agcb-a", vm.vm_id)
    return vm, [(0, 0xA1), (1 * MiB, 0xA2)]


def _fail_over(lab: AgentLab) -> tuple[LabVm, list[tuple[int, int]]]:
    vm, covered = _protected_and_covered(lab)
    os.kill(lab.qemu_pid("agcb-a", vm.name), 9)
    return vm, covered


def _write_mid_copy(mon: LibvirtMonitor, offset: int, pattern: int) -> None:
    """`write` would attach an NBD export to the quorum node, and its drain wakes the
    throttled copy-back, which then ends before this module catches it mid-way. This
    VM is idle under KVM, where HMP's hold on the main lock meets no stalled checkpoint
    (ftlab/diskprobe.py)."""
    write_pattern_hmp(mon, Disk(index=0, image="", size=0), offset, BLOCK, pattern)


def _copying_with_a_write(lab: AgentLab) -> tuple[LabVm, list[tuple[int, int]],
                                                LibvirtMonitor]:
    """Failed over onto agcb-b, whose copy-back runs; one more covered write during it.
    Returns the VM, the covered writes and the survivor's monitor."""
    vm, covered = _fail_over(lab)
    lab.wait_reason("agcb-b", vm.vm_id, COPYING_BACK + ",", timeout=30)
    survivor = monitor(lab, "agcb-b", vm, False)
    _write_mid_copy(survivor, 3 * MiB, 0xC3)
    covered.append((3 * MiB, 0xC3))
    return vm, covered, survivor


def _log(lab: AgentLab, host: str) -> str:
    with open(lab.agent(host).log_path, errors="replace") as f:
        return f.read()


def _job_progress(lab: AgentLab, vm: LabVm) -> int:
    jobs = monitor(lab, "agcb-b", vm, False).execute("query-jobs")
    (job,) = [j for j in jobs if j["id"] == "ft-copyback0"]
    return job["current-progress"]


def _stop_on(lab: AgentLab, host: str, vm: LabVm) -> None:
    """A stop as VDSM does one: the destroy hooks around libvirt's destroy."""
    vdsm = lab.vdsm[host]
    vdsm.run_hooks("before_vm_destroy", None, vm.vm_id, {"ft": "true"})
    lab._destroy_domains(lab.host(host), (vm.name, vm.secondary_name))
    vdsm.run_hooks("after_vm_destroy", None, vm.vm_id, {"ft": "true"})


def test_survivor_copies_back_resumes_after_an_agent_crash_and_pivots(lab):
    vm, covered = _fail_over(lab)
    status = lab.wait_reason("agcb-b", vm.vm_id, COPYING_BACK + ",", timeout=30)
    assert status.state is VmState.NOT_PROTECTED and status.role is Role.PRIMARY
    survivor = monitor(lab, "agcb-b", vm, False)
    _write_mid_copy(survivor, 3 * MiB, 0xC3)  # during the copy
    covered.append((3 * MiB, 0xC3))

    # Anything that would read the stale image is refused, with the reason: turning
    # protection off, and a new start of the VM through the hooks.
    with pytest.raises(AgentError, match=COPYING_BACK):
        lab.call("agcb-b", "unprotect", vm.vm_id)
    xml = guest.idle_guest_xml(vm.name, vm.disk, mac=guest.guest_mac(2),
                               serial_log=lab.host("agcb-b").path("images", "x.serial"),
                               vm_id=vm.vm_id)
    with pytest.raises(HookError, match=COPYING_BACK):
        lab.vdsm["agcb-b"].run_hooks("before_vm_start", xml, vm.vm_id, {"ft": "true"})

    # The agent dies mid-copy; the job goes on in QEMU; the new agent resumes it.
    before = _job_progress(lab, vm)
    lab.agent("agcb-b").crash()
    # The throttled mirror copies a 16 MiB buffer, then sleeps it off (8 s at 2M).
    deadline = time.monotonic() + 30
    while _job_progress(lab, vm) <= before:
        assert time.monotonic() < deadline, "the copy stopped with the agent"
        time.sleep(0.5)
    _write_mid_copy(survivor, 4 * MiB, 0xD4)
    covered.append((4 * MiB, 0xD4))
    lab.agent("agcb-b").start()
    deadline = time.monotonic() + 15
    while "copy-back resumed in QEMU" not in _log(lab, "agcb-b"):
        assert time.monotonic() < deadline, "the new agent did not resume the copy"
        time.sleep(0.2)
    mid = _percent(lab.wait_reason("agcb-b", vm.vm_id, COPYING_BACK + ",").reason)
    assert 0 < mid < 100

    after = lab.wait_status("agcb-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=90)
    assert after.image_current_at is not None and after.failovers == 1
    # The survivor runs on the engine's image: the block graph says so.
    nodes = survivor.execute("query-named-block-nodes", {"flat": True})
    files = {n["node-name"]: n["file"] for n in nodes}
    assert files.get("ft-sd0") == vm.disk
    assert not {"ft-parent0", "ft-disk0"} & set(files), "a replica node is still open"
    graph = survivor.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    (quorum,) = [n["id"] for n in graph["nodes"] if n["name"] == "ft-quorum0"]
    assert [names[e["child"]] for e in graph["edges"] if e["parent"] == quorum] == \
        ["ft-sd0"]
    replica_dir = lab.agent("agcb-b").host.path("ft", "replicas", vm.vm_id)
    assert not os.path.exists(replica_dir), "the replica outlived the verified copy-back"
    for offset, pattern in covered:
        assert holds(lab, "agcb-b", vm, survivor, offset, pattern)

    # Re-protection resyncs from the now-current image; a second failover repeats it.
    lab.protect(vm, "agcb-b", "agcb-c")
    write(lab, "agcb-b", vm, 5 * MiB, 0xE5)
    covered.append((5 * MiB, 0xE5))
    lab.wait_checkpoints("agcb-b", vm.vm_id)
    _stop_everywhere(lab, vm, ("agcb-b", "agcb-c"))
    for offset, pattern in covered:
        assert image_matches(vm.disk, offset, BLOCK, pattern), \
            f"the storage-domain image lacks {pattern:#x} at {offset}"
    assert not image_matches(vm.disk, 6 * MiB, BLOCK, 0xE5), "negative control"


def _stop_everywhere(lab: AgentLab, vm: LabVm, hosts: tuple[str, ...]) -> None:
    for host in hosts:
        _stop_on(lab, host, vm)
    deadline = time.monotonic() + 30
    while any(lab.qemu_pid(h, n) for h in hosts for n in (vm.name, vm.secondary_name)):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_stop_during_the_copy_finishes_it_and_loses_nothing(lab):
    vm, covered, _ = _copying_with_a_write(lab)
    pid = lab.qemu_pid("agcb-b", vm.name)

    _stop_on(lab, "agcb-b", vm)
    deadline = time.monotonic() + 60
    while domains.process_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    record = None
    while time.monotonic() < deadline:
        record = lab.net.call(lab.arbiter().get_pair, vm.vm_id)
        if record is not None and record.state == "Down":
            break
        time.sleep(0.2)
    assert record is not None and "made current" in record.reason, record
    for offset, pattern in covered:
        assert image_matches(vm.disk, offset, BLOCK, pattern), \
            f"the storage-domain image lacks {pattern:#x} at {offset} after the stop"
    assert not os.path.exists(lab.agent("agcb-b").host.path("ft", "replicas", vm.vm_id))
    # The image is current: the arbiter's mark is gone, a normal start may read it.
    assert lab.net.call(lab.arbiter().stale_image, vm.vm_id) is None
    _normal_start(lab, "agcb-c", vm)


def test_survivor_qemu_crash_mid_copy_is_finished_from_the_replica(lab):
    vm, covered, _ = _copying_with_a_write(lab)
    os.kill(lab.qemu_pid("agcb-b", vm.name), 9)

    down = lab.wait_status("agcb-b", vm.vm_id, VmState.DOWN, timeout=60)
    assert "made current from this host's replica" in down.reason, down
    for offset, pattern in covered:
        assert image_matches(vm.disk, offset, BLOCK, pattern), \
            f"the storage-domain image lacks {pattern:#x} at {offset} after the crash"
    assert not image_matches(vm.disk, 2 * MiB, BLOCK, 0xC3), "negative control"
    assert not os.path.exists(lab.agent("agcb-b").host.path("ft", "replicas", vm.vm_id))


def _wait_forgotten(lab: AgentLab, host: str, vm: LabVm, timeout: float) -> None:
    """Until the agent no longer knows the VM (VDSM released it: its record is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lab.status(host, vm.vm_id)
        except AgentError:
            return
        assert time.monotonic() < deadline, f"{vm.name} not forgotten: {lab.agent_logs()}"
        time.sleep(0.2)


def _normal_start(lab: AgentLab, host: str, vm: LabVm, ft: str | None = "false") -> None:
    """before_vm_start as VDSM runs it for a start without FT (ft=false, or no property);
    HookError when the hook refuses it."""
    xml = guest.idle_guest_xml(vm.name, vm.disk, mac=guest.guest_mac(2),
                               serial_log=lab.host(host).path("images", "n.serial"),
                               vm_id=vm.vm_id)
    lab.vdsm[host].run_hooks("before_vm_start", xml, vm.vm_id,
                             {} if ft is None else {"ft": ft})


def _logged_at(lab: AgentLab, host: str, words: str) -> float:
    """When the agent first logged `words` (its asctime, this machine's clock)."""
    line = next(line for line in _log(lab, host).splitlines() if words in line)
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def _silent_crash(lab: AgentLab, host: str) -> None:
    """The host goes silent (its link down, as a powered-off host) and every process of
    it dies, its agent and etcd member too: nobody there can confirm anything."""
    lab.cut_link(host)
    lab.host(host).crash()


def test_silent_primary_host_then_survivor_host_crash_mid_copy_lose_nothing(lab):
    """The copy-back starts on the arbiter's proof alone (the old primary's host and agent
    are dead), normal starts are refused everywhere while the image is behind, and a
    crash of the survivor's whole host mid-copy leaves the image marked stale until the
    revived host copies its replica back: then every covered write is on the image."""
    try:
        _silent_hosts_then_offline_copy(lab, lab.arbiter())
    finally:
        for host in ("agcb-a", "agcb-b"):   # the module's other tests need both
            if lab.host(host).holder_pid() is None:
                lab.revive(host)


def _silent_hosts_then_offline_copy(lab: AgentLab, arbiter: Arbiter) -> None:
    vm, covered = _protected_and_covered(lab)
    _silent_crash(lab, "agcb-a")

    status = lab.wait_reason("agcb-b", vm.vm_id, COPYING_BACK + ",", timeout=60)
    holder, claimed_at = lab.net.call(arbiter.live_claim, vm.vm_id, status.generation)
    assert holder == "agcb-b"
    started = _logged_at(lab, "agcb-b", f"{vm.name}: copy-back started at")
    assert started >= claimed_at + copyback.FENCE_WINDOW_S - 0.01, \
        f"the copy-back began {started - claimed_at:.2f} s after the claim"
    mark = lab.net.call(arbiter.stale_image, vm.vm_id)
    assert (mark.host, mark.generation, mark.since) == ("agcb-b", status.generation,
                                                        claimed_at)
    lab.revive("agcb-a")            # back with its etcd member (quorum after b is lost)

    _write_mid_copy(monitor(lab, "agcb-b", vm, False), 3 * MiB, 0xC3)  # during the copy
    covered.append((3 * MiB, 0xC3))
    with pytest.raises(HookError, match="storage-domain image is behind this host's"):
        _normal_start(lab, "agcb-b", vm)
    for host, ft in (("agcb-c", "false"), ("agcb-c", None), ("agcb-a", "false")):
        with pytest.raises(HookError, match="host agcb-b has run it on its own replica"):
            _normal_start(lab, host, vm, ft)
    with pytest.raises(HookError, match="storage-domain image is behind"):
        lab.vdsm["agcb-c"].run_hooks("before_vm_start", guest.idle_guest_xml(
            vm.name, vm.disk, vm_id=vm.vm_id), vm.vm_id, {"ft": "true"})
    mid = _percent(lab.wait_reason("agcb-b", vm.vm_id, COPYING_BACK + ",").reason)
    assert 0 <= mid < 100

    _silent_crash(lab, "agcb-b")                    # the survivor's host, mid-copy
    replica = lab.host("agcb-b").path("ft", "replicas", vm.vm_id, "disk0.qcow2")
    for offset, pattern in covered:
        assert image_matches(replica, offset, BLOCK, pattern), \
            f"the replica lacks {pattern:#x} at {offset} after its host crashed"
    assert lab.net.call(arbiter.stale_image, vm.vm_id) == mark, "marked current"
    with pytest.raises(HookError, match="host agcb-b has run it on its own replica"):
        _normal_start(lab, "agcb-c", vm)

    lab.revive("agcb-b")            # its agent finds the VM's QEMU gone: offline copy
    down = lab.wait_status("agcb-b", vm.vm_id, VmState.DOWN, timeout=120)
    assert "made current from this host's replica" in down.reason, down
    assert down.image_current_at is not None
    assert lab.net.call(arbiter.stale_image, vm.vm_id) is None
    for offset, pattern in covered:
        assert image_matches(vm.disk, offset, BLOCK, pattern), \
            f"the storage-domain image lacks {pattern:#x} at {offset}"
    assert not image_matches(vm.disk, 2 * MiB, BLOCK, 0xC3), "negative control"
    _normal_start(lab, "agcb-c", vm)                # allowed now
    _normal_start(lab, "agcb-c", vm, None)


@pytest.mark.parametrize("interrupt", ["qemu-crash", "stop"])
def test_copy_back_that_cannot_reach_the_image_keeps_it_refused_and_retries(lab, interrupt):
    """The survivor's QEMU dies mid-copy, or the admin stops the VM then, while its host
    cannot reach the storage-domain image: the offline copy fails, the VM is Down with
    the reason naming the replica, every start is refused, nothing is lost; once the
    image is reachable again the agent's retry makes it current and starts are allowed
    (a stopped VM, which VDSM released, is then forgotten)."""
    arbiter = lab.arbiter()
    vm, covered, survivor = _copying_with_a_write(lab)
    away = vm.disk + ".unreachable"
    os.rename(vm.disk, away)                # the storage domain is gone from b's view
    try:
        if interrupt == "stop":
            # The mirror stalls too, so that the stop's online finish cannot get in sync
            # through the image's open descriptor before VDSM destroys QEMU.
            survivor.execute("job-pause", {"id": "ft-copyback0"})
            _stop_on(lab, "agcb-b", vm)
        else:
            os.kill(lab.qemu_pid("agcb-b", vm.name), 9)
        down = lab.wait_status("agcb-b", vm.vm_id, VmState.DOWN, timeout=60)
        assert "the storage-domain image is NOT current" in down.reason, down
        assert os.path.join("replicas", vm.vm_id) in down.reason
        assert down.image_current_at is None
        assert lab.net.call(arbiter.stale_image, vm.vm_id).host == "agcb-b"
        for host in ("agcb-b", "agcb-c"):
            with pytest.raises(HookError, match="storage-domain image is behind"):
                _normal_start(lab, host, vm)
    finally:
        os.rename(away, vm.disk)
    down = lab.wait_status("agcb-b", vm.vm_id, VmState.DOWN, timeout=5)
    deadline = time.monotonic() + 60        # the agent retries every 30 s
    while lab.net.call(arbiter.stale_image, vm.vm_id) is not None:
        assert time.monotonic() < deadline, lab.agent_logs()
        time.sleep(0.5)
    if interrupt == "stop":
        _wait_forgotten(lab, "agcb-b", vm, 10)
    else:
        assert "made current from this host's replica" in lab.status("agcb-b",
                                                                      vm.vm_id).reason
    for offset, pattern in covered:
        assert image_matches(vm.disk, offset, BLOCK, pattern), \
            f"the storage-domain image lacks {pattern:#x} at {offset}"
    _normal_start(lab, "agcb-c", vm)


def test_etcd_out_when_the_copy_back_ends_then_a_stop_and_an_agent_restart_clear_the_mark(
        lab):
    """A double fault: etcd has no quorum when the survivor's copy-back ends, so the
    arbiter keeps the image's stale mark; then the VM stops (the agent forgets it) and
    the agent restarts. Once etcd is back the mark goes all the same, and a normal start
    reads every covered write: a current image is never left refused for good."""
    arbiter = lab.arbiter()
    vm, covered, _ = _copying_with_a_write(lab)
    others = [0, 2]                         # agcb-a's and agcb-c's members: no quorum
    for i in others:
        lab.etcd.stop_member(i)
    try:
        deadline = time.monotonic() + 90
        # The copy-back ends (image_current_at), then etcd refuses to drop the mark.
        while "still marks the storage-domain image stale" not in _log(lab, "agcb-b"):
            assert time.monotonic() < deadline, lab.agent_logs()
            time.sleep(0.5)
        assert lab.status("agcb-b", vm.vm_id).image_current_at is not None
        _stop_on(lab, "agcb-b", vm)
        _wait_forgotten(lab, "agcb-b", vm, 30)
        agent = lab.agent("agcb-b")
        agent.stop()
        agent.start()
    finally:
        lab.etcd.start_members(others)
    mark = lab.net.call(arbiter.stale_image, vm.vm_id)
    deadline = time.monotonic() + 45         # the agent tells etcd again every 30 s
    while mark is not None:
        # Meanwhile the agent, which verified the copy-back, lets a normal start go on.
        _normal_start(lab, "agcb-b", vm)
        assert time.monotonic() < deadline, (mark, lab.agent_logs())
        time.sleep(1.0)
        mark = lab.net.call(arbiter.stale_image, vm.vm_id)
    for offset, pattern in covered:
        assert image_matches(vm.disk, offset, BLOCK, pattern), \
            f"the storage-domain image lacks {pattern:#x} at {offset}"
    assert not image_matches(vm.disk, 2 * MiB, BLOCK, 0xC3), "negative control"
    _normal_start(lab, "agcb-c", vm)
