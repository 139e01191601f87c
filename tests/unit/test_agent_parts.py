"""The agent's pure parts: the state table, persisted records, the port plan, heartbeats
(real UDP on loopback) and checkpoint statistics from QMP events."""
from __future__ import annotations

import contextlib
import socket
import time
import types

import pytest

from vdsm_ft import identity
from vdsm_ft.agent import hostqemu, ports, states
from vdsm_ft.agent.checkpoints import CheckpointStats
from vdsm_ft.agent.heartbeat import Heartbeat, HeartbeatKeyError, probe, read_key
from vdsm_ft.agent.store import ImageNote, ImageNotes, Store, StoreError, VmRecord
from vdsm_ft.api import Failover, PeerSpec, Role, VmState
from vdsm_ft.qmp import Event

S = VmState
VM = "0b6c1a43-8a47-4a53-9d6c-2c1fd1d4d9b1"


def seen(**kw: bool) -> states.Observation:
    base = dict(is_primary=True, launched=True, qemu_alive=True, in_colo=False,
                stopping=False, disable_requested=False, peer_assigned=False,
                peer_lost=False)
    base.update(kw)
    return states.Observation(**base)


@pytest.mark.parametrize("state, observation, action, result", [
    (S.STARTING, seen(launched=False, qemu_alive=False), None, None),
    (S.STARTING, seen(), "none", S.NEED_SECONDARY),
    (S.STARTING, seen(is_primary=False, in_colo=True), "none", S.PROTECTED),
    (S.STARTING, seen(is_primary=False, peer_lost=True), "teardown", S.DOWN),
    (S.NEED_SECONDARY, seen(peer_assigned=True), "protect", None),
    (S.PROTECTED, seen(in_colo=True), None, None),
    (S.PROTECTED, seen(in_colo=True, peer_lost=True), "fail_over", None),
    # An intentional stop wins over a lost peer and over a dead QEMU.
    (S.PROTECTED, seen(stopping=True, peer_lost=True, qemu_alive=False), "teardown", None),
    (S.PROTECTED, seen(qemu_alive=False, peer_lost=True), "mark_down", None),
    (S.SYNCING, seen(), "abandon", None),
    (S.SYNCING, seen(in_colo=True), "none", S.PROTECTED),
    # A promoted secondary moves into the VM's own identity; a dead one is Down.
    (S.TAKING_IDENTITY, seen(), "take_identity", S.NEED_SECONDARY),
    (S.TAKING_IDENTITY, seen(qemu_alive=False), "mark_down", S.DOWN),
    (S.DISABLED, seen(), "none", S.NEED_SECONDARY),
    (S.DISABLED, seen(disable_requested=True), None, None),
    # A survivor on its replica copies back before anything re-protects it; a stop or a
    # dead QEMU comes first (they finish the copy themselves).
    (S.NEED_SECONDARY, seen(image_stale=True, peer_assigned=True), "copy_back", None),
    (S.NOT_PROTECTED, seen(image_stale=True, peer_assigned=True), "copy_back", None),
    (S.NOT_PROTECTED, seen(image_stale=True, stopping=True), "teardown", None),
    (S.NOT_PROTECTED, seen(image_stale=True, qemu_alive=False), "mark_down", None),
    (S.DOWN, seen(image_stale=True, qemu_alive=False), "retry_copy_back", None),
    (S.DOWN, seen(qemu_alive=False), None, None),
])
def test_table_picks_the_row_an_admin_would_expect(state, observation, action, result):
    row = states.next_row(state, observation)
    assert (row.action if row else None) == action
    if result is not None:
        assert row.leads_to == {result}


def test_every_row_names_a_known_condition_and_action():
    from vdsm_ft.agent.controller import VmController
    for row in states.TABLE:
        assert row.condition in states.CONDITIONS
        assert row.action == "none" or hasattr(VmController, "_do_" + row.action)
        assert row.action is states.Action.NONE or row.action in VmController.ACTIONS
        assert row.leads_to, row
        if row.action == "none":
            assert len(row.leads_to) == 1
    assert set(states.CONDITIONS) == set(states.When)
    assert set(VmController.ACTIONS) == set(states.Action) - {states.Action.NONE}


def test_an_action_ending_outside_its_row_is_refused():
    row = states.next_row(S.PROTECTED, seen(peer_lost=True))
    assert states.check(row, S.DOWN) is S.DOWN
    with pytest.raises(states.IllegalTransition, match="fail_over"):
        states.check(row, S.PROTECTED)


def test_records_round_trip_atomically_and_privately(tmp_path):
    store = Store(str(tmp_path / "vms"))
    peer = PeerSpec(host_id="h2", agent_address="10.0.0.2", agent_port=54329,
                    replication_address="10.0.0.2")
    rec = VmRecord(vm_id=VM, name="web", role=Role.PRIMARY, engine_xml="<domain/>",
                   state=S.PROTECTED, generation=3, peer=peer, ports={"primary": [1, 2]},
                   disk_sizes=(64 << 20,), peer_ports=(5, 6),
                   last_failover=Failover(at=1.0, from_host="h1", to_host="h2",
                                          duration_ms=40.0))
    store.save(rec)
    assert store.load_all() == [rec]
    assert (tmp_path / "vms" / f"{VM}.json").stat().st_mode & 0o777 == 0o600
    store.delete(VM)
    assert store.load_all() == []


def test_an_unreadable_record_says_what_to_do(tmp_path):
    store = Store(str(tmp_path))
    (tmp_path / f"{VM}.json").write_text("{truncated")
    with pytest.raises(StoreError, match="move it away"):
        store.load_all()


def test_image_notes_outlive_records_and_bad_ones_say_what_to_do(tmp_path):
    notes = ImageNotes(str(tmp_path / "image-current"))
    note = ImageNote(VM, "web", 4)
    notes.save(note)
    Store(str(tmp_path / "vms")).delete(VM)       # a stop forgets the VM's record only
    assert notes.load_all() == [note]
    assert notes.get(VM) == note
    assert (tmp_path / "image-current" / f"{VM}.json").stat().st_mode & 0o777 == 0o600
    notes.delete(VM)
    assert notes.load_all() == [] and notes.get(VM) is None
    (tmp_path / "image-current" / f"{VM}.json").write_text('{"vm_id": "x"}')
    with pytest.raises(StoreError, match="move it away"):
        notes.load_all()


def _four_ports_held(stack: contextlib.ExitStack) -> int:
    """A listener on port P, and P+1..P+3 reserved against the rest of the machine.

    The reservations bind with SO_REUSEADDR and never listen: Linux then lets
    `ports._bindable` bind them too, while no connect() picks them as its ephemeral
    port, so a busy CI machine cannot take the ports the test expects to be free.
    """
    for _ in range(50):
        with contextlib.ExitStack() as attempt:
            busy = attempt.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 0))
            base = busy.getsockname()[1]
            try:
                for port in range(base + 1, base + 4):
                    spare = attempt.enter_context(socket.socket())
                    spare.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    spare.bind(("127.0.0.1", port))
            except OSError:
                continue
            busy.listen()
            stack.enter_context(attempt.pop_all())
            return base
    raise AssertionError("no four consecutive free ports on 127.0.0.1 in 50 tries")


def test_port_plan_skips_held_and_bound_ports():
    with contextlib.ExitStack() as stack:
        taken = _four_ports_held(stack)
        chosen = ports.allocate(2, (taken, taken + 3), held=[taken + 1],
                                address="127.0.0.1")
        assert chosen == [taken + 2, taken + 3]
        with pytest.raises(ports.PortsExhausted, match="widen"):
            ports.allocate(5, (taken, taken + 3), held=[], address="127.0.0.1")


def test_heartbeats_carry_each_vms_qemu_liveness():
    a = Heartbeat("a", "127.0.0.1", 0).start()
    b = Heartbeat("b", "127.0.0.1", 0).start()
    try:
        b_port = b._sock.getsockname()[1]
        assert b.silent_for("a") == float("inf")
        a.send("127.0.0.1", b_port, {VM: (4, False)})
        deadline = time.monotonic() + 2
        while b.peer_vm("a", VM) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        vm = b.peer_vm("a", VM)
        assert (vm.generation, vm.qemu_alive) == (4, False)
        assert b.silent_for("a") < 1.0
    finally:
        a.stop()
        b.stop()


KEY = b"k" * 32


class _Capture:
    """A receiver socket that keeps what a Heartbeat sent, to replay or alter it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2)
        self.port = self.sock.getsockname()[1]

    def take(self, sender: Heartbeat, vms) -> bytes:
        sender.send("127.0.0.1", self.port, vms)
        return self.sock.recvfrom(65536)[0]


def test_signed_heartbeats_are_accepted_once_and_forgeries_dropped():
    a = Heartbeat("a", "127.0.0.1", 0, KEY)
    b = Heartbeat("b", "127.0.0.1", 0, KEY)
    stranger = Heartbeat("a", "127.0.0.1", 0, b"x" * 32)
    unsigned = Heartbeat("a", "127.0.0.1", 0)
    cap = _Capture()
    try:
        first = cap.take(a, {VM: (4, True)})
        assert b.accept(first, "10.0.0.1") and b.peer_vm("a", VM).qemu_alive is True
        assert not b.accept(first, "10.0.0.1"), "a replay must be dropped"
        # Another key, no signature, or an altered body: "QEMU exited" is not believed.
        for forged in (cap.take(stranger, {VM: (4, False)}),
                       cap.take(unsigned, {VM: (4, False)}),
                       cap.take(a, {VM: (4, True)}).replace(b"true", b"false")):
            assert not b.accept(forged, "10.0.0.66")
            assert b.peer_vm("a", VM).qemu_alive is True
        assert b.accept(cap.take(a, {VM: (4, False)}), "10.0.0.1")
        assert b.peer_vm("a", VM).qemu_alive is False
    finally:
        cap.sock.close()
        for hb in (a, b, stranger, unsigned):
            hb._sock.close()


def test_a_stale_signed_heartbeat_is_dropped(monkeypatch):
    a = Heartbeat("a", "127.0.0.1", 0, KEY)
    b = Heartbeat("b", "127.0.0.1", 0, KEY)
    cap = _Capture()
    try:
        monkeypatch.setattr(time, "time", lambda: 1_000_000.0)
        old = cap.take(a, {VM: (4, False)})
        monkeypatch.setattr(time, "time", lambda: 1_000_031.0)
        assert not b.accept(old, "10.0.0.1") and b.peer_vm("a", VM) is None
    finally:
        cap.sock.close()
        a._sock.close()
        b._sock.close()


@pytest.mark.parametrize("content, mode, words", [
    (b"k" * 32, 0o644, "chmod 600"),
    (b"short", 0o600, "at least 32"),
])
def test_heartbeat_key_file_must_be_private_and_long(tmp_path, content, mode, words):
    path = tmp_path / "hb.key"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(HeartbeatKeyError, match=words):
        read_key(str(path))
    with pytest.raises(HeartbeatKeyError, match="head -c 32 /dev/urandom"):
        read_key(str(tmp_path / "missing"))


def test_heartbeat_key_file_is_read_stripped(tmp_path):
    path = tmp_path / "hb.key"
    path.write_bytes(b"k" * 40 + b"\n")
    path.chmod(0o600)
    assert read_key(str(path)) == b"k" * 40


def test_probe_counts_refused_and_accepted_connections_as_a_live_host():
    """Silence (no answer at all) is covered by the partition tests, where a lab host's
    route to its peer is a blackhole."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]      # bound, not listening: connect is refused
        assert probe("127.0.0.1", port, 0.5) is True
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert probe("127.0.0.1", listening.getsockname()[1], 0.5) is True


def test_checkpoint_stats_from_stop_and_resume_timestamps():
    stats = CheckpointStats()
    t = time.monotonic()
    for i, (stop, resume) in enumerate([(10.0, 10.040), (12.0, 12.060)]):
        stats.on_event(Event("STOP", {}, stop, t, 2 * i))
        stats.on_event(Event("RESUME", {}, resume, t, 2 * i + 1))
    assert stats.total == 2
    assert stats.last_pause_ms() == pytest.approx(60.0)
    assert stats.pause_quantile_ms(0.5) == pytest.approx(60.0)
    assert stats.per_minute() == 2.0
    assert stats.lag_seconds() is not None and stats.lag_seconds() < 5


def test_copy_back_waits_for_the_winners_fencing_window():
    from vdsm_ft import copyback
    window = copyback.FENCE_WINDOW_S
    assert window > 3.0        # colo-compare's hold time (COMPARE_TIMEOUT_MS) and more
    assert copyback.old_primary_fenced(("h2", 100.0), "h2", 7, now=100.0) == window
    assert copyback.old_primary_fenced(("h2", 100.0), "h2", 7, now=100.0 + window) == 0
    with pytest.raises(copyback.NotYetSafe, match="h1, not this host"):
        copyback.old_primary_fenced(("h1", 100.0), "h2", 7, now=200.0)
    with pytest.raises(copyback.NotYetSafe, match="no live claim"):
        copyback.old_primary_fenced(None, "h2", 7, now=200.0)


def test_identity_start_failure_on_image_locks_names_the_missing_qemu_patch():
    locked = identity.start_failure('internal error: qemu unexpectedly closed the monitor: '
                                    'Failed to get "write" lock')
    assert "packaging/qemu/patches/0004-monitor-cont-in-inmigrate" in locked
    assert identity.start_failure("no space left") == \
        "the new domain did not start: no space left"


def test_the_host_record_is_rewritten_within_the_etcd_token_ttl_not_at_every_check(
        tmp_path, monkeypatch):
    """A failover's claim must not pay an etcd login (hostqemu.HOST_RECORD_REFRESH_S)."""
    class Arbiter:
        def __init__(self) -> None:
            self.puts = 0

        def put_host(self, record) -> None:
            self.puts += 1

    now = [1000.0]
    monkeypatch.setattr(hostqemu.time, "monotonic", lambda: now[0])
    config = types.SimpleNamespace(state_dir=str(tmp_path), host_id="host-a",
                                   qemu_emulator="/usr/bin/qemu-system-x86_64")
    arbiter = Arbiter()
    watch = hostqemu.HostQemu(config, arbiter, "1.0")
    watch.last = object()            # a probe result; the fake arbiter never encodes it
    watch.publish()
    for _ in range(10):              # the watch's 2 s checks
        now[0] += hostqemu.QEMU_CHECK_INTERVAL
        watch.publish()
    assert arbiter.puts == 1
    now[0] += hostqemu.HOST_RECORD_REFRESH_S
    watch.publish()
    assert arbiter.puts == 2
    assert hostqemu.HOST_RECORD_REFRESH_S < 300 / 2     # etcd's default --auth-token-ttl


class _SilentPeer:
    """Heartbeat's view of a peer whose last heartbeat came at `last_seen`."""

    def __init__(self, last_seen: float):
        self.last_seen = last_seen

    def peer_vm(self, host_id: str, vm_id: str) -> None:
        return None

    def silent_for(self, host_id: str) -> float:
        return time.monotonic() - self.last_seen


def _suspicion_monitor(monkeypatch, answers):
    """A Monitor whose probes of the peer's host answer as `answers()` says."""
    from vdsm_ft.agent import monitor as monitor_mod
    from vdsm_ft.hostconfig import HostConfig
    config = HostConfig(path="agent.conf", host_id="host-a",
                        replication_address="127.0.0.1",
                        etcd_endpoints=["http://127.0.0.1:2379"])
    monkeypatch.setattr(monitor_mod, "probe", lambda address, port, timeout: answers())
    heartbeat = _SilentPeer(time.monotonic())
    mon = monitor_mod.Monitor(config, None, None, heartbeat, None)
    peer = PeerSpec(host_id="host-b", agent_address="127.0.0.1", agent_port=1,
                    replication_address="127.0.0.1")
    rec = VmRecord(vm_id=VM, name="vm1", role=Role.PRIMARY, engine_xml="", peer=peer)
    return mon, rec, config


def test_an_agent_restart_on_a_lossy_link_is_not_a_lost_host(monkeypatch):
    """The secondary's agent restarts (no heartbeats) while its link drops a packet now
    and then: one unanswered probe must not fail over a pair whose COLO runs on (the
    nemesis soak saw a healthy secondary dropped that way). Every third probe is lost."""
    calls = iter(range(10 ** 6))
    mon, rec, config = _suspicion_monitor(monkeypatch, lambda: next(calls) % 3 != 2)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert mon._peer_suspicion(rec) == ""
        time.sleep(config.heartbeat_interval / 2)


def test_a_dead_host_is_still_found_once_silent_for_the_timeout(monkeypatch):
    mon, rec, config = _suspicion_monitor(monkeypatch, lambda: False)
    t0 = time.monotonic()
    while not mon._peer_suspicion(rec):
        assert time.monotonic() - t0 < config.heartbeat_timeout + 2 * \
            config.heartbeat_interval, "a dead host was not suspected in time"
        time.sleep(config.heartbeat_interval / 5)
    assert time.monotonic() - t0 > config.heartbeat_timeout
    assert "host-b" in mon._peer_suspicion(rec)
