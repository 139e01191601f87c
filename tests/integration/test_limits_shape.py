"""A multi-vCPU, multi-disk, multi-NIC VM through the real agents (issue 14): the idle
guest with 4 vCPUs, 4 disks and 2 NICs is protected, survives a primary failover and,
re-protected onto the third host, a secondary failover, with the data rules checked on
every disk at the block layer: a write a checkpoint covered survives, a write after the
last checkpoint on a primary that dies is rolled back, and the survivor takes new
writes. bench/limits.py runs the whole matrix of shapes.
"""
from __future__ import annotations

import os

import pytest

from ftlab.agentlab import MiB, AgentLab, LabVm, VmShape
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.monitor import LibvirtMonitor
from vdsm_ft.api import Role, VmState
from vdsm_ft.layout import Disk, VmLayout

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BLOCK = 64 * 1024
SHAPE = VmShape(vcpus=4, disks=4, nics=2)
A, B, C = "sh-a", "sh-b", "sh-c"


@pytest.fixture(scope="module")
def lab(kvm):
    with AgentLab("sh") as lab:
        yield lab


def _probe(lab: AgentLab, host: str, vm: LabVm, index: int) -> tuple[VmLayout, Disk]:
    run_dir = os.path.join(lab.agent(host).run_dir, "vms", vm.vm_id)
    disk = Disk(index=index, image="", size=64 * MiB)
    return VmLayout(vm.vm_id, vm.name, run_dir, (disk,)), disk


def write_all(lab: AgentLab, host: str, vm: LabVm, offset: int, pattern: int) -> None:
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    for i in range(SHAPE.disks):
        write_pattern(mon, *_probe(lab, host, vm, i), offset, BLOCK, pattern)


def holding(lab: AgentLab, host: str, vm: LabVm, offset: int, pattern: int) -> list[bool]:
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    return [pattern_matches(mon, *_probe(lab, host, vm, i), offset, BLOCK, pattern)
            for i in range(SHAPE.disks)]


def survivor_alone(lab: AgentLab, host: str, vm: LabVm, failovers: int) -> None:
    after = lab.wait_status(host, vm.vm_id, VmState.NEED_SECONDARY, timeout=15)
    assert after.role is Role.PRIMARY and after.failovers == failovers
    assert after.last_failover is not None and after.last_failover.to_host == host
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    assert mon.execute("query-colo-status")["mode"] == "none"
    assert mon.execute("query-status")["status"] == "running"


def test_four_vcpus_four_disks_two_nics_protect_and_both_failovers(lab):
    vm = lab.start_vm(A, shape=SHAPE)
    try:
        lab.protect(vm, A, B)
        mon = LibvirtMonitor(lab.host(A).uri, vm.name)
        assert len(mon.execute("query-cpus-fast")) == SHAPE.vcpus
        quorums = [n["node-name"] for n in mon.execute("query-named-block-nodes",
                                                       {"flat": True})
                   if n["node-name"].startswith("ft-quorum")]
        assert sorted(quorums) == [f"ft-quorum{i}" for i in range(SHAPE.disks)]
        status = lab.status(A, vm.vm_id)
        assert status.state is VmState.PROTECTED

        # Primary failover: what a checkpoint covered survives on every disk; what came
        # after the last checkpoint is rolled back.
        write_all(lab, A, vm, 0, 0x41)
        lab.wait_checkpoints(A, vm.vm_id)
        before = lab.checkpoints(A, vm.vm_id)
        write_all(lab, A, vm, 1 * MiB, 0x42)
        unacknowledged = lab.checkpoints(A, vm.vm_id) == before
        os.kill(lab.qemu_pid(A, vm.name), 9)
        survivor_alone(lab, B, vm, failovers=1)
        assert holding(lab, B, vm, 0, 0x41) == [True] * SHAPE.disks
        if unacknowledged:
            assert holding(lab, B, vm, 1 * MiB, 0x42) == [False] * SHAPE.disks

        # Secondary failover: the primary carries on with everything and takes writes.
        lab.protect(vm, B, C)
        write_all(lab, B, vm, 2 * MiB, 0x43)
        lab.wait_checkpoints(B, vm.vm_id)
        os.kill(lab.qemu_pid(C, vm.secondary_name), 9)
        survivor_alone(lab, B, vm, failovers=2)
        write_all(lab, B, vm, 3 * MiB, 0x44)
        for offset, pattern in ((0, 0x41), (2 * MiB, 0x43), (3 * MiB, 0x44)):
            assert holding(lab, B, vm, offset, pattern) == [True] * SHAPE.disks
    finally:
        lab.remove_vm(vm)
