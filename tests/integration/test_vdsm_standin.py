"""The VDSM stand-in's rules (docs/engine-view.md), on the system libvirtd with
idle KVM guests: which domains it holds and reports, how it adopts unknown ones, their
status, and its recovery after a restart."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from types import SimpleNamespace

import libvirt
import pytest
from lxml import etree

from ftlab import guest
from ftlab.vdsm import EXTERNAL_VM_LOOKUP_INTERVAL, OVIRT_VM_NS, Vdsm
from ftlab.vdsmdriver import HostVdsm, VdsmFleet

pytestmark = pytest.mark.kvm
URI = "qemu:///system"


@pytest.fixture(scope="module")
def base():
    path = tempfile.mkdtemp(prefix="ftlab-vdsm-", dir="/tmp")
    os.chmod(path, 0o755)               # QEMU (libvirt-qemu) must traverse it
    os.makedirs(os.path.join(path, "hooks"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cached_disk():
    return guest.build_idle_disk(64 << 20)


@pytest.fixture
def domains(libvirtd, kvm):
    """Domains the test starts itself; destroyed and undefined at the end."""
    made: list[str] = []
    yield made
    conn = libvirt.open(URI)
    try:
        for vm_id in made:
            try:
                dom = conn.lookupByUUIDString(vm_id)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            try:
                dom.undefine()
            except libvirt.libvirtError:
                pass                        # transient
    finally:
        conn.close()


def _xml(base: str, cached_disk: str, metadata: bool = True,
         extra_meta: str = "") -> tuple[str, str]:
    vm_id = str(uuid.uuid4())
    name = f"vs-{vm_id[:8]}"
    disk = guest.install_disk(cached_disk, os.path.join(base, f"{name}.qcow2"))
    xml = guest.idle_guest_xml(name, disk, serial_log=os.path.join(base, f"{name}.serial"),
                               vm_id=vm_id, memory_mib=64)
    root = etree.fromstring(xml.encode())
    md = root.find("metadata")
    if not metadata:
        root.remove(md)
    elif extra_meta:
        wrapper = etree.fromstring(f'<w xmlns:ovirt-vm="{OVIRT_VM_NS}">{extra_meta}</w>')
        md.find(f"{{{OVIRT_VM_NS}}}vm").append(wrapper[0])
    return vm_id, etree.tostring(root, encoding="unicode")


def _start_outside_vdsm(domains: list[str], xml: str, paused: bool = False) -> libvirt.virDomain:
    """A domain someone else started (the agent, an admin): libvirt only."""
    conn = libvirt.open(URI)
    flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
    dom = conn.createXML(xml, flags)
    domains.append(dom.UUIDString())
    return dom


def _vdsm(base: str) -> Vdsm:
    return Vdsm(os.path.join(base, "hooks"), URI)


def _reported(vdsm: Vdsm) -> dict[str, dict]:
    return {r["uuid"]: r for r in vdsm.report()}


def test_reports_only_the_vms_it_holds(base, cached_disk, domains):
    vdsm = _vdsm(base)
    a_id, a_xml = _xml(base, cached_disk)
    vdsm.start_vm(a_xml)
    domains.append(a_id)
    b_id, b_xml = _xml(base, cached_disk)
    _start_outside_vdsm(domains, b_xml)
    got = _reported(vdsm)
    assert a_id in got and b_id not in got
    assert got[a_id]["status"] == "up" and got[a_id]["has_ovirt_metadata"]
    # The report carries the live domain XML (Host.dumpxmls), with the disk's alias.
    assert "ua-" in got[a_id]["domxml"] and a_id in got[a_id]["domxml"]


def test_unknown_domain_is_adopted_as_external_by_the_lookup_after_an_event(base, cached_disk,
                                                                           domains):
    vdsm = _vdsm(base)
    b_id, b_xml = _xml(base, cached_disk)             # it carries oVirt metadata
    _start_outside_vdsm(domains, b_xml)
    assert vdsm.lookup_external_vms() == []           # no event named it: nothing to adopt
    vdsm.lookup_vm_from_event(b_id)
    assert b_id not in _reported(vdsm)                # queued until the periodic lookup
    assert vdsm.lookup_external_vms() == [b_id]
    assert vdsm.vms[b_id].external                    # external even with metadata
    got = _reported(vdsm)[b_id]
    assert got["status"] == "up" and got["has_ovirt_metadata"]


def test_fleet_adopts_after_an_event_at_the_lookup_interval(base, cached_disk, domains):
    assert EXTERNAL_VM_LOOKUP_INTERVAL == 60.0        # VDSM's external_vm_lookup_interval
    host = SimpleNamespace(name="h1", uri=URI, nsenter=list)
    reports: list[tuple[str, list[dict]]] = []
    fleet = VdsmFleet({"h1": HostVdsm(host, "/nonexistent")}, base,
                      lambda h, r: reports.append((h, r)), lookup_interval=1.5)
    fleet.hosts["h1"].vdsm = _vdsm(base)
    fleet.report_once()                               # VDSM's first listing
    b_id, b_xml = _xml(base, cached_disk, metadata=False)
    t0 = time.monotonic()
    _start_outside_vdsm(domains, b_xml)
    fleet.report_once()                               # the STARTED event arrives
    assert b_id in fleet.hosts["h1"].vdsm.unknown_vm_ids
    assert b_id not in {r["uuid"] for r in reports[-1][1]}
    while b_id not in {r["uuid"] for r in reports[-1][1]}:
        assert time.monotonic() - t0 < 5, "not adopted within the lookup interval"
        time.sleep(0.2)
        fleet.report_once()
    assert fleet.hosts["h1"].vdsm.vms[b_id].external
    adopted = next(r for r in reports[-1][1] if r["uuid"] == b_id)
    assert adopted["status"] == "up" and not adopted["has_ovirt_metadata"]


def test_status_is_fixed_at_recovery_with_cpus_stopped_laid_over(base, cached_disk, domains):
    vdsm = _vdsm(base)
    run_id, run_xml = _xml(base, cached_disk, metadata=False)
    running = _start_outside_vdsm(domains, run_xml)
    pau_id, pau_xml = _xml(base, cached_disk, metadata=False)
    paused = _start_outside_vdsm(domains, pau_xml, paused=True)
    for vm_id in (run_id, pau_id):
        vdsm.lookup_vm_from_event(vm_id)
    assert sorted(vdsm.lookup_external_vms()) == sorted([run_id, pau_id])
    got = _reported(vdsm)
    assert got[run_id]["status"] == "up" and got[pau_id]["status"] == "paused"
    running.suspend()                                 # CPUs stopped: Paused over Up
    paused.resume()                                   # Paused was fixed at recovery
    got = _reported(vdsm)
    assert got[run_id]["status"] == "paused" and got[pau_id]["status"] == "paused"
    running.resume()
    assert _reported(vdsm)[run_id]["status"] == "up"


def test_restart_recovers_metadata_domains_and_kills_loose_ones(base, cached_disk, domains):
    first = _vdsm(base)
    a_id, a_xml = _xml(base, cached_disk)
    first.start_vm(a_xml)
    domains.append(a_id)
    ext_id, ext_xml = _xml(base, cached_disk, metadata=False)
    _start_outside_vdsm(domains, ext_xml)
    # Metadata VDSM cannot read (metadata.Descriptor converts type="int"): recovery fails.
    bad_id, bad_xml = _xml(base, cached_disk,
                           extra_meta='<ovirt-vm:minGuaranteedMemoryMb type="int">lots'
                                      '</ovirt-vm:minGuaranteedMemoryMb>')
    _start_outside_vdsm(domains, bad_xml)
    second = _vdsm(base)                              # VDSM restarted
    killed = second.recover()
    assert bad_id in killed
    conn = libvirt.open(URI)
    try:
        assert not conn.lookupByUUIDString(bad_id).isActive()
    except libvirt.libvirtError:
        pass                                          # a transient domain is gone
    finally:
        conn.close()
    assert a_id in second.vms and not second.vms[a_id].external
    assert second.vms[a_id].custom == {"ft": "true"}
    assert ext_id in second.vms and second.vms[ext_id].external
    got = _reported(second)
    assert got[a_id]["status"] == "up" and bad_id not in got
