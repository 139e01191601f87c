"""vdsm_ft.admission: an ft=true start's admission and preparation, with its inputs passed
in (no HookContext): the agent calls it so, and the hook when the agent is unreachable."""
from __future__ import annotations

import os

import pytest

from ftlab import guest, qemubuild
from vdsm_ft import admission, emulator, hostconfig

VM = "6a1f0c2e-4b7d-4e51-9a3c-2f8d7e6b5a41"


class _Arbiter:
    """A `LiveCheck` with a fixed answer (a real one needs etcd)."""

    def __init__(self, live: str | None):
        self.live = live
        self.asked: list[tuple[str, str]] = []

    def start_check(self, vm_id, host, timeout=None):
        self.asked.append((vm_id, host))
        return self.live, None

    def stale_image(self, vm_id, timeout=None):
        return None


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "agent.conf"
    path.write_text(f"""[host]
id = host-a
replication_address = 127.0.0.1
[agent]
run_dir = {tmp_path}/run
[qemu]
emulator = {qemubuild.ft_emulator().path}
[etcd]
endpoints = http://127.0.0.1:1
""")
    return hostconfig.load(str(path))


def _engine_xml() -> str:
    return guest.idle_guest_xml("idle", "/nowhere/idle.qcow2", vm_id=VM)


def test_prepares_with_the_inputs_it_is_given(config):
    arbiter = _Arbiter(live=None)
    engine_xml = _engine_xml()
    xml = admission.prepare_primary(config, arbiter, emulator.identify, VM, engine_xml)
    assert arbiter.asked == [(VM, "host-a")]
    assert "quorum" in xml
    with open(os.path.join(config.vm_run_dir(VM), admission.ENGINE_XML)) as f:
        assert f.read() == engine_xml


def test_a_live_copy_elsewhere_refuses_before_the_run_dir_is_made(config):
    with pytest.raises(admission.StartRefused, match="runs on host host-b"):
        admission.prepare_primary(config, _Arbiter(live="host-b"), emulator.identify, VM,
                                  _engine_xml())
    assert not os.path.exists(config.vm_run_dir(VM))


def test_a_bad_engine_xml_is_refused_before_the_arbiter_is_asked(config):
    arbiter = _Arbiter(live=None)
    with pytest.raises(admission.StartRefused, match="is not the vmId"):
        admission.prepare_primary(config, arbiter, emulator.identify,
                                  "00000000-0000-4000-8000-000000000000", _engine_xml())
    assert arbiter.asked == []
