"""domxml: the engine's domain XML in, the COLO primary and secondary XML out."""
from __future__ import annotations

import json
import os
import uuid

import pytest
from lxml import etree

from vdsm_ft import domxml, layout

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
QEMU_72 = (7, 2, 0)
RUN = "/run/vdsm-ft/6a1f0c2e"
VM_UUID = "6a1f0c2e-4b7d-4e51-9a3c-2f8d7e6b5a41"
Q = "{%s}" % domxml.QEMU_NS


def engine(name: str = "engine-i440fx.xml") -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def args(xml: str) -> list[str]:
    root = etree.fromstring(xml.encode())
    return [a.get("value") for a in root.iterfind(f"{Q}commandline/{Q}arg")]


def options(xml: str, flag: str) -> list[str]:
    a = args(xml)
    return [a[i + 1] for i, v in enumerate(a) if v == flag]


def devices(xml: str) -> list[dict]:
    return [json.loads(d) for d in options(xml, "-device")]


def overrides(xml: str) -> dict[str, dict[str, tuple[str, str]]]:
    """<qemu:override>: device alias -> {property: (type, value)}."""
    root = etree.fromstring(xml.encode())
    return {dev.get("alias"): {p.get("name"): (p.get("type"), p.get("value"))
                               for p in dev.iterfind(f"{Q}frontend/{Q}property")}
            for dev in root.iterfind(f"{Q}override/{Q}device")}


def guest_disks(xml: str) -> list[etree._Element]:
    return tree(xml).findall("devices/disk[@device='disk']")


ENGINE_DISK_ALIASES = ["ua-c3f2a1b0-9e8d-4c7b-a6f5-e4d3c2b1a0f9",
                       "ua-d4e3f2a1-0b9c-4d8e-b7a6-f5e4d3c2b1a0",
                       "ua-b07a37de-95d6-4682-84cd-c8c9201327e3"]


def replicas(n: int = 3) -> list[layout.Disk]:
    return [layout.Disk(index=i, image=f"/var/lib/vdsm-ft/replicas/{VM_UUID}/disk{i}.qcow2",
                        size=1 << 30, fmt="qcow2", active=f"/dev/shm/vdsm-ft/active{i}.qcow2",
                        hidden=f"/dev/shm/vdsm-ft/hidden{i}.qcow2") for i in range(n)]


ENDPOINTS = layout.Endpoints(primary_host="192.0.2.1", secondary_host="192.0.2.2",
                             migration_port=49152, nbd_port=49153,
                             mirror_ports=(49154, 49156), compare_ports=(49155, 49157))


def secondary(xml: str | None = None, generation: int = 1, disks=None) -> str:
    xml = xml if xml is not None else engine()
    return domxml.secondary_xml(xml, RUN, disks if disks is not None else replicas(), ENDPOINTS,
                                generation, QEMU_72)


def tree(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def pci_addresses(xml: str) -> dict[str, tuple]:
    """Every libvirt device with an address, keyed by tag + alias (or ordinal), plus the
    pinned slots of the COLO disk devices from the command line."""
    root = tree(xml)
    out, seen = {}, {}
    for el in root.find("devices"):
        if not isinstance(el.tag, str):
            continue
        nth = seen[el.tag] = seen.get(el.tag, -1) + 1
        addr = el.find("address")
        if addr is None:
            continue
        alias = el.find("alias")
        key = f"{el.tag}:{alias.get('name') if alias is not None else nth}"
        out[key] = tuple(sorted(addr.attrib.items()))
    for dev in devices(xml):
        out["qemu:" + dev["id"]] = dev
    return out


def with_devices(extra: str, xml: str | None = None) -> str:
    xml = xml if xml is not None else engine()
    return xml.replace("</devices>", extra + "\n  </devices>", 1)


# ---------------------------------------------------------------------------- primary

def test_primary_keeps_every_engine_disk_with_its_device_on_a_quorum():
    out = domxml.primary_xml(engine(), RUN, QEMU_72)
    root = tree(out)
    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["cdrom", "disk", "disk", "disk"]
    cdrom = tree(engine()).find("devices/disk[@device='cdrom']")
    shape = lambda el: [(e.tag, dict(e.attrib), (e.text or "").strip()) for e in el.iter()]
    assert shape(disks[0]) == shape(cdrom)                 # the CD-ROM is untouched
    # Each engine disk stays for libvirt and dumpxmls, on a placeholder source: libvirt
    # opens no image; the device is pointed at our quorum.
    for i, (el, alias) in enumerate(zip(guest_disks(out), ENGINE_DISK_ALIASES)):
        assert el.find("alias").get("name") == alias
        assert el.get("type") == "file"
        assert el.find("source").attrib == {"file": f"{RUN}/{VM_UUID}-disk{i}.placeholder"}
        assert el.find("driver").get("type") == "raw"
        assert el.find("driver").get("cache") is None and el.find("driver").get("io") is None
        assert el.find("backingStore") is None
    assert overrides(out) == {
        alias: {"drive": ("string", f"ft-quorum{i}"), "share-rw": ("bool", "true"),
                "write-cache": ("string", "on")}
        for i, alias in enumerate(ENGINE_DISK_ALIASES)}
    assert devices(out) == []                  # libvirt builds the guest disk devices
    blockdevs = options(out, "-blockdev")
    assert blockdevs[0].startswith("driver=file,filename=/rhev/data-center/mnt/nfs.example.com")
    assert blockdevs[0].endswith(",node-name=ft-disk0-file,cache.direct=on")
    assert blockdevs[1] == "driver=raw,file=ft-disk0-file,node-name=ft-disk0"
    assert blockdevs[2] == ("driver=quorum,node-name=ft-quorum0,read-pattern=fifo,"
                            "vote-threshold=1,children.0=ft-disk0")
    assert blockdevs[4] == "driver=qcow2,file=ft-disk1-file,node-name=ft-disk1,discard=unmap"
    # The disk on the block domain is a host_device node with native AIO.
    assert blockdevs[6].startswith("driver=host_device,filename=/rhev/data-center/mnt/blockSD/")
    assert "aio=native" in blockdevs[6]
    assert blockdevs[8].endswith("children.0=ft-disk2")


def test_primary_guest_disks_keep_engine_slots_boot_order_serial_and_error_policy():
    engine_disks = tree(engine()).findall("devices/disk[@device='disk']")
    out = guest_disks(domxml.primary_xml(engine(), RUN, QEMU_72))
    for want, got in zip(engine_disks, out):
        assert got.find("address").attrib == want.find("address").attrib
        assert got.findtext("serial") == want.findtext("serial")
        assert got.find("target").attrib == want.find("target").attrib
        assert got.find("driver").get("error_policy") == want.find("driver").get("error_policy")
        assert (got.find("boot") is None) == (want.find("boot") is None)
    assert out[0].find("address").get("slot") == "0x07" and out[0].find("boot").get("order") == "1"
    assert out[2].find("address").attrib["type"] == "drive"


def test_write_through_cache_modes_keep_the_guests_write_cache_off():
    xml = engine().replace('cache="none"', 'cache="writethrough"', 1)
    got = overrides(domxml.primary_xml(xml, RUN, QEMU_72))
    assert got[ENGINE_DISK_ALIASES[0]]["write-cache"] == ("string", "off")
    assert got[ENGINE_DISK_ALIASES[1]]["write-cache"] == ("string", "on")


def test_a_disk_without_a_user_alias_gets_one_for_the_override():
    root = tree(engine())
    first = root.find("devices/disk[@device='disk']")
    first.remove(first.find("alias"))
    out = domxml.primary_xml(etree.tostring(root, encoding="unicode"), RUN, QEMU_72)
    assert guest_disks(out)[0].find("alias").get("name") == "ua-ft-disk0"
    assert overrides(out)["ua-ft-disk0"]["drive"] == ("string", "ft-quorum0")


def test_primary_turns_vhost_off_on_every_nic_and_keeps_queues():
    root = tree(domxml.primary_xml(engine(), RUN, QEMU_72))
    drivers = [i.find("driver") for i in root.iterfind("devices/interface")]
    assert [d.get("name") for d in drivers] == ["qemu", "qemu"]
    assert drivers[0].get("queues") == "2"


def test_primary_has_the_private_qmp_monitor_and_keeps_identity():
    out = domxml.primary_xml(engine(), RUN, QEMU_72)
    assert options(out, "-chardev") == [
        f"socket,id={layout.QMP_CHARDEV},path={RUN}/qmp.sock,server=on,wait=off"]
    assert options(out, "-mon") == [f"chardev={layout.QMP_CHARDEV},mode=control"]
    root = tree(out)
    assert root.findtext("uuid") == VM_UUID and root.findtext("name") == "web01"
    assert root.find("os/type").get("machine") == "pc-i440fx-rhel7.6.0"
    assert root.find("metadata") is not None and root.find("devices/lease") is not None
    assert "-incoming" not in args(out)


def test_identity_domain_is_the_primary_on_the_replicas_waiting_for_a_migration():
    out = domxml.identity_xml(engine(), RUN, tuple(replicas()), QEMU_72)
    root = tree(out)
    # The VM's own identity, so that VDSM adopts it as the VM (docs/engine-view.md).
    assert root.findtext("uuid") == VM_UUID and root.findtext("name") == "web01"
    assert root.find(f"metadata/{{{domxml.OVIRT_VM_NS}}}vm") is not None
    blockdevs = options(out, "-blockdev")
    assert blockdevs[0] == (f"driver=file,filename=/var/lib/vdsm-ft/replicas/{VM_UUID}/"
                            "disk0.qcow2,node-name=ft-disk0-file,cache.direct=on")
    assert blockdevs[1] == "driver=qcow2,file=ft-disk0-file,node-name=ft-disk0"
    assert blockdevs[6].startswith("driver=file,filename=/var/lib/vdsm-ft/replicas/")
    assert blockdevs[8].endswith("children.0=ft-disk2")
    # Same guest devices as on the primary (the migration stream needs them), none of
    # the secondary's filters, and the primary's QMP socket, not the secondary's.
    assert devices(out) == devices(domxml.primary_xml(engine(), RUN, QEMU_72))
    assert options(out, "-object") == []
    assert options(out, "-chardev") == [
        f"socket,id={layout.QMP_CHARDEV},path={RUN}/qmp.sock,server=on,wait=off"]
    assert args(out)[-2:] == ["-incoming", "defer"]


def test_identity_domain_needs_a_replica_for_every_disk():
    with pytest.raises(domxml.DomXmlError, match="3 disks"):
        domxml.identity_xml(engine(), RUN, tuple(replicas(2)), QEMU_72)


def test_primary_without_machine_type_gets_i440fx():
    xml = engine().replace(' machine="pc-i440fx-rhel7.6.0"', "")
    assert tree(domxml.primary_xml(xml, RUN, QEMU_72)).find("os/type").get("machine") == "pc"


# --------------------------------------------------------------------------- escaping

def test_qemu_escape_doubles_commas_only():
    assert domxml.qemu_escape("/a,b'c=d") == "/a,,b'c=d"


def test_paths_and_names_with_commas_and_quotes_are_escaped():
    evil = "/rhev/data-center/mnt/srv:_ex,ports/it's,here/disk"
    xml = engine().replace(
        "/rhev/data-center/mnt/nfs.example.com:_exports_data/5e3c1a9f-2d4b-4c8e-9a7f-1b3d5e7f9a2c/"
        "images/c3f2a1b0-9e8d-4c7b-a6f5-e4d3c2b1a0f9/7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d",
        evil.replace("'", "&apos;"))
    xml = xml.replace("<serial>c3f2a1b0-9e8d-4c7b-a6f5-e4d3c2b1a0f9</serial>",
                      "<serial>ser,ial</serial>")
    run = "/run/ft,vm'1"
    out = domxml.primary_xml(xml, run, QEMU_72)
    assert options(out, "-blockdev")[0].startswith(
        "driver=file,filename=/rhev/data-center/mnt/srv:_ex,,ports/it's,,here/disk,node-name=")
    # The serial stays in the <disk>: libvirt writes the JSON device, no escaping here.
    assert guest_disks(out)[0].findtext("serial") == "ser,ial"
    assert guest_disks(out)[0].find("source").get("file") == \
        f"/run/ft,vm'1/{VM_UUID}-disk0.placeholder"
    assert domxml.placeholders(out) == [f"/run/ft,vm'1/{VM_UUID}-disk{i}.placeholder"
                                        for i in range(3)]
    assert options(out, "-chardev")[0] == "socket,id=ftqmp,path=/run/ft,,vm'1/qmp.sock,server=on,wait=off"
    disks = replicas()
    disks[0] = layout.Disk(index=0, image="/srv/re,p'l/d0", size=1, fmt="raw",
                           active="/dev/shm/a,0", hidden="/dev/shm/h,0")
    sec = domxml.secondary_xml(xml, run, disks, ENDPOINTS, 1, QEMU_72)
    blockdevs = options(sec, "-blockdev")
    assert "filename=/srv/re,,p'l/d0," in blockdevs[0]
    assert any("filename=/dev/shm/h,,0," in b for b in blockdevs)
    assert any("filename=/dev/shm/a,,0," in b for b in blockdevs)


# ---------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("device, reason", [
    ("<interface type='vhostuser'><mac address='56:6f:5a:8e:00:09'/><model type='virtio'/>"
     "<source type='unix' path='/run/vhu.sock' mode='client'/></interface>", "vhost-user"),
    ("<interface type='hostdev' managed='yes'><mac address='56:6f:5a:8e:00:09'/><source>"
     "<address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/></source>"
     "</interface>", "SR-IOV"),
    ("<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' "
     "bus='0x5e' slot='0x00' function='0x0'/></source></hostdev>", "host device"),
    ("<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>", "vDPA"),
    ("<disk type='block' device='lun' sgio='filtered' snapshot='no'><target dev='sdb' bus='scsi'/>"
     "<source dev='/dev/mapper/36001405abcdef'/><driver name='qemu' type='raw'/></disk>",
     "direct LUN"),
    ("<disk type='block' device='disk' snapshot='no'><target dev='vdc' bus='virtio'/>"
     "<source dev='/dev/mapper/36001405abcdef'/><driver name='qemu' type='raw'/></disk>",
     "direct LUN"),
    ("<disk type='network' device='disk' snapshot='no'><target dev='vdc' bus='virtio'/>"
     "<source protocol='rbd' name='pool/vol'><host name='ceph1' port='6789'/></source>"
     "<driver name='qemu' type='raw'/></disk>", "Ceph RBD"),
    ("<disk type='file' device='disk' snapshot='no'><target dev='hda' bus='ide'/>"
     "<source file='/rhev/data-center/x/y'/><driver name='qemu' type='raw'/></disk>",
     "ide interface"),
])
def test_refusals_name_the_cause_and_the_fix(device, reason):
    xml = with_devices(device)
    for make in (lambda: domxml.primary_xml(xml, RUN, QEMU_72), lambda: secondary(xml),
                 lambda: domxml.layout_from_domxml(xml, RUN)):
        with pytest.raises(domxml.Unsupported) as e:
            make()
        assert reason in e.value.reason
        assert e.value.fix and "Fix:" in str(e.value)
        assert isinstance(e.value, domxml.DomXmlError)


def test_q35_is_refused_on_qemu_7_2_with_the_chipset_fix():
    with pytest.raises(domxml.Unsupported) as e:
        domxml.primary_xml(engine("engine-q35.xml"), RUN, QEMU_72)
    assert "q35" in e.value.reason and "7.2.0" in e.value.reason
    assert "i440fx" in e.value.fix
    with pytest.raises(domxml.Unsupported):
        secondary(engine("engine-q35.xml"))


def test_q35_is_kept_where_colo_handles_it():
    out = domxml.primary_xml(engine("engine-q35.xml"), RUN, (11, 0, 0))
    assert tree(out).find("os/type").get("machine") == "pc-q35-rhel8.6.0"
    disks = guest_disks(out)
    assert [(d.find("address").get("bus"), d.find("address").get("slot")) for d in disks[:2]] \
        == [("0x00", "0x1e"), ("0x00", "0x1d")]


def test_other_architectures_and_machines_are_refused():
    with pytest.raises(domxml.Unsupported, match="ppc64le"):
        domxml.primary_xml(engine().replace('arch="x86_64"', 'arch="ppc64le"'), RUN, QEMU_72)
    with pytest.raises(domxml.Unsupported, match="microvm"):
        domxml.primary_xml(engine().replace("pc-i440fx-rhel7.6.0", "microvm"), RUN, QEMU_72)


@pytest.mark.parametrize("bad", ["<domain><name>x</name", "", "<vm/>",
                                 "<domain type='kvm'><name>x</name></domain>"])
def test_malformed_xml_raises_with_the_parser_message(bad):
    with pytest.raises(domxml.MalformedXml) as e:
        domxml.primary_xml(bad, RUN, QEMU_72)
    assert str(e.value)


def test_malformed_xml_carries_the_parser_message():
    with pytest.raises(domxml.MalformedXml, match="line 1"):
        domxml.ft_property("<domain><name>x</name")


def test_a_second_qemu_commandline_is_refused():
    xml = engine().replace(
        "</domain>", "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        "<qemu:arg value='-S'/></qemu:commandline></domain>")
    with pytest.raises(domxml.DomXmlError, match="qemu:commandline"):
        domxml.primary_xml(xml, RUN, QEMU_72)


def test_engine_disk_slot_used_by_another_device_is_an_error():
    xml = engine().replace('function="0x0" slot="0x07" type="pci"', 'function="0x0" slot="0x09" type="pci"')
    with pytest.raises(domxml.DomXmlError, match="0x09"):
        domxml.primary_xml(xml, RUN, QEMU_72)


# ---------------------------------------------------------------------- ft property

def test_ft_property_reads_the_ovirt_custom_metadata():
    assert domxml.ft_property(engine()) == "true"
    assert domxml.ft_property(engine().replace("<ovirt-vm:ft>true</ovirt-vm:ft>", "")) is None
    no_md = engine().split("<metadata>")[0] + "</domain>"
    assert domxml.ft_property(no_md) is None
    yes = engine().replace("<ovirt-vm:ft>true<", "<ovirt-vm:ft>yes<")
    assert domxml.ft_property(yes) == "yes"


# -------------------------------------------------------------------------- secondary

def test_secondary_identity_is_derived_and_has_no_metadata_or_lease():
    out = secondary(generation=4)
    root = tree(out)
    expected = str(uuid.uuid5(layout.FT_NAMESPACE, f"{VM_UUID}/secondary/4"))
    assert root.findtext("uuid") == expected == domxml.secondary_uuid(VM_UUID, 4)
    assert tree(secondary(generation=5)).findtext("uuid") != expected
    assert root.findtext("name") == "web01-ft-secondary"
    assert root.find("metadata") is None and root.find("devices/lease") is None
    assert b"ovirt.org/vm/1.0\">" not in etree.tostring(root.find("devices"))
    # libvirt wants SMBIOS uuid == <uuid>; the guest keeps its own through -smbios.
    assert root.findtext("sysinfo/system/entry[@name='uuid']") == expected
    assert options(out, "-smbios") == [f"type=1,uuid={VM_UUID}"]
    paths = [c.find("source").get("path") for c in root.iterfind("devices/channel[@type='unix']")]
    assert paths and all(expected in p and VM_UUID not in p for p in paths)


def test_secondary_console_log_is_its_own_file():
    log = f"/var/log/ftlab/{VM_UUID}.serial"
    root = tree(secondary(with_devices(
        f"<serial type='file'><source path='{log}'/><target port='0'/></serial>"),
        generation=3))
    expected = domxml.secondary_uuid(VM_UUID, 3)
    assert root.find("devices/serial/source").get("path") == \
        f"/var/log/ftlab/{expected}.serial"


def test_secondary_waits_for_migration_with_a_replication_chain_per_disk():
    out = secondary()
    a = args(out)
    assert a[-2:] == ["-incoming", "defer"]
    b = options(out, "-blockdev")
    assert len(b) == 3 * 8
    assert b[0] == (f"driver=file,filename=/var/lib/vdsm-ft/replicas/{VM_UUID}/disk0.qcow2,"
                    "node-name=ft-parent0-file,cache.direct=on")
    assert b[1] == "driver=qcow2,file=ft-parent0-file,node-name=ft-parent0"
    assert b[3] == "driver=qcow2,file=ft-hidden0-file,node-name=ft-hidden0,backing=ft-parent0"
    assert b[5] == "driver=qcow2,file=ft-active0-file,node-name=ft-active0,backing=ft-hidden0"
    assert b[6] == ("driver=replication,mode=secondary,top-id=ft-quorum0,file=ft-active0,"
                    "node-name=ft-repl0")
    assert b[7] == ("driver=quorum,node-name=ft-quorum0,read-pattern=fifo,vote-threshold=1,"
                    "children.0=ft-repl0")
    # The same <disk> representation as the primary, each device on its quorum.
    assert overrides(out) == overrides(domxml.primary_xml(engine(), RUN, QEMU_72))
    assert [d.find("alias").get("name") for d in guest_disks(out)] == ENGINE_DISK_ALIASES


def test_secondary_has_redirectors_and_rewriter_per_nic_on_libvirts_netdev():
    out = secondary()
    net0 = "hostua-7d7b11a5-ccd5-4528-9273-4b9d328e61e8"
    net1 = "hostua-8e8c22b6-dde6-4639-a384-5cae439f72f9"
    assert options(out, "-chardev") == [
        "socket,id=ft-red0-0,host=192.0.2.1,port=49154,reconnect=1,nodelay=on",
        "socket,id=ft-red0-1,host=192.0.2.1,port=49155,reconnect=1,nodelay=on",
        "socket,id=ft-red1-0,host=192.0.2.1,port=49156,reconnect=1,nodelay=on",
        "socket,id=ft-red1-1,host=192.0.2.1,port=49157,reconnect=1,nodelay=on",
        f"socket,id=ftqmp,path={RUN}/qmp-sec.sock,server=on,wait=off"]
    assert options(out, "-object") == [
        f"filter-redirector,id=ft-f0-1,netdev={net0},queue=tx,indev=ft-red0-0,vnet_hdr_support=on",
        f"filter-redirector,id=ft-f0-2,netdev={net0},queue=rx,outdev=ft-red0-1,vnet_hdr_support=on",
        f"filter-rewriter,id=ft-rew0,netdev={net0},queue=all,vnet_hdr_support=on",
        f"filter-redirector,id=ft-f1-1,netdev={net1},queue=tx,indev=ft-red1-0,vnet_hdr_support=on",
        f"filter-redirector,id=ft-f1-2,netdev={net1},queue=rx,outdev=ft-red1-1,vnet_hdr_support=on",
        f"filter-rewriter,id=ft-rew1,netdev={net1},queue=all,vnet_hdr_support=on"]
    assert [i.find("driver").get("name") for i in tree(out).iterfind("devices/interface")] == [
        "qemu", "qemu"]


def test_secondary_input_mismatches_are_errors():
    with pytest.raises(domxml.DomXmlError, match="3 disks but 2"):
        secondary(disks=replicas(2))
    with pytest.raises(domxml.DomXmlError, match="2 NICs"):
        domxml.secondary_xml(engine(), RUN, replicas(), layout.Endpoints(
            "192.0.2.1", "192.0.2.2", 1, 2, (3,), (4,)), 1, QEMU_72)
    no_overlay = [layout.Disk(index=i, image=f"/r{i}", size=1) for i in range(3)]
    with pytest.raises(domxml.DomXmlError, match="overlay"):
        secondary(disks=no_overlay)


def test_secondary_has_its_own_console_sockets_and_logs():
    # After a failover the VM's own domain starts beside the secondary on its host.
    xml = with_devices(
        f"<serial type='unix'><source mode='bind' path='/var/run/ovirt-vmconsole-console/"
        f"{VM_UUID}.sock'/><log file='/var/log/{VM_UUID}.serial'/></serial>"
        f"<console type='file'><source path='/var/log/{VM_UUID}.console'/></console>")
    root = tree(secondary(xml))
    sec_uuid = domxml.secondary_uuid(VM_UUID, 1)
    assert root.find("devices/serial/source").get("path") == \
        f"/var/run/ovirt-vmconsole-console/{sec_uuid}.sock"
    assert root.find("devices/serial/log").get("file") == f"/var/log/{sec_uuid}.serial"
    assert root.find("devices/console/source").get("path") == f"/var/log/{sec_uuid}.console"


def test_secondary_refuses_the_legacy_agent_channel():
    xml = with_devices("<channel type='unix'><target type='virtio' name='com.redhat.rhevm.vdsm'/>"
                       "<source mode='bind' path='/var/lib/libvirt/qemu/channels/x.vdsm'/></channel>")
    domxml.primary_xml(xml, RUN, QEMU_72)
    with pytest.raises(domxml.Unsupported, match="legacy"):
        secondary(xml)


# -------------------------------------------------------------- identical addresses

@pytest.mark.parametrize("sample", ["engine-i440fx.xml", "engine-i440fx-first-run.xml"])
def test_both_sides_have_identical_device_addresses(sample):
    primary = pci_addresses(domxml.primary_xml(engine(sample), RUN, QEMU_72))
    second = pci_addresses(secondary(engine(sample)))
    assert primary == second
    assert f"disk:{ENGINE_DISK_ALIASES[0]}" in primary and len(primary) > 8


def test_first_run_gets_every_pci_slot_pinned_without_collisions():
    out = domxml.primary_xml(engine("engine-i440fx-first-run.xml"), RUN, QEMU_72)
    root = tree(out)
    slots = {}
    for el in root.find("devices"):
        addr = el.find("address") if isinstance(el.tag, str) else None
        if addr is not None and addr.get("type") == "pci":
            slots.setdefault(int(addr.get("slot"), 16), []).append(el.tag)
    # The virtio disks without an address take slots from the top.
    assert slots[0x1f] == ["disk"] and slots[0x1e] == ["disk"]
    assert all(len(v) == 1 for v in slots.values()), slots
    assert slots[0x02] == ["video"]
    # libvirt would add a balloon by itself; it is named here so its slot is pinned.
    assert "memballoon" in sum(slots.values(), [])
    for tag in ("interface", "rng"):
        for el in root.iterfind(f"devices/{tag}"):
            assert el.find("address").get("type") == "pci"
    # libvirt's own fixed-address PIIX3 devices are left to libvirt.
    assert root.find("devices/controller[@type='usb']").find("address") is None


def test_nic_without_mac_gets_the_same_mac_on_both_sides():
    xml = with_devices("<interface type='bridge'><source bridge='ovirtmgmt'/><model type='virtio'/>"
                       "</interface>")
    ep = layout.Endpoints("192.0.2.1", "192.0.2.2", 1, 2, (3, 5, 7), (4, 6, 8))
    p = tree(domxml.primary_xml(xml, RUN, QEMU_72))
    s = tree(domxml.secondary_xml(xml, RUN, replicas(), ep, 1, QEMU_72))
    mac_p = p.findall("devices/interface")[2].find("mac").get("address")
    assert mac_p == s.findall("devices/interface")[2].find("mac").get("address")
    assert mac_p.startswith("52:54:00:")


# ----------------------------------------------------------------------------- layout

def test_layout_names_libvirts_netdevs_and_lists_the_disks():
    xml = with_devices("<interface type='bridge'><source bridge='b2'/><model type='virtio'/>"
                       "<mac address='56:6f:5a:8e:00:03'/></interface>")
    xml = xml.replace("<interface type=\"bridge\">", "<interface type='network'><source network='n'/>"
                      "<mac address='56:6f:5a:8e:00:00'/></interface><interface type=\"bridge\">", 1)
    vm = domxml.layout_from_domxml(xml, RUN)
    assert vm.vm_id == VM_UUID and vm.name == "web01" and vm.qmp_socket == f"{RUN}/qmp.sock"
    assert [n.netdev for n in vm.nics] == [
        "hostnet0", "hostua-7d7b11a5-ccd5-4528-9273-4b9d328e61e8",
        "hostua-8e8c22b6-dde6-4639-a384-5cae439f72f9", "hostnet1"]
    assert [n.mac for n in vm.nics] == ["56:6f:5a:8e:00:00", "56:6f:5a:8e:00:01",
                                        "56:6f:5a:8e:00:02", "56:6f:5a:8e:00:03"]
    assert [(d.index, d.fmt, d.size) for d in vm.disks] == [(0, "raw", 0), (1, "qcow2", 0),
                                                             (2, "qcow2", 0)]
    assert vm.disks[2].image.startswith("/rhev/data-center/mnt/blockSD/")
    assert [d.quorum for d in vm.disks] == ["ft-quorum0", "ft-quorum1", "ft-quorum2"]


def test_secondary_with_colo_tls_dials_the_primary_sockets_over_tls():
    plain = args(secondary())
    assert not any("tls-creds" in a for a in plain)
    xml = domxml.secondary_xml(engine(), RUN, replicas(), ENDPOINTS, 1, QEMU_72,
                               tls_dir="/etc/pki/qemu/ft,colo")
    a = args(xml)
    creds = [o for o in options(xml, "-object") if o.startswith("tls-creds-x509,")]
    assert creds == [f"tls-creds-x509,id={layout.TLS_CLIENT_ID},dir=/etc/pki/qemu/ft,,colo,"
                     "endpoint=client,verify-peer=on"]
    sockets = [c for c in options(xml, "-chardev") if ",host=" in c]
    assert sockets and all(c.endswith(f",tls-creds={layout.TLS_CLIENT_ID}") for c in sockets)
    # The creds exist before the first chardev that names them.
    assert a.index("tls-creds-x509," + creds[0].split(",", 1)[1]) < \
        a.index(sockets[0])


def test_both_roles_run_on_the_given_emulator_and_machine_type():
    emu, machine = "/usr/libexec/vdsm-ft/qemu-system-x86_64", "pc-i440fx-7.2"
    for out in (domxml.primary_xml(engine(), RUN, QEMU_72, emulator=emu, machine=machine),
                domxml.secondary_xml(engine(), RUN, replicas(), ENDPOINTS, 1, QEMU_72,
                                     emulator=emu, machine=machine)):
        root = tree(out)
        assert root.findtext("devices/emulator") == emu
        assert root.find("os/type").get("machine") == machine
    # The engine's own <emulator> is replaced, never doubled.
    with_one = engine().replace(
        "<devices>", "<devices><emulator>/usr/libexec/qemu-kvm</emulator>", 1)
    root = tree(domxml.primary_xml(with_one, RUN, QEMU_72, emulator=emu, machine=machine))
    assert [e.text for e in root.iterfind("devices/emulator")] == [emu]


def _many_disks(count: int) -> str:
    from ftlab import guest
    return guest.engine_domain_xml(guest.EngineVm(
        name="wide", mac=guest.guest_mac(2),
        disks=tuple(guest.EngineDisk(f"/i/{i}.qcow2", str(uuid.UUID(int=i + 1)))
                    for i in range(count))))


def test_disks_that_do_not_fit_on_pci_0_are_refused_with_the_counts_and_the_fix():
    # 29 free slots: 26 VirtIO disks beside a NIC, the balloon and the RNG fit, 27 not.
    domxml.primary_xml(_many_disks(26), RUN, QEMU_72)
    for make in (lambda xml: domxml.primary_xml(xml, RUN, QEMU_72), secondary):
        with pytest.raises(domxml.Unsupported) as e:
            make(_many_disks(27))
        assert str(e.value) == (
            "fault tolerance is not possible: the VM has 27 VirtIO disks and 3 other PCI "
            "devices, more than the 29 free slots of pci.0 (vdsm-ft pins every device of a "
            "COLO pair there, so that both sides have the same addresses, and puts none "
            "behind a PCI bridge). Fix: attach the disks with the VirtIO-SCSI interface "
            "(one controller slot for all of them), or give the VM fewer VirtIO disks or "
            "NICs")
