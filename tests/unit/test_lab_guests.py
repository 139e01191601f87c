"""The lab's guest choice (`ftlab_guest`) and the client-side checks of tier 3: a
counter that must rise with every reply, and the gap a fault leaves."""
from __future__ import annotations

import json

import pytest

from ftlab import counterclient, guest, qemubuild
from ftlab.counterclient import Reply
from ftlab.preflight import is_lab_namespace
from ftlab.vdsm import VdsmError
from ftlab.vdsmdriver import _guest


def test_idle_guest_is_the_default():
    assert _guest({"ft": "true"}) == ("idle", None)


def test_idle_guest_takes_a_shape():
    import xml.etree.ElementTree as ET
    xml = guest.idle_guest_xml("vm", "/i/0.qcow2", mac=guest.guest_mac(2), vcpus=4,
                               memory_mib=1024, vm_id="6d1c7a8e-1d3e-4c55-9b8f-0a1b2c3d4e5f",
                               extra_disks=(guest.EngineDisk("/i/1.qcow2", "id1"),
                                            guest.EngineDisk("/i/2.qcow2", "id2")),
                               extra_macs=(guest.guest_mac(258),))
    dom = ET.fromstring(xml)
    assert dom.findtext("vcpu") == "4" and dom.find("vcpu").get("current") == "4"
    assert dom.find("cpu/topology").get("sockets") == "4"
    assert dom.findtext("memory") == str(1024 * 1024)
    assert [d.find("source").get("file") for d in dom.iterfind("devices/disk")] == [
        "/i/0.qcow2", "/i/1.qcow2", "/i/2.qcow2"]
    nics = list(dom.iterfind("devices/interface"))
    assert [n.find("mac").get("address") for n in nics] == [guest.guest_mac(2),
                                                           guest.guest_mac(258)]
    assert len({n.find("alias").get("name") for n in nics}) == 2


def test_linux_guest_gets_its_address():
    kind, net = _guest({"ftlab_guest": "linux", "ftlab_guest_ip": "10.78.0.10"})
    assert kind == "linux" and net is not None and net.address == "10.78.0.10"


@pytest.mark.parametrize("custom, words", [
    ({"ftlab_guest": "windows"}, "give one of idle, linux, linux-tcg"),
    ({"ftlab_guest": "linux"}, "needs ftlab_guest_ip"),
    ({"ftlab_guest": "linux", "ftlab_guest_ip": "10.78.0.10,x"}, "not a dotted IPv4"),
])
def test_bad_guest_choice_is_refused_with_what_to_give(custom, words):
    with pytest.raises(VdsmError, match=words):
        _guest(custom)


TCG_FT = {"ftlab_guest": "linux-tcg", "ftlab_guest_ip": "10.78.0.10", "ft": "true"}


def _lab_qemu(monkeypatch, tmp_path, source: str, patches: list[str] | None,
              upstream: str = "7.2.22") -> None:
    """The lab's FT QEMU is tmp_path/bin/qemu-system-x86_64; `patches`: what its
    build-info.json says went in (None: no build-info.json, as for Debian's QEMU)."""
    binary = tmp_path / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir()
    binary.write_text("")
    if patches is not None:
        (tmp_path / "build-info.json").write_text(json.dumps(
            {"variant": "colo", "upstream_version": upstream, "patches": patches}))
    monkeypatch.setattr(qemubuild, "ft_emulator",
                        lambda: qemubuild.Choice(str(binary), source, ""))


PATCHES = ["0001-colo-savevm-live-state-under-bql-7.2.patch",
           "0002-ram_addr-rearm-tcg-notdirty-traps-in-fast-sync.patch",
           "0003-migration-socket-tcp-nodelay.patch"]


def test_tcg_guest_with_ft_is_refused_on_a_qemu_without_the_patches(monkeypatch, tmp_path):
    _lab_qemu(monkeypatch, tmp_path, "Debian fallback", None)
    with pytest.raises(VdsmError, match="linux-tcg cannot have ft=true here: FT VMs run on "
                       ".*lacks the project's QEMU patches .*0001-colo-savevm.*0002-ram_addr"
                       ".*scripts/build-qemu --variant colo"):
        _guest(TCG_FT)


def test_a_build_without_the_dirty_tracking_fix_is_refused(monkeypatch, tmp_path):
    _lab_qemu(monkeypatch, tmp_path, "VDSM_FT_EMULATOR", [PATCHES[0], PATCHES[2]])
    with pytest.raises(VdsmError, match=r"patches for COLO under TCG \(0002-ram_addr-rearm"):
        _guest(TCG_FT)


@pytest.mark.parametrize("upstream, patches", [
    ("7.2.22", PATCHES),
    # Upstream has the dirty-tracking fix from 9.0 on; only the BQL patch is needed.
    ("10.0.13", ["0001-colo-savevm-live-state-under-bql.patch", PATCHES[2]]),
])
def test_tcg_guest_with_ft_runs_on_the_projects_colo_build(monkeypatch, tmp_path, upstream,
                                                           patches):
    _lab_qemu(monkeypatch, tmp_path, "project build", patches, upstream)
    kind, net = _guest(TCG_FT)
    assert kind == "linux-tcg" and net is not None and net.address == "10.78.0.10"


def test_console_errors_find_kernel_trouble_not_boot_chatter():
    log = ("Kernel command line: console=ttyS0,115200 panic=10 loglevel=5\n"
           "virtio_net virtio0: input.0:id 22 is not a head!\n"
           "FTLAB-GUEST-READY\n"
           "Kernel panic - not syncing: Fatal exception in interrupt\n")
    assert guest.console_errors(log) == [
        "virtio_net virtio0: input.0:id 22 is not a head!",
        "Kernel panic - not syncing: Fatal exception in interrupt"]
    assert guest.console_errors("ftlab: ip=10.78.0.10/24 counter=0\n") == []


def _replies(*points):
    return [Reply(t, v, "" if v is not None else "timed out") for t, v in points]


def test_a_rising_counter_has_no_fork_and_errors_do_not_count():
    replies = _replies((1.0, 5), (1.1, None), (1.2, 6), (1.3, 9))
    assert counterclient.forks(replies) == []


def test_a_repeated_or_lower_value_is_a_fork():
    replies = _replies((1.0, 5), (1.1, 6), (1.2, 6), (1.3, 4), (1.4, 7))
    assert counterclient.forks(replies) == [(6, 6), (6, 4)]


def test_gap_runs_from_the_last_reply_before_to_the_first_after():
    replies = _replies((1.0, 5), (1.5, 6), (1.6, None), (2.25, 7), (2.3, 8))
    assert counterclient.gap_ms(replies, at=1.55) == pytest.approx(750.0)


def test_no_gap_without_replies_on_both_sides():
    replies = _replies((1.0, 5), (2.0, None))
    assert counterclient.gap_ms(replies, at=1.5) is None
    assert counterclient.gap_ms(replies, at=0.5) is None


def test_the_demo_client_namespace_is_the_labs_own():
    assert is_lab_namespace("ftlab-client")
    assert not is_lab_namespace("ftlab-t2-client")
