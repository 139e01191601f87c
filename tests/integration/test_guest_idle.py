"""The tier 1 idle guest: firmware only, under KVM, started by a lab host's libvirtd from
the generated primary XML. SeaBIOS finds nothing bootable and then waits for good (no
reboot loop), so a COLO checkpoint sees a guest that does next to nothing."""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time

import pytest

from ftlab import guest, netns
from ftlab.host import LabHost
from vdsm_ft import domxml, runfiles

pytestmark = pytest.mark.kvm

WIRE = "tid-wire"
FIRMWARE_TIMEOUT = 60.0
NO_BOOT = "No bootable device."


def test_idle_guest_waits_in_firmware_without_rebooting(kvm):
    base = tempfile.mkdtemp(prefix="ftlab-tid-", dir="/tmp")
    os.chmod(base, 0o755)
    host = LabHost("tid-a", 1, base, wire=WIRE)
    try:
        host.up()
        disk = guest.install_disk(guest.build_idle_disk(64 << 20),
                                  os.path.join(base, "idle.qcow2"))
        run_dir = os.path.join(base, "run")
        os.makedirs(run_dir)
        pw = pwd.getpwnam(guest.QEMU_USER)
        os.chown(run_dir, pw.pw_uid, pw.pw_gid)
        serial = os.path.join(base, "serial.log")
        engine_xml = guest.idle_guest_xml("idle1", disk, serial_log=serial)
        assert "type=\"kvm\"" in engine_xml
        conn = host.connect()
        xml = domxml.primary_xml(engine_xml, run_dir, (7, 2, 0))
        runfiles.make_placeholders(xml)
        dom = conn.createXML(xml, 0)
        try:
            deadline = time.monotonic() + FIRMWARE_TIMEOUT
            console = ""
            while NO_BOOT not in console:
                assert time.monotonic() < deadline, \
                    f"SeaBIOS did not report {NO_BOOT!r} in {FIRMWARE_TIMEOUT}s: {console!r}"
                time.sleep(0.5)
                console = open(serial, errors="replace").read() if os.path.exists(serial) else ""
            assert "Retrying" not in console
            time.sleep(3)
            console = open(serial, errors="replace").read()
            assert console.count("SeaBIOS (version") == 1, "the firmware rebooted"
            assert dom.isActive() and dom.info()[0] == 1     # VIR_DOMAIN_RUNNING
        finally:
            dom.destroy()
            conn.close()
    finally:
        host.down()
        netns.delete(netns.netns_name(WIRE))
        shutil.rmtree(base, ignore_errors=True)
