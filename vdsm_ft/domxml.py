"""Turn the domain XML oVirt's engine generates into the COLO primary and secondary XML.

Pure functions: strings in, strings out. libvirt has no COLO model (colo.md §12), so
the COLO block graph, the guest disk devices, the secondary's network filters and the
agent's private QMP monitor are passed through `<qemu:commandline>`; every name in it
comes from `layout`.

Rules both roles follow, and why:
- The engine's `<disk device='disk'>` elements are removed: the image is opened by our
  `-blockdev` nodes, and libvirt must not open it a second time.
- CD-ROMs and floppies stay libvirt devices on both sides. Their ISO is opened on the
  secondary's host too, so it must be reachable there (an ISO storage domain or the
  same path on every host).
- libvirt does not know about a `-device` in `<qemu:commandline>` and hands its slot out
  again (DESIGN.md). So every libvirt PCI device on pci.0 gets an explicit address here,
  and disks without one get slots from the top of the bus, which libvirt fills last.
  Assignment is deterministic: the same engine XML yields the same addresses on both
  sides, which COLO needs (the migration stream carries device state by address).
- Option values are escaped (`,` -> `,,`) in keyval options (-blockdev, -chardev,
  -object); guest devices use QEMU's JSON syntax (see `_guest_device`).
- NICs get `<driver name='qemu'/>` (vhost off): COLO's filters sit in QEMU's userspace
  net path (colo.md §11).

Host requirements that follow (libvirt relabels and exposes only what its XML names):
files and directories named here must be usable by the QEMU user, and block-domain disks
(host_device nodes) open only where qemu.conf has `namespaces = []` and a
`cgroup_controllers` list without "devices" (seen on libvirt 9.0; see
tests/integration/test_domxml_libvirt.py).
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass

from lxml import etree

from vdsm_ft import layout

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
# Fixed namespace of the secondary's derived UUID (docs/engine-view.md). Never change
# it: a running pair's secondary UUID is recomputed from it.
FT_NAMESPACE = uuid.UUID("2fda9e63-be79-5fc0-aa87-dff200e760db")
SECONDARY_SUFFIX = "-ft-secondary"
# QEMU's COLO aborts the secondary at the first checkpoint on q35 until Lukas Straub's
# fix ("colo: Fix crash during device vmstate load"), released with QEMU 11.0.
Q35_COLO_FIXED = (11, 0, 0)
# VDSM recovers a domain carrying this channel as one of its own VMs, not as external
# (vdsm recovery._is_external_vm); the secondary must be external (engine-view.md).
LEGACY_AGENT_CHANNEL = "com.redhat.rhevm.vdsm"

_PCI_SLOTS = range(0x03, 0x20)          # 0 host bridge, 1 PIIX3, 2 primary video
_VIDEO_SLOT = 0x02
_ERROR_POLICY = {                       # libvirt error_policy -> (werror, rerror)
    "stop": ("stop", "stop"),
    "report": ("report", "report"),
    "ignore": ("ignore", "ignore"),
    "enospace": ("enospc", "report"),
}


class DomXmlError(Exception):
    """The engine's domain XML cannot be turned into a COLO role."""


class MalformedXml(DomXmlError):
    """The domain XML does not parse."""


class InvalidProperty(DomXmlError):
    """The `ft` custom property has a value we do not accept."""


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

    def qemu(self) -> str:
        return f"0x{self.slot:x}.0x{self.function:x}"


@dataclass(frozen=True)
class _EngineDisk:
    index: int
    image: str
    fmt: str
    block: bool
    bus: str                  # "virtio" or "scsi"
    pci: _PciAddr | None      # virtio: where the device sits
    scsi: tuple[str, int, int, int] | None   # scsi: (controller id, bus, target, unit)
    bootindex: str | None
    serial: str | None
    cache_direct: bool
    aio: str | None
    discard: str | None
    error_policy: str | None
    queues: str | None
    iothread: str | None


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


def _disk_facts(root: etree._Element, disk: etree._Element, index: int,
                pci: _PciAddr | None) -> _EngineDisk:
    block = disk.get("type", "file") == "block"
    driver = disk.find("driver")
    drv = driver.attrib if driver is not None else {}
    target = disk.find("target")
    bus = target.get("bus", "virtio")
    boot = disk.find("boot")
    serial = disk.find("serial")
    iothread = drv.get("iothread")
    return _EngineDisk(
        index=index,
        image=_source_path(disk, "dev" if block else "file"),
        fmt=drv.get("type", "raw"),
        block=block,
        bus=bus,
        pci=pci if bus == "virtio" else None,
        scsi=_scsi_address(root, disk) if bus == "scsi" else None,
        bootindex=boot.get("order") if boot is not None else None,
        serial=serial.text if serial is not None and serial.text else None,
        cache_direct=drv.get("cache") in ("none", "directsync"),
        aio={"native": "native", "io_uring": "io_uring"}.get(drv.get("io", "")),
        discard="unmap" if drv.get("discard") == "unmap" else None,
        error_policy=drv.get("error_policy"),
        queues=drv.get("queues"),
        iothread=f"iothread{iothread}" if iothread else None,
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
                raise DomXmlError("no free PCI slot on pci.0 for the COLO disk devices")
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
                raise DomXmlError("no free PCI slot on pci.0 for the VM's devices")
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


def _guest_device(d: _EngineDisk, bus_name: str) -> list[str]:
    """The guest's disk device, in JSON syntax.

    QEMU 7.2 creates every keyval `-device` before any JSON one, and libvirt 9.0 passes
    its devices as JSON; a keyval scsi-hd would look for its controller before libvirt's
    virtio-scsi exists ("Bus '...' not found"). JSON keeps command-line order, and needs
    no comma escaping.
    """
    ld = layout.Disk(index=d.index, image=d.image, size=0)
    if d.bus == "virtio":
        dev: dict[str, object] = {"driver": "virtio-blk-pci", "drive": ld.quorum, "id": ld.device,
                                  "bus": bus_name, "addr": d.pci.qemu()}
        if d.pci.multifunction:
            dev["multifunction"] = True
        if d.queues:
            dev["num-queues"] = _int(d.queues, "disk queues")
        if d.iothread:
            dev["iothread"] = d.iothread
    else:
        ctrl, bus, target, unit = d.scsi
        dev = {"driver": "scsi-hd", "drive": ld.quorum, "id": ld.device, "bus": f"{ctrl}.0",
               "channel": bus, "scsi-id": target, "lun": unit}
    # Host-side qemu-io through the quorum needs a shared writer (DESIGN.md).
    dev["share-rw"] = True
    if d.bootindex:
        dev["bootindex"] = _int(d.bootindex, "boot order")
    if d.serial:
        dev["serial"] = d.serial
    if d.error_policy in _ERROR_POLICY:
        dev["werror"], dev["rerror"] = _ERROR_POLICY[d.error_policy]
    return ["-device", json.dumps(dev, separators=(",", ":"))]


def _qmp_args(run_dir: str, root: etree._Element) -> list[str]:
    sock = layout.VmLayout(vm_id=root.findtext("uuid").strip(), name=root.findtext("name"),
                           run_dir=run_dir).qmp_socket
    return ["-chardev", "socket," + _opts(("id", layout.QMP_CHARDEV), ("path", sock),
                                          ("server", "on"), ("wait", "off")),
            "-mon", _opts(("chardev", layout.QMP_CHARDEV), ("mode", "control"))]


def _prepare(engine_xml: str, qemu_version: tuple[int, int, int]
             ) -> tuple[etree._Element, list[_EngineDisk], list[_EngineNic]]:
    """Parse, refuse, pin addresses, drop the disks from libvirt, turn vhost off."""
    root = _parse(engine_xml)
    _refuse_unsupported(root)
    _refuse_q35(root, qemu_version)
    disks_el = _guest_disks(root)
    pci = _assign_addresses(root, disks_el)
    disks = [_disk_facts(root, el, i, pci.get(i)) for i, el in enumerate(disks_el)]
    nics = _nics(root)
    for el in disks_el:
        el.getparent().remove(el)
    for iface, nic in zip(root.iterfind("devices/interface"), nics):
        if iface.find("mac") is None:
            iface.insert(0, etree.Element("mac", address=nic.mac))
        driver = iface.find("driver")
        if driver is None:
            driver = etree.SubElement(iface, "driver")
        driver.set("name", "qemu")
    if not _machine(root):
        root.find("os/type").set("machine", "pc")
    return root, disks, nics


def _with_commandline(root: etree._Element, args: list[str]) -> str:
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
    cmd = etree.SubElement(new, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        etree.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    return etree.tostring(new, encoding="unicode")


def _bus_name(root: etree._Element) -> str:
    return "pcie.0" if _is_q35(_machine(root)) else "pci.0"


def primary_xml(engine_xml: str, run_dir: str, qemu_version: tuple[int, int, int]) -> str:
    """The COLO primary: the engine's VM with each disk on a one-child quorum node."""
    root, disks, _ = _prepare(engine_xml, qemu_version)
    bus = _bus_name(root)
    args: list[str] = []
    for d in disks:
        ld = layout.Disk(index=d.index, image=d.image, size=0, fmt=d.fmt)
        args += _format_nodes(ld.primary_child, d.image, d.fmt, d.block, d)
        args += _quorum(ld.quorum, ld.primary_child)
        args += _guest_device(d, bus)
    args += _qmp_args(run_dir, root)
    return _with_commandline(root, args)


def secondary_uuid(vm_uuid: str, generation: int) -> str:
    return str(uuid.uuid5(FT_NAMESPACE, f"{vm_uuid}/secondary/{generation}"))


def secondary_name(vm_name: str) -> str:
    return vm_name + SECONDARY_SUFFIX


def secondary_xml(engine_xml: str, run_dir: str, disks: list[layout.Disk],
                  endpoints: layout.Endpoints, generation: int,
                  qemu_version: tuple[int, int, int], tls_dir: str | None = None) -> str:
    """The COLO secondary, waiting for the primary's migration (`-incoming defer`).

    With `tls_dir` (a QEMU x509 creds dir) the mirror/compare sockets to the primary run
    over TLS; the client creds must exist before the -chardev that names them.

    `engine_xml` must be the same engine XML the primary was made from: device addresses
    are derived from it, and both sides must match. `disks` are the local replicas with
    their overlays (qcow2, created by the caller with the replica's size), by index as
    `layout_from_domxml` numbers them; a replica under /dev/ is opened as a block device.
    """
    root, edisks, nics = _prepare(engine_xml, qemu_version)
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
        src = chan.find("source")
        # Host-side socket paths carry the VM UUID; the secondary needs its own.
        if src is not None and src.get("path") and vm_uuid in src.get("path"):
            src.set("path", src.get("path").replace(vm_uuid, sec_uuid))
    bus = _bus_name(root)
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
        args += _guest_device(ed, bus)
    tls: tuple[tuple[str, object], ...] = ()
    if tls_dir is not None and nics:
        args += ["-object", "tls-creds-x509," + _opts(
            ("id", layout.TLS_CLIENT_ID), ("dir", tls_dir), ("endpoint", "client"),
            ("verify-peer", "on"))]
        tls = (("tls-creds", layout.TLS_CLIENT_ID),)
    for nic in nics:
        ln = layout.Nic(index=nic.index, netdev=nic.netdev, mac=nic.mac)
        for chardev, port in ((ln.red_in_chardev, endpoints.mirror_ports[nic.index]),
                              (ln.red_out_chardev, endpoints.compare_ports[nic.index])):
            args += ["-chardev", "socket," + _opts(("id", chardev), ("host", endpoints.primary_host),
                                                   ("port", port), ("reconnect", 1), *tls)]
        args += ["-object", "filter-redirector," + _opts(
            ("id", ln.filter_sec_in), ("netdev", ln.netdev), ("queue", "tx"),
            ("indev", ln.red_in_chardev))]
        args += ["-object", "filter-redirector," + _opts(
            ("id", ln.filter_sec_out), ("netdev", ln.netdev), ("queue", "rx"),
            ("outdev", ln.red_out_chardev))]
        args += ["-object", "filter-rewriter," + _opts(
            ("id", ln.rewriter), ("netdev", ln.netdev), ("queue", "all"))]
    args += _qmp_args(run_dir, root)
    args += ["-smbios", "type=1," + _opts(("uuid", vm_uuid))]
    args += ["-incoming", "defer"]
    return _with_commandline(root, args)


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


def ft_property(engine_xml: str) -> str | None:
    """The raw `ft` custom property from the ovirt-vm metadata, or None when unset."""
    root = _parse(engine_xml)
    el = root.find(f"metadata/{{{OVIRT_VM_NS}}}vm/{{{OVIRT_VM_NS}}}custom/{{{OVIRT_VM_NS}}}ft")
    if el is None:
        return None
    return el.text or ""


def parse_ft_value(value: str | None) -> bool:
    """`true` -> True; `false` or unset -> False; anything else is refused."""
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise InvalidProperty(f"custom property ft={value!r} is not valid: "
                          "use ft=true or ft=false (lower case), or leave it unset")
