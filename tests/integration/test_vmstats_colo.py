"""The after_get_all_vm_stats hook on a real COLO pair (AgentLab: lab hosts with their own
libvirtd, real agents, the idle guest under KVM) polled through the VDSM stand-in, which
runs the hook as API.getAllVmStats does. A short checkpoint delay makes the primary stop
often, so that polls land in the stops. How often one does depends on the machine (31 of
400 polls here, none of 400 in one CI run), so each test polls until enough of its reads
fell in a stop, within a deadline, instead of a fixed number of times."""
from __future__ import annotations

import collections
import tempfile
import time

import libvirt
import pytest

from ftlab.agentlab import AgentLab
from ftlab.monitor import LibvirtMonitor
from ftlab.vdsm import Vdsm

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

DELAY_MS = 50
IN_STOPS = 5            # polls that must fall in a checkpoint stop
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def lab(kvm):
    with AgentLab("vs", hosts=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def vm(lab):
    vm = lab.start_vm("vs-a")
    lab.protect(vm, "vs-a", "vs-b")
    # The test's own monitor call: the hook never sends one (it would taint the domain).
    LibvirtMonitor(lab.host("vs-a").uri, vm.name).execute(
        "migrate-set-parameters", {"x-checkpoint-delay": DELAY_MS})
    lab.wait_checkpoints("vs-a", vm.vm_id)
    return vm


def without_hook(lab: AgentLab, like: Vdsm) -> Vdsm:
    """A stand-in on the same host with the same VMs but no hook scripts at all."""
    bare = Vdsm(tempfile.mkdtemp(prefix="vs-nohooks-"), like.libvirt_uri,
                connect=lab.host("vs-a").connect)
    bare.vms = like.vms
    return bare


def statuses(vdsm: Vdsm, vm_id: str, polls: int) -> collections.Counter:
    return collections.Counter(r["status"] for _ in range(polls) for r in vdsm.report()
                               if r["uuid"] == vm_id)


def poll_through_stops(vdsm: Vdsm, vm_id: str) -> collections.Counter:
    """Polls vdsm until IN_STOPS of its reports read the domain paused from libvirt (the
    status VDSM has before its hooks run); counts (before hooks, after hooks) pairs."""
    seen: collections.Counter = collections.Counter()
    hooks = vdsm.after_get_all_vm_stats

    def recorded(reports: list[dict]) -> list[str]:
        after = hooks(reports)
        seen.update((r["status"], a) for r, a in zip(reports, after) if r["uuid"] == vm_id)
        return after

    vdsm.after_get_all_vm_stats = recorded
    deadline = time.monotonic() + DEADLINE_S
    try:
        while sum(n for (before, _), n in seen.items() if before == "paused") < IN_STOPS:
            assert time.monotonic() < deadline, f"too few polls fell in a stop: {seen}"
            vdsm.report()
    finally:
        del vdsm.after_get_all_vm_stats
    return seen


def test_libvirt_state_reasons_during_checkpoints(lab, vm):
    """What libvirt says while COLO stops the primary: recorded, and it must not look like
    an admin's pause."""
    conn = lab.host("vs-a").connect()
    seen: collections.Counter = collections.Counter()
    deadline = time.monotonic() + DEADLINE_S
    try:
        dom = conn.lookupByUUIDString(vm.vm_id)
        while sum(n for (s, _), n in seen.items() if s == libvirt.VIR_DOMAIN_PAUSED) < IN_STOPS:
            assert time.monotonic() < deadline, f"too few reads fell in a stop: {seen}"
            seen[tuple(dom.state(0))] += 1
    finally:
        conn.close()
    print("libvirt (state, reason):", dict(seen))
    assert (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER) not in seen


def test_checkpoint_stops_show_paused_without_the_hook_and_never_with_it(lab, vm):
    vdsm = lab.vdsm["vs-a"]
    bare = poll_through_stops(without_hook(lab, vdsm), vm.vm_id)
    hooked = poll_through_stops(vdsm, vm.vm_id)
    print("(before hooks, after) without hook:", dict(bare), "with hook:", dict(hooked))
    assert bare[("paused", "paused")] >= IN_STOPS
    assert {after for _, after in hooked} == {"up"}
    assert hooked[("paused", "up")] >= IN_STOPS


def test_recovery_during_a_checkpoint_reports_up_with_the_hook(lab, vm):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        fresh = Vdsm(lab.vdsm["vs-a"].hooks_dir, lab.vdsm["vs-a"].libvirt_uri,
                     env=lab.vdsm["vs-a"].env, pythonpath=lab.vdsm["vs-a"].pythonpath,
                     hook_timeout=lab.vdsm["vs-a"].hook_timeout, wrap=lab.vdsm["vs-a"].wrap,
                     connect=lab.host("vs-a").connect)
        assert fresh.recover() == []
        if fresh.vms[vm.vm_id].status == "paused":
            break
    else:
        pytest.fail("no recovery fell in a checkpoint stop")
    assert statuses(without_hook(lab, fresh), vm.vm_id, 20) == {"paused": 20}
    assert statuses(fresh, vm.vm_id, 20) == {"up": 20}


def test_admin_pause_of_a_protected_vm_stays_paused_while_it_holds(lab, vm):
    """An admin's pause (PAUSED_USER) is never reported Up. COLO's next checkpoint ends
    with vm_start() and so undoes such a pause (seen here at 50 ms: every poll after the
    pause found libvirt running again): the checkpoint delay is raised for the test, and
    the pause is polled while it holds."""
    mon = LibvirtMonitor(lab.host("vs-a").uri, vm.name)
    start = lab.checkpoints("vs-a", vm.vm_id)
    mon.execute("migrate-set-parameters", {"x-checkpoint-delay": 60000})
    deadline = time.monotonic() + 15
    while lab.checkpoints("vs-a", vm.vm_id) <= start:   # QEMU checkpoints on the change
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conn = lab.host("vs-a").connect()
    dom = conn.lookupByUUIDString(vm.vm_id)
    dom.suspend()
    try:
        assert dom.state(0) == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]
        assert statuses(lab.vdsm["vs-a"], vm.vm_id, 5) == {"paused": 5}
        assert dom.state(0)[1] == libvirt.VIR_DOMAIN_PAUSED_USER, "the pause ended early"
    finally:
        dom.resume()
        conn.close()
        mon.execute("migrate-set-parameters", {"x-checkpoint-delay": DELAY_MS})
