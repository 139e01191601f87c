"""A real agent in this process, without QEMU or etcd: who may write a VM's record, and
that request handlers answer before their clients give up (issue 11's defects)."""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ftlab.pki import issue, make_ca
from vdsm_ft import api
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.daemon import Agent
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import Store, VmRecord
from vdsm_ft.api import NotFound, PeerSpec, Role, VmState
from vdsm_ft.hostconfig import HostConfig

VM = "0b6c1a43-8a47-4a53-9d6c-2c1fd1d4d9b1"
XML = ("<domain type='kvm'><name>vm1</name><uuid>" + VM + "</uuid><memory>1048576</memory>"
       "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices></devices></domain>")


@pytest.fixture
def config(tmp_path) -> HostConfig:
    ca = make_ca(tmp_path / "ca")
    tls = issue(tmp_path / "ca", ca, "host-a", addresses=["127.0.0.1"])
    return HostConfig(
        path=str(tmp_path / "agent.conf"), host_id="host-a",
        replication_address="127.0.0.1", etcd_endpoints=("http://127.0.0.1:1",),
        etcd_allow_plain_http=True, api_port=0, api_address="127.0.0.1", tls_ca=tls.ca, tls_cert=tls.cert,
        tls_key=tls.key, hook_socket=str(tmp_path / "agent.sock"),
        run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"),
        replica_dir=str(tmp_path / "replicas"), overlay_dir=str(tmp_path / "overlays"),
        libvirt_uri="qemu+unix:///system?socket=" + str(tmp_path / "no-libvirtd"),
        qemu_emulator=str(tmp_path / "no-qemu"), qemu_user="root")


@pytest.fixture
def agents():
    running: list[Agent] = []

    def start(config: HostConfig) -> Agent:
        agent = Agent(config).start()
        running.append(agent)
        return agent

    yield start
    for agent in running:
        agent.stop()


def _record_path(config: HostConfig) -> str:
    return os.path.join(config.state_dir, "vms", f"{VM}.json")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _ctl(agent: Agent) -> VmController:
    ctl = agent.registry.get(VM)
    assert ctl is not None, f"VM {VM} is not known to the agent"
    return ctl


def _gone(agent: Agent) -> bool:
    try:
        agent.api_backend.vm_status(VM)
    except NotFound:
        return True
    return False


def test_a_forgotten_secondary_stays_forgotten_and_its_vm_may_start_after_a_restart(
        config, agents):
    peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1", agent_port=_closed_port(),
                    replication_address="127.0.0.1")
    # A secondary whose QEMU is gone (its host crashed mid-start): the loop forgets it.
    Store(os.path.join(config.state_dir, "vms")).save(VmRecord(
        vm_id=VM, name="vm1", role=Role.SECONDARY, engine_xml=XML,
        domain="vm1-ft-secondary", generation=3, peer=peer))
    first = agents(config)
    _wait(lambda: _gone(first))
    time.sleep(0.5)     # the step that forgot it has ended
    assert not os.path.exists(_record_path(config)), "the forgotten record was written back"
    first.stop()

    again = agents(config)
    again.hook_backend.register(VM, XML)     # VDSM starts the VM here: no secondary refuses it
    assert again.api_backend.vm_status(VM).role is Role.PRIMARY


def test_a_down_secondary_record_left_by_an_older_agent_does_not_refuse_a_start(
        config, agents):
    Store(os.path.join(config.state_dir, "vms")).save(VmRecord(
        vm_id=VM, name="vm1", role=Role.SECONDARY, engine_xml=XML, state=VmState.DOWN,
        domain="vm1-ft-secondary", generation=3))
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    assert agent.api_backend.vm_status(VM).role is Role.PRIMARY


def test_a_replaced_controller_never_writes_over_the_new_record(config, agents):
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    old = _ctl(agent)
    agent.hook_backend.register(VM, XML)     # the start hook again (VDSM restarted the VM)
    with pytest.raises(NotFound):
        old.update(reason="written by the replaced controller")
    assert Store(os.path.join(config.state_dir, "vms")).load_all()[0].reason == ""
    assert agent.api_backend.vm_status(VM).reason == ""


def test_restart_secondary_answers_before_its_client_gives_up(config, agents):
    # A peer agent that accepts and never answers: ending the pair takes its full
    # timeout, which is the loop's business, not the request's.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1",
                        agent_port=silent.getsockname()[1], replication_address="127.0.0.1")
        agent = agents(config)
        agent.hook_backend.register(VM, XML)
        _ctl(agent).update(state=VmState.PROTECTED, peer=peer, generation=3)
        answered = threading.Event()

        def ask() -> None:
            agent.api_backend.restart_secondary(VM)
            answered.set()

        threading.Thread(target=ask, daemon=True).start()
        assert answered.wait(api.DEFAULT_TIMEOUT), \
            f"restart-secondary took longer than a client waits ({api.DEFAULT_TIMEOUT} s)"
    finally:
        silent.close()


def _loop_thread(agent: Agent) -> str:
    return _ctl(agent)._thread.name


def test_test_failover_is_done_by_the_loop_not_the_request(config, agents, monkeypatch):
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    ctl = _ctl(agent)
    ctl.update(state=VmState.PROTECTED, generation=3)
    killed_in: list[str] = []
    monkeypatch.setattr(ctl, "kill_qemu",
                        lambda: killed_in.append(threading.current_thread().name))
    agent.api_backend.test_failover(VM)
    _wait(lambda: not ctl.record.test_failover)
    assert killed_in == [_loop_thread(agent)]


def _protected_secondary(config, agents, monkeypatch) -> Agent:
    """A secondary whose QEMU runs in COLO, as far as its loop can tell."""
    peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1", agent_port=_closed_port(),
                    replication_address="127.0.0.1")
    Store(os.path.join(config.state_dir, "vms")).save(VmRecord(
        vm_id=VM, name="vm1", role=Role.SECONDARY, engine_xml=XML, launched=True,
        state=VmState.PROTECTED, domain="vm1-ft-secondary", generation=3, peer=peer))
    monkeypatch.setattr("vdsm_ft.agent.controller.VmController.qemu_alive",
                        lambda self: True)
    monkeypatch.setattr("vdsm_ft.agent.controller.VmController.colo_mode",
                        lambda self: "secondary")
    monkeypatch.setattr("vdsm_ft.agent.controller.VmController.kill_qemu",
                        lambda self: None)
    return agents(config)


def test_a_guest_power_off_event_is_recorded_by_the_loop(config, agents, monkeypatch):
    from vdsm_ft.qmp import Event
    agent = _protected_secondary(config, agents, monkeypatch)
    ctl = _ctl(agent)
    writers: list[str] = []
    update = ctl.update

    def recording(**changes):
        if "stopping" in changes:
            writers.append(threading.current_thread().name)
        return update(**changes)

    monkeypatch.setattr(ctl, "update", recording)
    monkeypatch.setattr(ctl, "_do_teardown", lambda: VmState.DOWN)
    loop = _loop_thread(agent)
    ctl._on_event(Event("SHUTDOWN", {"guest": True}, 0.0, 0.0, 0))
    _wait(lambda: ctl.record.stopping)
    assert writers == [loop]


def test_unprotect_of_a_secondary_is_done_by_its_loop(config, agents, monkeypatch):
    """Its primary dropping it: the request only records it, the secondary's own loop
    kills its QEMU and forgets it (row "dropped by its primary"), for good."""
    agent = _protected_secondary(config, agents, monkeypatch)
    loop = _loop_thread(agent)
    killed_in: list[str] = []
    monkeypatch.setattr(VmController, "kill_qemu",
                        lambda self: killed_in.append(threading.current_thread().name))
    agent.api_backend.unprotect(VM)
    _wait(lambda: killed_in)
    assert killed_in == [loop]
    assert _gone(agent)
    time.sleep(0.5)     # the step that forgot it has ended
    assert not os.path.exists(_record_path(config)), "the forgotten record was written back"


class _Libvirt:
    """The domains libvirt runs here, as far as a secondary's bring-up and teardown go:
    a start beside a domain of the same name fails as libvirt's does."""

    def __init__(self, *running: str):
        self.running = set(running)

    def start(self, ctl: VmController, request: api.PrepareSecondary,
              emu: object) -> api.SecondaryReady:
        from vdsm_ft import domains
        domain = ctl.record.domain
        if domain in self.running:
            raise domains.DomainError(f"operation failed: domain '{domain}' already exists")
        self.running.add(domain)
        return api.SecondaryReady(vm_id=request.vm_id, generation=request.generation,
                                  migration_port=1, nbd_port=2)


def _next_secondary(agent: Agent, libvirt: _Libvirt, monkeypatch) -> api.PrepareSecondary:
    """The bring-up's QEMU checks and domain start (Secondaries._start) faked by
    `libvirt`; the request the primary sends for its next generation."""
    from vdsm_ft.agent.secondary import Secondaries
    emu = SimpleNamespace(identity="test build")
    monkeypatch.setattr(Secondaries, "_qemu", lambda self, request: (emu, "pc"))
    monkeypatch.setattr(Secondaries, "_start", lambda self, ctl, request, emu:
                        libvirt.start(ctl, request, emu))
    old = _ctl(agent).record
    return api.PrepareSecondary(vm_id=VM, name=old.name, generation=old.generation + 1,
                                primary=old.peer, domain_xml=XML, disks=())


def test_a_prepare_secondary_during_the_old_ones_teardown_waits_for_it(config, agents,
                                                                     monkeypatch):
    """The primary's next prepare-secondary comes to this host while the old secondary's
    loop tears it down (CI once saw "domain ... already exists"): it waits until the old
    domain is gone (Services.vm_lock), then starts the new one."""
    agent = _protected_secondary(config, agents, monkeypatch)
    libvirt = _Libvirt("vm1-ft-secondary")
    tearing_down = threading.Event()

    def slow_kill(self: VmController) -> None:
        tearing_down.set()
        time.sleep(0.5)     # libvirt's destroy takes its time
        libvirt.running.discard(self.record.domain)

    monkeypatch.setattr(VmController, "kill_qemu", slow_kill)
    request = _next_secondary(agent, libvirt, monkeypatch)
    agent.api_backend.unprotect(VM)
    assert tearing_down.wait(5.0), "the loop did not tear the old secondary down"
    ready = agent.api_backend.prepare_secondary(request)
    assert ready.generation == request.generation
    assert _ctl(agent).record.generation == request.generation
    assert libvirt.running == {"vm1-ft-secondary"}


def test_a_prepare_secondary_before_the_old_ones_teardown_replaces_it(config, agents,
                                                                    monkeypatch):
    """The prepare comes before the old secondary's loop gets to its teardown: the
    prepare replaces it, and the old loop's late teardown leaves the new one alone."""
    from vdsm_ft.agent.states import Action
    agent = _protected_secondary(config, agents, monkeypatch)
    libvirt = _Libvirt("vm1-ft-secondary")
    killed_in: list[str] = []

    def kill(self: VmController) -> None:
        killed_in.append(threading.current_thread().name)
        libvirt.running.discard(self.record.domain)

    monkeypatch.setattr(VmController, "kill_qemu", kill)
    reached, go_on, done = threading.Event(), threading.Event(), threading.Event()
    drop = VmController.ACTIONS[Action.DROP_SECONDARY]

    def late_drop(ctl: VmController) -> VmState:
        reached.set()
        go_on.wait(5.0)
        try:
            return drop(ctl)
        finally:
            done.set()

    monkeypatch.setitem(VmController.ACTIONS, Action.DROP_SECONDARY, late_drop)
    request = _next_secondary(agent, libvirt, monkeypatch)
    agent.api_backend.unprotect(VM)
    assert reached.wait(5.0), "the loop did not take the row"
    agent.api_backend.prepare_secondary(request)
    go_on.set()
    assert done.wait(5.0)
    assert killed_in == [threading.current_thread().name]
    assert _ctl(agent).record.generation == request.generation
    assert not _ctl(agent).record.dropped
    assert libvirt.running == {"vm1-ft-secondary"}


def test_a_pid_the_kernel_gave_to_another_process_is_never_killed(config, agents,
                                                                 monkeypatch):
    """The QEMU it saw is gone and its pid now names another process (here a sleep):
    the VM's QEMU is not alive, and kill_qemu leaves that process alone."""
    import subprocess
    from vdsm_ft import domains
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    ctl = _ctl(agent)
    other = subprocess.Popen(["sleep", "30"])
    try:
        monkeypatch.setattr(agent.services, "destroy_domain", lambda name: None)
        monkeypatch.setattr(domains, "qemu_pid", lambda name, among=None: other.pid)
        monkeypatch.setattr(domains, "start_time", lambda pid: 100, raising=False)
        assert ctl.qemu_alive()                     # the VM's QEMU, as seen then
        # It exited, and the kernel gave its pid to a process started later.
        monkeypatch.setattr(domains, "qemu_pid", lambda name, among=None: None)
        monkeypatch.setattr(domains, "start_time", lambda pid: 200, raising=False)
        assert not ctl.qemu_alive()
        ctl.kill_qemu()
        assert other.poll() is None, "kill_qemu killed a process that was not the QEMU"
    finally:
        other.kill()
        other.wait()


def test_a_replaced_secondarys_late_kill_leaves_the_new_ones_qemu_and_domain(
        config, agents, monkeypatch):
    """A prepare-secondary replaced the old secondary while the old loop was inside an
    action; that action's kill_qemu comes after the new QEMU runs, under the same domain
    name. It must neither kill that QEMU (here a sleep) nor destroy its domain."""
    import subprocess
    from vdsm_ft import domains
    real = VmController.qemu_alive, VmController.kill_qemu
    old_qemu, new_qemu = (subprocess.Popen(["sleep", "30"]) for _ in range(2))
    seen = old_qemu
    destroyed: list[str] = []
    try:
        monkeypatch.setattr(domains, "qemu_pid", lambda name, among=None: seen.pid)
        agent = _protected_secondary(config, agents, monkeypatch)
        monkeypatch.setattr(VmController, "qemu_alive", real[0])
        monkeypatch.setattr(VmController, "kill_qemu", real[1])
        monkeypatch.setattr(agent.services, "destroy_domain", destroyed.append)
        old = _ctl(agent)
        assert old.qemu_alive()
        request = _next_secondary(agent, _Libvirt(), monkeypatch)
        agent.api_backend.prepare_secondary(request)        # forgets the old one
        assert old_qemu.wait(5.0) == -9 and destroyed == ["vm1-ft-secondary"]
        seen = new_qemu                                     # the new secondary's QEMU
        assert _ctl(agent) is not old and _ctl(agent).qemu_alive()
        old.kill_qemu()
        with pytest.raises(subprocess.TimeoutExpired):     # not killed: still runs
            new_qemu.wait(0.5)
        assert destroyed == ["vm1-ft-secondary"], "it destroyed the new domain"
    finally:
        for p in (old_qemu, new_qemu):
            p.kill()
            p.wait()


def test_an_admin_stop_holds_the_generation_before_vdsm_kills_qemu(config, agents,
                                                                  monkeypatch):
    """before_vm_destroy -> stopping: the claim is made before the answer, in the
    request, so the secondary, seeing QEMU die right after, can only lose it."""
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    ctl = _ctl(agent)
    peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1", agent_port=_closed_port(),
                    replication_address="127.0.0.1")
    ctl.update(state=VmState.PROTECTED, peer=peer, generation=3)
    claims: list[tuple] = []
    monkeypatch.setattr(agent.arbiter, "claim_live", lambda vm, gen, host, timeout:
                        claims.append((vm, gen, host, threading.current_thread().name))
                        or True)
    agent.hook_backend.stopping(VM)
    assert claims and claims[0] == (VM, 3, "host-a", threading.current_thread().name)


def test_syncing_and_failing_over_are_on_disk_before_their_actions_run(config, agents,
                                                                       monkeypatch):
    """Entered through their rows, and saved before the long part: an agent restarted
    mid-sync finds Syncing (and abandons the half-made pair), one restarted mid-failover
    finds Failing Over (and goes on with it)."""
    from vdsm_ft.agent.states import Action
    monkeypatch.setattr(VmController, "qemu_alive", lambda self: True)
    monkeypatch.setattr(VmController, "colo_mode", lambda self: None)
    on_disk: list[tuple[Action, VmState]] = []

    def recording(action: Action, result: VmState):
        def act(ctl: VmController) -> VmState:
            on_disk.append((action, Store(os.path.join(config.state_dir, "vms"))
                            .load_all()[0].state))
            return result
        return act

    monkeypatch.setitem(VmController.ACTIONS, Action.PROTECT,
                        recording(Action.PROTECT, VmState.PROTECTED))
    monkeypatch.setitem(VmController.ACTIONS, Action.FAIL_OVER,
                        recording(Action.FAIL_OVER, VmState.DOWN))
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    ctl = _ctl(agent)
    peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1", agent_port=_closed_port(),
                    replication_address="127.0.0.1")
    ctl.update(launched=True, peer=peer)
    ctl.wake()
    _wait(lambda: ctl.record.state is VmState.PROTECTED)
    ctl.peer_lost("test")
    _wait(lambda: ctl.record.state is VmState.DOWN)
    assert on_disk == [(Action.PROTECT, VmState.SYNCING),
                       (Action.FAIL_OVER, VmState.FAILING_OVER)]


def test_only_the_step_writes_a_vms_state():
    """No action writes `state=` itself: the step applies its row's entering state and
    the action's checked outcome, in one place (VmController._enter)."""
    import inspect
    import re
    from vdsm_ft.agent import controller
    source = inspect.getsource(controller)
    writes = [m.start() for m in re.finditer(r"\bupdate\([^)]*\bstate=", source)]
    assert len(writes) == 1
    assert source.rfind("def ", 0, writes[0]) == source.index("def _enter(")


def test_a_start_whose_disk_image_is_missing_is_refused_with_its_cause(config, agents,
                                                                       tmp_path):
    """Issue 16: the hook used to get "internal error" (500), the cause only in the log."""
    from vdsm_ft.agenterrors import AgentRefused
    missing = str(tmp_path / "images" / "gone.qcow2")
    xml = XML.replace("<devices></devices>", (
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{missing}'/><target dev='vda' bus='virtio'/></disk></devices>"))
    agent = agents(config)
    with pytest.raises(AgentRefused, match=r"not started: cannot read the size of "
                       + missing.replace(".", r"\.")):
        agent.hook_backend.register(VM, xml)
    assert agent.registry.get(VM) is None    # nothing recorded for a VM that cannot run


def test_a_start_that_never_ran_leaves_no_record(config, agents):
    """Issue 16: a failed start after prepare left a primary in Starting for good."""
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    agent.hook_backend.destroyed(VM)         # VDSM's start failed: no `started` came
    assert agent.registry.get(VM) is None
    assert not os.path.exists(_record_path(config))


def _counted(agent: Agent) -> int:
    """host-a's FT VMs toward the poller's caps while the engine waits for VM's launch
    there (engine_plugin.reconcile.loads_from)."""
    from engine_plugin.agents import AgentView
    from engine_plugin.inventory import Inventory, VmInfo
    from engine_plugin.reconcile import loads_from
    vm = VmInfo(id=VM, name="vm1", cluster_id="c1", status="wait_for_launch",
                host_id="host-a", memory=1 << 30, vcpus=1)
    view = AgentView(statuses={"host-a": agent.api_backend.host_status()})
    return loads_from(Inventory(vms={VM: vm}), view)["host-a"].ft_vms


def test_a_start_that_never_launches_is_removed_after_launch_timeout(config, agents):
    """Issue 16: after `prepare` neither `started` nor `destroyed` came (VDSM crashed,
    libvirt failed), and the record held a cap slot in Starting for good."""
    agent = agents(replace(config, launch_timeout=1.0))
    agent.hook_backend.register(VM, XML)
    assert _counted(agent) == 1
    time.sleep(0.5)
    assert agent.registry.get(VM) is not None, "removed before its bound"
    _wait(lambda: agent.registry.get(VM) is None, timeout=5.0)
    assert not os.path.exists(_record_path(config))
    assert _counted(agent) == 0


def test_a_launched_start_outlives_launch_timeout(config, agents, monkeypatch):
    monkeypatch.setattr(Services, "running_domain", lambda self, vm_id: "vm1")
    monkeypatch.setattr(VmController, "qemu_alive", lambda self: True)
    monkeypatch.setattr(VmController, "colo_mode", lambda self: None)
    agent = agents(replace(config, launch_timeout=0.5))
    agent.hook_backend.register(VM, XML)
    agent.hook_backend.started(VM, None)
    time.sleep(1.5)
    assert agent.api_backend.vm_status(VM).state is VmState.NEED_SECONDARY


def test_started_is_refused_unless_libvirt_runs_the_domain(config, agents, monkeypatch):
    """Issue 16: the hook socket's word made a primary of a VM that libvirt never ran
    here (a forged `prepare` and `started`)."""
    from vdsm_ft.agenterrors import AgentRefused
    from vdsm_ft.hookapi import HookClient
    running: dict[str, str] = {}
    monkeypatch.setattr(Services, "running_domain", lambda self, vm_id: running.get(vm_id))
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    hook = HookClient(config.hook_socket)
    with pytest.raises(AgentRefused, match="not taken as started: libvirt on host-a runs "
                       "no domain with its UUID; unless libvirt runs it, its record goes "
                       "600 s after its prepare") as refused:
        hook.started(VM, "<domain>forged</domain>")
    assert refused.value.status == 409
    running[VM] = "vm2"
    with pytest.raises(AgentRefused, match="runs its UUID as domain 'vm2', not 'vm1'"):
        hook.started(VM)
    assert not _ctl(agent).record.launched
    running[VM] = "vm1"
    hook.started(VM)
    assert _ctl(agent).record.launched


def test_started_is_refused_while_libvirt_cannot_say(config, agents):
    """The fixture's libvirt URI names no socket: no answer is no proof."""
    from vdsm_ft.agenterrors import AgentRefused
    agent = agents(config)
    agent.hook_backend.register(VM, XML)
    with pytest.raises(AgentRefused, match="libvirt on host-a cannot say whether it runs"):
        agent.hook_backend.started(VM, None)
    assert not _ctl(agent).record.launched


def test_a_qemu_libvirt_does_not_run_as_the_vm_is_not_adopted(config, agents, monkeypatch):
    """discover finds a QEMU by its -name alone; adopting it takes libvirt's word, and a
    refusal leaves no record and does not stop discovery."""
    from vdsm_ft import admission
    agent = agents(config)
    run_dir = os.path.join(config.run_dir, "vms", VM)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, admission.ENGINE_XML), "w") as f:
        f.write(XML)
    # No process is killed or asked over QMP here: the adopted VM's loop sees a live QEMU.
    monkeypatch.setattr("vdsm_ft.domains.qemu_pid", lambda name, among=None: 12345)
    monkeypatch.setattr(VmController, "qemu_alive", lambda self: True)
    monkeypatch.setattr(VmController, "colo_mode", lambda self: None)
    monkeypatch.setattr(VmController, "kill_qemu", lambda self: None)
    monkeypatch.setattr(Services, "running_domain", lambda self, vm_id: None)
    agent.monitor.discover()
    assert agent.registry.get(VM) is None
    monkeypatch.setattr(Services, "running_domain", lambda self, vm_id: "vm1")
    agent.monitor.discover()
    assert _ctl(agent).record.launched


def test_running_name_tells_no_domain_from_libvirt_failing():
    import libvirt
    from vdsm_ft import domains

    class Error(libvirt.libvirtError):
        def __init__(self, code: int):
            super().__init__("fake")
            self.code = code

        def get_error_code(self) -> int:
            return self.code

        def get_error_message(self) -> str:
            return f"error {self.code}"

    class Dom:
        def __init__(self, active: bool):
            self.active = active

        def name(self) -> str:
            return "vm1"

        def isActive(self) -> bool:
            return self.active

    class Conn:
        def __init__(self, answer):
            self.answer = answer

        def lookupByUUIDString(self, uuid: str) -> Dom:
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    assert domains.running_name(Conn(Dom(True)), VM) == "vm1"
    assert domains.running_name(Conn(Dom(False)), VM) is None
    assert domains.running_name(Conn(Error(libvirt.VIR_ERR_NO_DOMAIN)), VM) is None
    with pytest.raises(domains.DomainError, match="cannot look up domain"):
        domains.running_name(Conn(Error(libvirt.VIR_ERR_SYSTEM_ERROR)), VM)


def test_a_corrupt_claim_is_counted_reported_and_on_metrics(config, monkeypatch):
    """Issue 16: the primary's ALERT reaches the status field the poller turns into an
    alert event, and a counter on /metrics; a controller that never runs its loop, so
    the failover below is the only one."""
    from vdsm_ft.agent.metrics import render_metrics
    from vdsm_ft.arbiter import CorruptClaim
    agent = Agent(config)
    peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1", agent_port=_closed_port(),
                    replication_address="127.0.0.1")
    ctl = agent.registry.install(VmRecord(
        vm_id=VM, name="vm1", role=Role.PRIMARY, engine_xml=XML, launched=True,
        state=VmState.FAILING_OVER, domain="vm1", generation=3, peer=peer),
        lambda record: VmController(agent.services, record))

    def planted() -> bool:
        raise CorruptClaim("live claim is not valid: 'junk'")

    monkeypatch.setattr(ctl, "hold_generation", planted)
    monkeypatch.setattr(ctl, "kill_qemu", lambda: pytest.fail("the primary fenced itself"))
    monkeypatch.setattr(ctl, "ensure_qmp", lambda: object())
    monkeypatch.setattr(ctl, "layout", lambda: None)
    monkeypatch.setattr("vdsm_ft.agent.controller.colo.failover_primary", lambda q, l: None)
    assert ctl._do_fail_over() is VmState.NEED_SECONDARY
    alert = ctl.status().arbiter_alert
    assert alert.startswith("ALERT: the arbiter's live claim is corrupt: ") and \
        "(generation 3)" in alert and alert in ctl.record.reason
    assert api.VmStatus.from_dict(ctl.status().to_dict()).arbiter_alert == alert
    metrics = render_metrics("host-a", [ctl])
    assert f'vdsm_ft_arbiter_corrupt_claims_total{{host="host-a",vm="{VM}",name="vm1",' \
           f'role="primary"}} 1' in metrics


def test_a_status_without_arbiter_alert_still_parses():
    """Wire compatibility: an older agent sends no arbiter_alert."""
    data = api.VmStatus(vm_id=VM, name="vm1", state=VmState.PROTECTED,
                        role=Role.PRIMARY).to_dict()
    del data["arbiter_alert"]
    assert api.VmStatus.from_dict(data).arbiter_alert == ""


def test_a_vms_lock_excludes_while_held_and_is_dropped_with_its_last_user(config, agents):
    """Services.vm_lock: a second user waits for the first; once nobody holds or waits
    for a VM's lock, the agent keeps nothing for it (hosts see VMs come and go)."""
    services = agents(config).services
    waiting, order = threading.Event(), []

    def second() -> None:
        waiting.set()
        with services.vm_lock(VM):
            order.append("second")

    with services.vm_lock(VM):
        with services.vm_lock(VM):          # re-entrant: forget runs kill_qemu under it
            assert services.locked_vms() == 1
        t = threading.Thread(target=second)
        t.start()
        waiting.wait(5.0)
        time.sleep(0.1)
        order.append("first")
        assert services.locked_vms() == 1
    t.join(5.0)
    assert order == ["first", "second"]
    assert services.locked_vms() == 0


def test_one_qmp_connection_per_vm_when_two_threads_connect_at_once(config, agents,
                                                                    monkeypatch):
    """ensure_qmp connects outside the controller's lock; a connection another thread
    installed meanwhile is kept, and the late one is closed, not leaked over it."""
    agent = _protected_secondary(config, agents, monkeypatch)
    ctl = _ctl(agent)
    ctl._close_qmp()
    closed: list[object] = []

    class FakeQmp:
        def __init__(self, path: str, name: str):
            self.name = name

        def connect(self, timeout: float) -> None:
            if ctl.qmp is None:
                ctl._use_qmp(FakeQmp("", "installed meanwhile"))

        def subscribe(self, callback) -> None:
            pass

        def close(self) -> None:
            closed.append(self)

    monkeypatch.setattr("vdsm_ft.agent.controller.Qmp", FakeQmp)
    got = ctl.ensure_qmp()
    assert got is ctl.qmp and got.name == "installed meanwhile"
    assert [q.name for q in closed] == ["vm1-ft-secondary"]
    ctl._close_qmp()
    assert ctl.qmp is None and closed[-1] is got
