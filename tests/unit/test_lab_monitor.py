"""ftlab.monitor: an HMP command that QEMU never answers fails the caller in time."""
import threading
import time

import pytest

from ftlab.monitor import LibvirtMonitor, MonitorTimeout


def test_an_unanswered_hmp_command_times_out_with_the_domain_named():
    mon = LibvirtMonitor("qemu:///nowhere", "vm-a")
    release = threading.Event()
    mon._command = lambda text, flags: release.wait(10) and ""
    t0 = time.monotonic()
    with pytest.raises(MonitorTimeout, match="vm-a: HMP 'info status' got no answer"):
        mon.hmp("info status", timeout=0.2)
    assert time.monotonic() - t0 < 2
    release.set()


def test_an_answer_and_an_error_come_back_as_they_are():
    mon = LibvirtMonitor("qemu:///nowhere", "vm-a")
    mon._command = lambda text, flags: f"reply to {text}"
    assert mon.hmp("info status") == "reply to info status"

    def fails(text, flags):
        raise ValueError("libvirt said no")

    mon._command = fails
    with pytest.raises(ValueError, match="libvirt said no"):
        mon.hmp("info status")
