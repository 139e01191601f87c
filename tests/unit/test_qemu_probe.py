"""The QEMU capability probe (`vdsm_ft.qemu_probe`) against real binaries: this host's
QEMU, and programs that are not a working QEMU. The project's EL9 look-alike build (a
real QEMU that cannot do COLO) is probed in tests/integration/test_qemu_capability.py."""
from __future__ import annotations

import os
import stat
import time

import pytest

from ftlab import qemubuild
from vdsm_ft import hostconfig, hooks, qemu_probe
from vdsm_ft.hooks import HookContext

DEBIAN = qemubuild.DEBIAN_QEMU
VM = "6a1f0c2e-4b7d-4e51-9a3c-2f8d7e6b5a41"


def test_debians_qemu_can_do_colo(tmp_path):
    r = qemu_probe.probe(DEBIAN, str(tmp_path / "work"))
    assert r.capable and r.reason == "" and r.failed == (), r.reason
    assert r.version.startswith("7.2.") and r.machine.startswith("pc-i440fx-")
    assert r.build.startswith("QEMU emulator version 7.2.")
    assert r.current() and r.took_ms < 10_000
    # The throwaway QEMUs and their sockets are gone.
    assert os.listdir(tmp_path / "work") == []


def test_a_binary_that_is_not_a_working_qemu_is_not_capable(tmp_path):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\ncase \"$1\" in\n--version) echo 'QEMU emulator version 7.2.22';;"
                    "\n-machine) [ \"$2\" = help ] && echo 'pc-i440fx-7.2  PC' && exit 0;"
                    " echo 'no VMs here' >&2; exit 1;;\nesac\n")
    fake.chmod(0o755)
    r = qemu_probe.probe(str(fake), str(tmp_path / "work"))
    assert not r.capable and r.failed == ("qmp",)
    assert "did not start for the probe" in r.reason and "no VMs here" in r.reason
    assert r.reason.endswith("see docs/qemu.md") and "install vdsm-ft-qemu" in r.reason
    missing = qemu_probe.probe("/nonexistent/qemu-system-x86_64", str(tmp_path / "work"))
    assert not missing.capable and missing.failed == ("run",)
    assert "does not exist" in missing.reason and not missing.current()


@pytest.mark.parametrize("version, broken", [
    ((7, 2, 22), False), ((9, 2, 4), False), ((10, 0, 0), True), ((10, 0, 2), True),
    ((10, 0, 6), True), ((10, 0, 7), False), ((10, 0, 13), False), ((10, 1, 0), True),
    ((10, 1, 2), True), ((10, 1, 3), False), ((10, 2, 0), False)])
def test_known_broken_releases(version, broken):
    assert bool(qemu_probe.broken_release(version)) is broken


def test_the_result_is_kept_readable_and_goes_stale_when_the_binary_changes(tmp_path):
    binary = tmp_path / "qemu"
    binary.write_bytes(open(DEBIAN, "rb").read(4096))
    r = qemu_probe.QemuCapability(capable=False, reason="because", path=str(binary),
                                  failed=("x-colo",), file_key=tuple(
                                      qemu_probe.emulator.file_key(str(binary))))
    qemu_probe.save(str(tmp_path / "state"), r)
    path = qemu_probe.result_path(str(tmp_path / "state"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    kept = qemu_probe.load(str(tmp_path / "state"))
    assert kept == r and kept.current()
    os.utime(binary, ns=(0, time.time_ns() + 10**9))
    assert not kept.current()
    assert qemu_probe.load(str(tmp_path / "nothing")) is None


def _config(tmp_path, policy: str, emulator: str) -> hostconfig.HostConfig:
    path = tmp_path / "agent.conf"
    path.write_text(f"""[host]
id = host-a
replication_address = 127.0.0.1
[agent]
hook_socket = {tmp_path}/none.sock
run_dir = {tmp_path}/run
state_dir = {tmp_path}/state
[qemu]
emulator = {emulator}
[etcd]
endpoints = http://127.0.0.1:9
[hooks]
agent_timeout = 0.3
qemu_incapable = {policy}
""")
    return hostconfig.load(str(path))


@pytest.mark.parametrize("policy", ["refuse", "start_unprotected"])
def test_with_the_agent_down_the_hook_applies_the_kept_probe(tmp_path, policy):
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    config = _config(tmp_path, policy, str(fake))
    kept = qemu_probe.probe(str(fake), str(tmp_path / "work"))
    qemu_probe.save(config.state_dir, kept)
    env = {"vmId": VM, "ft": "true"}
    xml = f"<domain><name>x</name><uuid>{VM}</uuid></domain>"
    start = time.monotonic()
    r = hooks.before_vm_start(env, xml, HookContext(env, config=config))
    assert time.monotonic() - start < 2.0
    assert kept.reason in r.message
    assert f"[hooks] qemu_incapable = {policy}" in r.message
    if policy == "refuse":
        assert r.rc == 2 and r.xml is None
    else:
        assert r.rc == 0 and r.xml is None and "starts unprotected" in r.message
