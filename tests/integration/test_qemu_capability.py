"""A host whose QEMU cannot do COLO, end to end, with the real incapable QEMU: the
project's EL9 look-alike build (scripts/build-qemu --variant el9-lookalike: Red Hat's
--disable-replication and block driver allowlist without quorum).

Real agents in lab hosts (ftlab.agentlab), real etcd, the real hook scripts run by the
VDSM stand-in: the probe's result, the host's arbiter record, the start hook's refusal,
a refused secondary; and a pair whose QEMU builds differ is refused before anything
starts. Placement and the engine event are in tests/integration/test_poller.py.
"""
from __future__ import annotations

import os

import pytest

from ftlab import qemubuild
from ftlab.agentlab import AgentLab
from ftlab.vdsm import HookError
from vdsm_ft import domains, qemu_probe
from vdsm_ft.api import VmState

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def el9() -> str:
    return qemubuild.require(qemubuild.EL9_LOOKALIKE)


@pytest.fixture(scope="module")
def colo_build() -> str:
    return qemubuild.require(qemubuild.COLO)


def test_the_el9_lookalike_is_found_incapable_with_each_cause_and_the_fix(el9, tmp_path):
    r = qemu_probe.probe(el9, str(tmp_path))
    assert not r.capable
    assert {"x-colo", "quorum", "replication"} <= set(r.failed), r.reason
    assert "x-colo cannot be set" in r.reason and "compiled without replication" in r.reason
    assert "not whitelisted" in r.reason and "allowlist leaves quorum out" in r.reason
    assert r.reason.endswith("Fix: install vdsm-ft-qemu and set [qemu] emulator to it "
                             "(/usr/libexec/vdsm-ft/qemu-system-x86_64), see docs/qemu.md")
    assert "nbd" not in r.failed and "i440fx" not in r.failed    # what it can do is not blamed


@pytest.fixture(scope="module")
def lab(kvm, el9, colo_build):
    # a: the project's COLO build; b: Debian's own 7.2 (another build); c: the look-alike.
    with AgentLab("qc", emulators={"a": colo_build, "b": qemubuild.DEBIAN_QEMU,
                                   "c": el9}) as made:
        yield made


def _no_trace(lab: AgentLab, host_name: str, vm_id: str, domain: str) -> None:
    """Nothing of the VM was started or created on the host: no domain, no replica, no
    overlays."""
    conn = lab.host(host_name).connect()
    try:
        assert domain not in {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()
    for directory in (lab.host(host_name).path("ft", "replicas"),
                      lab.agent(host_name).overlay_dir):
        assert not os.path.exists(os.path.join(directory, vm_id)), directory


def test_the_incapable_host_publishes_why_in_its_status_and_arbiter_record(lab, el9):
    status = lab.call("qc-c", "host_status")
    assert status.qemu is not None and not status.qemu.capable
    assert status.qemu.path == el9 and "x-colo" in status.qemu.failed
    assert "install vdsm-ft-qemu" in status.qemu.reason
    assert lab.call("qc-a", "host_status").qemu.capable
    assert lab.etcd is not None and lab.net is not None
    records = lab.net.call(lambda: {h: lab.arbiter().get_host(h)
                                    for h in ("qc-a", "qc-c")})
    assert records["qc-c"].qemu == status.qemu
    assert records["qc-a"].qemu.capable and records["qc-a"].qemu.path.endswith(
        "/bin/qemu-system-x86_64")
    # The result is kept in the agent's state dir, where the hook reads it.
    kept = qemu_probe.load(lab.host("qc-c").path("ft", "state"))
    assert kept == status.qemu


def test_the_start_hook_refuses_an_ft_vm_on_the_incapable_host(lab):
    with pytest.raises(HookError) as refused:
        lab.start_vm("qc-c")
    text = refused.value.message
    assert "cannot do COLO" in text and "x-colo cannot be set" in text
    assert "[hooks] qemu_incapable = refuse" in text and "install vdsm-ft-qemu" in text
    assert lab.call("qc-c", "host_status").vms == ()


def test_no_secondary_starts_on_the_incapable_host(lab):
    vm = lab.start_vm("qc-a")
    try:
        lab.wait_status("qc-a", vm.vm_id, VmState.NEED_SECONDARY)
        lab.call("qc-a", "protect", vm.vm_id, lab.peer("qc-c"))
        st = lab.wait_reason("qc-a", vm.vm_id, "cannot run the secondary")
        assert st.state is VmState.NEED_SECONDARY and "x-colo cannot be set" in st.reason
        _no_trace(lab, "qc-c", vm.vm_id, vm.secondary_name)
    finally:
        lab.remove_vm(vm)


def test_a_pair_with_different_qemu_builds_is_refused_before_anything_starts(lab,
                                                                             colo_build):
    vm = lab.start_vm("qc-a")
    try:
        lab.wait_status("qc-a", vm.vm_id, VmState.NEED_SECONDARY)
        lab.call("qc-a", "protect", vm.vm_id, lab.peer("qc-b"))
        st = lab.wait_reason("qc-a", vm.vm_id, "QEMU builds differ")
        assert st.state is VmState.NEED_SECONDARY
        assert "colo" in st.reason and "Debian" in st.reason and "qc-b" in st.reason
        _no_trace(lab, "qc-b", vm.vm_id, vm.secondary_name)
        assert domains.qemu_pid(vm.name, among=lab.host("qc-a").pids()) is not None
    finally:
        lab.remove_vm(vm)
