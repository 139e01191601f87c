"""The poller against the fake engine through the REAL ovirtsdk4 over HTTPS.

The host agents here are the agent's real protocol (`vdsm_ft.api` over mutual TLS) with
a scripted backend that records calls and reports the statuses the test sets
(tests/integration/scripted_agents.py): the real agent does not exist yet (issue 4) and
replaces that backend when it lands.
"""
from __future__ import annotations

import collections
import time

import pytest

from engine_plugin import config, reconcile
from engine_plugin.agents import Agents
from engine_plugin.engine import Engine
from engine_plugin.events import ORIGIN
from engine_plugin.poller import Poller
from ftlab import qemubuild
from ftlab.engine.fake_engine import FakeEngine
from ftlab.engine.model import GiB, Hook
from tests.integration.scripted_agents import AgentFleet, primary_status
from vdsm_ft import qemu_probe
from vdsm_ft.api import Failover, Role, VmState, VmStatus
from vdsm_ft.layout import secondary_uuid

USER, PASSWORD = "ft-poller@internal", "s3cret-poller"
FT_HOOK = [Hook("before_vm_start", "50_ft", "0" * 32)]
HOSTS = ["h1", "h2", "h3", "h4"]


class Lab:
    def __init__(self, tmp_path, engine: FakeEngine, fleet: AgentFleet):
        self.tmp_path, self.engine, self.fleet = tmp_path, engine, fleet
        info = engine.info
        self.conf_path = tmp_path / "poller.conf"
        config.write(str(self.conf_path), {
            "engine": {"url": info.url, "username": USER, "password": PASSWORD,
                       "ca_file": info.ca_file, "timeout": 2},
            "agents": {"port": fleet.port, "cert": fleet.poller_tls.cert,
                       "key": fleet.poller_tls.key, "ca": fleet.poller_tls.ca, "timeout": 1},
            "poller": {"interval": 0.2},
        })
        self.settings = config.load(str(self.conf_path), env={})

    def poller(self, lease=None) -> Poller:
        s = self.settings
        return Poller(s, Engine(s.engine, s.poller.hook_name), Agents(s.agents), lease)

    def our_events(self):
        return [e for e in self.engine.events() if e.origin == ORIGIN]


@pytest.fixture
def lab(tmp_path):
    engine = FakeEngine(users={USER: PASSWORD})
    engine.start()
    fleet = AgentFleet(tmp_path / "pki", HOSTS)
    for h in HOSTS:
        # h2 lacks the FT hook; h4 has less schedulable memory than h3 but enough.
        host = engine.add_host(h, address=fleet.addresses[h],
                               memory=(48 if h == "h4" else 64) * GiB,
                               hooks=[] if h == "h2" else FT_HOOK)
        fleet.backends[h].host_id = host.id     # agents report the engine's host ids
    try:
        yield Lab(tmp_path, engine, fleet)
    finally:
        fleet.stop()
        engine.stop()


def _ft_vm(lab: Lab, name="web", host="h1", memory=4 * GiB, cpus=2, **kw):
    vm = lab.engine.add_vm(name, memory=memory, cpus=cpus,
                           custom_properties={"ft": "true", "other": "kept"}, host=host, **kw)
    lab.fleet.backends[host].set_vm(primary_status(vm.id, name, lab.engine.host(host).id))
    return vm


def _cycle_until(poller, done, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        res = poller.cycle()
        if done():
            return res
        assert time.monotonic() < deadline, f"not done after {timeout} s: {res}"
        time.sleep(0.2)


def _host_id(lab, name):
    return lab.engine.host(name).id


def test_up_ft_vm_is_protected_onto_a_valid_peer_once(lab):
    vm = _ft_vm(lab)
    poller = lab.poller()

    res = poller.cycle()
    assert res.engine_ok and res.failures == [], res.failures
    calls = lab.fleet.backends["h1"].calls_named("protect")
    assert len(calls) == 1
    _, vm_id, peer = calls[0]
    # h1 runs the primary, h2 has no hook; h3 and h4 both qualify, h3 has more memory.
    assert vm_id == vm.id and peer.host_id == _host_id(lab, "h3")
    assert (peer.agent_address, peer.agent_port) == (lab.fleet.addresses["h3"], lab.fleet.port)
    assert peer.replication_address == lab.fleet.backends["h3"].replication_address
    assert res.reasons["web"] == "protecting onto h3"

    # Level-triggered and idempotent: the agent now reports Syncing, nothing is re-sent.
    poller.cycle()
    assert len(lab.fleet.backends["h1"].calls_named("protect")) == 1

    b1 = lab.fleet.backends["h1"]
    b1.set_vm(primary_status(vm.id, "web", _host_id(lab, "h1"), VmState.PROTECTED,
                             secondary_host=_host_id(lab, "h3"), generation=1))
    res = poller.cycle()
    protected = [e for e in lab.our_events() if "is protected by FT" in e.description]
    assert len(protected) == 1 and protected[0].vm_id == vm.id
    assert "secondary on h3" in protected[0].description
    poller.cycle()
    assert len([e for e in lab.our_events() if "is protected" in e.description]) == 1


def test_no_qualifying_host_posts_one_refusal_event(lab):
    vm = _ft_vm(lab, memory=40 * GiB)       # 2x = 80 GiB: no host has that much
    poller = lab.poller()
    for _ in range(3):
        res = poller.cycle()
        assert res.engine_ok
    assert lab.fleet.backends["h1"].calls_named("protect") == []
    refusals = [e for e in lab.our_events() if e.description.startswith("FT cannot protect")]
    assert len(refusals) == 1 and refusals[0].vm_id == vm.id
    text = refusals[0].description
    assert "h1: runs the primary" in text and "h2: FT hook not installed" in text
    assert "h3: needs 80.0 GiB schedulable memory" in text


def test_no_secondary_on_a_host_whose_qemu_cannot_do_colo_and_one_event(lab, tmp_path):
    """The agents report what the real probe found: h3 runs the EL9 look-alike QEMU."""
    el9 = qemu_probe.probe(qemubuild.require(qemubuild.EL9_LOOKALIKE), str(tmp_path / "p"))
    assert not el9.capable
    lab.fleet.backends["h3"].qemu = el9
    _ft_vm(lab)
    poller = lab.poller()
    for _ in range(3):
        res = poller.cycle()
        assert res.engine_ok and res.failures == [], res.failures
    [(_, _, peer)] = lab.fleet.backends["h1"].calls_named("protect")
    assert peer.host_id == _host_id(lab, "h4")           # h3 has more memory, but no COLO
    events = [e for e in lab.our_events() if "cannot run FT VMs" in e.description]
    assert len(events) == 1, [e.description for e in events]
    assert events[0].description == f"Host h3 cannot run FT VMs: {el9.reason}"
    assert events[0].host_id == _host_id(lab, "h3") and events[0].severity == "error"

    # A VM that its host started unprotected ([hooks] qemu_incapable = start_unprotected)
    # is reported with the host's reason, not as started without the hook.
    other = lab.engine.add_vm("plain", memory=GiB, cpus=1, host="h3",
                              custom_properties={"ft": "true"})
    res = poller.cycle()
    assert res.reasons["plain"] == "not protected: the QEMU on h3 cannot do COLO"
    [note] = [e for e in lab.our_events() if e.vm_id == other.id]
    assert "whose QEMU cannot do COLO (x-colo" in note.description
    assert "install vdsm-ft-qemu" in note.description
    for _ in range(2):
        poller.cycle()
    assert len([e for e in lab.our_events() if "cannot run FT VMs" in e.description]) == 1


def test_copy_back_is_one_event_then_one_when_the_image_is_current(lab):
    """The agent's reason carries the copy-back's progress: one event for the copy, not
    one per percent; one more once the storage-domain image is current."""
    vm = _ft_vm(lab)
    h1, b1 = _host_id(lab, "h1"), lab.fleet.backends["h1"]
    poller = lab.poller()
    for percent in (10, 40, 90):
        b1.set_vm(primary_status(vm.id, "web", h1, VmState.NOT_PROTECTED, generation=2,
                                 failovers=1,
                                 reason=f"copying back to the storage domain, {percent}%"))
        res = poller.cycle()
        assert res.reasons["web"] == f"not protected: copying back to the storage " \
            f"domain, {percent}%"
    assert b1.calls_named("protect") == []       # protection waits for the copy-back
    copying = [e for e in lab.our_events() if "copying back" in e.description]
    assert len(copying) == 1 and copying[0].vm_id == vm.id, copying
    b1.set_vm(primary_status(vm.id, "web", h1, VmState.NEED_SECONDARY, generation=2,
                             failovers=1, image_current_at=time.time()))
    poller.cycle()
    assert len(b1.calls_named("protect")) == 1   # and now it is re-protected
    poller.cycle()
    current = [e for e in lab.our_events() if "current again" in e.description]
    assert len(current) == 1 and "storage domain" in current[0].description


def test_ha_vm_with_ft_is_flagged_not_protected(lab):
    _ft_vm(lab, name="hadb", ha=True)
    res = lab.poller().cycle()
    assert lab.fleet.backends["h1"].calls_named("protect") == []
    assert "refused" in res.reasons["hadb"]
    [ev] = [e for e in lab.our_events() if "high availability" in e.description]
    assert ev.severity == "error"


def test_failover_is_reprotected_onto_a_third_host_with_no_human_step(lab):
    h1, h3, h4 = (_host_id(lab, h) for h in ("h1", "h3", "h4"))
    vm = _ft_vm(lab)
    poller = lab.poller()
    poller.cycle()
    b1, b3, b4 = (lab.fleet.backends[h] for h in ("h1", "h3", "h4"))
    b1.set_vm(primary_status(vm.id, "web", h1, VmState.PROTECTED, secondary_host=h3,
                             generation=1))
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.PROTECTED, role=Role.SECONDARY,
                       primary_host=h1, secondary_host=h3, generation=1))
    poller.cycle()

    # Host h1 dies: its agent is silent, the engine goes Connecting -> NonResponsive and
    # shows the VM Unknown; the survivor on h3 took over and won generation 1's claim.
    lab.fleet.kill("h1")
    lab.engine.kill_host("h1")
    lab.engine.wait_host_status("h1", "non_responsive", timeout=10)
    assert lab.engine.vm("web").status == "unknown"
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.NEED_SECONDARY,
                       role=Role.PRIMARY, primary_host=h3, generation=1, failovers=1,
                       last_failover=Failover(at=1.0, from_host=h1, to_host=h3,
                                              duration_ms=21, old_primary_cannot_run=True)))
    res = poller.cycle()
    assert res.engine_ok, res.failures
    calls = b3.calls_named("protect")
    assert len(calls) == 1 and calls[0][2].host_id == h4     # h1 dead, h2 no hook, h3 primary
    assert res.reasons["web"] == "re-protecting onto h4"
    fences = [a for a in lab.engine.actions() if a.kind == "fence"]
    assert [(a.host_id, a.detail) for a in fences] == [(h1, "manual")]
    assert lab.engine.vm("web").status == "down"             # confirmed, not restarted
    # Events of one severity about one VM are spaced by the engine's flood window, so
    # the last may come a cycle later; no action repeats meanwhile.
    wanted = ("continues on host h3 as external-web-ft-secondary", "re-protected on host h4",
              "Confirming host h1 as rebooted")
    _cycle_until(poller, lambda: all(any(w in e.description for e in lab.our_events())
                                     for w in wanted))
    assert len(b3.calls_named("protect")) == 1
    assert len([a for a in lab.engine.actions() if a.kind == "fence"]) == 1

    # The survivor protects onto h4; once Protected, one more event, no more actions.
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.PROTECTED, role=Role.PRIMARY,
                       primary_host=h3, secondary_host=h4, generation=2, failovers=1))
    # The engine's flood window (1 s for one severity and VM) holds the event back a cycle.
    res = _cycle_until(poller, lambda: any(
        "protected again by FT: primary on h3, secondary on h4" in e.description
        for e in lab.our_events()))
    assert res.actions == []
    assert len(b3.calls_named("protect")) == 1 and b4.calls == []
    ids = [e.custom_id for e in lab.our_events()]
    assert len(ids) == len(set(ids))


def test_survivor_running_as_the_vm_itself_is_one_event_and_stray_externals_go(lab):
    h1, h3, h4 = (_host_id(lab, h) for h in ("h1", "h3", "h4"))
    vm = _ft_vm(lab)
    poller = lab.poller()
    b3 = lab.fleet.backends["h3"]
    # While protected, h3's VDSM reported the secondary (generation 1): imported external.
    gen1 = secondary_uuid(vm.id, 1)
    lab.engine.report_vms("h3", [{"uuid": gen1, "name": "web-ft-secondary",
                                  "status": "up", "has_ovirt_metadata": False,
                                  "memory": 4 * GiB}])
    # The survivor moved into the VM's own domain: h3 reports the VM itself, and the
    # secondary's domain is gone (its external record goes Down).
    lab.fleet.kill("h1")
    lab.engine.kill_host("h1")
    lab.engine.report_vms("h3", [{"uuid": vm.id, "name": "web", "status": "up",
                                  "has_ovirt_metadata": True, "memory": 4 * GiB}])
    assert lab.engine.vm("web").host_id == h3
    assert lab.engine.vm("external-web-ft-secondary").status == "down"
    lf = Failover(at=7.25, from_host=h1, to_host=h3, duration_ms=95,
                  old_primary_cannot_run=True, domain="web", identity_pause_ms=31.8)
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.NEED_SECONDARY,
                       role=Role.PRIMARY, primary_host=h3, generation=1, failovers=1,
                       last_failover=lf))
    _cycle_until(poller, lambda: any("failed over" in e.description
                                     for e in lab.our_events()))
    [told] = [e for e in lab.our_events() if "failed over" in e.description]
    assert told.description == ("VM web failed over from host h1 to host h3: the "
                                "secondary took over in 95 ms and now runs as web itself; "
                                "the workload paused 32 ms while it moved.")
    assert "external-web-ft-secondary" not in {v.name for v in lab.engine.vms()}

    # Re-protected onto h4: the new secondary's record is live and stays, the event is
    # not repeated for the next generation.
    lab.engine.report_vms("h4", [{"uuid": secondary_uuid(vm.id, 2),
                                  "name": "web-ft-secondary", "status": "up",
                                  "has_ovirt_metadata": False, "memory": 4 * GiB}])
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.PROTECTED, role=Role.PRIMARY,
                       primary_host=h3, secondary_host=h4, generation=2, failovers=1,
                       last_failover=lf))
    time.sleep(1.2)                              # past the engine's flood window
    poller.cycle()
    poller.cycle()
    assert [v.status for v in lab.engine.vms()
            if v.name == "external-web-ft-secondary"] == ["up"]
    assert len([e for e in lab.our_events() if "failed over" in e.description]) == 1


def test_reprotection_waits_until_the_engine_shows_the_vm_on_the_survivors_host(lab):
    h1, h3, h4 = (_host_id(lab, h) for h in ("h1", "h3", "h4"))
    vm = _ft_vm(lab)
    poller = lab.poller()
    b3 = lab.fleet.backends["h3"]
    lab.fleet.kill("h1")
    lab.engine.kill_host("h1")
    lf = Failover(at=time.time(), from_host=h1, to_host=h3, duration_ms=60,
                  old_primary_cannot_run=True, domain="web", identity_pause_ms=30.0)
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.NEED_SECONDARY,
                       role=Role.PRIMARY, primary_host=h3, generation=1, failovers=1,
                       last_failover=lf))
    # VDSM on h3 has not adopted the VM yet: the engine still has it on h1, and a
    # checkpoint's pause that the adoption caught would make the engine destroy it.
    for _ in range(3):
        res = poller.cycle()
        assert res.engine_ok, res.failures
        assert b3.calls_named("protect") == []
        assert res.reasons["web"].startswith("re-protection waits until the engine shows "
                                             "web on h3"), res.reasons
    assert lab.engine.vm("web").host_id == h1

    lab.engine.report_vms("h3", [{"uuid": vm.id, "name": "web", "status": "up",
                                  "has_ovirt_metadata": True, "memory": 4 * GiB}])
    assert lab.engine.vm("web").host_id == h3
    res = poller.cycle()
    calls = b3.calls_named("protect")
    assert len(calls) == 1 and calls[0][2].host_id == h4, calls
    assert res.reasons["web"] == "re-protecting onto h4"


def test_reprotection_goes_ahead_with_a_warning_when_the_engine_never_follows(
        lab, monkeypatch):
    monkeypatch.setattr(reconcile, "ADOPTION_WAIT_S", 1.5)
    h1, h3, h4 = (_host_id(lab, h) for h in ("h1", "h3", "h4"))
    vm = _ft_vm(lab)
    poller = lab.poller()
    b3 = lab.fleet.backends["h3"]
    lab.fleet.kill("h1")
    lf = Failover(at=time.time(), from_host=h1, to_host=h3, duration_ms=60,
                  old_primary_cannot_run=True, domain="web")
    b3.set_vm(VmStatus(vm_id=vm.id, name="web", state=VmState.NEED_SECONDARY,
                       role=Role.PRIMARY, primary_host=h3, generation=1, failovers=1,
                       last_failover=lf))
    poller.cycle()
    assert b3.calls_named("protect") == []
    time.sleep(1.6)                              # the wait, and the engine's flood window
    _cycle_until(poller, lambda: any("does not show it there yet" in e.description
                                     for e in lab.our_events()))
    calls = b3.calls_named("protect")
    assert calls and calls[0][2].host_id == h4, calls
    [late] = [e for e in lab.our_events() if "does not show it there yet" in e.description]
    assert late.severity == "warning" and "check VDSM on h3" in late.description


def test_a_retried_reprotection_is_one_event(lab, monkeypatch):
    # The refusing peer's pass-over, shortened so the retries land on h4 again.
    monkeypatch.setattr("engine_plugin.poller.REFUSED_PEER_BACKOFF_S", 0.3)
    h1, h3, h4 = (_host_id(lab, h) for h in ("h1", "h3", "h4"))
    vm = _ft_vm(lab)
    poller = lab.poller()
    b3 = lab.fleet.backends["h3"]
    lab.fleet.kill("h1")
    survivor = dict(vm_id=vm.id, name="web", state=VmState.NEED_SECONDARY, role=Role.PRIMARY,
                    primary_host=h3, failovers=1)
    b3.set_vm(VmStatus(generation=1, **survivor))
    _cycle_until(poller, lambda: any("re-protected on host h4" in e.description
                                     for e in lab.our_events()))
    # Each attempt onto h4 fails after taking a new generation; the poller tries again.
    for generation in (2, 3):
        b3.set_vm(VmStatus(generation=generation, **survivor))
        attempts = len(b3.calls_named("protect"))
        _cycle_until(poller, lambda: len(b3.calls_named("protect")) > attempts)
        assert b3.calls_named("protect")[-1][2].host_id == h4
    time.sleep(1.2)                              # past the engine's flood window
    poller.cycle()
    told = [e for e in lab.our_events() if "re-protected on host" in e.description]
    assert len(told) == 1, [e.description for e in told]


def test_fence_is_withheld_without_the_arbiters_proof(lab):
    h1, h3 = _host_id(lab, "h1"), _host_id(lab, "h3")
    vm = _ft_vm(lab)
    lab.fleet.kill("h1")
    lab.engine.kill_host("h1")
    lab.engine.wait_host_status("h1", "non_responsive", timeout=10)
    lab.fleet.backends["h3"].set_vm(VmStatus(
        vm_id=vm.id, name="web", state=VmState.NEED_SECONDARY, role=Role.PRIMARY,
        primary_host=h3, generation=1, failovers=1,
        last_failover=Failover(at=1.0, from_host=h1, to_host=h3, duration_ms=21,
                               old_primary_cannot_run=False)))
    lab.poller().cycle()
    assert [a for a in lab.engine.actions() if a.kind == "fence"] == []
    assert lab.engine.vm("web").status == "unknown"


def test_engine_outage_mid_cycle_recovers_without_duplicates(lab):
    vm = _ft_vm(lab)
    _ft_vm(lab, name="hadb", host="h4", ha=True)    # gives the cycle an event to post
    poller = lab.poller()
    b1 = lab.fleet.backends["h1"]

    def outage_during_protect(name, *args):
        if name == "protect":
            lab.engine.set_outage(True)      # after the inventory, before the events
    b1.on_call = outage_during_protect
    res = poller.cycle()
    assert len(b1.calls_named("protect")) == 1
    assert not res.engine_ok and "unreachable" in " ".join(res.failures)
    b1.on_call = None
    # Still down: the cycle fails fast, backs off, does nothing.
    res = poller.cycle()
    assert not res.engine_ok and poller.delay() > lab.settings.poller.interval
    lab.engine.set_outage(False)
    b1.set_vm(primary_status(vm.id, "web", _host_id(lab, "h1"), VmState.PROTECTED,
                             secondary_host=_host_id(lab, "h3"), generation=1))
    res = poller.cycle()
    assert res.engine_ok and poller.delay() == lab.settings.poller.interval
    assert len(b1.calls_named("protect")) == 1
    assert len([e for e in lab.our_events() if "hadb" in e.description]) == 1

    # An event whose answer is lost (the engine is slower than our timeout) is stored by
    # the engine; re-posting it next cycle hits the same custom_id and counts as done.
    lab.fleet.backends["h1"].set_vm(primary_status(
        vm.id, "web", _host_id(lab, "h1"), VmState.NOT_PROTECTED,
        reason="secondary disk directory full", generation=1))
    lab.engine.set_delay(3.0, "events", "POST")
    res = poller.cycle()
    assert not res.engine_ok and "curl error 28" in " ".join(res.failures)
    lab.engine.set_delay(0, "events", "POST")
    deadline = time.monotonic() + 5
    while not any("disk directory full" in e.description for e in lab.our_events()):
        assert time.monotonic() < deadline, "the delayed event never reached the engine"
        time.sleep(0.1)
    time.sleep(1.3)                  # past the engine's flood window for this VM
    res = poller.cycle()
    assert res.engine_ok and res.failures == [] and res.events_posted == []
    ids = collections.Counter(e.custom_id for e in lab.our_events())
    assert ids and max(ids.values()) == 1
    full = [e for e in lab.our_events() if "disk directory full" in e.description]
    assert len(full) == 1

    # A restarted poller re-derives the same facts and posts nothing new.
    before = len(lab.our_events())
    lab.poller().cycle()
    assert len(lab.our_events()) == before


def test_only_one_of_two_pollers_acts(lab, etcd_cluster):
    from vdsm_ft.arbiter import Arbiter, LeaderLease
    _ft_vm(lab)
    _ft_vm(lab, name="db", host="h3", memory=2 * GiB, cpus=1)
    leases = [LeaderLease(Arbiter(etcd_cluster.endpoints), "ovirt-ft-poller-test", f"p{i}",
                          ttl=2) for i in (1, 2)]
    p1, p2 = lab.poller(leases[0]), lab.poller(leases[1])
    r1, r2 = p1.cycle(), p2.cycle()
    assert (r1.leader, r2.leader) == (True, False)
    assert r2.actions == [] and len(r1.actions) == 2
    for _ in range(3):
        assert p2.cycle().leader is False
        assert p1.cycle().leader is True
    protects = sum(len(b.calls_named("protect")) for b in lab.fleet.backends.values())
    assert protects == 2
    # The leader goes away: the other takes over.
    leases[0].release()
    assert p2.cycle().leader is True
    assert p1.cycle().leader is False
    leases[1].release()
