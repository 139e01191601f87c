"""The logic behind each hook point (`vdsm_ft.hooks`), with real parts: the real hook socket
server with a recording backend, the real `Arbiter` client (pointed at no etcd where the
test is about etcd being unreachable), real `primary_xml`, the real QEMU binary. The
paths that need a live etcd are in tests/integration/test_hooks_vdsm.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from lxml import etree

from ftlab import guest
from vdsm_ft import hooking, hooks, hostconfig
from vdsm_ft.arbiter import Arbiter
from vdsm_ft.hookapi import HookClient
from vdsm_ft.hooks import HookContext, HookResult

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "tests", "data")
VM = "6a1f0c2e-4b7d-4e51-9a3c-2f8d7e6b5a41"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path, agent):
    path = tmp_path / "agent.conf"
    path.write_text(f"""[host]
id = host-a
replication_address = 127.0.0.1
[agent]
hook_socket = {agent[1]}
run_dir = {tmp_path}/run
[etcd]
endpoints = http://127.0.0.1:{_free_port()}
[hooks]
agent_timeout = 0.5
""")
    return hostconfig.load(str(path))


def _ctx(env, config, agent_path, arbiter_bound=0.3) -> HookContext:
    return HookContext(env, config=config, agent=HookClient(agent_path, timeout=0.5),
                       arbiter=Arbiter(config.etcd_endpoints, bound=arbiter_bound))


def _env(ft: str | None, vm_id: str = VM) -> dict[str, str]:
    env = {"vmId": vm_id}
    if ft is not None:
        env["ft"] = ft
    return env


def _engine_xml(vm_id: str = VM, machine: str | None = None) -> str:
    xml = guest.idle_guest_xml("idle", "/nowhere/idle.qcow2", vm_id=vm_id)
    if machine:
        root = etree.fromstring(xml.encode())
        root.find("os/type").set("machine", machine)
        xml = etree.tostring(root, encoding="unicode")
    return xml


# ---------------------------------------------------------------- before_vm_start

@pytest.mark.parametrize("ft", [None, "false"])
def test_no_ft_leaves_the_xml_alone_and_asks_nobody(ft):
    env = dict(_env(ft), VDSM_FT_CONFIG="/nonexistent/agent.conf")
    ctx = HookContext(env)
    assert hooks.before_vm_start(env, _engine_xml(), ctx) == HookResult(0, None, "")
    assert "config" not in ctx.__dict__ and "agent" not in ctx.__dict__


def test_no_ft_fast_path_imports_nothing_heavy():
    code = ("import sys; from vdsm_ft import hooks; "
            "r = hooks.before_vm_start({'vmId': 'x'}, '', hooks.HookContext({})); "
            "print(r.rc, sorted(m for m in ('lxml', 'requests', 'etcd3gw', 'vdsm_ft.arbiter', "
            "'vdsm_ft.domxml', 'vdsm_ft.hostconfig') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=30, check=True)
    assert out.stdout.strip() == "0 []"


@pytest.mark.parametrize("value", ["yes", "TRUE", "1", ""])
def test_invalid_ft_value_is_refused_with_what_is_accepted(value, config, agent):
    r = hooks.before_vm_start(_env(value), _engine_xml(), _ctx(_env(value), config, agent[1]))
    assert r.rc == 2 and r.xml is None
    assert f"ft={value!r} is not valid" in r.message
    assert "use ft=true or ft=false" in r.message
    assert agent[0].calls == []


def test_vm_lease_is_refused(config, agent):
    xml = open(os.path.join(DATA, "engine-i440fx.xml")).read()
    r = hooks.before_vm_start(_env("true"), xml, _ctx(_env("true"), config, agent[1]))
    assert r.rc == 2 and r.xml is None
    assert "VM lease" in r.message and "No VM Lease" in r.message


def test_vm_id_must_match_the_xml(config, agent):
    other = "11111111-2222-3333-4444-555555555555"
    r = hooks.before_vm_start(_env("true", other), _engine_xml(),
                              _ctx(_env("true", other), config, agent[1]))
    assert r.rc == 2 and "is not the vmId" in r.message


def test_missing_vm_id_is_refused(config, agent):
    r = hooks.before_vm_start({"ft": "true"}, _engine_xml(),
                              _ctx({"ft": "true"}, config, agent[1]))
    assert r.rc == 2 and "no valid vmId" in r.message


def test_broken_host_config_refuses_naming_the_file(tmp_path):
    bad = tmp_path / "agent.conf"
    bad.write_text("[host]\nid = a\n")
    env = dict(_env("true"), VDSM_FT_CONFIG=str(bad))
    r = hooks.before_vm_start(env, _engine_xml(), HookContext(env))
    assert r.rc == 2 and str(bad) in r.message and "is required" in r.message


def test_unsupported_vm_is_refused_with_cause_and_fix(config, agent):
    r = hooks.before_vm_start(_env("true"), _engine_xml(machine="pc-q35-rhel8.6.0"),
                              _ctx(_env("true"), config, agent[1]))
    assert r.rc == 2 and r.xml is None
    assert "q35" in r.message and "Fix:" in r.message and "i440fx" in r.message
    assert agent[0].calls == []


def test_unreachable_etcd_refuses_the_start_naming_etcd(config, agent):
    start = time.monotonic()
    r = hooks.before_vm_start(_env("true"), _engine_xml(),
                              _ctx(_env("true"), config, agent[1], arbiter_bound=0.3))
    assert time.monotonic() - start < 1.5
    assert r.rc == 2 and r.xml is None
    assert "arbiter (etcd)" in r.message and "two" in r.message
    assert agent[0].calls == []
    assert not os.path.exists(config.vm_run_dir(VM))


def test_qemu_version_of_this_host():
    assert hooks.qemu_version() >= (7, 2, 0)
    with pytest.raises(hooks.HookError, match="cannot ask"):
        hooks.qemu_version("/nonexistent/qemu")


# ---------------------------------------------------------------- other hook points

@pytest.mark.parametrize("func, message", [
    (hooks.before_vm_migrate_source, "not live-migrated by the engine"),
    (hooks.before_vm_hibernate, "cannot be suspended"),
    (hooks.before_vm_dehibernate, "cannot be restored"),
])
def test_refused_operations(func, message):
    assert func(_env(None), "<domain/>", HookContext({})) == HookResult(0, None, "")
    assert func(_env("false"), "<domain/>", HookContext({})) == HookResult(0, None, "")
    r = func(_env("true"), "<domain/>", HookContext({}))
    assert r.rc == 2 and message in r.message
    r = func(_env("yes"), "<domain/>", HookContext({}))
    assert r.rc == 2 and "is not valid" in r.message


def test_after_start_and_destroy_tell_the_agent(config, agent):
    backend, path = agent
    ctx = _ctx(_env("true"), config, path)
    assert hooks.after_vm_start(_env("true"), "<domain>live</domain>", ctx).rc == 0
    assert hooks.before_vm_destroy(_env("true"), "", ctx).rc == 0
    assert hooks.after_vm_destroy(_env("true"), "<domain/>", ctx).rc == 0
    assert backend.calls == [("started", VM, "<domain>live</domain>"), ("stopping", VM),
                             ("destroyed", VM)]


def test_no_ft_vm_never_reaches_the_agent(config, agent):
    backend, path = agent
    ctx = _ctx(_env(None), config, path)
    for func in (hooks.after_vm_start, hooks.before_vm_destroy, hooks.after_vm_destroy):
        assert func(_env(None), "<domain/>", ctx) == HookResult(0, None, "")
    assert backend.calls == []


@pytest.mark.parametrize("func", [hooks.after_vm_start, hooks.before_vm_destroy,
                                  hooks.after_vm_destroy])
def test_agent_trouble_never_fails_stop_or_after_hooks(func, config, agent):
    backend, path = agent
    backend.stalling = True
    start = time.monotonic()
    r = func(_env("true"), "<domain/>", _ctx(_env("true"), config, path))
    assert time.monotonic() - start < 1.0       # the client's 0.5 s bound
    assert r.rc == 0 and "could not tell the agent" in r.message
    backend.stalling = False
    backend.crash = True
    r = func(_env("true"), "<domain/>", _ctx(_env("true"), config, path))
    assert r.rc == 0 and "could not tell the agent" in r.message


# ---------------------------------------------------------------- run(): the protocol

def test_run_reads_and_writes_the_hook_file_only_when_needed(tmp_path, monkeypatch):
    xml = _engine_xml()
    f = tmp_path / "domxml"
    f.write_text(xml)
    monkeypatch.setenv("vmId", VM)
    monkeypatch.setenv(hooking.DOMXML_ENV, str(f))
    monkeypatch.delenv("ft", raising=False)
    assert hooks.run("before_vm_start") == 0
    assert f.read_text() == xml
    monkeypatch.setenv("ft", "yes")
    assert hooks.run("before_vm_start") == 2
    assert f.read_text() == xml


def test_run_maps_unexpected_errors_per_hook_point(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("vmId", VM)
    monkeypatch.setenv("ft", "true")
    monkeypatch.setenv(hooking.DOMXML_ENV, str(tmp_path / "missing"))
    assert hooks.run("before_vm_start") == 2
    assert hooks.run("after_vm_destroy") == 0
    assert "unexpected error" in capfd.readouterr().err
