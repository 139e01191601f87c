"""Copy-back onto a block storage domain's LV (host_device), against a real QEMU.

libvirt 9.0 here lets QEMU open no block device that its XML does not name (see
tests/integration/test_domxml_libvirt.py), so this QEMU runs without libvirt and without a
guest (`-machine none`): the block layer is what is under test. The source is the graph
a survivor has after a failover, a quorum on its qcow2 replica; the target a loop device
standing in for the LV, with stale data on it that the copy must overwrite.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from ftlab.diskprobe import image_matches
from vdsm_ft import copyback
from vdsm_ft.layout import Disk, VmLayout
from vdsm_ft.qmp import Qmp



MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 64 * 1024


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=60).stdout


@pytest.fixture
def survivor():
    base = tempfile.mkdtemp(prefix="ftcb-block-", dir="/var/tmp")
    replica = os.path.join(base, "replica.qcow2")
    lv_file = os.path.join(base, "lv.raw")
    _run("qemu-img", "create", "-q", "-f", "qcow2", replica, str(SIZE))
    _run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xa1 0 {BLOCK}", replica)
    _run("qemu-img", "create", "-q", "-f", "raw", lv_file, str(SIZE))
    # The stale image: an old block the survivor has since rewritten, one it zeroed.
    _run("qemu-io", "-f", "raw", "-c", f"write -P 0x55 0 {BLOCK}",
         "-c", f"write -P 0x56 {1 * MiB} {BLOCK}", lv_file)
    loop = _run("losetup", "--find", "--show", lv_file).strip()
    sock = os.path.join(base, "qmp.sock")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{sock},server=on,wait=off",
         "-blockdev", f"driver=file,filename={replica},node-name=ft-parent0-file",
         "-blockdev", "driver=qcow2,file=ft-parent0-file,node-name=ft-parent0",
         "-blockdev", "driver=quorum,node-name=ft-quorum0,read-pattern=fifo,"
                      "vote-threshold=1,children.0=ft-parent0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    q = Qmp(sock, "block-survivor")
    try:
        q.connect(timeout=10.0)
        layout = VmLayout("8c3d5ad6-8d0e-4b5a-9f43-6a8f3f3b7f10", "block", base,
                          (Disk(0, replica, SIZE, "qcow2"),))
        yield q, layout, loop
    finally:
        q.close()
        qemu.kill()
        qemu.wait(timeout=10)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_copy_back_onto_a_block_device_and_pivot(survivor):
    q, layout, loop = survivor
    to = (copyback.Target(0, loop, "raw"),)
    assert copyback.start(q, layout, to, 8 * MiB) is False
    drivers = {n["node-name"]: n["drv"]
               for n in q.execute("query-named-block-nodes", {"flat": True})}
    assert drivers[to[0].file_node] == "host_device"
    q.hmp(f'qemu-io ft-quorum0 "write -P 0xd4 {4 * MiB} {BLOCK}"')    # during the copy
    assert not copyback.progress(q, to).ready
    copyback.wait_ready(q, to, 60.0, interval=0.1)
    q.hmp(f'qemu-io ft-quorum0 "write -P 0xe5 {5 * MiB} {BLOCK}"')    # while READY
    copyback.pivot(q, layout, to)
    copyback.verify(q, layout, to)
    q.hmp(f'qemu-io ft-quorum0 "write -P 0xf6 {6 * MiB} {BLOCK}"')    # on the LV now
    copyback.drop_replica_nodes(q, layout)
    names = {n["node-name"] for n in q.execute("query-named-block-nodes", {"flat": True})}
    assert "ft-parent0" not in names and to[0].node in names
    q.execute("quit")
    time.sleep(0.5)
    for offset, pattern in ((0, 0xA1), (1 * MiB, 0x00), (4 * MiB, 0xD4),
                            (5 * MiB, 0xE5), (6 * MiB, 0xF6)):
        assert image_matches(loop, offset, BLOCK, pattern, fmt="raw"), \
            f"the LV lacks {pattern:#x} at {offset}"
    assert not image_matches(loop, 7 * MiB, BLOCK, 0xF6, fmt="raw"), "negative control"
