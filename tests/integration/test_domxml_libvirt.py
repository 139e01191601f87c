"""Real libvirtd 9.0 accepts and starts the XML domxml generates (issue 2, item 3).

The engine XML is the sample `tests/data/engine-i440fx.xml` (three disks: raw file, qcow2
file, qcow2 on a block device behind virtio-scsi; two NICs with ua- aliases; a lease; a
CD-ROM whose ISO is missing), made runnable on this machine: images become local files
and a loop device, NICs become user networking, spice listens on loopback, the CPU is
qemu64 without the svm this host lacks. Paths carry a comma and a quote, so QEMU's option
escaping is exercised for real.

Why the chown in the setup: libvirt relabels only what its own XML names. The images,
loop devices, overlays and run directories appear only in `<qemu:commandline>`, so they
must belong to the QEMU user (libvirt-qemu on Debian) or QEMU fails with "Permission
denied" (docs/colo-facts.md, "libvirt has no COLO model").

Block devices: libvirt 9.0 starts QEMU in a private mount namespace whose /dev holds
only the devices libvirt's XML names (qemu.conf `namespaces`, default ["mount"]), and
its device cgroup allows only those (`cgroup_device_acl`). A block device named only in
`<qemu:commandline>` is therefore refused ("No such file or directory"; with a node
outside /dev, "Operation not permitted" - both seen here). So the main test runs the
sample's block-domain disk as a file, and `test_block_disk_needs_libvirt_host_config`
pins what a host must configure for block storage domains.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid

import libvirt
import pytest
from lxml import etree
from qemu.qmp import QMPClient

from vdsm_ft import domxml, ftvalue, layout, runfiles

pytestmark = pytest.mark.kvm

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
QEMU_USER = "libvirt-qemu"
QEMU_VERSION = (7, 2, 0)
SAMPLE_UUID = "6a1f0c2e-4b7d-4e51-9a3c-2f8d7e6b5a41"
DISK_SIZE = 64 << 20


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def _chown(path: str) -> None:
    pw = pwd.getpwnam(QEMU_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _qmp(sock: str, *commands: tuple[str, dict | None]) -> list:
    async def session():
        client = QMPClient("domxml-test")
        await asyncio.wait_for(client.connect(sock), 10)
        try:
            return [await asyncio.wait_for(client.execute(cmd, args), 10) for cmd, args in commands]
        finally:
            await client.disconnect()
    return asyncio.run(session())


def _offers_oob(sock: str) -> bool:
    async def session():
        client = QMPClient("domxml-test")
        await asyncio.wait_for(client.connect(sock), 10)
        try:
            return "oob" in client.greeting.QMP.capabilities
        finally:
            await client.disconnect()
    return asyncio.run(session())


def _wait_for(path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def _cmdline(dom: libvirt.virDomain) -> list[str]:
    with open(f"/run/libvirt/qemu/{dom.name()}.pid") as f:
        pid = int(f.read().strip())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


class Lab:
    """Files, loop devices and domains of one test, all removed in `close`."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="ftdx-", dir="/var/tmp")
        os.chmod(self.base, 0o755)
        self.loops: list[str] = []
        self.domains: list[libvirt.virDomain] = []

    def dir(self, name: str) -> str:
        path = os.path.join(self.base, name)
        os.makedirs(path, exist_ok=True)
        _chown(path)
        return path

    def image(self, path: str, fmt: str) -> str:
        _run("qemu-img", "create", "-q", "-f", fmt, path, str(DISK_SIZE))
        _chown(path)
        return path

    def loop(self, path: str) -> str:
        loop = _run("losetup", "--find", "--show", path).strip()
        self.loops.append(loop)
        _chown(loop)
        return loop

    def start(self, conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
        dom = conn.createXML(xml, 0)
        self.domains.append(dom)
        return dom

    def close(self) -> None:
        for dom in self.domains:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def lab(libvirtd, kvm):
    lab = Lab()
    yield lab
    lab.close()


def _block_disks_allowed() -> bool:
    """Whether this host's libvirt lets QEMU open devices its XML does not name."""
    conf = {}
    with open("/etc/libvirt/qemu.conf") as f:
        for line in f:
            m = re.match(r"\s*(namespaces|cgroup_controllers)\s*=\s*(.*)", line)
            if m:
                conf[m.group(1)] = m.group(2).strip()
    no_ns = conf.get("namespaces", "").replace(" ", "") == "[]"
    no_dev_cgroup = "cgroup_controllers" in conf and "devices" not in conf["cgroup_controllers"]
    return no_ns and no_dev_cgroup


def runnable_engine_xml(lab: Lab, block_disk: bool = False,
                        sample: str = "engine-i440fx.xml") -> tuple[str, str]:
    """The sample engine XML with host-specific parts replaced; returns (xml, vm_uuid).

    The sample's block-domain disk becomes a loop device if `block_disk`, else a file.
    """
    with open(os.path.join(DATA, sample)) as f:
        xml = f.read()
    vm_uuid = str(uuid.uuid4())
    images = lab.dir("img,dir'x")
    paths = {
        "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d": lab.image(f"{images}/disk0,raw", "raw"),
        "8b7c6d5e-4f3a-4b2c-8d9e-0f1a2b3c4d5e": lab.image(f"{images}/disk1'q.qcow2", "qcow2"),
    }
    disk2 = lab.image(f"{images}/disk2.qcow2", "qcow2")
    paths["b3335e60-6d27-46e0-bed8-50e75cca6786"] = lab.loop(disk2) if block_disk else disk2
    if not block_disk:
        xml = xml.replace('<disk snapshot="no" type="block" device="disk">',
                          '<disk snapshot="no" type="file" device="disk">')
        xml = xml.replace('<source dev="/rhev/data-center/mnt/blockSD/',
                          '<source file="/rhev/data-center/mnt/blockSD/')
    for volume, path in paths.items():
        xml = re.sub(r'(file|dev)="/rhev/data-center/[^"]*' + volume + '"',
                     lambda m: f'{m.group(1)}="{path.replace(chr(39), "&apos;")}"', xml)
    xml = xml.replace(SAMPLE_UUID, vm_uuid)
    xml = xml.replace("<name>web01</name>", f"<name>ftdx-{vm_uuid[:8]}</name>")
    xml = xml.replace("/var/lib/libvirt/qemu/channels/", lab.dir("ch") + "/")
    xml = xml.replace("pc-i440fx-rhel7.6.0", "pc-i440fx-7.2").replace("pc-q35-rhel8.6.0", "pc-q35-7.2")
    xml = re.sub(r"<memory>\d+</memory>", "<memory>131072</memory>", xml)
    xml = re.sub(r"<currentMemory>\d+</currentMemory>", "<currentMemory>131072</currentMemory>", xml)
    xml = xml.replace('memory="2097152"', 'memory="131072"')
    xml = re.sub(r"<model>Skylake[^<]*</model>\s*<feature [^>]*/>",
                 "<model fallback='allow'>qemu64</model>", xml)
    xml = xml.replace('<cpu match="exact">', "<cpu mode='custom' match='exact' check='none'>")
    xml = xml.replace('<listen type="network" network="vdsm-ovirtmgmt"/>',
                      '<listen type="address" address="127.0.0.1"/>')
    xml = re.sub(r'\s*<channel name="\w+" mode="secure"/>', "", xml.replace(' tlsPort="-1"', ""))
    # A third NIC without a user alias: libvirt names its netdev hostnet0.
    xml = xml.replace("</devices>", '<interface type="user"><model type="virtio"/>'
                      '<mac address="56:6f:5a:8e:00:03"/></interface></devices>', 1)
    # User networking has no multiqueue; the vhost driver must still be switched off.
    xml = xml.replace('<interface type="bridge">', '<interface type="user">')
    xml = xml.replace('<driver queues="2" name="vhost"/>', '<driver name="vhost"/>')
    xml = re.sub(r'\s*<source bridge="[^"]*"/>|\s*<mtu [^>]*/>|\s*<filterref [^>]*/>|\s*<bandwidth/>',
                 "", xml)
    return xml, vm_uuid


def _block_nodes(sock: str) -> dict[str, dict]:
    (nodes,) = _qmp(sock, ("query-named-block-nodes", {"flat": True}))
    return {n["node-name"]: n for n in nodes}


def _engine_disks(xml: str) -> list[dict]:
    """Alias, serial, target, PCI slot / drive address, boot order and source per disk."""
    root = etree.fromstring(xml.encode())
    out = []
    for d in root.iterfind("devices/disk[@device='disk']"):
        addr, boot, src = d.find("address"), d.find("boot"), d.find("source")
        out.append({"alias": d.find("alias").get("name"), "serial": d.findtext("serial"),
                    "target": d.find("target").get("dev"),
                    "address": {k: v for k, v in (addr.attrib.items() if addr is not None
                                                  else ()) if k in ("type", "slot", "unit",
                                                                    "controller")},
                    "boot": boot.get("order") if boot is not None else None,
                    "source": src.get("file") or src.get("dev")})
    return out


def _devices_on(sock: str) -> dict[str, str]:
    """Block node -> the guest device that uses it (query-block)."""
    (blocks,) = _qmp(sock, ("query-block", None))
    return {b["inserted"]["node-name"]: b["qdev"] for b in blocks
            if b.get("inserted") and b.get("qdev")}


def _qemu_io_write(sock: str, qdev: str) -> None:
    (out,) = _qmp(sock, ("human-monitor-command",
                         {"command-line": f'qemu-io -d {qdev} "write -P 0x5a 0 64k"'}))
    assert out.strip() == "", out


def _pci(sock: str) -> list[tuple]:
    (buses,) = _qmp(sock, ("query-pci", None))
    return sorted((d["bus"], d["slot"], d["function"], d["id"]["vendor"], d["id"]["device"],
                   d.get("qdev_id", "")) for b in buses for d in b["devices"])


def _libvirt_addresses(dom: libvirt.virDomain) -> dict[str, tuple]:
    root = etree.fromstring(dom.XMLDesc(0).encode())
    out = {}
    for el in root.find("devices"):
        addr, alias = el.find("address"), el.find("alias")
        if addr is not None and alias is not None:
            out[alias.get("name")] = tuple(sorted(addr.attrib.items()))
    return out


@pytest.mark.parametrize("sample, qemu_version", [
    ("engine-i440fx.xml", QEMU_VERSION),
    ("engine-i440fx-first-run.xml", QEMU_VERSION),
    # q35 is refused for COLO on 7.2; posing as 11.0 shows libvirt accepts and starts the
    # q35 variant (COLO itself with q35 cannot run here).
    ("engine-q35.xml", (11, 0, 0)),
])
def test_libvirtd_starts_the_primary_and_the_secondary(lab, libvirtd, sample, qemu_version):
    conn = libvirt.open(libvirtd.uri)
    engine_xml, vm_uuid = runnable_engine_xml(lab, sample=sample)
    assert ftvalue.parse(domxml.ft_property(engine_xml)) is True

    # --- primary: running under KVM, its quorums on the private QMP socket
    prun = lab.dir("run,p'1")
    vm = domxml.layout_from_domxml(engine_xml, prun)
    pxml = domxml.primary_xml(engine_xml, prun, qemu_version)
    runfiles.make_placeholders(pxml)
    primary = lab.start(conn, pxml)
    _wait_for(vm.qmp_socket)
    state, _ = primary.state()
    assert state == libvirt.VIR_DOMAIN_RUNNING
    (status,) = _qmp(vm.qmp_socket, ("query-status", None))
    assert status["status"] == "running"
    # yank must work on this monitor (docs/decisions.md, D5)
    assert _offers_oob(vm.qmp_socket)
    nodes = _block_nodes(vm.qmp_socket)
    for d in vm.disks:
        assert nodes[d.quorum]["drv"] == "quorum"
        assert nodes[d.primary_child]["drv"] == d.fmt
        assert nodes[d.primary_child]["file"] == d.image
    # libvirt built each guest disk device from the engine's <disk> (named by its alias)
    # and <qemu:override> put it on our quorum.
    aliases = _engine_disks(engine_xml)
    assert _devices_on(vm.qmp_socket) == {
        vm.disks[0].quorum: f"/machine/peripheral/{aliases[0]['alias']}/virtio-backend",
        vm.disks[1].quorum: f"/machine/peripheral/{aliases[1]['alias']}/virtio-backend",
        vm.disks[2].quorum: aliases[2]["alias"]}
    # Host-side qemu-io through the guest device lands in the quorum's image.
    _qemu_io_write(vm.qmp_socket, f"/machine/peripheral/{aliases[0]['alias']}/virtio-backend")
    # No image is opened twice: each appears once on the command line, in our node.
    cmd_args = _cmdline(primary)
    for d in vm.disks:
        assert sum(domxml.qemu_escape(d.image) in a for a in cmd_args) == 1, d.image
    # libvirt derives the netdev ids layout_from_domxml predicts.
    cmd = " ".join(_cmdline(primary))
    assert [n.netdev for n in vm.nics] == ["hostua-7d7b11a5-ccd5-4528-9273-4b9d328e61e8",
                                           "hostua-8e8c22b6-dde6-4639-a384-5cae439f72f9",
                                           "hostnet0"]
    for nic in vm.nics:
        assert f'"id":"{nic.netdev}"' in cmd
    # Host.dumpxmls shows every engine disk as the engine wrote it: alias, serial,
    # address, boot order; only the source is the placeholder. The CD-ROM is untouched.
    live = etree.fromstring(primary.XMLDesc(0).encode())
    assert [d.get("device") for d in live.iterfind("devices/disk")] == ["cdrom", "disk",
                                                                         "disk", "disk"]
    shown = _engine_disks(primary.XMLDesc(0))
    assert [d["source"] for d in shown] == [domxml.placeholder_path(prun, vm_uuid, i)
                                            for i in range(len(aliases))]
    for want, got in zip(aliases, shown):
        assert {k: got[k] for k in ("alias", "serial", "target", "boot")} == \
            {k: want[k] for k in ("alias", "serial", "target", "boot")}
        assert want["address"].items() <= got["address"].items()     # the engine's address
    assert all(i.find("driver").get("name") == "qemu" for i in live.iterfind("devices/interface"))

    # --- secondary: started, paused in inmigrate, replication chain in place
    srun = lab.dir("run,s'1")
    overlays = lab.dir("ovl,s")
    replicas = lab.dir("rep,l'ica")
    disks = []
    for d in vm.disks:
        image = lab.image(f"{replicas}/disk{d.index}.{d.fmt}", d.fmt)
        disks.append(layout.Disk(index=d.index, image=image, size=DISK_SIZE, fmt=d.fmt,
                                 hidden=lab.image(f"{overlays}/hidden{d.index}.qcow2", "qcow2"),
                                 active=lab.image(f"{overlays}/active{d.index}.qcow2", "qcow2")))
    endpoints = layout.Endpoints(primary_host="127.0.0.1", secondary_host="127.0.0.1",
                                 migration_port=0, nbd_port=0,
                                 mirror_ports=(1, 3, 5), compare_ports=(2, 4, 6))
    sxml = domxml.secondary_xml(engine_xml, srun, disks, endpoints, 1, qemu_version)
    runfiles.make_placeholders(sxml)
    secondary = lab.start(conn, sxml)
    ssock = layout.qmp_socket(srun, domxml.secondary_name(primary.name()))
    _wait_for(ssock)
    assert secondary.UUIDString() == domxml.secondary_uuid(vm_uuid, 1)
    assert secondary.name() == domxml.secondary_name(primary.name())
    state, _ = secondary.state()
    assert state == libvirt.VIR_DOMAIN_PAUSED
    (status, guest_uuid, objects) = _qmp(ssock, ("query-status", None), ("query-uuid", None),
                                         ("qom-list", {"path": "/objects"}))
    assert status["status"] == "inmigrate"
    assert guest_uuid["UUID"] == vm_uuid            # the guest keeps its SMBIOS identity
    names = {o["name"] for o in objects}
    for i, nic in enumerate(vm.nics):
        assert {nic.filter_sec_in, nic.filter_sec_out, nic.rewriter} <= names
    snodes = _block_nodes(ssock)
    for d in disks:
        assert snodes[layout.SECONDARY_REPLICATION_FMT.format(d.index)]["drv"] == "replication"
        assert snodes[d.quorum]["drv"] == "quorum"
        chain = json.loads(snodes[layout.SECONDARY_ACTIVE_FMT.format(d.index)]["backing_file"]
                           .removeprefix("json:"))
        assert chain["file"]["filename"] == d.hidden            # active -> hidden -> parent
        assert chain["backing"]["file"]["filename"] == d.image
        assert snodes[d.parent]["file"] == d.image

    # --- both sides: identical guest-visible PCI layout and libvirt addresses
    ppci = _pci(vm.qmp_socket)
    assert ppci == _pci(ssock)
    assert {aliases[0]["alias"], aliases[1]["alias"]} <= {p[-1] for p in ppci}
    assert _devices_on(ssock) == _devices_on(vm.qmp_socket)
    paddr, saddr = _libvirt_addresses(primary), _libvirt_addresses(secondary)
    assert paddr == saddr and len(paddr) >= 8


def test_block_disk_needs_libvirt_host_config(lab, libvirtd):
    """A block-domain disk (host_device node) opens only where the host's libvirt lets
    QEMU reach devices its XML does not name: qemu.conf `namespaces = []` and
    `cgroup_controllers` without "devices". The host installer must set both."""
    conn = libvirt.open(libvirtd.uri)
    engine_xml, _ = runnable_engine_xml(lab, block_disk=True)
    run = lab.dir("run-blk")
    xml = domxml.primary_xml(engine_xml, run, QEMU_VERSION)
    runfiles.make_placeholders(xml)
    assert "driver=host_device,filename=/dev/loop" in xml
    if _block_disks_allowed():
        lab.start(conn, xml)
        _wait_for(os.path.join(run, "qmp.sock"))
        assert _block_nodes(os.path.join(run, "qmp.sock"))["ft-disk2-file"]["drv"] == "host_device"
    else:
        with pytest.raises(libvirt.libvirtError, match=r"Could not open '/dev/loop\d+': "
                           r"(No such file or directory|Operation not permitted)"):
            lab.start(conn, xml)
