"""The after_get_all_vm_stats hook on a real COLO pair (AgentLab: lab hosts with their own
libvirtd, real agents, the idle guest under KVM) polled through the VDSM stand-in, which
runs the hook as API.getAllVmStats does. A short checkpoint delay makes the primary stop
often, so that polls land in the stops."""
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
POLLS = 400


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


def test_libvirt_state_reasons_during_checkpoints(lab, vm):
    """What libvirt says while COLO stops the primary: recorded, and it must not look like
    an admin's pause."""
    conn = lab.host("vs-a").connect()
    try:
        dom = conn.lookupByUUIDString(vm.vm_id)
        seen = collections.Counter(tuple(dom.state(0)) for _ in range(3000))
    finally:
        conn.close()
    print("libvirt (state, reason) over 3000 reads:", dict(seen))
    paused = {k for k in seen if k[0] == libvirt.VIR_DOMAIN_PAUSED}
    assert paused, "no read fell in a checkpoint stop"
    assert (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER) not in paused


def test_checkpoint_stops_show_paused_without_the_hook_and_never_with_it(lab, vm):
    vdsm = lab.vdsm["vs-a"]
    bare = statuses(without_hook(lab, vdsm), vm.vm_id, POLLS)
    hooked = statuses(vdsm, vm.vm_id, POLLS)
    print("without hook:", dict(bare), "with hook:", dict(hooked))
    assert bare["paused"] > 0
    assert hooked == {"up": POLLS}


def test_recovery_during_a_checkpoint_reports_up_with_the_hook(lab, vm):
    for _ in range(500):
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
