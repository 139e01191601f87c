"""The logic behind each hook point (`vdsm_ft.hooks`), with real parts: the real hook socket
server with a recording backend (which runs the agent's real `prepare_primary`), the real
`Arbiter` client (pointed at no etcd where the test is about etcd being unreachable), real
`primary_xml`, the real QEMU binary. The paths that need a live etcd are in
tests/integration/test_hooks_vdsm.py."""
from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
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


def _write_config(tmp_path, hook_socket: str, policy: str = "start_unprotected") -> str:
    path = tmp_path / f"agent-{policy}.conf"
    path.write_text(f"""[host]
id = host-a
replication_address = 127.0.0.1
[agent]
hook_socket = {hook_socket}
run_dir = {tmp_path}/run
[etcd]
endpoints = http://127.0.0.1:{_free_port()}
[hooks]
agent_timeout = 0.5
agent_unreachable = {policy}
""")
    return str(path)


@pytest.fixture
def config(tmp_path, agent):
    return hostconfig.load(_write_config(tmp_path, agent[1]))


class _NobodyLive:
    """A `LiveCheck` whose arbiter knows no other live copy (a real one needs etcd)."""

    def other_member_live(self, vm_id, host, timeout=None):
        return None


def _ctx(env, config, agent, arbiter_bound=0.3) -> HookContext:
    """The hook's parts; the recording agent does its work with the same ones."""
    backend, path = agent
    ctx = HookContext(env, config=config, agent=HookClient(path, timeout=0.5),
                      arbiter=Arbiter(config.etcd_endpoints, bound=arbiter_bound))
    backend.parts = ctx
    return ctx


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
    r = hooks.before_vm_start(_env(value), _engine_xml(), _ctx(_env(value), config, agent))
    assert r.rc == 2 and r.xml is None
    assert f"ft={value!r} is not valid" in r.message
    assert "use ft=true or ft=false" in r.message
    assert agent[0].calls == []


def test_vm_lease_is_refused(config, agent):
    xml = open(os.path.join(DATA, "engine-i440fx.xml")).read()
    r = hooks.before_vm_start(_env("true"), xml, _ctx(_env("true"), config, agent))
    assert r.rc == 2 and r.xml is None
    assert "VM lease" in r.message and "No VM Lease" in r.message


def test_vm_id_must_match_the_xml(config, agent):
    other = "11111111-2222-3333-4444-555555555555"
    r = hooks.before_vm_start(_env("true", other), _engine_xml(),
                              _ctx(_env("true", other), config, agent))
    assert r.rc == 2 and "is not the vmId" in r.message


def test_missing_vm_id_is_refused(config, agent):
    r = hooks.before_vm_start({"ft": "true"}, _engine_xml(),
                              _ctx({"ft": "true"}, config, agent))
    assert r.rc == 2 and "no valid vmId" in r.message


def test_broken_host_config_refuses_naming_the_file(tmp_path):
    bad = tmp_path / "agent.conf"
    bad.write_text("[host]\nid = a\n")
    env = dict(_env("true"), VDSM_FT_CONFIG=str(bad))
    r = hooks.before_vm_start(env, _engine_xml(), HookContext(env))
    assert r.rc == 2 and str(bad) in r.message and "is required" in r.message


def test_unsupported_vm_is_refused_with_cause_and_fix(config, agent):
    r = hooks.before_vm_start(_env("true"), _engine_xml(machine="pc-q35-rhel8.6.0"),
                              _ctx(_env("true"), config, agent))
    assert r.rc == 2 and r.xml is None
    assert "q35" in r.message and "Fix:" in r.message and "i440fx" in r.message
    assert agent[0].calls == []


def test_unreachable_etcd_refuses_the_start_naming_etcd(config, agent):
    start = time.monotonic()
    r = hooks.before_vm_start(_env("true"), _engine_xml(),
                              _ctx(_env("true"), config, agent, arbiter_bound=0.3))
    assert time.monotonic() - start < 1.5
    assert r.rc == 2 and r.xml is None
    assert "arbiter (etcd)" in r.message and "two" in r.message
    assert agent[0].calls == []
    assert not os.path.exists(config.vm_run_dir(VM))


def test_the_agent_prepares_and_the_hook_writes_its_xml(config, agent):
    backend, path = agent
    ctx = HookContext(_env("true"), config=config, agent=HookClient(path, timeout=0.5))
    xml = _engine_xml()
    r = hooks.before_vm_start(_env("true"), xml, ctx)
    primary = f"<domain>primary of {VM}</domain>"
    assert r == HookResult(0, primary, f"vdsm-ft: VM {VM} prepared as COLO primary and "
                                       "registered with the agent")
    assert backend.calls == [("prepare", VM, xml, primary)]
    assert "arbiter" not in ctx.__dict__           # the hook itself never asked etcd


def test_the_agents_refusal_stops_the_start_with_its_message(config, agent):
    backend, path = agent
    backend.refuse = f"VM {VM} not started: it runs as a secondary on this host"
    ctx = HookContext(_env("true"), config=config, agent=HookClient(path, timeout=0.5))
    r = hooks.before_vm_start(_env("true"), _engine_xml(), ctx)
    assert r == HookResult(2, None, f"vdsm-ft: VM {VM} not started: it runs as a secondary "
                                    "on this host")


def test_real_prepare_makes_the_run_dir_and_keeps_the_engine_xml(config, agent):
    ctx = _ctx(_env("true"), config, agent)
    ctx.__dict__["arbiter"] = _NobodyLive()
    xml = _engine_xml()
    r = hooks.before_vm_start(_env("true"), xml, ctx)
    assert r.rc == 0 and "ft-quorum0" in r.xml
    run_dir = config.vm_run_dir(VM)
    assert open(os.path.join(run_dir, hooks.ENGINE_XML)).read() == xml
    assert agent[0].calls == [("prepare", VM, xml, r.xml)]


@pytest.mark.parametrize("policy, rc", [("start_unprotected", 0), ("refuse", 1)])
def test_agent_down_the_hook_prepares_itself_then_applies_the_policy(tmp_path, policy, rc):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock"), policy))
    ctx = HookContext(_env("true"), config=config, arbiter=_NobodyLive())
    r = hooks.before_vm_start(_env("true"), _engine_xml(), ctx)
    assert r.rc == rc and "not reachable" in r.message
    if rc == 0:
        assert "ft-quorum0" in r.xml and "WARNING" in r.message
    else:
        assert r.xml is None and "agent_unreachable = refuse" in r.message
    assert os.path.exists(os.path.join(config.vm_run_dir(VM), hooks.ENGINE_XML))


def test_agent_down_keeps_every_refusal_of_the_local_path(tmp_path):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock"), "refuse"))
    env = _env("true")
    ctx = HookContext(env, config=config, arbiter=Arbiter(config.etcd_endpoints, bound=0.3))
    r = hooks.before_vm_start(env, _engine_xml(machine="pc-q35-rhel8.6.0"), ctx)
    assert r.rc == 2 and "q35" in r.message and "Fix:" in r.message
    r = hooks.before_vm_start(env, _engine_xml(), ctx)
    assert r.rc == 2 and "arbiter (etcd)" in r.message


def test_stuck_agent_costs_its_bound_then_the_hook_prepares_itself(config, agent):
    backend, path = agent
    backend.stalling = True
    ctx = HookContext(_env("true"), config=config, agent=HookClient(path, timeout=0.5),
                      arbiter=_NobodyLive())
    start = time.monotonic()
    r = hooks.before_vm_start(_env("true"), _engine_xml(), ctx)
    assert time.monotonic() - start < 2.0       # 0.5 s agent bound + the local work
    assert r.rc == 0 and "ft-quorum0" in r.xml and "did not answer" in r.message


def test_ft_true_with_the_agent_imports_no_lxml_nor_etcd_client(tmp_path, agent):
    """The real script, as VDSM runs it: the agent does the work, so the hook process
    loads none of the heavy modules."""
    xml_file = tmp_path / "domxml"
    xml_file.write_text(_engine_xml())
    code = ("import runpy, sys\n"
            "try:\n"
            f"    runpy.run_path({os.path.join(REPO, 'hooks', 'before_vm_start', '50_ft')!r},"
            " run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('lxml', 'etcd3gw', 'requests', "
            "'vdsm_ft.arbiter', 'vdsm_ft.domxml', 'http.client') if m in sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=REPO, ft="true", vmId=VM,
               VDSM_FT_CONFIG=_write_config(tmp_path, agent[1]))
    env[hooking.DOMXML_ENV] = str(xml_file)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=30, check=True)
    assert out.stdout.strip() == "0 []", out.stderr
    assert "registered with the agent" in out.stderr
    assert xml_file.read_text() == f"<domain>primary of {VM}</domain>"


def test_the_agents_qemu_version_is_asked_once_per_binary(tmp_path):
    qemu, asked = tmp_path / "qemu", tmp_path / "asked"
    qemu.write_text(f"#!/bin/sh\necho x >> {asked}\necho 'QEMU emulator version 9.2.1'\n")
    qemu.chmod(0o755)
    cached = hooks.CachedQemuVersion()
    assert cached(str(qemu)) == cached(str(qemu)) == (9, 2, 1)
    assert asked.read_text() == "x\n"
    qemu.write_text(f"#!/bin/sh\necho x >> {asked}\necho 'QEMU emulator version 11.0.0'\n")
    os.utime(qemu, ns=(0, time.time_ns() + 10**9))      # an upgrade replaced the binary
    assert cached(str(qemu)) == (11, 0, 0)
    with pytest.raises(hooks.HookError, match="cannot ask"):
        cached("/nonexistent/qemu")


def test_run_dir_made_by_the_agent_stays_usable_by_the_hooks_group(tmp_path, config):
    if os.geteuid() != 0:
        pytest.fail("this test chowns to the QEMU user, so it must run as root")
    parent = os.path.dirname(config.vm_run_dir(VM))
    os.makedirs(parent)
    kvm = grp.getgrnam("kvm").gr_gid
    os.chown(parent, 0, kvm)
    os.chmod(parent, 0o2770)
    path = hooks._owned_run_dir(config, VM)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam(config.qemu_user).pw_uid, kvm)
    assert stat.S_IMODE(st.st_mode) == 0o2770


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
    backend = agent[0]
    ctx = _ctx(_env("true"), config, agent)
    assert hooks.after_vm_start(_env("true"), "<domain>live</domain>", ctx).rc == 0
    assert hooks.before_vm_destroy(_env("true"), "", ctx).rc == 0
    assert hooks.after_vm_destroy(_env("true"), "<domain/>", ctx).rc == 0
    assert backend.calls == [("started", VM, "<domain>live</domain>"), ("stopping", VM),
                             ("destroyed", VM)]


def test_no_ft_vm_never_reaches_the_agent(config, agent):
    backend = agent[0]
    ctx = _ctx(_env(None), config, agent)
    for func in (hooks.after_vm_start, hooks.before_vm_destroy, hooks.after_vm_destroy):
        assert func(_env(None), "<domain/>", ctx) == HookResult(0, None, "")
    assert backend.calls == []


@pytest.mark.parametrize("func", [hooks.after_vm_start, hooks.before_vm_destroy,
                                  hooks.after_vm_destroy])
def test_agent_trouble_never_fails_stop_or_after_hooks(func, config, agent):
    backend = agent[0]
    backend.stalling = True
    start = time.monotonic()
    r = func(_env("true"), "<domain/>", _ctx(_env("true"), config, agent))
    assert time.monotonic() - start < 1.0       # the client's 0.5 s bound
    assert r.rc == 0 and "could not tell the agent" in r.message
    backend.stalling = False
    backend.crash = True
    r = func(_env("true"), "<domain/>", _ctx(_env("true"), config, agent))
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
