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

from ftlab import guest, qemubuild
from vdsm_ft import admission, emulator, hooking, hooks, hostconfig
from vdsm_ft.arbiter import Arbiter, ArbiterUnavailable, StaleImage
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
[qemu]
emulator = {qemubuild.ft_emulator().path}
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

    def start_check(self, vm_id, host, timeout=None):
        return None, self.stale_image(vm_id)

    def stale_image(self, vm_id, timeout=None):
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
def test_no_ft_asks_the_agent_only_whether_the_image_is_current(ft, config, agent):
    ctx = HookContext(_env(ft), config=config, agent=HookClient(agent[1], timeout=0.5))
    assert hooks.before_vm_start(_env(ft), _engine_xml(), ctx) == HookResult(0, None, "")
    assert agent[0].calls == [("image", VM, ft)]
    assert "arbiter" not in ctx.__dict__


@pytest.mark.parametrize("ft", [None, "false"])
def test_no_ft_start_is_refused_while_the_agent_says_the_image_is_behind(ft, config, agent):
    agent[0].stale = f"VM {VM} not started: its storage-domain image is behind"
    ctx = HookContext(_env(ft), config=config, agent=HookClient(agent[1], timeout=0.5))
    r = hooks.before_vm_start(_env(ft), _engine_xml(), ctx)
    assert r == HookResult(2, None, f"vdsm-ft: VM {VM} not started: its storage-domain "
                                    "image is behind")


class _Marks:
    """The arbiter's stale-image answer, for a hook whose agent does not answer."""

    def __init__(self, answer):
        self.answer = answer
        self.asked: list[str] = []

    def stale_image(self, vm_id, timeout=None):
        self.asked.append(vm_id)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


MARK = StaleImage(VM, 3, "host-b", 1_790_000_000.0)


@pytest.mark.parametrize("ft", [None, "false"])
def test_agent_down_the_hook_asks_etcd_and_a_mark_refuses_the_start(tmp_path, ft):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock")))
    marks = _Marks(MARK)
    r = hooks.before_vm_start(_env(ft), _engine_xml(),
                              HookContext(_env(ft), config=config, arbiter=marks))
    assert r.rc == 2 and r.xml is None and marks.asked == [VM]
    assert "storage-domain image is behind" in r.message
    assert "host host-b has run it on its own replica" in r.message
    assert "generation 3" in r.message
    assert (f"ovirt-ft accept-stale-image {VM} --lose-writes-since-failover"
            in r.message)
    marks.answer = None
    r = hooks.before_vm_start(_env(ft), _engine_xml(),
                              HookContext(_env(ft), config=config, arbiter=marks))
    assert r == HookResult(0, None, "")


def test_nobody_can_tell_refuses_an_ft_history_vm_and_warns_for_others(tmp_path):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock")))
    down = _Marks(ArbiterUnavailable("no etcd endpoint answered within 0.3 s"))
    r = hooks.before_vm_start(_env("false"), _engine_xml(),
                              HookContext(_env("false"), config=config, arbiter=down))
    assert r.rc == 2 and r.xml is None
    assert "it was an FT VM (ft=false)" in r.message and "cannot be checked" in r.message
    assert "not reachable" in r.message and "no etcd endpoint answered" in r.message
    r = hooks.before_vm_start(_env(None), _engine_xml(),
                              HookContext(_env(None), config=config, arbiter=down))
    assert r.rc == 0 and r.xml is None
    assert "WARNING" in r.message and "without the storage-domain image check" in r.message


def test_no_config_refuses_an_ft_history_vm_and_warns_for_others():
    for ft, rc in ((None, 0), ("false", 2)):
        env = dict(_env(ft), VDSM_FT_CONFIG="/nonexistent/agent.conf")
        ctx = HookContext(env)
        r = hooks.before_vm_start(env, _engine_xml(), ctx)
        assert r.rc == rc and r.xml is None and "/nonexistent/agent.conf" in r.message
        assert "agent" not in ctx.__dict__ and "arbiter" not in ctx.__dict__


def test_ft_true_start_is_refused_while_the_image_is_behind(tmp_path):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock")))

    class Behind(_NobodyLive):
        def stale_image(self, vm_id, timeout=None):
            return MARK

    r = hooks.before_vm_start(_env("true"), _engine_xml(),
                              HookContext(_env("true"), config=config, arbiter=Behind()))
    assert r.rc == 2 and r.xml is None
    assert "storage-domain image is behind" in r.message and "host-b" in r.message


def _run_start_hook_listing_heavy_imports(tmp_path, agent, xml_file, ft: str | None
                                          ) -> subprocess.CompletedProcess:
    """Run the real before_vm_start script as VDSM does (`ft` unset when None); it
    prints its exit code and which heavy modules it had imported."""
    code = ("import runpy, sys\n"
            "try:\n"
            f"    runpy.run_path({os.path.join(REPO, 'hooks', 'before_vm_start', '50_ft')!r},"
            " run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('lxml', 'etcd3gw', 'requests', "
            "'vdsm_ft.arbiter', 'vdsm_ft.domxml', 'http.client') if m in sys.modules))\n")
    env = dict(os.environ, PYTHONPATH=REPO, vmId=VM,
               VDSM_FT_CONFIG=_write_config(tmp_path, agent[1]))
    env.pop("ft", None)
    if ft is not None:
        env["ft"] = ft
    env[hooking.DOMXML_ENV] = str(xml_file)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=30, check=True)


@pytest.mark.parametrize("ft", [None, "false"])
def test_no_ft_start_imports_nothing_heavy(tmp_path, agent, ft):
    """The real script, as VDSM runs it, the agent up: no lxml, no etcd client."""
    xml_file = tmp_path / "domxml"
    xml = _engine_xml()
    xml_file.write_text(xml)
    out = _run_start_hook_listing_heavy_imports(tmp_path, agent, xml_file, ft)
    assert out.stdout.strip() == "0 []", out.stderr
    assert agent[0].calls == [("image", VM, ft)]
    assert xml_file.read_text() == xml


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
    assert open(os.path.join(run_dir, admission.ENGINE_XML)).read() == xml
    assert agent[0].calls == [("prepare", VM, xml, r.xml)]


@pytest.mark.parametrize("policy, rc", [("start_unprotected", 0), ("refuse", 1)])
def test_agent_down_the_hook_prepares_itself_then_applies_the_policy(tmp_path, policy, rc):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock"), policy))
    ctx = HookContext(_env("true"), config=config, arbiter=_NobodyLive())
    r = hooks.before_vm_start(_env("true"), _engine_xml(), ctx)
    assert r.rc == rc and "not reachable" in r.message
    if rc == 0:
        assert "ft-quorum0" in r.xml and "WARNING" in r.message
        assert f"<emulator>{config.qemu_emulator}</emulator>" in r.xml
    else:
        assert r.xml is None and "agent_unreachable = refuse" in r.message
    assert os.path.exists(os.path.join(config.vm_run_dir(VM), admission.ENGINE_XML))


def test_an_el9_clusters_machine_type_is_mapped_and_logged(tmp_path):
    config = hostconfig.load(_write_config(tmp_path, str(tmp_path / "none.sock")))
    ctx = HookContext(_env("true"), config=config, arbiter=_NobodyLive())
    r = hooks.before_vm_start(_env("true"), _engine_xml(machine="pc-i440fx-rhel7.6.0"), ctx)
    own = emulator.identify(config.qemu_emulator).i440fx
    assert r.rc == 0 and f'machine="{own}"' in r.xml
    assert (f"(on {config.qemu_emulator}, machine type pc-i440fx-rhel7.6.0 mapped to "
            f"{own})") in r.message


def test_a_missing_emulator_refuses_the_start_naming_the_fix(tmp_path):
    path = _write_config(tmp_path, str(tmp_path / "none.sock"))
    with open(path) as f:
        text = f.read().replace(qemubuild.ft_emulator().path, "/nonexistent/qemu-system-x86_64")
    with open(path, "w") as f:
        f.write(text)
    config = hostconfig.load(path)
    ctx = HookContext(_env("true"), config=config, arbiter=_NobodyLive())
    r = hooks.before_vm_start(_env("true"), _engine_xml(), ctx)
    assert r.rc == 2 and r.xml is None
    assert "/nonexistent/qemu-system-x86_64 does not exist: install vdsm-ft-qemu" in r.message


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
    out = _run_start_hook_listing_heavy_imports(tmp_path, agent, xml_file, "true")
    assert out.stdout.strip() == "0 []", out.stderr
    assert "registered with the agent" in out.stderr
    assert xml_file.read_text() == f"<domain>primary of {VM}</domain>"


def test_run_dir_made_by_the_agent_stays_usable_by_the_hooks_group(tmp_path, config):
    if os.geteuid() != 0:
        pytest.fail("this test chowns to the QEMU user, so it must run as root")
    parent = os.path.dirname(config.vm_run_dir(VM))
    os.makedirs(parent)
    kvm = grp.getgrnam("kvm").gr_gid
    os.chown(parent, 0, kvm)
    os.chmod(parent, 0o2770)
    path = admission._owned_run_dir(config, VM)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam(config.qemu_user).pw_uid, kvm)
    assert stat.S_IMODE(st.st_mode) == 0o2770


# ---------------------------------------------------------------- other hook points

@pytest.mark.parametrize("func, message", [
    (hooks.before_vm_migrate_source, "not live-migrated by the engine"),
    (hooks.before_vm_hibernate, "cannot be suspended"),
    (hooks.before_vm_dehibernate, "cannot be restored"),
    (hooks.before_vm_pause, "cannot be paused"),
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
