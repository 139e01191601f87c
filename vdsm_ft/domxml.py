"""Turn the domain XML oVirt's engine generates into the COLO primary and secondary XML.

Pure functions: strings in, strings out. libvirt has no COLO model (docs/colo-facts.md), so
the COLO block graph, the guest disk devices, the secondary's network filters and the
agent's private QMP monitor are passed through `<qemu:commandline>`; every name in it
comes from `layout`.

Rules both roles follow, and why:
- The engine's `<disk device='disk'>` elements stay, with their aliases (`ua-<uuid>`),
  serials, addresses, boot order and error policy: the engine reads the disks back from
  the live XML (`Host.dumpxmls`) and unplugs any managed disk missing there
  (`VmDevicesMonitoring.handleRemovedDevices`, docs/engine-view.md). libvirt builds the
  guest device from each, but the image is opened only by our `-blockdev` nodes: the
  `<disk>` gets a harmless source (an empty raw file of its own in the VM's run dir,
  `placeholder_path`, which the caller creates from the XML with vdsm_ft/runfiles.py) and
  `<qemu:override>` points its device's `drive` at our node (`disks_on_nodes`, the one
  place that does this for every role).
- CD-ROMs and floppies stay libvirt devices on both sides. Their ISO is opened on the
  secondary's host too, so it must be reachable there (an ISO storage domain or the
  same path on every host).
- Every libvirt PCI device on pci.0 gets an explicit address here, and disks without
  one get slots from the top of the bus, which libvirt fills last (where the guest saw
  them while the disk devices were our own `-device`s). Assignment is deterministic:
  the same engine XML yields the same addresses on both sides, which COLO needs (the
  migration stream carries device state by address).
- Option values are escaped (`,` -> `,,`) in keyval options (-blockdev, -chardev,
  -object).
- NICs get `<driver name='qemu'/>` (vhost off): COLO's filters sit in QEMU's userspace
  net path (docs/colo-facts.md, "vhost off").

Host requirements that follow (libvirt relabels and exposes only what its XML names):
files and directories named here must be usable by the QEMU user, and block-domain disks
(host_device nodes) open only where qemu.conf has `namespaces = []` and a
`cgroup_controllers` list without "devices" (seen on libvirt 9.0; see
tests/integration/test_domxml_libvirt.py).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from lxml import etree

from vdsm_ft import layout

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# The source every engine disk gets in our XML: an empty raw file per disk in the VM's
# run dir. Not /dev/null: libvirt would relabel the host's /dev/null (SELinux) where
# qemu.conf has no mount namespace, which block storage domains need (docs/install.md).
PLACEHOLDER_SUFFIX = ".placeholder"
# libvirt cache modes whose guest device has write-cache=off.
_WRITE_CACHE_OFF = ("writethrough", "directsync")
# <driver> attributes the placeholder drops: it is raw, and O_DIRECT fails on tmpfs.
_PLACEHOLDER_DROPS = ("type", "cache", "io", "copy_on_read")
OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
SECONDARY_SUFFIX = layout.SECONDARY_SUFFIX
# QEMU's COLO aborts the secondary at the first checkpoint on q35 until Lukas Straub's
# fix ("colo: Fix crash during device vmstate load"), released with QEMU 11.0.
Q35_COLO_FIXED = (11, 0, 0)
# VDSM recovers a domain carrying this channel as one of its own VMs, not as external
# (vdsm recovery._is_external_vm); the secondary must be external (engine-view.md).
LEGACY_AGENT_CHANNEL = "com.redhat.rhevm.vdsm"

_PCI_SLOTS = range(0x03, 0x20)          # 0 host bridge, 1 PIIX3, 2 primary video
_VIDEO_SLOT = 0x02


class DomXmlError(Exception):
    """The engine's domain XML cannot be turned into a COLO role."""


class MalformedXml(DomXmlError):
    """The domain XML does not parse."""


class Unsupported(DomXmlError):
    """The VM uses something COLO cannot protect."""

    def __init__(self, reason: str, fix: str):
        super().__init__(f"fault tolerance is not possible: {reason}. Fix: {fix}")
        self.reason = reason
        self.fix = fix


def qemu_escape(value: str) -> str:
    """Escape one QEMU option value: ',' separates options, ',,' is a literal comma."""
    return value.replace(",", ",,")


def _opts(*pairs: tuple[str, object]) -> str:
    return ",".join(f"{k}={qemu_escape(str(v))}" for k, v in pairs if v is not None)


# ---------------------------------------------------------------------------- parsing

def _parse(xml: str) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=False)
    try:
        root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml, parser)
    except etree.XMLSyntaxError as e:
        raise MalformedXml(f"domain XML does not parse: {e}") from e
    if root.tag != "domain":
        raise MalformedXml(f"root element is <{root.tag}>, expected <domain>")
    for required in ("name", "uuid", "devices", "os/type"):
        if root.find(required) is None:
            raise MalformedXml(f"domain XML has no <{required}>")
    return root


@dataclass(frozen=True)
class _PciAddr:
    slot: int
    function: int = 0
    multifunction: bool = False


@dataclass(frozen=True)
class _EngineDisk:
    index: int
    image: str
    fmt: str
    block: bool
    cache_direct: bool
    write_cache: bool         # the guest device's write-cache, from the cache mode
    aio: str | None
    discard: str | None


@dataclass(frozen=True)
class _EngineNic:
    index: int
    netdev: str
    mac: str


def _int(value: str | None, what: str) -> int:
    try:
        return int(value or "0", 0)
    except ValueError as e:
        raise MalformedXml(f"{what}: {value!r} is not a number") from e


def _pci_addr(el: etree._Element) -> _PciAddr | None:
    addr = el.find("address")
    if addr is None or addr.get("type") != "pci":
        return None
    if _int(addr.get("domain"), "address domain") != 0 or _int(addr.get("bus"), "address bus") != 0:
        return None
    return _PciAddr(_int(addr.get("slot"), "address slot"),
                    _int(addr.get("function"), "address function"),
                    addr.get("multifunction") == "on")


def _machine(root: etree._Element) -> str:
    return root.find("os/type").get("machine") or ""


def _is_q35(machine: str) -> bool:
    return "q35" in machine


def _source_path(disk: etree._Element, attr: str) -> str:
    src = disk.find("source")
    path = src.get(attr) if src is not None else None
    if not path:
        target = disk.find("target")
        dev = target.get("dev") if target is not None else "?"
        raise MalformedXml(f"disk {dev} has no <source {attr}=...>")
    return path


def _scsi_controller_id(root: etree._Element, index: int) -> str:
    for ctrl in root.iterfind("devices/controller[@type='scsi']"):
        if _int(ctrl.get("index"), "controller index") == index:
            if ctrl.get("model") != "virtio-scsi":
                raise Unsupported(f"SCSI controller {index} is {ctrl.get('model') or 'the default model'}",
                                  "use VirtIO-SCSI (or VirtIO) as the disk interface")
            alias = ctrl.find("alias")
            # libvirt keeps user aliases (ua-*) as the QEMU id, else names it scsi<index>.
            if alias is not None and alias.get("name", "").startswith("ua-"):
                return alias.get("name")
            return f"scsi{index}"
    raise MalformedXml(f"a SCSI disk names controller {index}, which the domain does not define")


def _scsi_address(root: etree._Element, disk: etree._Element) -> tuple[str, int, int, int]:
    addr = disk.find("address")
    if addr is not None and addr.get("type") == "drive":
        ctrl = _int(addr.get("controller"), "drive controller")
        return (_scsi_controller_id(root, ctrl), _int(addr.get("bus"), "drive bus"),
                _int(addr.get("target"), "drive target"), _int(addr.get("unit"), "drive unit"))
    # libvirt's default for a SCSI disk without an address follows its name (sdX):
    # 7 units per controller. Following it keeps libvirt's own SCSI CD-ROMs off our units.
    dev = disk.find("target").get("dev", "")
    m = re.fullmatch(r"sd([a-z]+)", dev)
    if not m:
        raise MalformedXml(f"SCSI disk {dev!r} has no drive address and no sdX name")
    idx = 0
    for ch in m.group(1):
        idx = idx * 26 + (ord(ch) - ord("a") + 1)
    idx -= 1
    return (_scsi_controller_id(root, idx // 7), 0, 0, idx % 7)


def _refuse_unsupported(root: etree._Element) -> None:
    devices = root.find("devices")
    arch = root.find("os/type").get("arch", "x86_64")
    if arch != "x86_64":
        raise Unsupported(f"architecture {arch}", "vdsm-ft protects x86_64 VMs only")
    machine = _machine(root)
    if machine and not machine.startswith("pc") and machine not in ("q35",):
        raise Unsupported(f"machine type {machine}", "use the i440fx chipset")
    for iface in devices.iterfind("interface"):
        kind = iface.get("type")
        if kind == "vhostuser":
            raise Unsupported("a vhost-user network interface (COLO's filters need QEMU's "
                              "userspace net path)", "use a bridged (Linux bridge) vNIC profile")
        if kind == "hostdev":
            raise Unsupported("an SR-IOV (passthrough) network interface: device state cannot "
                              "be checkpointed", "use a vNIC profile without passthrough")
        if kind == "vdpa":
            raise Unsupported("a vDPA network interface: device state cannot be checkpointed",
                              "use a bridged vNIC profile")
    if devices.find("hostdev") is not None:
        raise Unsupported("a host device is passed through (<hostdev>): its state cannot be "
                          "checkpointed", "remove the host device from the VM")
    for disk in devices.iterfind("disk"):
        device, kind = disk.get("device", "disk"), disk.get("type", "file")
        dev = disk.find("target").get("dev", "?") if disk.find("target") is not None else "?"
        if device == "lun":
            raise Unsupported(f"disk {dev} is a direct LUN (SCSI passthrough)",
                              "replace the direct LUN with a disk image on a storage domain")
        if device != "disk":
            continue
        if kind not in ("file", "block"):
            what = {"network": "a network disk (Ceph RBD, Gluster, iSCSI by URL)"}.get(
                kind, f"a disk of type '{kind}'")
            raise Unsupported(f"disk {dev} is {what}; COLO replicates file and block images only",
                              "move the disk to an NFS, POSIX, local or iSCSI/FC storage domain")
        if kind == "block" and _source_path(disk, "dev").startswith("/dev/mapper/"):
            # VDSM gives images on block domains /rhev/data-center/... paths; a bare
            # multipath device is a direct LUN attached with the VirtIO interface.
            raise Unsupported(f"disk {dev} is a direct LUN",
                              "replace the direct LUN with a disk image on a storage domain")
        bus = disk.find("target").get("bus", "virtio") if disk.find("target") is not None else "virtio"
        if bus not in ("virtio", "scsi"):
            raise Unsupported(f"disk {dev} uses the {bus} interface",
                              "change the disk interface to VirtIO or VirtIO-SCSI")


def _refuse_q35(root: etree._Element, qemu_version: tuple[int, int, int]) -> None:
    machine = _machine(root)
    if _is_q35(machine) and tuple(qemu_version) < Q35_COLO_FIXED:
        have = ".".join(map(str, qemu_version))
        raise Unsupported(f"machine type {machine} (q35): COLO on QEMU {have} crashes the "
                          "secondary at the first checkpoint",
                          "set the VM's chipset to i440fx (Q35 needs QEMU 11.0 or later)")


def _guest_disks(root: etree._Element) -> list[etree._Element]:
    return [d for d in root.iterfind("devices/disk") if d.get("device", "disk") == "disk"]


def _disk_facts(root: etree._Element, disk: etree._Element, index: int) -> _EngineDisk:
    block = disk.get("type", "file") == "block"
    driver = disk.find("driver")
    drv = driver.attrib if driver is not None else {}
    if disk.find("target").get("bus", "virtio") == "scsi":
        _scsi_address(root, disk)           # refuses a SCSI controller that is not virtio
    return _EngineDisk(
        index=index,
        image=_source_path(disk, "dev" if block else "file"),
        fmt=drv.get("type", "raw"),
        block=block,
        cache_direct=drv.get("cache") in ("none", "directsync"),
        write_cache=drv.get("cache") not in _WRITE_CACHE_OFF,
        aio={"native": "native", "io_uring": "io_uring"}.get(drv.get("io", "")),
        discard="unmap" if drv.get("discard") == "unmap" else None,
    )


def _nic_netdev(iface: etree._Element, plain_index: int) -> str:
    # Verified on libvirt 9.0 (/proc/<pid>/cmdline): alias ua-X -> netdev hostua-X;
    # without a user alias libvirt names the NIC net<k>, k counting such NICs in order.
    alias = iface.find("alias")
    if alias is not None and alias.get("name", "").startswith("ua-"):
        return "host" + alias.get("name")
    return f"hostnet{plain_index}"


def _derived_mac(vm_uuid: str, index: int) -> str:
    digest = hashlib.sha256(f"{vm_uuid}/nic/{index}".encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (digest[0], digest[1], digest[2])


def _nics(root: etree._Element) -> list[_EngineNic]:
    nics, plain = [], 0
    vm_uuid = root.findtext("uuid").strip()
    for i, iface in enumerate(root.iterfind("devices/interface")):
        alias = iface.find("alias")
        netdev = _nic_netdev(iface, plain)
        if alias is None or not alias.get("name", "").startswith("ua-"):
            plain += 1
        mac = iface.find("mac")
        nics.append(_EngineNic(i, netdev, mac.get("address") if mac is not None
                               else _derived_mac(vm_uuid, i)))
    return nics


# ---------------------------------------------------------------- PCI slot assignment

def _is_libvirt_pci_device(el: etree._Element) -> bool:
    """Devices libvirt would put on pci.0 of an i440fx machine when they have no address."""
    tag, kind = el.tag, el.get("type")
    model = el.get("model")
    if tag == "interface":
        return True
    if tag == "controller":
        if kind in ("virtio-serial", "scsi", "sata"):
            return True
        if kind == "pci":
            return model not in (None, "pci-root", "pcie-root")
        # libvirt pins piix3-uhci (the i440fx default) to 00:01.2 itself.
        return kind == "usb" and model not in (None, "piix3-uhci", "none")
    if tag == "memballoon":
        return model not in ("none", None) and model.startswith("virtio")
    if tag == "video":
        m = el.find("model")
        return m is None or m.get("type") != "none"
    if tag in ("rng", "vsock", "filesystem"):
        return True
    if tag == "watchdog":
        return model == "i6300esb"
    if tag == "sound":
        return model not in ("pcspk",)
    if tag == "input":
        return el.get("bus") == "virtio"
    return False


def _set_pci_address(el: etree._Element, addr: _PciAddr) -> None:
    old = el.find("address")
    if old is not None:
        el.remove(old)
    etree.SubElement(el, "address", type="pci", domain="0x0000", bus="0x00",
                     slot=f"0x{addr.slot:02x}", function=f"0x{addr.function:x}")


def _out_of_slots(devices: etree._Element, disks: list[etree._Element]) -> Unsupported:
    """The refusal of a VM whose devices do not fit on pci.0, with the counts."""
    disk_set = {id(d) for d in disks}
    virtio = sum(1 for d in disks if d.find("target").get("bus", "virtio") == "virtio")
    other = sum(1 for el in devices if isinstance(el.tag, str) and id(el) not in disk_set
                and _is_libvirt_pci_device(el))
    other += devices.find("memballoon") is None       # the balloon libvirt would add
    return Unsupported(
        f"the VM has {virtio} VirtIO disks and {other} other PCI devices, more than the "
        f"{len(_PCI_SLOTS)} free slots of pci.0 (vdsm-ft pins every device of a COLO "
        "pair there, so that both sides have the same addresses, and puts none behind a "
        "PCI bridge)", "attach the disks with the VirtIO-SCSI interface (one controller slot "
        "for all of them), or give the VM fewer VirtIO disks or NICs")


def _assign_addresses(root: etree._Element, disks: list[etree._Element]) -> dict[int, _PciAddr]:
    """Pin every PCI address on pci.0; return the virtio disks' addresses by disk index.

    Disks keep the engine's address when it has one (the guest sees the same slot as
    before), else take the highest free slot. Other devices keep theirs, else take the
    lowest free slot as libvirt would. On q35 libvirt puts devices behind root ports,
    which never collide with pcie.0 slots taken from the top.
    """
    q35 = _is_q35(_machine(root))
    devices = root.find("devices")
    used: set[int] = {0x00, 0x01}
    if q35:
        used |= {0x1f}                     # ICH9 LPC, SATA, SMBus
    disk_set = {id(d) for d in disks}
    for el in devices:
        if not isinstance(el.tag, str) or id(el) in disk_set:
            continue
        addr = _pci_addr(el)
        if addr is not None:
            used.add(addr.slot)
    result: dict[int, _PciAddr] = {}
    for i, disk in enumerate(disks):
        if disk.find("target").get("bus", "virtio") != "virtio":
            continue
        addr = _pci_addr(disk)
        if addr is not None:
            taken = addr.slot in used or any(
                (a.slot, a.function) == (addr.slot, addr.function) for a in result.values())
            if taken:
                raise DomXmlError(f"disk {disk.find('target').get('dev')} has PCI slot "
                                  f"0x{addr.slot:02x}, which another device also uses")
            result[i] = addr
    used |= {a.slot for a in result.values()}
    for i, disk in enumerate(disks):
        if disk.find("target").get("bus", "virtio") == "virtio" and i not in result:
            slot = next((s for s in reversed(_PCI_SLOTS) if s not in used), None)
            if slot is None:
                raise _out_of_slots(devices, disks)
            result[i] = _PciAddr(slot)
            used.add(slot)
    if q35:
        return result
    if devices.find("memballoon") is None:
        # libvirt adds a virtio balloon when none is named; add it here so it gets a
        # pinned slot like everything else.
        etree.SubElement(devices, "memballoon", model="virtio")
    videos = [el for el in devices if el.tag == "video"]
    for el in devices:
        if not isinstance(el.tag, str) or id(el) in disk_set:
            continue
        if _pci_addr(el) is not None or el.find("address") is not None:
            continue
        if not _is_libvirt_pci_device(el):
            continue
        if videos and el is videos[0] and _VIDEO_SLOT not in used:
            slot = _VIDEO_SLOT
        else:
            slot = next((s for s in _PCI_SLOTS if s not in used), None)
            if slot is None:
                raise _out_of_slots(devices, disks)
        _set_pci_address(el, _PciAddr(slot))
        used.add(slot)
    return result


# ------------------------------------------------------------------- role building

def _format_nodes(node: str, image: str, fmt: str, block: bool, d: _EngineDisk | None,
                  backing: str | None = None) -> list[str]:
    """A protocol node plus a format node named `node`."""
    file_node = f"{node}-file"
    cache = d.cache_direct if d is not None else False
    proto = [("driver", "host_device" if block else "file"), ("filename", image),
             ("node-name", file_node)]
    if cache:
        proto.append(("cache.direct", "on"))
    if d is not None and d.aio and cache:
        proto.append(("aio", d.aio))
    if d is not None and d.discard:
        proto.append(("discard", d.discard))
    fmt_opts = [("driver", fmt), ("file", file_node), ("node-name", node)]
    if backing is not None:
        fmt_opts.append(("backing", backing))
    if d is not None and d.discard:
        fmt_opts.append(("discard", d.discard))
    return ["-blockdev", _opts(*proto), "-blockdev", _opts(*fmt_opts)]


def _quorum(quorum: str, child: str) -> list[str]:
    return ["-blockdev", _opts(("driver", "quorum"), ("node-name", quorum),
                               ("read-pattern", "fifo"), ("vote-threshold", 1),
                               ("children.0", child))]


def placeholder_path(run_dir: str, domain_uuid: str, index: int) -> str:
    """The empty file that stands as disk `index`'s source in the XML of domain
    `domain_uuid` (its own: two domains of one VM may share a run dir, e.g. a survivor and
    the domain it migrates into, and libvirt labels each domain's files for it)."""
    return f"{run_dir.rstrip('/')}/{domain_uuid}-disk{index}{PLACEHOLDER_SUFFIX}"


def placeholders(role_xml: str) -> list[str]:
    """The placeholder files a role's XML (primary_xml, secondary_xml, identity_xml)
    names: they must exist before libvirt starts it (vdsm_ft/runfiles.py)."""
    root = _parse(role_xml)
    return [d.find("source").get("file") for d in _guest_disks(root)
            if d.find("source") is not None
            and (d.find("source").get("file") or "").endswith(PLACEHOLDER_SUFFIX)]


def disks_on_nodes(disk_elements: list[etree._Element], disks: list[_EngineDisk],
                   nodes: list[str], run_dir: str, domain_uuid: str
                   ) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Keep each engine `<disk>` for libvirt and the engine, with its device on our node.

    Each element keeps its alias, serial, address, boot order, error policy, queues and
    iothread, so libvirt builds the same guest device and `Host.dumpxmls` shows the disk
    the engine manages; its source becomes its placeholder file in `run_dir`
    (`placeholder_path`), so libvirt opens no image. Returns the `<qemu:override>` entries
    (alias, [(property, type, value)]) that set the device's `drive` to `nodes[i]` (our
    block node for disk i), `share-rw` (host side qemu-io through the quorum needs a shared
    writer, docs/colo-facts.md, "What this lab's machines run") and the guest's
    write-cache. Every role (primary, secondary, a later domain of the same VM) builds its
    disks with this, from the same engine XML.
    """
    overrides = []
    for el, d, node in zip(disk_elements, disks, nodes):
        alias = el.find("alias")
        if alias is None or not alias.get("name", "").startswith("ua-"):
            # <qemu:override> finds devices by alias; a user alias must start with ua-.
            if alias is not None:
                el.remove(alias)
            alias = etree.SubElement(el, "alias", name=f"ua-ft-disk{d.index}")
        el.set("type", "file")
        for child in el.findall("source") + el.findall("backingStore"):
            el.remove(child)
        source = etree.Element("source", file=placeholder_path(run_dir, domain_uuid, d.index))
        driver = el.find("driver")
        if driver is None:
            driver = etree.SubElement(el, "driver", name="qemu")
        for attr in _PLACEHOLDER_DROPS:
            driver.attrib.pop(attr, None)
        driver.set("type", "raw")
        el.insert(list(el).index(driver) + 1, source)
        overrides.append((alias.get("name"), [
            ("drive", "string", node), ("share-rw", "bool", "true"),
            ("write-cache", "string", "on" if d.write_cache else "off")]))
    return overrides


def _qmp_args(run_dir: str, root: etree._Element) -> list[str]:
    sock = layout.VmLayout(vm_id=root.findtext("uuid").strip(), name=root.findtext("name"),
                           run_dir=run_dir).qmp_socket
    return ["-chardev", "socket," + _opts(("id", layout.QMP_CHARDEV), ("path", sock),
                                          ("server", "on"), ("wait", "off")),
            "-mon", _opts(("chardev", layout.QMP_CHARDEV), ("mode", "control"))]


def _set_qemu(root: etree._Element, emulator: str | None, machine: str | None) -> None:
    """The QEMU binary and machine type the FT VM runs on (both roles must agree)."""
    if machine:
        root.find("os/type").set("machine", machine)
    if emulator:
        devices = root.find("devices")
        el = devices.find("emulator")
        if el is None:
            el = etree.Element("emulator")
            devices.insert(0, el)
        el.text = emulator


def _prepare(engine_xml: str, qemu_version: tuple[int, int, int], emulator: str | None = None,
             machine: str | None = None
             ) -> tuple[etree._Element, list[etree._Element], list[_EngineDisk], list[_EngineNic]]:
    """Parse, refuse, pin addresses, turn vhost off, and put the VM on `emulator` with
    `machine` (when given); the disk elements are returned for `disks_on_nodes`."""
    root = _parse(engine_xml)
    _refuse_unsupported(root)
    _refuse_q35(root, qemu_version)
    disks_el = _guest_disks(root)
    pci = _assign_addresses(root, disks_el)
    disks = [_disk_facts(root, el, i) for i, el in enumerate(disks_el)]
    nics = _nics(root)
    for i, el in enumerate(disks_el):
        if i in pci and _pci_addr(el) is None:
            _set_pci_address(el, pci[i])
    for iface, nic in zip(root.iterfind("devices/interface"), nics):
        if iface.find("mac") is None:
            iface.insert(0, etree.Element("mac", address=nic.mac))
        driver = iface.find("driver")
        if driver is None:
            driver = etree.SubElement(iface, "driver")
        driver.set("name", "qemu")
    if not _machine(root):
        root.find("os/type").set("machine", "pc")
    _set_qemu(root, emulator, machine)
    return root, disks_el, disks, nics


def _with_commandline(root: etree._Element, args: list[str],
                      overrides: list[tuple[str, list[tuple[str, str, str]]]]) -> str:
    nsmap = dict(root.nsmap)
    nsmap["qemu"] = QEMU_NS
    new = etree.Element(root.tag, attrib=dict(root.attrib), nsmap=nsmap)
    new.text = root.text
    for child in list(root):
        new.append(child)
    old = new.find(f"{{{QEMU_NS}}}commandline")
    if old is not None:
        raise DomXmlError("the domain XML already has a <qemu:commandline>; another hook "
                          "(e.g. qemucmdline) must not be combined with ft=true")
    if new.find(f"{{{QEMU_NS}}}override") is not None:
        raise DomXmlError("the domain XML already has a <qemu:override>; another hook must "
                          "not be combined with ft=true")
    cmd = etree.SubElement(new, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        etree.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    if overrides:
        # libvirt >= 8.2 applies these to the JSON -device it builds (checked on 9.0).
        override = etree.SubElement(new, f"{{{QEMU_NS}}}override")
        for alias, props in overrides:
            frontend = etree.SubElement(etree.SubElement(override, f"{{{QEMU_NS}}}device",
                                                         alias=alias),
                                        f"{{{QEMU_NS}}}frontend")
            for name, kind, value in props:
                etree.SubElement(frontend, f"{{{QEMU_NS}}}property", name=name, type=kind,
                                 value=value)
    return etree.tostring(new, encoding="unicode")


def primary_xml(engine_xml: str, run_dir: str, qemu_version: tuple[int, int, int],
                emulator: str | None = None, machine: str | None = None,
                images: tuple[layout.Disk, ...] = (), incoming: bool = False) -> str:
    """The COLO primary: the engine's VM with each disk on a one-child quorum node, run by
    `emulator` with machine type `machine` when given (vdsm_ft.emulator.colo_machine).

    `images` replace the engine's images by index (a survivor's local replicas, see
    `identity_xml`); `incoming` makes QEMU wait for a migration (`-incoming defer`).
    """
    root, disk_els, disks, _ = _prepare(engine_xml, qemu_version, emulator, machine)
    by_index = {d.index: d for d in images}
    args: list[str] = []
    for d in disks:
        own = by_index.get(d.index)
        image, fmt = (own.image, own.fmt) if own else (d.image, d.fmt)
        block = image.startswith("/dev/") if own else d.block
        ld = layout.Disk(index=d.index, image=image, size=0, fmt=fmt)
        args += _format_nodes(ld.primary_child, image, fmt, block, d)
        args += _quorum(ld.quorum, ld.primary_child)
    overrides = disks_on_nodes(disk_els, disks, [layout.QUORUM_FMT.format(d.index)
                                                  for d in disks], run_dir,
                               root.findtext("uuid").strip())
    args += _qmp_args(run_dir, root)
    if incoming:
        args += ["-incoming", "defer"]
    return _with_commandline(root, args, overrides)


def identity_xml(engine_xml: str, run_dir: str, replicas: tuple[layout.Disk, ...],
                 qemu_version: tuple[int, int, int], emulator: str | None = None,
                 machine: str | None = None) -> str:
    """The domain a survivor migrates into after a failover (vdsm_ft/identity.py).

    It is the primary XML, so it carries the VM's own name, UUID and oVirt metadata
    (VDSM adopts it as the VM, docs/engine-view.md), on this host's replicas, with none
    of the secondary's network filters, waiting for the local migration. `emulator` and
    `machine` must be the survivor's (the migration stream needs both equal).
    """
    root = _parse(engine_xml)
    count = len(_guest_disks(root))
    if sorted(d.index for d in replicas) != list(range(count)):
        raise DomXmlError(f"the VM has {count} disks but replicas were given for indexes "
                          f"{sorted(d.index for d in replicas)}")
    return primary_xml(engine_xml, run_dir, qemu_version, emulator, machine,
                       images=replicas, incoming=True)


def secondary_uuid(vm_uuid: str, generation: int) -> str:
    return layout.secondary_uuid(vm_uuid, generation)


def secondary_name(vm_name: str) -> str:
    return vm_name + SECONDARY_SUFFIX


def secondary_xml(engine_xml: str, run_dir: str, disks: list[layout.Disk],
                  endpoints: layout.Endpoints, generation: int,
                  qemu_version: tuple[int, int, int], tls_dir: str | None = None,
                  emulator: str | None = None, machine: str | None = None) -> str:
    """The COLO secondary, waiting for the primary's migration (`-incoming defer`).

    `emulator` and `machine` as for `primary_xml`: the primary's machine type, on a QEMU
    of the primary's build (the migration stream needs both equal).

    With `tls_dir` (a QEMU x509 creds dir) the mirror/compare sockets to the primary run
    over TLS; the client creds must exist before the -chardev that names them.

    `engine_xml` must be the same engine XML the primary was made from: device addresses
    are derived from it, and both sides must match. `disks` are the local replicas with
    their overlays (qcow2, created by the caller with the replica's size), by index as
    `layout_from_domxml` numbers them; a replica under /dev/ is opened as a block device.
    """
    root, disk_els, edisks, nics = _prepare(engine_xml, qemu_version, emulator, machine)
    if len(disks) != len(edisks):
        raise DomXmlError(f"the VM has {len(edisks)} disks but {len(disks)} replicas were given")
    if len(endpoints.mirror_ports) != len(nics) or len(endpoints.compare_ports) != len(nics):
        raise DomXmlError(f"the VM has {len(nics)} NICs but the endpoints give "
                          f"{len(endpoints.mirror_ports)} mirror and "
                          f"{len(endpoints.compare_ports)} compare ports")
    for d in disks:
        if not (d.active and d.hidden):
            raise DomXmlError(f"replica {d.index} has no active/hidden overlay path")
    vm_uuid = root.findtext("uuid").strip()
    sec_uuid = secondary_uuid(vm_uuid, generation)
    root.find("name").text = secondary_name(root.findtext("name"))
    root.find("uuid").text = sec_uuid
    # libvirt insists the SMBIOS UUID equals <uuid>; the guest keeps its own through the
    # -smbios below (the last one on the command line wins).
    for entry in root.iterfind("sysinfo/system/entry[@name='uuid']"):
        entry.text = sec_uuid
    for md in root.findall("metadata"):
        root.remove(md)
    devices = root.find("devices")
    for lease in devices.findall("lease"):
        devices.remove(lease)
    for chan in devices.iterfind("channel"):
        target = chan.find("target")
        if target is not None and target.get("name") == LEGACY_AGENT_CHANNEL:
            raise Unsupported("the VM has the legacy ovirt-guest-agent channel, which makes "
                              "VDSM adopt the secondary as an oVirt VM",
                              "run the VM in a 4.4 or later cluster (no legacy channel)")
    # Host-side sockets and logs carry the VM UUID; the secondary needs its own, because
    # after a failover the VM's own domain starts beside it (vdsm_ft/identity.py).
    for char in (*devices.iterfind("channel"), *devices.iterfind("serial"),
                 *devices.iterfind("console")):
        for el, attr in ((char.find("source"), "path"), (char.find("log"), "file")):
            if el is not None and vm_uuid in el.get(attr, ""):
                el.set(attr, el.get(attr).replace(vm_uuid, sec_uuid))
    args: list[str] = []
    by_index = {d.index: d for d in disks}
    for ed in edisks:
        d = by_index.get(ed.index)
        if d is None:
            raise DomXmlError(f"no replica given for disk {ed.index}")
        args += _format_nodes(d.parent, d.image, d.fmt, d.image.startswith("/dev/"), ed)
        hidden = layout.SECONDARY_HIDDEN_FMT.format(d.index)
        active = layout.SECONDARY_ACTIVE_FMT.format(d.index)
        repl = layout.SECONDARY_REPLICATION_FMT.format(d.index)
        args += _format_nodes(hidden, d.hidden, "qcow2", False, None, backing=d.parent)
        args += _format_nodes(active, d.active, "qcow2", False, None, backing=hidden)
        args += ["-blockdev", _opts(("driver", "replication"), ("mode", "secondary"),
                                    ("top-id", d.quorum), ("file", active), ("node-name", repl))]
        args += _quorum(d.quorum, repl)
    tls: tuple[tuple[str, object], ...] = ()
    if tls_dir is not None and nics:
        args += ["-object", "tls-creds-x509," + _opts(
            ("id", layout.TLS_CLIENT_ID), ("dir", tls_dir), ("endpoint", "client"),
            ("verify-peer", "on"))]
        tls = (("tls-creds", layout.TLS_CLIENT_ID),)
    for nic in nics:
        ln = layout.Nic(index=nic.index, netdev=nic.netdev, mac=nic.mac)
        # A virtio NIC's frames carry the tap's virtio-net header; without
        # vnet_hdr_support every filter parses them as non-IP, the rewriter never
        # rewrites and colo-compare releases all output unchecked (docs/qemu.md, "The
        # client's view at x-checkpoint-delay 2000"). Harmless on other NICs (length 0).
        vnet = ("vnet_hdr_support", "on")
        for chardev, port in ((ln.red_in_chardev, endpoints.mirror_ports[nic.index]),
                              (ln.red_out_chardev, endpoints.compare_ports[nic.index])):
            # Nagle off, as on the primary's ends (colo._add_socket): the secondary's
            # output is small packets colo-compare holds the primary's twins for.
            args += ["-chardev", "socket," + _opts(("id", chardev), ("host", endpoints.primary_host),
                                                   ("port", port), ("reconnect", 1),
                                                   ("nodelay", "on"), *tls)]
        args += ["-object", "filter-redirector," + _opts(
            ("id", ln.filter_sec_in), ("netdev", ln.netdev), ("queue", "tx"),
            ("indev", ln.red_in_chardev), vnet)]
        args += ["-object", "filter-redirector," + _opts(
            ("id", ln.filter_sec_out), ("netdev", ln.netdev), ("queue", "rx"),
            ("outdev", ln.red_out_chardev), vnet)]
        args += ["-object", "filter-rewriter," + _opts(
            ("id", ln.rewriter), ("netdev", ln.netdev), ("queue", "all"), vnet)]
    args += _qmp_args(run_dir, root)
    args += ["-smbios", "type=1," + _opts(("uuid", vm_uuid))]
    args += ["-incoming", "defer"]
    overrides = disks_on_nodes(disk_els, edisks, [layout.QUORUM_FMT.format(d.index)
                                                   for d in edisks], run_dir, sec_uuid)
    return _with_commandline(root, args, overrides)


def layout_from_domxml(engine_xml: str, run_dir: str) -> layout.VmLayout:
    """The VM's COLO layout on the primary: disks (size 0: the caller asks qemu-img) and
    NICs with the netdev id libvirt gives them."""
    root = _parse(engine_xml)
    _refuse_unsupported(root)
    disks = tuple(
        layout.Disk(index=i, image=_source_path(el, "dev" if el.get("type") == "block" else "file"),
                    size=0, fmt=(el.find("driver").get("type", "raw")
                                 if el.find("driver") is not None else "raw"))
        for i, el in enumerate(_guest_disks(root)))
    nics = tuple(layout.Nic(index=n.index, netdev=n.netdev, mac=n.mac) for n in _nics(root))
    return layout.VmLayout(vm_id=root.findtext("uuid").strip(), name=root.findtext("name"),
                           run_dir=run_dir, disks=disks, nics=nics)


def engine_machine(engine_xml: str) -> str:
    """The machine type the engine asked for ("" when it named none)."""
    return _machine(_parse(engine_xml))


def ft_property(engine_xml: str) -> str | None:
    """The raw `ft` custom property from the ovirt-vm metadata, or None when unset."""
    root = _parse(engine_xml)
    el = root.find(f"metadata/{{{OVIRT_VM_NS}}}vm/{{{OVIRT_VM_NS}}}custom/{{{OVIRT_VM_NS}}}ft")
    if el is None:
        return None
    return el.text or ""

