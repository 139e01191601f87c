"""Tier 2 through the whole lab: the Linux test guest, created and started through the
real ovirtsdk4 (fake engine -> VDSM stand-in -> real hooks -> the host's libvirtd) with
the lab's `ftlab_guest=linux-tcg` (TCG, without COLO: tier 2 in docs/colo-facts.md), serves
its HTTP counter to the demo's client (`ftlab.counterclient` in namespace ftlab-client),
and the counter rises by one with every reply.

Tier 3T, the same guest with ft=true and a client across failovers under TCG with the
project's QEMU patches, is tests/e2e/test_tier3t.py (and `vdsm-ft lab demo --guest
linux`); on a QEMU without the patches the lab refuses ft=true for it
(tests/unit/test_lab_guests.py).
"""
from __future__ import annotations

import uuid

import ovirtsdk4.types as types
import pytest

from ftlab import counterclient, netns
from ftlab.demo import (DEMO_GUEST_IP, DemoGuest, DemoVm, Lab, MiB, Results,
                        Timeline, start_client, stop_client, wait_for, wait_up)
from ftlab.labstate import read_state
from ftlab.vdsmdriver import GUEST_IP_PROPERTY, GUEST_PROPERTY, LINUX_TEMPLATE

pytestmark = [pytest.mark.slow, pytest.mark.tcg]

START_TIMEOUT = 120.0
REPLIES = 20
TCG_GUEST = DemoGuest("linux-tcg", "Linux test guest under TCG", 256 * MiB, 0, DEMO_GUEST_IP)


@pytest.fixture
def lab(lab_up):
    lab = Lab(read_state(lab_up.lab_dir))
    yield lab
    lab.close()


def _create(lab: Lab, custom: dict[str, str]) -> types.Vm:
    vms = lab.conn.system_service().vms_service()
    return vms.add(types.Vm(
        name=f"linux-{uuid.uuid4().hex[:6]}", cluster=types.Cluster(name="Default"),
        template=types.Template(name=LINUX_TEMPLATE), memory=256 * MiB,
        custom_properties=[types.CustomProperty(name=k, value=v) for k, v in custom.items()]))


def _remove(lab: Lab, vm: types.Vm) -> None:
    svc = lab.conn.system_service().vms_service().vm_service(vm.id)
    if svc.get().status != types.VmStatus.DOWN:
        svc.stop()
    svc.remove()


def test_linux_guest_started_through_the_lab_serves_a_rising_counter(lab):
    tl = Timeline()
    vm = _create(lab, {GUEST_PROPERTY: "linux-tcg", GUEST_IP_PROPERTY: DEMO_GUEST_IP})
    svc = lab.conn.system_service().vms_service().vm_service(vm.id)
    res = Results()
    dvm = DemoVm(vm.id, vm.name, TCG_GUEST)
    try:
        svc.start()

        got = wait_up(svc, vm.name, START_TIMEOUT)
        tl.say(f"{vm.name} is Up on {got.host.id}")
        dvm.client = start_client(tl, dvm)
        wait_for(f"{REPLIES} replies", lambda: len(dvm.client.values_after(0.0)) >= REPLIES,
                 60)
    finally:
        stop_client(res, dvm)
        _remove(lab, vm)
    values = [r.value for r in res.client_replies if r.value is not None]
    assert len(values) >= REPLIES
    assert counterclient.forks(res.client_replies) == []
    assert all(b == a + 1 for a, b in zip(values, values[1:])), values
    assert not netns.exists(netns.CLIENT_NS)
