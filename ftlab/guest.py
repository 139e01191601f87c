"""Test guests, built on the fly from the distribution's packages (nothing binary is committed).

- The **Linux test guest** (tiers 2 and 3): Debian's kernel plus a busybox initramfs on a
  bootable disk (MBR, a FAT partition with syslinux holding kernel, initramfs and
  syslinux.cfg, and a raw partition that holds the counter). It takes a static IP from
  its kernel command line, serves an HTTP counter kept on its disk and a TCP echo, and
  logs to the serial console.
- The **idle guest** (tier 1): firmware only, one blank qcow2 disk.

Built images are cached under a build directory, keyed on every input, so a test
session pays for a build once. Callers copy the cached image with `install_disk` before
giving it to a VM: the cache is never written by a guest.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import lzma
import os
import pwd
import re
import shutil
import struct
import subprocess
import tempfile
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace

DEFAULT_CACHE_DIR = "/var/cache/vdsm-ft-lab"
QEMU_USER = "libvirt-qemu"

# The guest's services; clients in the lab use these.
HTTP_PORT = 80
ECHO_PORT = 7
COUNTER_URL_PATH = "/cgi-bin/counter"
# Printed on the serial console once every service listens.
READY_LINE = "FTLAB-GUEST-READY"

# Virtio drivers the guest needs; their dependencies come from modules.dep, so the load
# order is virtio_ring, virtio, virtio_pci(_*_dev), then the device drivers.
GUEST_MODULES = ("virtio_ring", "virtio", "virtio_pci", "virtio_blk",
                 "failover", "net_failover", "virtio_net", "e1000")
# NIC models the guest has a driver for (the engine's <model type=...>).
NIC_MODELS = ("virtio", "e1000")

SECTOR = 512
BOOT_START = 2048                   # sectors: 1 MiB alignment, as partitioning tools do
BOOT_SECTORS = 40 * 2048            # 40 MiB FAT: kernel (~8 MiB) + initramfs + room
COUNTER_SECTORS = 2048              # 1 MiB raw partition; the counter is its sector 0
COUNTER_START = BOOT_START + BOOT_SECTORS
COUNTER_MAGIC = "FTCOUNTER"
MIN_LINUX_DISK = (COUNTER_START + COUNTER_SECTORS) * SECTOR

SYSLINUX_MBR = "/usr/lib/syslinux/mbr/mbr.bin"
BUSYBOX = "/bin/busybox"
# Bumped when the guest's scripts or layout change in a way the inputs do not show.
BUILD_FORMAT = "1"

# What a Linux kernel prints on its console when it hits a bug or corruption
# (lib/list_debug.c, kernel/panic.c, arch/x86/kernel/dumpstack.c, virtio_ring.c's
# BAD_RING). A COLO secondary whose RAM was not restored faithfully shows these first.
KERNEL_ERROR_RE = re.compile(
    r"is not a head|\bBUG\b|\bOops\b|Kernel panic|Call Trace|general protection|"
    r"list_(add|del) corruption|[Uu]nable to handle|Fatal exception|segfault at|"
    r"WARNING: CPU|soft lockup|blocked for more than|invalid opcode|RIP: ")


class GuestBuildError(RuntimeError):
    """A test guest could not be built; the message names the missing piece."""


@dataclass(frozen=True)
class Kernel:
    version: str
    image: str          # /boot/vmlinuz-<version>
    modules_dir: str    # /lib/modules/<version>


@dataclass(frozen=True)
class GuestNet:
    """The guest's static address, passed on its kernel command line."""

    address: str        # e.g. 10.78.0.10
    prefix: int = 24
    gateway: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", self.address):
            raise ValueError(f"guest address {self.address!r} is not a dotted IPv4 address")
        if not 0 < self.prefix <= 32:
            raise ValueError(f"guest prefix /{self.prefix} is out of range")
        if self.gateway and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", self.gateway):
            raise ValueError(f"guest gateway {self.gateway!r} is not a dotted IPv4 address")


def find_kernel() -> Kernel:
    """The newest installed distribution kernel that has its modules installed."""
    found = []
    for image in glob.glob("/boot/vmlinuz-*"):
        version = image[len("/boot/vmlinuz-"):]
        moddir = os.path.join("/lib/modules", version)
        if os.path.exists(os.path.join(moddir, "modules.dep")):
            found.append(Kernel(version, image, moddir))
    if not found:
        raise GuestBuildError("no /boot/vmlinuz-* with matching /lib/modules/<version>/"
                              "modules.dep: apt-get install linux-image-amd64")
    return max(found, key=lambda k: [int(p) if p.isdigit() else 0
                                     for p in re.split(r"[.-]", k.version)])


def module_load_order(modules_dir: str, wanted: tuple[str, ...] = GUEST_MODULES) -> list[str]:
    """Module files (relative to `modules_dir`) in dependency order, from modules.dep."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    with open(os.path.join(modules_dir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            by_name[_module_name(path)] = path
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in stack:
            raise GuestBuildError(f"module dependency cycle through {path}")
        for dep in deps.get(path, []):
            visit(dep, stack + (path,))
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise GuestBuildError(f"kernel module {name} not in {modules_dir}/modules.dep "
                                  "(is it built in? then drop it from the list)")
        visit(by_name[name], ())
    return order


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def _module_bytes(path: str) -> bytes:
    """The module as busybox insmod can load it: uncompressed."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise GuestBuildError(f"{path} is zstd-compressed; this builder handles .ko, .xz, .gz")
    return data


class Cpio:
    """A 'newc' cpio archive, as the kernel unpacks an initramfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        self._ino += 1
        self._out.write(header.encode() + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def device(self, name: str, mode: int, major: int, minor: int) -> None:
        # Only /dev/console is needed before devtmpfs is mounted.
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self._ino, mode, 0, 0, 1, 0, 0, 0, 0, major, minor, len(encoded), 0))
        self._ino += 1
        self._out.write(header.encode() + encoded)
        self._pad()

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


# PID 1 of the guest. Services stay up until the guest dies; there is no shutdown path
# because tests end a guest by destroying or resetting it.
INIT_SCRIPT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run /tmp
for m in $(cat /etc/modules.order); do
  insmod /lib/modules/$m || echo "ftlab: insmod $m failed"
done
ip=; gw=
for arg in $(cat /proc/cmdline); do
  case "$arg" in ftlab.ip=*) ip=${arg#ftlab.ip=};; ftlab.gw=*) gw=${arg#ftlab.gw=};; esac
done
i=0
while [ ! -b /dev/vda2 ] || [ ! -e /sys/class/net/eth0 ]; do
  i=$((i+1)); [ $i -gt 100 ] && echo "ftlab: no /dev/vda2 or eth0 after 10s" && break
  usleep 100000
done
ip link set lo up
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
httpd -p %(http)d -h /www
nc -ll -p %(echo)d -e /bin/cat &
echo "ftlab: ip=$ip counter=$(/www/cgi-bin/counter-read)"
echo "%(ready)s"
while true; do sleep 3600; done
""" % {"http": HTTP_PORT, "echo": ECHO_PORT, "ready": READY_LINE}

COUNTER_READ = """#!/bin/sh
v=$(dd if=/dev/vda2 bs=512 count=1 2>/dev/null | tr -d '\\000' | sed -n 's/^%(magic)s //p')
echo ${v:-0}
""" % {"magic": COUNTER_MAGIC}

# mkdir is atomic, so it serializes concurrent requests (busybox here has no flock).
COUNTER_CGI = """#!/bin/sh
until mkdir /run/counter.lock 2>/dev/null; do usleep 1000; done
v=$(( $(/www/cgi-bin/counter-read) + 1 ))
printf '%(magic)s %%d\\n' $v | dd of=/dev/vda2 bs=512 count=1 conv=sync,fsync 2>/dev/null
ok=$?
rmdir /run/counter.lock
if [ $ok -ne 0 ]; then
  printf 'Status: 500\\r\\nContent-Type: text/plain\\r\\n\\r\\nwrite failed\\n'; exit 0
fi
printf 'Content-Type: text/plain\\r\\n\\r\\n%%d\\n' $v
""" % {"magic": COUNTER_MAGIC}


def _has_interpreter(elf: bytes) -> bool:
    """True for a dynamically linked ELF64 (it has a PT_INTERP program header)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3
               for i in range(phnum))


def build_initramfs(kernel: Kernel) -> bytes:
    """A gzip'ed newc initramfs: static busybox, the virtio modules and the scripts."""
    if not os.path.exists(BUSYBOX):
        raise GuestBuildError(f"{BUSYBOX} missing: apt-get install busybox-static")
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    if _has_interpreter(busybox):
        raise GuestBuildError(f"{BUSYBOX} is dynamically linked: apt-get install busybox-static")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.split()
    cpio = Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "run", "tmp",
              "www", "www/cgi-bin"):
        cpio.directory(d)
    cpio.device("dev/console", 0o020600, 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    order = []
    for rel in module_load_order(kernel.modules_dir):
        name = os.path.basename(rel).split(".ko")[0] + ".ko"
        cpio.file(f"lib/modules/{name}", _module_bytes(os.path.join(kernel.modules_dir, rel)))
        order.append(name)
    cpio.file("etc/modules.order", ("\n".join(order) + "\n").encode())
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("www/cgi-bin/counter-read", COUNTER_READ.encode(), 0o755)
    cpio.file("www/cgi-bin/counter", COUNTER_CGI.encode(), 0o755)
    cpio.file("www/index.html", b"ftlab guest\n")
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def kernel_cmdline(net: GuestNet) -> str:
    args = ["console=ttyS0,115200", "panic=10", "loglevel=5",
            f"ftlab.ip={net.address}/{net.prefix}"]
    if net.gateway:
        args.append(f"ftlab.gw={net.gateway}")
    return " ".join(args)


def syslinux_cfg(net: GuestNet) -> str:
    return ("SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
            f"LABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.gz\n  APPEND {kernel_cmdline(net)}\n")


def _mbr(disk_sectors: int) -> bytes:
    with open(SYSLINUX_MBR, "rb") as f:
        code = f.read()[:440]
    entries = b""
    for boot, ptype, start, count in ((0x80, 0x06, BOOT_START, BOOT_SECTORS),
                                      (0x00, 0xDA, COUNTER_START, COUNTER_SECTORS)):
        # CHS fields say "use LBA" (0xFEFFFF), as modern partitioners write them.
        entries += struct.pack("<B3sB3sII", boot, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff",
                               start, count)
    entries += b"\0" * 32
    assert COUNTER_START + COUNTER_SECTORS <= disk_sectors
    return code.ljust(440, b"\0") + b"FTLB" + b"\0\0" + entries + b"\x55\xaa"


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise GuestBuildError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise GuestBuildError(f"{tool} not found: apt-get install {package}")


def _cache_path(cache_dir: str, kind: str, key: str, ext: str) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    return os.path.join(cache_dir, f"{kind}-{key[:24]}.{ext}")


def build_linux_disk(net: GuestNet, size: int = 64 << 20, fmt: str = "qcow2",
                     cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """The cached bootable Linux guest image for `net`; returns its path (do not write it)."""
    if size < MIN_LINUX_DISK:
        raise GuestBuildError(f"disk size {size} is below the {MIN_LINUX_DISK} bytes the "
                              "boot and counter partitions need")
    if fmt not in ("raw", "qcow2"):
        raise GuestBuildError(f"disk format {fmt!r}: only raw and qcow2 are built")
    for tool, package in (("mkfs.fat", "dosfstools"), ("mcopy", "mtools"),
                          ("syslinux", "syslinux"), ("qemu-img", "qemu-utils")):
        _require(tool, package)
    if not os.path.exists(SYSLINUX_MBR):
        raise GuestBuildError(f"{SYSLINUX_MBR} missing: apt-get install syslinux-common")
    kernel = find_kernel()
    initramfs = build_initramfs(kernel)
    cfg = syslinux_cfg(net)
    digest = hashlib.sha256()
    with open(kernel.image, "rb") as f:
        digest.update(f.read())
    for part in (initramfs, cfg.encode(), f"{BUILD_FORMAT}/{size}/{fmt}".encode()):
        digest.update(hashlib.sha256(part).digest())
    target = _cache_path(cache_dir, "linux", digest.hexdigest(), fmt)
    if os.path.exists(target):
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        raw = os.path.join(tmp, "disk.raw")
        with open(raw, "wb") as f:
            f.truncate(size)
            f.write(_mbr(size // SECTOR))
        _run(["mkfs.fat", f"--offset={BOOT_START}", "-h", str(BOOT_START), "-F", "16",
              "-i", "46544c42", "-n", "FTBOOT", raw, str(BOOT_SECTORS // 2)])
        files = {"vmlinuz": kernel.image}
        for name, data in (("initrd.gz", initramfs), ("syslinux.cfg", cfg.encode())):
            files[name] = os.path.join(tmp, name)
            with open(files[name], "wb") as f:
                f.write(data)
        image_arg = f"{raw}@@{BOOT_START * SECTOR}"
        for name, src in files.items():
            _run(["mcopy", "-o", "-i", image_arg, src, f"::{name}"])
        _run(["syslinux", "--install", "--offset", str(BOOT_START * SECTOR), raw])
        built = os.path.join(tmp, f"disk.{fmt}")
        if fmt == "raw":
            os.rename(raw, built)
        else:
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, built])
        os.rename(built, target)
    return target


def build_idle_disk(size: int = 64 << 20, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """The cached blank qcow2 disk of the idle guest (firmware finds nothing to boot)."""
    _require("qemu-img", "qemu-utils")
    target = _cache_path(cache_dir, "idle", hashlib.sha256(
        f"{BUILD_FORMAT}/{size}".encode()).hexdigest(), "qcow2")
    if not os.path.exists(target):
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            built = os.path.join(tmp, "disk.qcow2")
            _run(["qemu-img", "create", "-q", "-f", "qcow2", built, str(size)])
            os.rename(built, target)
    return target


def install_disk(cached: str, dest: str, owner: str = QEMU_USER) -> str:
    """Copy a cached image to `dest`, owned by the QEMU user (libvirt does not relabel
    images that COLO names only in <qemu:commandline>)."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    shutil.copyfile(cached, dest)
    user = pwd.getpwnam(owner)
    os.chown(dest, user.pw_uid, user.pw_gid)
    os.chmod(dest, 0o660)
    return dest


def console_errors(text: str) -> list[str]:
    """The lines of a serial console log that show a kernel error (KERNEL_ERROR_RE)."""
    return [line.strip() for line in text.splitlines() if KERNEL_ERROR_RE.search(line)]


def read_counter(image: str, fmt: str = "qcow2") -> int:
    """The counter as stored on a guest disk that no QEMU holds open."""
    return _counter_of(["-f", fmt, image])


def read_counter_opts(image_opts: str) -> int:
    """The counter read through QEMU `--image-opts` (e.g. a live VM's NBD export)."""
    return _counter_of(["--image-opts", image_opts])


def _counter_of(source: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "disk.raw")
        # A raw copy, not `qemu-img dd`: its count= also counts the skipped blocks.
        _run(["qemu-img", "convert", *source, "-O", "raw", out])
        with open(out, "rb") as f:
            f.seek(COUNTER_START * SECTOR)
            text = f.read(SECTOR).rstrip(b"\0").decode(errors="replace")
    match = re.match(rf"{COUNTER_MAGIC} (\d+)\n", text)
    return int(match.group(1)) if match else 0


# --- The domain XML oVirt's engine would send for these guests ---------------------

OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
OVIRT_TUNE_NS = "http://ovirt.org/vm/tune/1.0"
ET.register_namespace("ovirt-vm", OVIRT_VM_NS)
ET.register_namespace("ovirt-tune", OVIRT_TUNE_NS)
ENGINE_MACHINE = "pc-i440fx-7.2"
ENGINE_BRIDGE = "ovirtmgmt"


@dataclass(frozen=True)
class EngineDisk:
    """One engine disk: its image path and its id (alias `ua-<id>`, serial)."""

    path: str
    image_id: str
    fmt: str = "qcow2"


@dataclass(frozen=True)
class EngineVm:
    """What the engine knows about a VM, enough to write its domain XML."""

    name: str
    disk: str = ""                  # image path, as VDSM prepares it under /rhev/...
    disk_format: str = "qcow2"
    vm_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    image_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    volume_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    nic_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    mac: str = ""                   # empty: no NIC
    nic_model: str = "virtio"       # one of NIC_MODELS
    bridge: str = ENGINE_BRIDGE
    memory_mib: int = 128
    vcpus: int = 1
    domain_type: str = "kvm"        # "qemu" for TCG
    serial_log: str = ""            # file that receives the serial console
    custom: tuple[tuple[str, str], ...] = (("ft", "true"),)
    # All the VM's disks; when empty, `disk` (if set) is the one disk, id `image_id`.
    disks: tuple[EngineDisk, ...] = ()
    # All the VM's MACs, one NIC each; when empty, `mac` (if set) is the one NIC, id
    # `nic_id`.
    macs: tuple[str, ...] = ()

    def all_disks(self) -> tuple[EngineDisk, ...]:
        if self.disks:
            return self.disks
        return (EngineDisk(self.disk, self.image_id, self.disk_format),) if self.disk else ()

    def all_nics(self) -> tuple[tuple[str, str], ...]:
        """(MAC, NIC id) of every NIC; ids past the first are derived from the VM's id."""
        macs = self.macs or ((self.mac,) if self.mac else ())
        return tuple((mac, self.nic_id if i == 0 else
                      str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.vm_id}/nic/{i}")))
                     for i, mac in enumerate(macs))


def _derived_alias(vm_id: str, device: str) -> str:
    """A stable `ua-<uuid>` for devices the engine creates without asking the caller."""
    return f"ua-{uuid.uuid5(uuid.NAMESPACE_URL, f'{vm_id}/{device}')}"


def _disk_dev(index: int) -> str:
    """The engine's (and libvirt's) virtio disk name: vda..vdz, then vdaa, vdab, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def engine_domain_xml(vm: EngineVm) -> str:
    """The domain XML the engine's LibvirtVmXmlBuilder would send for `vm`: ovirt-vm
    metadata with custom properties, `ua-<uuid>` aliases, a virtio disk of type file,
    a virtio NIC on a bridge with vhost, a balloon and an RNG."""
    dom = ET.Element("domain", {"type": vm.domain_type})
    ET.SubElement(dom, "name").text = vm.name
    ET.SubElement(dom, "uuid").text = vm.vm_id
    ET.SubElement(dom, "memory").text = str(vm.memory_mib * 1024)
    ET.SubElement(dom, "currentMemory").text = str(vm.memory_mib * 1024)
    ET.SubElement(dom, "vcpu", {"current": str(vm.vcpus)}).text = str(vm.vcpus)
    sysinfo = ET.SubElement(ET.SubElement(dom, "sysinfo", {"type": "smbios"}), "system")
    for key, value in (("manufacturer", "oVirt"), ("product", "RHEL"),
                       ("uuid", vm.vm_id), ("family", "oVirt")):
        ET.SubElement(sysinfo, "entry", {"name": key}).text = value
    clock = ET.SubElement(dom, "clock", {"offset": "variable", "adjustment": "0"})
    ET.SubElement(clock, "timer", {"name": "rtc", "tickpolicy": "catchup"})
    ET.SubElement(clock, "timer", {"name": "pit", "tickpolicy": "delay"})
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    # qemu64 asks for svm, which nested hosts here lack; fallback keeps it startable.
    cpu = ET.SubElement(dom, "cpu", {"mode": "custom", "match": "exact", "check": "none"})
    ET.SubElement(cpu, "model", {"fallback": "allow"}).text = "qemu64"
    ET.SubElement(cpu, "topology", {"sockets": str(vm.vcpus), "cores": "1", "threads": "1"})
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", {"arch": "x86_64", "machine": ENGINE_MACHINE}).text = "hvm"
    ET.SubElement(os_, "smbios", {"mode": "sysinfo"})
    # rebootTimeout -1: SeaBIOS with nothing bootable waits instead of reboot-looping.
    ET.SubElement(os_, "bios", {"useserial": "yes", "rebootTimeout": "-1"})
    devices = ET.SubElement(dom, "devices")
    for i, d in enumerate(vm.all_disks()):
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk",
                                               "snapshot": "no"})
        ET.SubElement(disk, "target", {"dev": _disk_dev(i),
                                       "bus": "virtio"})
        source = ET.SubElement(disk, "source", {"file": d.path})
        ET.SubElement(source, "seclabel", {"model": "dac", "type": "none", "relabel": "no"})
        ET.SubElement(disk, "driver", {"name": "qemu", "io": "threads", "type": d.fmt,
                                       "error_policy": "stop", "cache": "none"})
        ET.SubElement(disk, "alias", {"name": f"ua-{d.image_id}"})
        if i == 0:
            ET.SubElement(disk, "boot", {"order": "1"})
        ET.SubElement(disk, "serial").text = d.image_id
    if vm.all_nics() and vm.nic_model not in NIC_MODELS:
        raise ValueError(f"NIC model {vm.nic_model!r}: the guest has drivers for "
                         + ", ".join(NIC_MODELS))
    for mac, nic_id in vm.all_nics():
        nic = ET.SubElement(devices, "interface", {"type": "bridge"})
        ET.SubElement(nic, "model", {"type": vm.nic_model})
        ET.SubElement(nic, "link", {"state": "up"})
        ET.SubElement(nic, "source", {"bridge": vm.bridge})
        if vm.nic_model == "virtio":     # the engine writes a driver for virtio only
            ET.SubElement(nic, "driver", {"name": "vhost", "queues": "1"})
        ET.SubElement(nic, "alias", {"name": f"ua-{nic_id}"})
        ET.SubElement(nic, "mac", {"address": mac})
        ET.SubElement(nic, "mtu", {"size": "1500"})
    if vm.serial_log:
        serial = ET.SubElement(devices, "serial", {"type": "file"})
        ET.SubElement(serial, "source", {"path": vm.serial_log})
        ET.SubElement(serial, "target", {"port": "0"})
    balloon = ET.SubElement(devices, "memballoon", {"model": "virtio"})
    ET.SubElement(balloon, "stats", {"period": "5"})
    ET.SubElement(balloon, "alias", {"name": _derived_alias(vm.vm_id, "balloon")})
    rng = ET.SubElement(devices, "rng", {"model": "virtio"})
    ET.SubElement(rng, "backend", {"model": "random"}).text = "/dev/urandom"
    ET.SubElement(rng, "alias", {"name": _derived_alias(vm.vm_id, "rng")})
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(meta, f"{{{OVIRT_TUNE_NS}}}qos")
    ovm = ET.SubElement(meta, f"{{{OVIRT_VM_NS}}}vm")
    ET.SubElement(ovm, f"{{{OVIRT_VM_NS}}}clusterVersion").text = "4.7"
    custom = ET.SubElement(ovm, f"{{{OVIRT_VM_NS}}}custom")
    for key, value in vm.custom:
        ET.SubElement(custom, f"{{{OVIRT_VM_NS}}}{key}").text = value
    for mac, _ in vm.all_nics():
        dev = ET.SubElement(ovm, f"{{{OVIRT_VM_NS}}}device", {"mac_address": mac})
        ET.SubElement(dev, f"{{{OVIRT_VM_NS}}}custom")
    for i, d in enumerate(vm.all_disks()):
        dev = ET.SubElement(ovm, f"{{{OVIRT_VM_NS}}}device",
                            {"devtype": "disk", "name": _disk_dev(i)})
        volume = vm.volume_id if i == 0 else str(uuid.uuid5(uuid.NAMESPACE_URL, d.image_id))
        for key, value in (("imageID", d.image_id), ("volumeID", volume),
                           ("domainID", str(uuid.uuid5(uuid.NAMESPACE_URL, "ftlab/sd"))),
                           ("poolID", str(uuid.uuid5(uuid.NAMESPACE_URL, "ftlab/dc")))):
            ET.SubElement(dev, f"{{{OVIRT_VM_NS}}}{key}").text = value
    ET.SubElement(ovm, f"{{{OVIRT_VM_NS}}}launchPaused").text = "false"
    ET.SubElement(ovm, f"{{{OVIRT_VM_NS}}}resumeBehavior").text = "kill"
    return ET.tostring(dom, encoding="unicode")


def guest_mac(index: int) -> str:
    """A stable MAC from oVirt's default pool (56:6f:...) for lab VM `index`."""
    return "56:6f:%02x:%02x:00:%02x" % ((index >> 16) & 0xFF, (index >> 8) & 0xFF, index & 0xFF)


def linux_guest_xml(name: str, disk: str, mac: str, serial_log: str,
                    disk_format: str = "qcow2", memory_mib: int = 256,
                    nic_model: str = "virtio", **ids: str) -> str:
    """Engine XML for the Linux test guest under TCG (`ids`: vm_id, image_id, ...)."""
    return engine_domain_xml(EngineVm(name=name, disk=disk, disk_format=disk_format,
                                      mac=mac, memory_mib=memory_mib, domain_type="qemu",
                                      serial_log=serial_log, nic_model=nic_model, **ids))


def idle_guest_xml(name: str, disk: str, mac: str = "", memory_mib: int = 128,
                   serial_log: str = "", vcpus: int = 1,
                   extra_disks: tuple[EngineDisk, ...] = (),
                   extra_macs: tuple[str, ...] = (), **ids: str) -> str:
    """Engine XML for the idle KVM guest (no NIC unless `mac` is given); `extra_disks`
    and `extra_macs` come after the first disk and NIC."""
    vm = EngineVm(name=name, disk=disk, mac=mac, memory_mib=memory_mib, vcpus=vcpus,
                  domain_type="kvm", serial_log=serial_log, **ids)
    if extra_disks:
        vm = replace(vm, disks=vm.all_disks() + extra_disks)
    if extra_macs:
        vm = replace(vm, macs=(mac, *extra_macs) if mac else extra_macs)
    return engine_domain_xml(vm)
