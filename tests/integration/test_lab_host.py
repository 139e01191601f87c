"""Lab hosts: own namespace, own libvirtd, a replication network between them, crash and
removal that leave nothing behind (issue 5, "The lab").

The hosts sit on their own wire (`ftlab-tlh-wire`), so this test can run beside a lab
that is up, and its cleanup touches only what it made.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import libvirt
import pytest
from lxml import etree

from ftlab import netns
from ftlab.host import LabHost, LabHostDown

WIRE = "tlh-wire"


def _netns_inode(name: str) -> tuple[int, int]:
    st = os.stat(os.path.join(netns.NETNS_DIR, name))
    return (st.st_dev, st.st_ino)


def _procs_in(ns_id: tuple[int, int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ns_id:
            found.append(int(entry))
    return found


def _daemon_pid(host: LabHost, name: str) -> int:
    with open(host.path("run", f"{name}.pid")) as f:
        return int(f.read())


@pytest.fixture
def hosts():
    base = tempfile.mkdtemp(prefix="ftlab-t-", dir="/tmp")
    os.chmod(base, 0o755)
    made = [LabHost("tlh-a", 1, base, wire=WIRE), LabHost("tlh-b", 2, base, wire=WIRE)]
    yield made
    for h in made:
        h.down()
    netns.delete(netns.netns_name(WIRE))
    shutil.rmtree(base, ignore_errors=True)


def test_two_hosts_each_with_own_libvirtd_and_a_replication_network(hosts):
    a, b = (h.up() for h in hosts)
    for h in (a, b):
        conn = libvirt.open(h.uri)
        try:
            caps = etree.fromstring(conn.getCapabilities().encode())
            # The daemon answering on this host's socket is this host's own libvirtd:
            # it runs in the host's netns and reports the host's own UUID.
            assert caps.findtext("host/uuid") == h.host_uuid
        finally:
            conn.close()
        for daemon in ("libvirtd", "virtlogd"):
            assert _daemon_pid(h, daemon) in h.pids(), f"{daemon} of {h.name} not in its netns"
        # Private mount namespace: the host's /run/libvirt is its own directory.
        listing = h.run(["ls", "/run/libvirt"]).stdout.split()
        assert "libvirt-sock" in listing and "libvirtd.pid" in listing
    assert a.host_uuid != b.host_uuid
    assert _daemon_pid(a, "libvirtd") != _daemon_pid(b, "libvirtd")
    assert not os.path.exists("/run/libvirt/ftlab-marker")
    a.run(["touch", "/run/libvirt/ftlab-marker"])
    assert os.path.exists(a.path("run", "ftlab-marker"))
    assert not os.path.exists(b.path("run", "ftlab-marker"))
    assert not os.path.exists("/run/libvirt/ftlab-marker")

    assert a.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout.count(a.address) == 1
    ping = a.run(["busybox", "ping", "-c", "1", "-W", "3", b.address], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    ping = b.run(["busybox", "ping", "-c", "1", "-W", "3", a.address], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # Negative control: an address nobody holds does not answer.
    ping = a.run(["busybox", "ping", "-c", "1", "-W", "1", "10.77.0.99"], check=False)
    assert ping.returncode != 0


def test_crash_kills_every_process_of_one_host_only(hosts):
    a, b = (h.up() for h in hosts)
    sleeper = a.popen(["sleep", "600"])
    deadline = time.monotonic() + 5
    while sleeper.pid not in a.pids():      # nsenter joins the namespaces, then execs
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a_pids = a.pids()
    assert len(a_pids) >= 4          # holder, virtlogd, libvirtd, sleeper
    b_pids = set(b.pids())
    a.crash()
    assert a.pids() == []
    assert sleeper.wait(timeout=10) == -9
    with pytest.raises(libvirt.libvirtError):
        libvirt.open(a.uri)
    with pytest.raises(LabHostDown):
        a.run(["true"])
    assert b_pids <= set(b.pids())
    libvirt.open(b.uri).close()
    # A crashed host can be brought up again.
    a.up()
    libvirt.open(a.uri).close()


def test_down_leaves_no_namespace_process_or_link(hosts):
    a, b = (h.up() for h in hosts)
    ids = {h.name: _netns_inode(h.netns) for h in (a, b)}
    wire_id = _netns_inode(netns.netns_name(WIRE))
    root_links_before = set(netns.ip("-o", "link", "show").stdout.split("\n"))
    for h in (a, b):
        h.down()
    netns.delete(netns.netns_name(WIRE))
    names = netns.ip("netns", "list").stdout
    for ns in (a.netns, b.netns, netns.netns_name(WIRE)):
        assert ns not in names
    for ns_id in list(ids.values()) + [wire_id]:
        assert _procs_in(ns_id) == []
    for h in (a, b):
        assert not os.path.exists(h.dir)
    # Nothing was added to the root namespace by a test wire, and nothing is left there.
    root_links = netns.ip("-o", "link", "show").stdout
    assert set(root_links.split("\n")) <= root_links_before
    for name in ("tlh-", "vnet", "r1@", "g1@"):
        assert name not in root_links


def test_host_comes_up_on_a_machine_without_run_libvirt():
    """Issue 10, item 5: without systemd nothing creates /run/libvirt, and the lab's bind
    mount over it failed ("mount point does not exist"). The host is brought up in a
    private mount namespace whose /run lacks libvirt/ (lab_host_without_run_libvirt.py);
    the machine's own /run is not touched."""
    base = tempfile.mkdtemp(prefix="ftlab-t-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
             "tests.integration.lab_host_without_run_libvirt", base,
             str(os.stat("/proc/self/ns/mnt").st_ino)],
            capture_output=True, text=True, timeout=120,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["missing_before"] is True
        assert result["made_by_lab"] is True
        assert result["libvirt_version"] >= 9000000
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert not os.path.exists(os.path.join(netns.NETNS_DIR, netns.netns_name("tlh-nr")))
