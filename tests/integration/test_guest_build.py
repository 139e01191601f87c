"""Building the test guests from the distribution's packages: module order, initramfs
contents, the bootable disk's partition table, the cache, and refusals of bad input."""
from __future__ import annotations

import gzip
import os
import struct
import subprocess

import pytest

from ftlab import guest


def test_modules_load_in_dependency_order():
    order = [os.path.basename(p).split(".ko")[0]
             for p in guest.module_load_order(guest.find_kernel().modules_dir)]
    for before, after in (("virtio_ring", "virtio"), ("virtio", "virtio_pci"),
                          ("virtio_pci", "virtio_blk"), ("virtio_pci", "virtio_net"),
                          ("failover", "net_failover"), ("net_failover", "virtio_net")):
        assert order.index(before) < order.index(after), order


def test_unknown_module_is_refused():
    with pytest.raises(guest.GuestBuildError, match="no_such_mod"):
        guest.module_load_order(guest.find_kernel().modules_dir, ("no_such_mod",))


def test_initramfs_is_newc_with_busybox_modules_and_services(tmp_path):
    archive = gzip.decompress(guest.build_initramfs(guest.find_kernel()))
    listing = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True,
                             check=True, timeout=30).stdout.decode().split()
    for name in ("init", "bin/busybox", "bin/httpd", "lib/modules/virtio_net.ko",
                 "www/cgi-bin/counter", "etc/modules.order", "dev/console"):
        assert name in listing
    # Every module is stored uncompressed (busybox insmod cannot read .xz).
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=archive, cwd=tmp_path,
                   check=True, capture_output=True, timeout=30)
    for mod in (tmp_path / "etc/modules.order").read_text().split():
        assert (tmp_path / "lib/modules" / mod).read_bytes()[:4] == b"\x7fELF"


def test_linux_disk_is_bootable_and_cached(tmp_path):
    net = guest.GuestNet("10.78.0.77")
    path = guest.build_linux_disk(net, fmt="raw", cache_dir=str(tmp_path))
    with open(path, "rb") as f:
        mbr = f.read(512)
    assert mbr[510:] == b"\x55\xaa"
    boot, ptype, start, count = struct.unpack_from("<B3xB3xII", mbr, 446)
    assert (boot, ptype, start) == (0x80, 0x06, guest.BOOT_START)
    ptype2, start2 = struct.unpack_from("<4xB3xI", mbr, 462)
    assert (ptype2, start2) == (0xDA, guest.COUNTER_START)
    files = subprocess.run(["mdir", "-a", "-b", "-i", f"{path}@@{guest.BOOT_START * 512}",
                            "::"], capture_output=True, text=True, check=True).stdout
    for name in ("VMLINUZ", "INITRD.GZ", "SYSLINUX.CFG", "LDLINUX.SYS"):
        assert name.lower() in files.lower()
    assert guest.read_counter(path, "raw") == 0
    mtime = os.stat(path).st_mtime_ns
    assert guest.build_linux_disk(net, fmt="raw", cache_dir=str(tmp_path)) == path
    assert os.stat(path).st_mtime_ns == mtime
    other = guest.build_linux_disk(guest.GuestNet("10.78.0.78"), fmt="raw",
                                   cache_dir=str(tmp_path))
    assert other != path


@pytest.mark.parametrize("kwargs", [{"address": "10.78.0"}, {"address": "10.78.0.1",
                                                              "prefix": 33},
                                    {"address": "10.78.0.1", "gateway": "x"}])
def test_bad_guest_network_is_refused(kwargs):
    with pytest.raises(ValueError):
        guest.GuestNet(**kwargs)


def test_too_small_disk_is_refused(tmp_path):
    with pytest.raises(guest.GuestBuildError, match="below"):
        guest.build_linux_disk(guest.GuestNet("10.78.0.9"), size=1 << 20,
                               cache_dir=str(tmp_path))
