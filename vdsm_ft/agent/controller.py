"""One VM's reconcile loop on one host.

Level-triggered: each step observes the VM and takes one row of `states.TABLE`. Requests
(protect, unprotect, an intentional stop) only change the persisted record and wake the
loop; suspicion of the peer comes from the agent's monitor or from QEMU's COLO_EXIT.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from vdsm_ft import (colo, copyback, domains, domxml, emulator, identity, libvirtconn,
                     replica, runfiles)
from vdsm_ft.agent import states
from vdsm_ft.agent.states import Action
from vdsm_ft.agent.checkpoints import CheckpointStats
from vdsm_ft.agent.registry import NotOwner
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import VmRecord
from vdsm_ft.agent.traffic import TrafficMeter
from vdsm_ft.api import (COPYING_BACK, AgentClient, AgentError, Failover,
                         PrepareSecondary, Role, VmState, VmStatus)
from vdsm_ft.arbiter import ArbiterError, ArbiterUnavailable, CorruptClaim
from vdsm_ft.layout import IDENTITY_MIGRATION_SOCKET, Endpoints, VmLayout, qmp_socket
from vdsm_ft.qmp import Event, Qmp, QmpError

log = logging.getLogger(__name__)

TICK_S = 1.0
# A secondary releases no output while it waits, so when etcd cannot answer (an election
# after the leader's host died, an outage) it keeps asking instead of fencing itself at
# once; a primary may not wait (the timing rule, docs/arbiter.md).
SECONDARY_ARBITER_PATIENCE_S = 60.0
QMP_CONNECT_TIMEOUT = 5.0


WAITING_FOR_ARBITER = "waiting for the arbiter (etcd) to confirm this side"
# A stop while the engine's image is behind finishes the copy first, this long at most;
# one that could not is tried again this often.
STOP_COPY_BOUND_S = 120.0
STALE_RETRY_S = 30.0


# The engine XML of a VM never changes while its record lives, and a step asks for its
# layout several times: parsed once (a VmLayout is frozen). Parse errors are not cached.
_engine_layout = functools.lru_cache(maxsize=256)(domxml.layout_from_domxml)


class VmController:
    def __init__(self, services: Services[VmController], record: VmRecord):
        self.services = services
        self._record = record
        self.vm_id = record.vm_id
        self.epoch = record.epoch     # its owner epoch (vdsm_ft/agent/registry.py)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._removed = threading.Event()
        self.qmp: Qmp | None = None
        self.stats = CheckpointStats()
        self.traffic = TrafficMeter()
        # Corrupt live claims met in failovers, and the last one's ALERT. In memory: the
        # counter is a process counter (/metrics), and the engine keeps the one event
        # the poller posts for the ALERT.
        self.corrupt_claims = 0
        self._arbiter_alert = ""
        # (pid, start time) of this VM's QEMU as last seen; the loop, the monitor and
        # the API threads all ask, so it is read and written under _lock.
        self._qemu: tuple[int, int] | None = None
        self._peer_lost_at: float | None = None
        self._peer_lost_why = ""
        self._guest_shutdown = threading.Event()   # set by the QMP thread (_on_event)
        # VDSM released the VM while it finished a copy-back (hook_backend: destroyed).
        self.forget_when_down = False
        self._copy_attached = False   # this process started or resumed the copy-back
        self._stale_retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"vm-{record.vm_id[:8]}",
                                        daemon=True)

    # -- record ----------------------------------------------------------------------

    @property
    def record(self) -> VmRecord:
        with self._lock:
            return self._record

    def update(self, **changes: object) -> VmRecord:
        """Change and persist the record; NotOwner once this controller was removed or
        replaced, so that its writes never land over the new owner's."""
        with self._lock:
            record = self._record.evolve(**changes)
            self.services.save(self, record)
            self._record = record
            return record

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> "VmController":
        self._thread.start()
        return self

    def retire(self) -> None:
        """Removed or replaced (by the registry): the loop ends at its next look."""
        self._removed.set()
        self._wake.set()

    @property
    def retired(self) -> bool:
        return self._removed.is_set()

    def stop(self) -> None:
        self.retire()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._close_qmp()

    # -- observation -----------------------------------------------------------------

    def layout(self) -> VmLayout:
        rec = self.record
        base = _engine_layout(rec.engine_xml, self.run_dir)
        disks = tuple(replace(d, size=size) for d, size in zip(base.disks,
                                                               rec.disk_sizes))
        if rec.role is Role.SECONDARY or rec.on_replica:
            disks = tuple(self.services.replica_disk(rec.vm_id, d) for d in disks)
        return replace(base, name=rec.domain, disks=disks)

    def copyback_targets(self) -> tuple[copyback.Target, ...]:
        return copyback.targets(_engine_layout(self.record.engine_xml, "/"))

    @property
    def run_dir(self) -> str:
        return self.services.vm_run_dir(self.record.vm_id)

    def qemu_alive(self) -> bool:
        return self._qemu_pid() is not None

    def _qemu_pid(self) -> int | None:
        """The pid of this VM's live QEMU, or None; never a pid reused by another process
        since (kill_qemu sends SIGKILL to it)."""
        with self._lock:
            known = self._qemu
        if known is not None and domains.process_alive(known[0]) and \
                domains.start_time(known[0]) == known[1]:
            return known[0]
        if self.services.superseded(self):
            return None
        pid = domains.qemu_pid(self.record.domain)
        started = domains.start_time(pid) if pid is not None else None
        with self._lock:
            self._qemu = (pid, started) if pid is not None and started is not None else None
            return self._qemu[0] if self._qemu else None

    def ensure_qmp(self) -> Qmp | None:
        """This VM's QMP connection, made on first use; None while QEMU does not answer."""
        if self.qmp is not None:
            return self.qmp
        if not self.qemu_alive():
            return None
        qmp = Qmp(qmp_socket(self.run_dir, self.record.domain), self.record.domain)
        try:
            qmp.connect(timeout=QMP_CONNECT_TIMEOUT)
        except QmpError as exc:
            log.warning("%s: QMP not reachable yet: %s", self.record.name, exc)
            qmp.close()
            return None
        qmp.subscribe(self._on_event)
        with self._lock:
            # Another thread (a kill under the VM's lock) may have connected or closed
            # meanwhile: one connection at a time, swapped under the lock.
            if self.qmp is None:
                self.qmp = qmp
                return qmp
            kept = self.qmp
        qmp.close()
        return kept

    def _on_event(self, event: Event) -> None:
        self.stats.on_event(event)
        if event.name == "COLO_EXIT" and self.record.state is VmState.PROTECTED:
            self.peer_lost(f"COLO link lost ({event.data.get('reason')})")
        elif event.name == "SHUTDOWN" and event.data.get("guest"):
            # The guest powered off: an intentional stop on both sides, never a failure.
            # Only noted here (the QMP thread); the loop records it (observe).
            self._guest_shutdown.set()
            self.wake()

    def colo_mode(self) -> str | None:
        qmp = self.ensure_qmp()
        if qmp is None:
            return None
        try:
            return colo.colo_status(qmp)["mode"]
        except QmpError:
            return None

    def peer_lost(self, why: str) -> None:
        with self._lock:
            if self._peer_lost_at is None:
                self._peer_lost_at = time.monotonic()
                self._peer_lost_why = why
                log.warning("%s: peer suspected lost: %s", self.record.name, why)
        self.wake()

    def observe(self) -> states.Observation:
        if self._guest_shutdown.is_set() and not self.record.stopping:
            # Persisted before anything acts on it: after an agent restart, QEMU gone
            # with `stopping` set is a stop, not a crash.
            self.update(stopping=True)
        rec = self.record
        alive = self.qemu_alive()
        mode = self.colo_mode() if alive else None
        return states.Observation(
            is_primary=rec.role is Role.PRIMARY,
            launched=rec.launched,
            qemu_alive=alive,
            in_colo=mode == rec.role.value,
            stopping=rec.stopping,
            disable_requested=rec.disabled,
            peer_assigned=rec.peer is not None,
            peer_lost=self._peer_lost_at is not None,
            image_stale=rec.on_replica,
            move_requested=rec.move_to is not None,
            test_failover_requested=rec.test_failover,
            launch_overdue=self._launch_overdue(rec),
            dropped_by_primary=rec.dropped)

    def _launch_overdue(self, rec: VmRecord) -> bool:
        # Wall-clock time, persisted: the bound holds across agent restarts.
        return (rec.role is Role.PRIMARY and not rec.launched and
                time.time() - rec.prepared_at > self.services.config.launch_timeout)

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._removed.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._removed.is_set():
                return
            try:
                self.step()
            except NotOwner:
                return              # removed or replaced while it acted
            except Exception:  # one VM's failure must not stop its loop or the agent
                log.exception("%s: reconcile step failed", self.record.name)

    def step(self) -> None:
        seen = self.observe()
        rec = self.record
        row = states.next_row(rec.state, seen)
        if row is None:
            return
        if row.entering is not None:
            self._enter(row, row.entering)
        if row.action is Action.NONE:
            (result,) = row.leads_to
        else:
            result = states.check(row, self.ACTIONS[row.action](self))
        if self.retired:
            # The action removed the VM (forget): its record is gone and stays gone.
            return
        if self._enter(row, result):
            self.wake()  # the new state may have a row to take right away

    def _enter(self, row: states.Row, state: VmState) -> bool:
        """The one place a VM's state changes: to its row's `entering` state or to the
        action's checked outcome. False when it is in `state` already."""
        rec = self.record
        if state is rec.state:
            return False
        log.info("%s: %s -> %s (%s, %s)", rec.name, rec.state.value, state.value,
                 row.condition.value, row.action.value)
        self.update(state=state)
        self.services.state_changed(self)
        return True

    # -- actions (each returns the next state) ----------------------------------------

    def _do_mark_down(self) -> VmState:
        rec = self.record
        self._close_qmp()
        if rec.role is Role.SECONDARY:
            # A secondary's copy is only a replica; the primary decides what happens.
            self.services.forget(self, reason="secondary QEMU exited")
            return VmState.DOWN
        if rec.peer is not None:
            reason = f"QEMU exited; the secondary on {rec.peer.host_id} takes over"
        elif rec.on_replica:
            reason = "QEMU exited; " + self._copy_back_offline(STOP_COPY_BOUND_S)
        else:
            reason = (f"QEMU exited; the last copy of the data is on this host "
                      f"({self.services.config.host_id})")
        self.update(reason=reason)
        if rec.peer is None and rec.generation:
            self._record_down(reason)
        return VmState.DOWN

    def _do_forget(self) -> VmState:
        """A prepare that no domain followed (docs/hooks.md, "A `prepare` is provisional")."""
        self.services.forget(self, reason="libvirt ran no domain for it within [agent] "
                             f"launch_timeout ({self.services.config.launch_timeout:.0f} s) "
                             "of its prepare")
        return VmState.DOWN

    def _do_drop_secondary(self) -> VmState:
        """Its primary's unprotect (api_backend records it): QEMU, domain and disks go."""
        self.services.forget(self, reason="the primary dropped its secondary")
        return VmState.DOWN

    def _do_test_failover(self) -> VmState:
        # Killed first, then the request cleared: an agent that dies in between finds
        # the QEMU gone, whose row comes first.
        self.kill_qemu()
        self.update(test_failover=False)
        return VmState.PROTECTED

    def _do_teardown(self) -> VmState:
        rec = self.record
        if rec.role is Role.SECONDARY:
            self.services.forget(self, reason="stopped")
            return VmState.DOWN
        self._end_pair()
        reason = "stopped by the admin or the guest"
        if rec.on_replica:
            reason += "; " + self._finish_copy_back(STOP_COPY_BOUND_S)
        self.update(reason=reason, peer=None)
        if rec.generation:
            self._record_down(reason)
        return VmState.DOWN

    def _record_down(self, reason: str) -> None:
        """The pair is Down, unless the engine's image is still behind: then it stays
        this host's (Not Protected), so the start hook elsewhere refuses a start."""
        rec = self.record
        if not rec.on_replica:
            self.services.pair_down(rec, reason)
            return
        try:
            self.services.arbiter.update_pair(rec.vm_id, rec.generation,
                                              state="Not Protected", reason=reason[:512])
        except ArbiterError as exc:
            log.warning("%s: pair record not updated: %s", rec.name, exc)

    def _do_retry_copy_back(self) -> VmState:
        if time.monotonic() < self._stale_retry_at:
            return VmState.DOWN
        self._stale_retry_at = time.monotonic() + STALE_RETRY_S
        reason = "stopped; " + self._copy_back_offline(STOP_COPY_BOUND_S)
        self.update(reason=reason)
        if not self.record.on_replica:
            self.services.pair_down(self.record, reason)
            if self.forget_when_down:
                self.services.forget(self, reason="VDSM released the VM")
        return VmState.DOWN

    def _do_unprotect(self) -> VmState:
        if not self._end_pair():
            self.kill_qemu()
            self.update(peer=None, reason="the secondary had already taken over; this copy "
                        "stopped to avoid two live copies")
            return VmState.DOWN
        self.update(peer=None, reason="suspended by the admin" if self.record.suspended
                    else "protection turned off")
        return VmState.DISABLED

    def _do_move_secondary(self) -> VmState:
        """restart-secondary / migrate-secondary: end the pair on purpose, then protect
        onto the recorded peer from Need Secondary."""
        target = self.record.move_to
        if not self._end_pair():
            self.kill_qemu()
            self.update(peer=None, move_to=None, reason="the secondary had already taken "
                        "over; this copy stopped to avoid two live copies")
            return VmState.DOWN
        self.update(peer=target, move_to=None,
                    reason=f"the secondary moves to {target.host_id}")
        return VmState.NEED_SECONDARY

    def hold_generation(self) -> bool:
        """Win this pair's generation for this host (a claim it holds already is kept);
        False when the secondary won it first. Raises ArbiterError without an answer."""
        rec = self.record
        return self.services.arbiter.claim_live(rec.vm_id, rec.generation,
                                                self.services.config.host_id,
                                                timeout=self.services.arbiter_bound)

    def _end_pair(self) -> bool:
        """End protection on purpose, so that the secondary never mistakes it for a loss.

        The primary first wins the generation itself (the secondary can then only lose
        and kill itself), then drops the secondary, then leaves COLO. Returns False when
        the secondary had already won: this side must not run on.
        """
        rec = self.record
        if rec.peer is not None and rec.generation:
            try:
                if not self.hold_generation():
                    return False
            except ArbiterError as exc:
                log.warning("%s: ending protection without the arbiter: %s", rec.name, exc)
        self._drop_peer_secondary()
        self._leave_colo()
        return True

    def _do_abandon(self) -> VmState:
        qmp = self.ensure_qmp()
        if qmp is not None:
            colo.abandon(qmp, self.layout())
        self._drop_peer_secondary()
        self.update(peer=None, reason="protection was interrupted; it starts over")
        return VmState.NEED_SECONDARY

    def _do_protect(self) -> VmState:
        rec = self.update(reason="", move_to=None, test_failover=False)
        qmp = self.ensure_qmp()
        if qmp is None:
            # This side is the problem, not the peer: another peer would not help.
            self.update(peer=None, reason="the VM's private QMP socket does not answer; "
                        "check the VM's QEMU log, then turn FT off and on again")
            return VmState.NOT_PROTECTED
        peer = rec.peer
        layout = self.layout()
        try:
            generation = self.services.arbiter.begin_generation(
                rec.vm_id, self.services.config.host_id, peer.host_id, state="Syncing")
            ports = self.services.allocate_ports(self, "primary", 2 * len(layout.nics))
            self.update(generation=generation)
            client = self.services.peer_client(peer)
            ready = client.prepare_secondary(PrepareSecondary(
                vm_id=rec.vm_id, name=rec.name, generation=generation,
                primary=self.services.self_spec(), domain_xml=rec.engine_xml,
                disks=tuple((d.index, d.size) for d in layout.disks),
                nics=tuple((n.index, n.netdev, n.mac) for n in layout.nics),
                mirror_ports=tuple(ports[0::2]), compare_ports=tuple(ports[1::2]),
                colo_tls=self.services.colo_tls() is not None, qemu_build=rec.qemu_build,
                machine=rec.machine))
            self.update(peer_ports=(ready.migration_port, ready.nbd_port))
            ep = ready.endpoints(self.services.config.replication_address,
                                 peer.replication_address, tuple(ports[0::2]),
                                 tuple(ports[1::2]))
            colo.protect(qmp, layout, _RemoteSecondary(client, rec.vm_id), ep,
                         before_rewriter=rec.was_secondary,
                         checkpoint_delay_ms=colo.DEFAULT_CHECKPOINT_DELAY_MS,
                         tls=self.services.colo_tls(),
                         cancelled=lambda: self._protect_moot() is not None)
            self.services.arbiter.update_pair(rec.vm_id, generation, state="Protected",
                                              primary=self.services.config.host_id,
                                              secondary=peer.host_id)
        except colo.Cancelled:
            # The row that next matches (disable requested, or the stop's safety row)
            # takes it from Need Secondary.
            return self._protect_failed(f"protection onto {peer.host_id} cancelled: "
                                        f"{self._protect_moot()}")
        except (colo.ColoError, QmpError, AgentError, ArbiterError, OSError) as exc:
            return self._protect_failed(f"protection onto {peer.host_id} failed: {exc}")
        with self._lock:
            self._peer_lost_at = None
        return VmState.PROTECTED

    def _protect_moot(self) -> str | None:
        """Why a `protect` in progress no longer matters, or None: read from the record
        the requests write, so that it also holds while the loop is inside the action."""
        rec = self.record
        if rec.disabled:
            return "FT was turned off"
        if rec.stopping or self._guest_shutdown.is_set():
            return "the VM is stopping"
        return None

    def _protect_failed(self, reason: str) -> VmState:
        log.warning("%s: %s", self.record.name, reason)
        self._drop_peer_secondary()
        self.services.release_ports(self, "primary")
        self.update(peer=None, reason=reason)
        return VmState.NEED_SECONDARY

    def _do_fail_over(self) -> VmState:
        rec = self.record
        with self._lock:
            detected = self._peer_lost_at or time.monotonic()
            why = self._peer_lost_why
        me = self.services.config.host_id
        try:
            won = self.hold_generation()
            lost_to = "" if won else f"the other side won generation {rec.generation}"
        except ArbiterUnavailable as exc:
            waited = time.monotonic() - detected
            if rec.role is Role.SECONDARY and waited < SECONDARY_ARBITER_PATIENCE_S:
                if not rec.reason.startswith(WAITING_FOR_ARBITER):
                    log.warning("%s: %s (%s); asking again for up to %.0f s", rec.name,
                                WAITING_FOR_ARBITER, exc, SECONDARY_ARBITER_PATIENCE_S)
                self.update(reason=f"{WAITING_FOR_ARBITER} ({exc}); {why}")
                return VmState.FAILING_OVER
            won, lost_to = False, (f"the arbiter did not confirm this side in {waited:.1f} s "
                                   f"({exc})")
        except CorruptClaim as exc:
            # Claims are create-only, so nobody can win this generation any more and no
            # second copy can go live: the primary goes on alone, the secondary (only a
            # replica) stops. Fencing the primary on it would let one planted key turn
            # the next ordinary fault into the VM's loss (issue 16).
            alert = (f"ALERT: the arbiter's live claim is corrupt: {exc} (generation "
                     f"{rec.generation})")
            log.error("%s: %s", rec.name, alert)
            with self._lock:
                self.corrupt_claims += 1
                self._arbiter_alert = alert
            won, lost_to = rec.role is Role.PRIMARY, alert
            why = f"{why}; {alert}"
        except ArbiterError as exc:
            won, lost_to = False, f"the arbiter did not confirm this side ({exc})"
        if not won:
            # The fencing rule: never let two copies release output.
            self.kill_qemu()
            log.warning("%s: fenced itself: %s", rec.name, lost_to)
            if rec.role is Role.SECONDARY:
                self.services.forget(self, reason=lost_to)
            else:
                self.update(reason=f"stopped to avoid two live copies: {lost_to}")
            return VmState.DOWN
        arbitrated_ms = (time.monotonic() - detected) * 1000.0
        qmp = self.ensure_qmp()
        try:
            if qmp is None:
                raise QmpError("the VM's QMP socket does not answer")
            if rec.role is Role.PRIMARY:
                colo.failover_primary(qmp, self.layout())
            else:
                colo.failover_secondary(qmp, self.layout())
        except (colo.ColoError, QmpError) as exc:
            self.kill_qemu()
            self.update(reason=f"failover failed ({exc}); {why}")
            return VmState.DOWN
        took_ms = (time.monotonic() - detected) * 1000.0
        failover = Failover(at=time.time(), from_host=rec.peer.host_id if (
            rec.role is Role.SECONDARY and rec.peer) else me, to_host=me,
            duration_ms=took_ms, arbitration_ms=arbitrated_ms,
            old_primary_cannot_run=rec.role is Role.SECONDARY)
        self.services.release_ports(self, "secondary" if rec.role is Role.SECONDARY
                                    else "primary")
        # A secondary runs on its replica from here: the engine's image is behind
        # (docs/decisions.md, D2).
        self.update(role=Role.PRIMARY, was_secondary=rec.was_secondary or
                    rec.role is Role.SECONDARY, peer=None, failovers=rec.failovers + 1,
                    last_failover=failover, reason=f"failed over after: {why}",
                    on_replica=rec.on_replica or rec.role is Role.SECONDARY,
                    image_current_at=None if rec.role is Role.SECONDARY
                    else rec.image_current_at)
        with self._lock:
            self._peer_lost_at = None
        try:
            self.services.arbiter.update_pair(rec.vm_id, rec.generation,
                                              state="Need Secondary", primary=me,
                                              secondary=None)
        except ArbiterError as exc:
            log.warning("%s: pair record not updated after failover: %s", rec.name, exc)
        log.warning("%s: failed over in %.1f ms (%s)", rec.name, took_ms, why)
        if rec.role is Role.SECONDARY:
            return VmState.TAKING_IDENTITY
        return VmState.NEED_SECONDARY

    def _do_take_identity(self) -> VmState:
        """Move the survivor into a domain with the VM's own name, UUID and metadata
        (vdsm_ft/identity.py). Any failure leaves the survivor running where it was."""
        rec = self.record
        if rec.domain == rec.name:
            # Moved already; an agent restart cut the cleanup short.
            self._finish_identity(domxml.secondary_name(rec.name))
            return VmState.NEED_SECONDARY
        src = self.ensure_qmp()
        if src is None:
            self.update(reason=f"{rec.reason}; not moved into its own identity: the "
                        "survivor's QMP socket does not answer")
            return VmState.NEED_SECONDARY
        started = time.monotonic()
        old_domain, new_domain = rec.domain, rec.name
        src_layout = self.layout()
        try:
            moved = self._migrate_into(src, src_layout, new_domain)
        except (identity.IdentityError, QmpError, domains.DomainError,
                domxml.DomXmlError, libvirtconn.LibvirtConnectError,
                emulator.EmulatorError) as exc:
            why = f"not moved into its own identity ({exc}); it runs on as {old_domain}"
            log.warning("%s: %s", rec.name, why)
            self.update(reason=f"{rec.reason}; {why}")
            return VmState.NEED_SECONDARY
        failover = rec.last_failover
        if failover is not None:
            failover = replace(failover, domain=new_domain, identity_pause_ms=(
                moved.pause_ms if moved.pause_ms is not None else moved.downtime_ms))
        # The new domain is the VM from here on: recorded before the old one goes, so a
        # restarted agent never takes the old domain's end for the VM's.
        self.update(domain=new_domain, was_secondary=False, on_replica=True,
                    last_failover=failover)
        with self._lock:
            self._qemu = None
        log.warning("%s: runs as domain %s now (local migration %.0f ms, guest paused "
                    "%s ms, QEMU's downtime %.0f ms, %.0f ms in all)", rec.name, new_domain,
                    moved.total_ms, "?" if moved.pause_ms is None else
                    f"{moved.pause_ms:.0f}", moved.downtime_ms,
                    (time.monotonic() - started) * 1000)
        self._finish_identity(old_domain)
        return VmState.NEED_SECONDARY

    def _migrate_into(self, src: Qmp, src_layout: VmLayout,
                      new_domain: str) -> identity.Moved:
        rec = self.record
        t0 = time.monotonic()
        self.update(reason=f"{rec.reason}; waiting for the replica to take the overlays")
        identity.wait_committed(src, src_layout)
        t_commit = time.monotonic()
        if domains.qemu_pid(new_domain) is not None:
            # An attempt cut short by an agent restart. QEMU finished the migration by
            # itself if the survivor waits in postmigrate: then the new domain is the VM.
            if identity.run_state(src) == "postmigrate":
                return self._adopt_moved(src, new_domain)
            self.services.destroy_domain(new_domain)      # it never ran
        emu = self.services.emulator()
        if rec.qemu_build and emu.identity != rec.qemu_build:
            raise identity.IdentityError(
                f"{emu.path} is now build {emu.identity!r}, the survivor runs "
                f"{rec.qemu_build!r}: a migration between them is not safe")
        xml = domxml.identity_xml(rec.engine_xml, self.run_dir, src_layout.disks,
                                  emu.version, emulator=emu.path,
                                  machine=rec.machine or None)
        conn = libvirtconn.connect(self.services.config)
        try:
            self.update(reason=f"{rec.reason}; starting domain {new_domain}")
            runfiles.make_placeholders(xml)
            try:
                domains.start(conn, xml)
            except domains.DomainError as exc:
                raise identity.IdentityError(identity.start_failure(str(exc))) from None
        finally:
            conn.close()
        t_start = time.monotonic()
        dst = Qmp(qmp_socket(self.run_dir, new_domain), new_domain)
        try:
            dst.connect(timeout=QMP_CONNECT_TIMEOUT)
            self.update(reason=f"{rec.reason}; migrating into domain {new_domain}")
            moved = identity.migrate_local(
                src, dst, os.path.join(self.run_dir, IDENTITY_MIGRATION_SOCKET))
        except (identity.IdentityError, QmpError) as exc:
            dst.close()
            # Never two live copies: the new domain is dead before the survivor resumes.
            self.services.destroy_domain(new_domain)
            try:
                identity.resume_source(src)
            except (identity.IdentityError, QmpError) as again:
                raise identity.IdentityError(f"{exc}; and the survivor did not resume: "
                                             f"{again}") from None
            raise
        t_end = time.monotonic()
        log.info("%s: replica commit %.0f ms, domain start %.0f ms, migration and run "
                 "%.0f ms", rec.name, (t_commit - t0) * 1000, (t_start - t_commit) * 1000,
                 (t_end - t_start) * 1000)
        self.update(reason=rec.reason)
        self._use_qmp(dst)
        return moved

    def _adopt_moved(self, src: Qmp, new_domain: str) -> identity.Moved:
        info = src.execute("query-migrate")
        dst = Qmp(qmp_socket(self.run_dir, new_domain), new_domain)
        try:
            dst.connect(timeout=QMP_CONNECT_TIMEOUT)
            state = identity.run_state(dst)
        except QmpError:
            dst.close()
            raise
        if state != "running":
            dst.close()
            raise identity.IdentityError(f"the survivor waits in postmigrate but domain "
                                         f"{new_domain} is {state!r}; check both domains")
        self._use_qmp(dst)
        return identity.Moved(pause_ms=None, downtime_ms=float(info.get("downtime", 0)),
                              total_ms=float(info.get("total-time", 0)))

    def _finish_identity(self, old_domain: str) -> None:
        """The old domain (paused after the migration) and its overlays go. Its images
        are inactive and flushed, so it is killed at once rather than asked to quit."""
        pid = domains.qemu_pid(old_domain)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.services.destroy_domain(old_domain)
        replica.remove_overlays(self.record.vm_id, self.services.config.overlay_dir)

    def _do_copy_back(self) -> VmState:
        """One step of the copy-back (vdsm_ft.copyback): prove, start or resume, report,
        and once in sync pivot onto the engine's image. The loop takes a step a tick,
        so a stop or a crash is seen between steps."""
        rec = self.record
        qmp = self.ensure_qmp()
        to = self.copyback_targets()
        try:
            if qmp is None:
                raise copyback.CopybackError("the VM's QMP socket does not answer")
            layout = self.layout()
            if copyback.on_engine_image(qmp, layout, to):
                return self._image_current(qmp, layout, None)   # pivoted, then restarted
            running = {t.job for t in to} <= {
                j["id"] for j in qmp.execute("query-jobs")
                if j["status"] in ("running", "ready", "paused")}
            if running and not self._copy_attached:
                # Started by an earlier run of this agent: the job went on in QEMU.
                copyback.start(qmp, layout, to, self.services.config.copyback_rate)
                log.info("%s: copy-back resumed in QEMU", rec.name)
            elif not running:
                wait = self._fencing_wait()
                if wait > 0:
                    self.update(reason=f"{COPYING_BACK}: waiting {wait:.1f} s until the "
                                "old primary is provably fenced")
                    self._wake_in(wait)
                    return VmState.NOT_PROTECTED
                copyback.start(qmp, layout, to, self.services.config.copyback_rate)
                log.info("%s: copy-back started at %d bytes/s", rec.name,
                         self.services.config.copyback_rate)
            self._copy_attached = True
            p = copyback.progress(qmp, to)
            if not p.ready:
                self.update(reason=f"{COPYING_BACK}, {p.percent}%")
                return VmState.NOT_PROTECTED
            pivot = copyback.pivot(qmp, layout, to)
            return self._image_current(qmp, layout, pivot)
        except (copyback.CopybackError, QmpError, ArbiterError) as exc:
            log.warning("%s: copy-back: %s", rec.name, exc)
            self.update(reason=f"{COPYING_BACK} is held up: {exc}")
            return VmState.NOT_PROTECTED

    # Each row's action (states.Action) and the method that does it.
    ACTIONS: dict[Action, Callable[["VmController"], VmState]] = {
        Action.ABANDON: _do_abandon,
        Action.COPY_BACK: _do_copy_back,
        Action.DROP_SECONDARY: _do_drop_secondary,
        Action.FAIL_OVER: _do_fail_over,
        Action.FORGET: _do_forget,
        Action.MARK_DOWN: _do_mark_down,
        Action.MOVE_SECONDARY: _do_move_secondary,
        Action.PROTECT: _do_protect,
        Action.RETRY_COPY_BACK: _do_retry_copy_back,
        Action.TAKE_IDENTITY: _do_take_identity,
        Action.TEARDOWN: _do_teardown,
        Action.TEST_FAILOVER: _do_test_failover,
        Action.UNPROTECT: _do_unprotect,
    }

    def _fencing_wait(self) -> float:
        """Seconds until the arbiter proves the old primary fenced (copyback's rule);
        raises NotYetSafe or ArbiterError when it proves nothing yet."""
        rec = self.record
        return copyback.old_primary_fenced(
            self.services.arbiter.live_claim(rec.vm_id, rec.generation,
                                             timeout=self.services.arbiter_bound),
            self.services.config.host_id, rec.generation)

    def _await_fenced(self, deadline: float) -> str | None:
        """Wait (until `deadline`) for the proof before a stop's copy writes the image;
        None once proven, else why not."""
        why = "no answer"
        while time.monotonic() < deadline:
            try:
                wait = self._fencing_wait()
            except (copyback.CopybackError, ArbiterError) as exc:
                why = str(exc)
                time.sleep(0.5)
                continue
            if wait <= 0:
                return None
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        return f"the arbiter did not prove the old primary fenced: {why}"

    def _image_current(self, qmp: Qmp, layout: VmLayout,
                       pivot: copyback.PivotResult | None) -> VmState:
        """Verified on the engine's image: close and remove this host's replica."""
        rec = self.record
        copyback.verify(qmp, layout, self.copyback_targets())
        copyback.drop_replica_nodes(qmp, layout)
        self._replica_done()
        if pivot is not None:
            log.warning("%s: the storage-domain image is current again (cut-over %.1f ms, "
                        "guest running)", rec.name, pivot.cutover_ms)
        self.update(reason="")
        return VmState.NEED_SECONDARY

    def _replica_done(self) -> None:
        rec = self.record
        replica.remove_secondary_disks(rec.vm_id, self.services.config.replica_dir,
                                       self.services.config.overlay_dir)
        self.update(on_replica=False, image_current_at=time.time())
        self.services.image_made_current(rec.vm_id, rec.name, rec.generation)

    def _finish_copy_back(self, bound: float) -> str:
        """A stop while the image is behind: pivot online if the copy gets in sync in
        time, else (QEMU gone) copy the replica offline. Returns what happened."""
        deadline = time.monotonic() + bound
        unproven = self._await_fenced(deadline)
        if unproven is not None:
            return self._stale_left(unproven)
        qmp = self.ensure_qmp()
        to = self.copyback_targets()
        try:
            if qmp is not None and self.qemu_alive():
                layout = self.layout()
                copyback.start(qmp, layout, to, 0)
                copyback.wait_ready(qmp, to, max(0.0, deadline - time.monotonic()),
                                    interval=0.1)
                copyback.pivot(qmp, layout, to)
                copyback.verify(qmp, layout, to)
                copyback.drop_replica_nodes(qmp, layout)
                self._replica_done()
                return "the storage-domain image was made current before the stop"
        except (copyback.CopybackError, QmpError) as exc:
            log.warning("%s: online copy-back at stop: %s", self.record.name, exc)
        self._close_qmp()
        return self._copy_back_offline(max(1.0, deadline - time.monotonic()))

    def _copy_back_offline(self, bound: float) -> str:
        rec = self.record
        deadline = time.monotonic() + bound
        unproven = self._await_fenced(deadline)
        if unproven is not None:
            return self._stale_left(unproven)
        while self.qemu_alive():
            if time.monotonic() > deadline:
                return self._stale_left("the QEMU did not exit")
            time.sleep(0.1)
        try:
            for disk, t in zip(self.layout().disks, self.copyback_targets()):
                copyback.copy_offline(disk, t, max(1.0, deadline - time.monotonic()))
        except copyback.CopybackError as exc:
            return self._stale_left(str(exc))
        self._replica_done()
        log.warning("%s: the storage-domain image was made current from the replica",
                    rec.name)
        return "the storage-domain image was made current from this host's replica"

    def _stale_left(self, why: str) -> str:
        where = os.path.join(self.services.config.replica_dir, self.record.vm_id)
        return (f"the storage-domain image is NOT current ({why}): the newest data is in "
                f"{where} on host {self.services.config.host_id}; copy it onto the image "
                "(docs/operations.md, copy-back) before the VM starts again")

    def _wake_in(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self.wake)
        timer.daemon = True
        timer.start()

    # -- helpers ---------------------------------------------------------------------

    def kill_qemu(self) -> None:
        # A controller replaced while inside a long action may still get here. Under the
        # VM's lock no new owner is installed meanwhile (a prepare-secondary installs
        # under it), and once one is, this kills only the QEMU it saw itself: the new
        # owner's QEMU and domain go by the same name.
        with self.services.vm_lock(self.vm_id):
            pid = self._qemu_pid()
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._close_qmp()
            if not self.services.superseded(self):
                self.services.destroy_domain(self.record.domain)

    def _use_qmp(self, qmp: Qmp) -> None:
        """Make `qmp` (the moved domain's) this VM's connection; the old one closes."""
        qmp.subscribe(self._on_event)
        with self._lock:
            old, self.qmp = self.qmp, qmp
        if old is not None:
            old.close()

    def _close_qmp(self) -> None:
        with self._lock:
            qmp, self.qmp = self.qmp, None
        if qmp is not None:
            qmp.close()

    def _leave_colo(self) -> None:
        qmp = self.ensure_qmp()
        if qmp is None:
            return
        try:
            if colo.colo_status(qmp)["mode"] != "none":
                colo.unprotect(qmp, self.layout())
            else:
                colo.abandon(qmp, self.layout())
        except (colo.ColoError, QmpError) as exc:
            log.warning("%s: leaving COLO: %s", self.record.name, exc)
        self.services.release_ports(self, "primary")

    def _drop_peer_secondary(self) -> None:
        peer = self.record.peer
        if peer is None:
            return
        try:
            self.services.peer_client(peer).unprotect(self.record.vm_id)
        except AgentError as exc:
            log.warning("%s: peer %s did not drop its secondary: %s", self.record.name,
                        peer.host_id, exc)

    def status(self) -> VmStatus:
        rec = self.record
        if rec.state is VmState.STARTING and rec.role is Role.SECONDARY:
            # The primary polls this while it waits for COLO to begin: look now rather
            # than at the next tick.
            self.wake()
        me = self.services.config.host_id
        peer = rec.peer.host_id if rec.peer else None
        primary, secondary = (me, peer) if rec.role is Role.PRIMARY else (peer, me)
        sent = 0
        if rec.role is Role.PRIMARY and rec.peer is not None and rec.peer_ports:
            sent = self.traffic.read(rec.peer.replication_address, rec.peer_ports)
        return VmStatus(vm_id=rec.vm_id, name=rec.name, state=rec.state, role=rec.role,
                        reason=rec.reason, primary_host=primary, secondary_host=secondary,
                        generation=rec.generation, suspended=rec.suspended,
                        checkpoints_per_minute=self.stats.per_minute(),
                        last_checkpoint_pause_ms=self.stats.last_pause_ms(),
                        lag_seconds=self.stats.lag_seconds(),
                        replication_bytes=sent,
                        replication_bytes_per_second=self.traffic.rate if sent else 0.0,
                        failovers=rec.failovers, last_failover=rec.last_failover,
                        image_current_at=rec.image_current_at,
                        arbiter_alert=self._arbiter_alert)


class _RemoteSecondary:
    """The secondary behind the peer agent (it prepared it in prepare-secondary)."""

    def __init__(self, client: AgentClient, vm_id: str):
        self.client = client
        self.vm_id = vm_id

    def prepare(self, ep: Endpoints, checkpoint_delay_ms: int) -> None:
        """Done by the peer agent before it answered prepare-secondary."""

    def mode(self) -> str:
        status = self.client.vm_status(self.vm_id)
        return "secondary" if status.state is VmState.PROTECTED else "none"

