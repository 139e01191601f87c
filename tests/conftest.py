import os

import pytest


def pytest_report_header(config):
    """Which QEMU the FT VMs of this run use, said up front (ftlab.qemubuild)."""
    from ftlab import qemubuild

    return [qemubuild.describe()]


@pytest.fixture(scope="session")
def libvirtd():
    """A reachable system libvirtd; started for the session if none runs."""
    from ftlab.libvirtd import Libvirtd

    daemon = Libvirtd().ensure()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def kvm():
    """Tier 1 needs /dev/kvm: a machine without it cannot run these tests at all."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.fail("/dev/kvm is not usable: tier 1 (real COLO) needs KVM")
