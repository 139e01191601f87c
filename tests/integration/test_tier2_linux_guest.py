"""Tier 2 (issue 2): the Linux test guest under TCG, started by a lab host's libvirtd from
the XML `vdsm_ft.domxml` generates.

- The primary XML boots the guest FROM ITS DISK (SeaBIOS -> syslinux on the quorum node;
  no direct kernel boot), and the guest serves its on-disk counter over the vhost-off
  NIC: a tap on the host's `ovirtmgmt` bridge, reached from a client in another network
  namespace through the lab's guest segment.
- The counter survives a guest reboot and is on the image afterwards.
- The secondary XML starts under libvirtd on a second lab host and waits in `inmigrate`.

Guest boot is detected by the guest's own READY line on the serial console, with a bound.
"""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest

from ftlab import guest, netns
from ftlab.host import LabHost
from vdsm_ft import domxml, layout, replica, runfiles
from vdsm_ft.qmp import Qmp

pytestmark = [pytest.mark.tcg, pytest.mark.slow]

WIRE = "t2-wire"
QEMU_VERSION = (7, 2, 0)
GUEST_IP = "10.78.0.10"
CLIENT_IP = "10.78.0.200"
BOOT_TIMEOUT = 90.0          # ~6 s measured under TCG; the bound allows a busy CI machine
HTTP_TIMEOUT = 10


def _qemu_owned_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    pw = pwd.getpwnam(guest.QEMU_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o750)
    return path


def _wait_ready(serial_log: str, count: int, dom: libvirt.virDomain) -> float:
    """Wait for the `count`-th READY line on the serial console; returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < BOOT_TIMEOUT:
        try:
            with open(serial_log, "rb") as f:
                if f.read().decode(errors="replace").count(guest.READY_LINE) >= count:
                    return time.monotonic() - start
        except FileNotFoundError:
            pass
        assert dom.isActive(), "the guest's QEMU exited during boot"
        time.sleep(0.2)
    tail = open(serial_log, errors="replace").read()[-2000:] if os.path.exists(serial_log) else ""
    pytest.fail(f"guest not ready within {BOOT_TIMEOUT}s; serial console tail:\n{tail}")


def _get(client: str, path: str = guest.COUNTER_URL_PATH) -> str:
    # No `-T`: Debian's static busybox 1.35 wget segfaults with it; the subprocess
    # timeout bounds the request instead.
    proc = netns.run_in(client, ["busybox", "wget", "-q", "-O", "-", f"http://{GUEST_IP}{path}"],
                        timeout=HTTP_TIMEOUT)
    assert proc.returncode == 0, f"HTTP GET {path} failed: {proc.stderr.strip()}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def lab():
    base = tempfile.mkdtemp(prefix="ftlab-t2-", dir="/tmp")
    os.chmod(base, 0o755)
    hosts = [LabHost("t2-a", 1, base, wire=WIRE), LabHost("t2-b", 2, base, wire=WIRE)]
    client = netns.netns_name("t2-client")
    try:
        for h in hosts:
            h.up()
        netns.add_client("t2-client", CLIENT_IP, 1, wire=netns.netns_name(WIRE))
        cached = guest.build_linux_disk(guest.GuestNet(GUEST_IP))
        disk = guest.install_disk(cached, os.path.join(_qemu_owned_dir(
            os.path.join(base, "images")), "disk.qcow2"))
        engine_xml = guest.linux_guest_xml("t2vm", disk, guest.guest_mac(1),
                                           os.path.join(base, "serial-a.log"),
                                           vm_id=str(uuid.uuid4()))
        yield {"base": base, "a": hosts[0], "b": hosts[1], "client": client,
               "disk": disk, "engine_xml": engine_xml}
    finally:
        for h in hosts:
            h.down()
        netns.delete(client)
        netns.delete(netns.netns_name(WIRE))
        shutil.rmtree(base, ignore_errors=True)


def test_primary_boots_from_quorum_disk_and_serves_counter(lab):
    a: LabHost = lab["a"]
    run_dir = _qemu_owned_dir(os.path.join(lab["base"], "run-a"))
    xml = domxml.primary_xml(lab["engine_xml"], run_dir, QEMU_VERSION)
    runfiles.make_placeholders(xml)
    assert "<kernel>" not in xml and "<initrd>" not in xml   # boots from the disk itself
    serial_log = os.path.join(lab["base"], "serial-a.log")
    conn = a.connect()
    dom = conn.createXML(xml, 0)
    try:
        boot_s = _wait_ready(serial_log, 1, dom)
        console = open(serial_log, errors="replace").read()
        assert "SYSLINUX" in console and "Loading vmlinuz" in console, \
            "the guest did not boot through the bootloader on its disk"
        assert f"ip={GUEST_IP}/24 counter=0" in console
        print(f"guest ready {boot_s:.1f}s after domain start (TCG)")

        # The guest disk is the quorum node the primary XML made, opened by our -blockdev.
        qmp = Qmp(layout.VmLayout(vm_id="", name="", run_dir=run_dir).qmp_socket).connect()
        try:
            nodes = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes")}
            quorum = layout.Disk(index=0, image=lab["disk"], size=0).quorum
            assert nodes[quorum]["drv"] == "quorum"
            devices = {b.get("qdev"): b for b in qmp.execute("query-block")}
            assert any(b.get("inserted", {}).get("node-name") == quorum
                       for b in devices.values()), devices
        finally:
            qmp.close()

        # vhost off: the tap netdev QEMU runs has no vhost.
        with open(os.path.join(a.path("run", "qemu"), "t2vm.pid")) as f:
            pid = int(f.read())
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode()
        assert '"type":"tap"' in cmdline
        assert '"vhost":true' not in cmdline and "vhostfd" not in cmdline
        assert a.run(["bridge", "link", "show"]).stdout.count("master ovirtmgmt") >= 2

        # The client, in another namespace, sees 1, 2, 3 ...
        assert [_get(lab["client"]) for _ in range(3)] == ["1", "2", "3"]
        # Concurrent requests are serialized on the disk: no value lost or repeated.
        with ThreadPoolExecutor(max_workers=4) as pool:
            values = sorted(int(v) for v in pool.map(lambda _: _get(lab["client"]), range(6)))
        assert values == list(range(4, 10))
        echo = netns.run_in(lab["client"], ["busybox", "nc", "-w", "3", GUEST_IP,
                                            str(guest.ECHO_PORT)],
                            input="ft echo 42\n", timeout=15)
        assert echo.stdout == "ft echo 42\n", echo.stderr

        # A reboot (hard reset) keeps the counter: it is on the disk.
        dom.reset(0)
        _wait_ready(serial_log, 2, dom)
        assert "counter=9" in open(serial_log, errors="replace").read()
        assert _get(lab["client"]) == "10"
    finally:
        dom.destroy()
        conn.close()
    assert guest.read_counter(lab["disk"]) == 10


def test_secondary_starts_and_waits_in_inmigrate(lab):
    a: LabHost = lab["a"]
    b: LabHost = lab["b"]
    engine_xml = lab["engine_xml"]
    vm = domxml.layout_from_domxml(engine_xml, run_dir="")
    size = replica.virtual_size(lab["disk"])
    sized = tuple(layout.Disk(index=d.index, image=d.image, size=size, fmt=d.fmt)
                  for d in vm.disks)
    disks = replica.create_secondary_disks(vm.vm_id, sized, b.path("replica"),
                                           b.path("overlay"), guest.QEMU_USER)
    run_dir = _qemu_owned_dir(os.path.join(lab["base"], "run-b"))
    endpoints = layout.Endpoints(primary_host=a.address, secondary_host=b.address,
                                 migration_port=49152, nbd_port=49153,
                                 mirror_ports=(49154,), compare_ports=(49155,))
    xml = domxml.secondary_xml(engine_xml, run_dir, list(disks), endpoints, 1, QEMU_VERSION)
    runfiles.make_placeholders(xml)
    conn = b.connect()
    dom = conn.createXML(xml, 0)
    try:
        assert dom.name() == domxml.secondary_name("t2vm")
        qmp = Qmp(layout.qmp_socket(run_dir, dom.name())).connect()
        try:
            status = qmp.execute("query-status")
            assert status["status"] == "inmigrate" and status["running"] is False
            nodes = {n["node-name"]: n["drv"] for n in qmp.execute("query-named-block-nodes")}
            assert nodes[disks[0].quorum] == "quorum"
            assert nodes[layout.SECONDARY_REPLICATION_FMT.format(0)] == "replication"
        finally:
            qmp.close()
        state, _ = dom.state()
        assert state == libvirt.VIR_DOMAIN_PAUSED
        # Still waiting a moment later: nothing started the guest behind our back.
        time.sleep(1)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    finally:
        dom.destroy()
        conn.close()
