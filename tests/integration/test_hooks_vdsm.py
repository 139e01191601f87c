"""The real hook scripts in hooks/, run by the VDSM stand-in exactly as VDSM runs them (own
processes, `_hook_domxml`, custom properties and `vmId` as env vars, VDSM's rc rules),
against the system libvirtd (KVM idle guest), a real 3-member etcd cluster and the real
hook socket server of the agent protocol with a recording backend that does the agent's
real `prepare` work (with the host's config and the real etcd)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import sysconfig
import tempfile
import uuid

import libvirt
import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pytest

from ftlab import guest, qemubuild
from ftlab.engine import EngineTiming, FakeEngine
from ftlab.vdsm import HookError, Vdsm
from tests.unit.test_hooks_api import Recorder
from vdsm_ft import hostconfig, layout
from vdsm_ft.arbiter import Arbiter
from vdsm_ft.emulator import CachedEmulators
from vdsm_ft.hooks import HookContext
from vdsm_ft.hookapi import serve_hooks

pytestmark = pytest.mark.kvm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOOKS = os.path.join(REPO, "hooks")
URI = "qemu:///system"
# Hooks run on /usr/bin/python3 (docs/decisions.md, D6). Real hosts install vdsm_ft and #
# its dependencies system-wide; here the repo and this interpreter's site-packages
# (etcd3gw) stand in.
PYTHONPATH = (REPO, sysconfig.get_paths()["purelib"])


@pytest.fixture(scope="module")
def base():
    path = tempfile.mkdtemp(prefix="ftlab-hooks-", dir="/tmp")
    os.chmod(path, 0o755)               # QEMU (libvirt-qemu) must traverse it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cached_disk():
    return guest.build_idle_disk(64 << 20)


@pytest.fixture
def agent(base):
    backend = Recorder()
    path = os.path.join(base, f"agent-{uuid.uuid4().hex[:6]}.sock")
    server = serve_hooks(path, backend, owner_gid=os.getgid())
    yield backend, path
    backend.stall.set()
    server.close()


class Host:
    """One lab host as the hooks see it: its config file and its VDSM."""

    def __init__(self, base: str, etcd: list[str], hook_socket: str, policy: str,
                 hooks_dir: str = HOOKS, hook_user: tuple[str, str] | None = None):
        self.config = os.path.join(base, f"agent-{uuid.uuid4().hex[:6]}.conf")
        self.run_dir = os.path.join(base, "run")
        with open(self.config, "w") as f:
            f.write(f"""[host]
id = host-a
replication_address = 127.0.0.1
[agent]
hook_socket = {hook_socket}
run_dir = {self.run_dir}
[etcd]
endpoints = {", ".join(etcd)}
[libvirt]
qemu_user = {guest.QEMU_USER}
[qemu]
emulator = {qemubuild.ft_emulator().path}
[hooks]
agent_unreachable = {policy}
agent_timeout = 1.0
""")
        self.vdsm = Vdsm(hooks_dir, URI, env=dict(os.environ, VDSM_FT_CONFIG=self.config),
                         pythonpath=PYTHONPATH, hook_timeout=60, hook_user=hook_user)


@pytest.fixture
def host(base, etcd_cluster, agent, libvirtd, kvm):
    h = Host(base, etcd_cluster.endpoints, agent[1], "start_unprotected")
    _prepares_for(agent[0], h)
    yield h
    _cleanup(h.vdsm)


def _prepares_for(backend: Recorder, h: Host) -> None:
    """The recording agent does the real agent's `prepare` work, with the host's config."""
    config = hostconfig.load(h.config)
    backend.parts = HookContext({}, config=config, emulators=CachedEmulators(),
                                arbiter=Arbiter(config.etcd_endpoints))


def _cleanup(vdsm: Vdsm) -> None:
    for vm_id in list(vdsm.vms):
        vdsm.destroy_vm(vm_id)


def _vm_xml(base: str, cached_disk: str, ft: str | None) -> tuple[str, str]:
    vm_id = str(uuid.uuid4())
    name = f"hk-{vm_id[:8]}"
    disk = guest.install_disk(cached_disk, os.path.join(base, f"{name}.qcow2"))
    custom = () if ft is None else (("ft", ft),)
    # The idle guest's <bios useserial> needs a serial device.
    xml = guest.idle_guest_xml(name, disk, serial_log=os.path.join(base, f"{name}.serial"),
                               vm_id=vm_id, custom=custom)
    return vm_id, xml


def _domain_names() -> set[str]:
    conn = libvirt.open(URI)
    try:
        return {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()


def _domain_state(name: str) -> int:
    conn = libvirt.open(URI)
    try:
        return conn.lookupByName(name).state()[0]
    finally:
        conn.close()


def _qmp(sock_path: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        f = s.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": "query-status"}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
        return reply


# ---------------------------------------------------------------- ft unset / false / true / invalid

@pytest.mark.parametrize("ft", [None, "false"])
def test_no_ft_vm_starts_with_the_engine_xml_untouched(host, agent, base, cached_disk, ft):
    vm_id, xml = _vm_xml(base, cached_disk, ft)
    record, outcome = host.vdsm.start_vm(xml)
    assert [os.path.basename(r.script) for r in outcome.runs] == ["50_ft"]
    assert outcome.runs[0].rc == 0 and outcome.runs[0].stderr == ""
    assert outcome.data == xml                       # byte for byte
    assert "qemu:commandline" not in record.xml
    assert record.name in _domain_names()
    host.vdsm.destroy_vm(vm_id)
    assert record.name not in _domain_names()
    # The agent is asked only whether the VM's storage-domain image is current.
    assert agent[0].calls == [("image", vm_id, ft)]


def test_ft_true_vm_starts_as_primary_and_its_qmp_answers(host, agent, base, cached_disk):
    backend = agent[0]
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    record, outcome = host.vdsm.start_vm(xml)
    assert outcome.runs[0].rc == 0, outcome.runs[0].stderr
    assert "prepared as COLO primary" in outcome.runs[0].stderr
    assert "qemu:commandline" in outcome.data and "ft-quorum0" in outcome.data
    assert "ft-quorum0" in record.xml                # libvirt runs the prepared XML
    run_dir = os.path.join(host.run_dir, "vms", vm_id)
    qmp_sock = layout.VmLayout(vm_id=vm_id, name=record.name, run_dir=run_dir).qmp_socket
    assert _qmp(qmp_sock)["return"]["status"] in ("running", "paused")
    assert os.stat(run_dir).st_uid == pwd.getpwnam(guest.QEMU_USER).pw_uid
    assert [c[0] for c in backend.calls] == ["prepare", "started"]
    assert backend.calls[0][1:] == (vm_id, xml, outcome.data)
    with open(os.path.join(run_dir, "engine.xml")) as f:
        assert f.read() == xml
    assert "ft-quorum0" in backend.calls[1][2]       # the live XML
    host.vdsm.destroy_vm(vm_id)
    assert [c[0] for c in backend.calls[2:]] == ["stopping", "destroyed"]
    assert record.name not in _domain_names()


def test_ft_primary_keeps_the_engine_disks_plugged(host, agent, base, cached_disk):
    """The strict engine unplugs a managed disk missing from Host.dumpxmls
    (VmDevicesMonitoring.handleRemovedDevices); the primary's live XML keeps it."""
    engine = FakeEngine(users={"admin@internal": "pw-hooks"}, timing=EngineTiming(refresh=3600))
    engine.start()
    try:
        engine.add_host("host-a")
        engine.add_template("tpl", disks=[("disk1", 64 << 20, "virtio", True)])
        vm = engine.add_vm("hk-disks", template="tpl", host="host-a",
                           custom_properties={"ft": "true"})
        disk = guest.install_disk(cached_disk, os.path.join(base, f"{vm.id}.qcow2"))
        xml = guest.idle_guest_xml(f"hk-{vm.id[:8]}", disk, vm_id=vm.id,
                                   image_id=vm.disks[0].id,
                                   serial_log=os.path.join(base, f"{vm.id}.serial"))
        record, outcome = host.vdsm.start_vm(xml)
        assert "prepared as COLO primary" in outcome.runs[0].stderr
        engine.report_vms("host-a", host.vdsm.report())
        conn = sdk.Connection(url=engine.info.url, username="admin@internal",
                              password="pw-hooks", ca_file=str(engine.info.ca_file))
        try:
            svc = conn.system_service().vms_service().vm_service(vm.id)
            assert svc.get().status == types.VmStatus.UP
            assert [(a.id, a.active) for a in svc.disk_attachments_service().list()] == \
                [(vm.disks[0].id, True)]
        finally:
            conn.close()
        host.vdsm.destroy_vm(vm.id)
    finally:
        engine.stop()


def test_invalid_ft_value_refuses_the_start(host, agent, base, cached_disk):
    vm_id, xml = _vm_xml(base, cached_disk, "yes")
    with pytest.raises(HookError) as e:
        host.vdsm.start_vm(xml)
    assert e.value.runs[0].rc == 2
    assert "ft='yes' is not valid" in e.value.message
    assert "use ft=true or ft=false" in e.value.message
    assert f"hk-{vm_id[:8]}" not in _domain_names()
    assert agent[0].calls == []


def test_a_hook_run_as_another_user_is_refused_and_fails_the_start(base, etcd_cluster, agent,
                                                                   cached_disk, libvirtd, kvm):
    """Issue 16: only root and vdsm may use the hook socket. The real start hook, run as
    the QEMU user past a careless chmod of the socket, gets the agent's 403, and that fails
    the start (rc 2) even under the start_unprotected policy: a refusal is not an
    unreachable agent."""
    h = Host(base, etcd_cluster.endpoints, agent[1], "start_unprotected",
             hook_user=(guest.QEMU_USER, "kvm"))
    os.chmod(agent[1], 0o666)
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    try:
        with pytest.raises(HookError) as e:
            h.vdsm.start_vm(xml)
    finally:
        _cleanup(h.vdsm)
    assert e.value.runs[0].rc == 2, e.value.runs
    assert "the vdsm-ft agent refused it" in e.value.message
    assert "may not use the hook socket: only root and vdsm" in e.value.message
    assert f"hk-{vm_id[:8]}" not in _domain_names()
    assert agent[0].calls == []


# ---------------------------------------------------------------- VDSM's rc rules

def _script(path: str, rc: int) -> None:
    with open(path, "w") as f:
        f.write(f"""#!/bin/bash
echo "$(basename "$0") ran" >&2
echo "<!-- $(basename "$0") -->" >> "$_hook_domxml"
exit {rc}
""")
    os.chmod(path, 0o755)


def _hooks_dir(base: str, extra: dict[str, dict[str, int]]) -> str:
    """The real hooks, plus test scripts: {hook point: {script name: rc}}."""
    path = tempfile.mkdtemp(dir=base)
    for point in os.listdir(HOOKS):
        os.makedirs(os.path.join(path, point))
        os.symlink(os.path.join(HOOKS, point, "50_ft"), os.path.join(path, point, "50_ft"))
    for point, scripts in extra.items():
        os.makedirs(os.path.join(path, point), exist_ok=True)
        for name, rc in scripts.items():
            _script(os.path.join(path, point, name), rc)
    return path


def test_rc1_fails_the_start_but_later_scripts_run(base, etcd_cluster, agent, cached_disk,
                                                   libvirtd):
    hooks_dir = _hooks_dir(base, {"before_vm_start": {"10_one": 1, "90_last": 0}})
    h = Host(base, etcd_cluster.endpoints, agent[1], "start_unprotected", hooks_dir)
    vm_id, xml = _vm_xml(base, cached_disk, None)
    with pytest.raises(HookError) as e:
        h.vdsm.start_vm(xml)
    assert [(os.path.basename(r.script), r.rc) for r in e.value.runs] == \
        [("10_one", 1), ("50_ft", 0), ("90_last", 0)]
    assert e.value.message == "10_one ran\n"
    assert f"hk-{vm_id[:8]}" not in _domain_names()


def test_rc2_fails_the_start_and_stops_the_scripts(base, etcd_cluster, agent, cached_disk,
                                                   libvirtd):
    hooks_dir = _hooks_dir(base, {"before_vm_start": {"10_two": 2, "90_last": 0}})
    h = Host(base, etcd_cluster.endpoints, agent[1], "start_unprotected", hooks_dir)
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    with pytest.raises(HookError) as e:
        h.vdsm.start_vm(xml)
    assert [(os.path.basename(r.script), r.rc) for r in e.value.runs] == [("10_two", 2)]
    assert agent[0].calls == []                 # 50_ft never ran


def test_each_script_sees_the_previous_ones_output(base, etcd_cluster, agent, cached_disk,
                                                   libvirtd):
    # 50_ft leaves the XML alone without ft; 10_mark's comment reaches 90_last and libvirt.
    hooks_dir = _hooks_dir(base, {"before_vm_start": {"10_mark": 0, "90_last": 0}})
    h = Host(base, etcd_cluster.endpoints, agent[1], "start_unprotected", hooks_dir)
    vm_id, xml = _vm_xml(base, cached_disk, None)
    _, outcome = h.vdsm.start_vm(xml)
    try:
        assert outcome.data == xml + "<!-- 10_mark -->\n<!-- 90_last -->\n"
    finally:
        _cleanup(h.vdsm)


def test_failing_after_start_and_destroy_hooks_never_abort(base, etcd_cluster, agent,
                                                           cached_disk, libvirtd, kvm):
    hooks_dir = _hooks_dir(base, {"after_vm_start": {"10_two": 2},
                                  "before_vm_destroy": {"10_two": 2},
                                  "after_vm_destroy": {"10_two": 2}})
    h = Host(base, etcd_cluster.endpoints, agent[1], "start_unprotected", hooks_dir)
    _prepares_for(agent[0], h)
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    record, _ = h.vdsm.start_vm(xml)
    assert record.name in _domain_names()
    before, after = h.vdsm.destroy_vm(vm_id)
    assert [r.rc for r in before.runs] == [2] and [r.rc for r in after.runs] == [2]
    assert record.name not in _domain_names()


# ---------------------------------------------------------------- arbiter, agent, migrate, destroy

def test_start_refused_while_another_member_is_live(host, agent, base, cached_disk,
                                                    etcd_cluster):
    arbiter = Arbiter(etcd_cluster.endpoints)
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    generation = arbiter.begin_generation(vm_id, "host-b", "host-a", state="Protected")
    try:
        with pytest.raises(HookError) as e:
            host.vdsm.start_vm(xml)
        assert e.value.runs[0].rc == 2
        assert "its live copy runs on host host-b" in e.value.message
        assert f"hk-{vm_id[:8]}" not in _domain_names()
        assert agent[0].calls == []
        # Once the pair is Down nobody is live: the start goes ahead.
        arbiter.update_pair(vm_id, generation, state="Down", reason="test")
        record, outcome = host.vdsm.start_vm(xml)
        assert outcome.runs[0].rc == 0 and record.name in _domain_names()
    finally:
        arbiter.delete_pair(vm_id)


def test_agent_down_default_policy_starts_prepared(base, etcd_cluster, cached_disk, libvirtd,
                                                   kvm):
    h = Host(base, etcd_cluster.endpoints, os.path.join(base, "no-agent.sock"),
             "start_unprotected")
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    try:
        record, outcome = h.vdsm.start_vm(xml)
        assert outcome.runs[0].rc == 0
        assert "WARNING" in outcome.runs[0].stderr and "unprotected" in outcome.runs[0].stderr
        assert "ft-quorum0" in record.xml and record.name in _domain_names()
    finally:
        _cleanup(h.vdsm)


def test_agent_down_refuse_policy_refuses(base, etcd_cluster, cached_disk, libvirtd):
    h = Host(base, etcd_cluster.endpoints, os.path.join(base, "no-agent.sock"), "refuse")
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    with pytest.raises(HookError) as e:
        h.vdsm.start_vm(xml)
    assert e.value.runs[0].rc == 1
    assert "agent_unreachable = refuse" in e.value.message
    assert f"hk-{vm_id[:8]}" not in _domain_names()


def test_migration_of_an_ft_vm_is_refused(host, agent, base, cached_disk):
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    host.vdsm.start_vm(xml)
    with pytest.raises(HookError) as e:
        host.vdsm.migrate_check(vm_id)
    assert "not live-migrated by the engine" in e.value.message
    assert "ovirt-ft migrate-secondary" in e.value.message


def test_pause_of_an_ft_vm_is_refused_and_of_another_vm_done(host, agent, base,
                                                               cached_disk):
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    record, _ = host.vdsm.start_vm(xml)
    with pytest.raises(HookError) as e:
        host.vdsm.pause_vm(vm_id)
    assert "cannot be paused" in e.value.message and "ft=false" in e.value.message
    assert _domain_state(record.name) == libvirt.VIR_DOMAIN_RUNNING
    plain_id, plain_xml = _vm_xml(base, cached_disk, "false")
    plain, _ = host.vdsm.start_vm(plain_xml)
    host.vdsm.pause_vm(plain_id)
    assert _domain_state(plain.name) == libvirt.VIR_DOMAIN_PAUSED


def test_destroy_completes_while_the_agent_hangs(host, agent, base, cached_disk):
    backend = agent[0]
    vm_id, xml = _vm_xml(base, cached_disk, "true")
    record, _ = host.vdsm.start_vm(xml)
    backend.stalling = True
    before, after = host.vdsm.destroy_vm(vm_id)
    assert record.name not in _domain_names()
    for outcome in (before, after):
        assert outcome.runs[0].rc == 0
        assert "could not tell the agent" in outcome.runs[0].stderr
