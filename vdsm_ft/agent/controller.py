"""One VM's reconcile loop on one host.

Level-triggered: each step observes the VM and takes one row of `states.TABLE`. Requests
(protect, unprotect, an intentional stop) only change the persisted record and wake the
loop; suspicion of the peer comes from the agent's monitor or from QEMU's COLO_EXIT.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from vdsm_ft import colo, domains, domxml
from vdsm_ft.agent import states
from vdsm_ft.agent.checkpoints import CheckpointStats
from vdsm_ft.agent.store import VmRecord
from vdsm_ft.agent.traffic import TrafficMeter
from vdsm_ft.api import (AgentClient, AgentError, Failover, PrepareSecondary, Role,
                         VmState, VmStatus)
from vdsm_ft.arbiter import ArbiterError, ArbiterUnavailable
from vdsm_ft.layout import Disk, Endpoints, Nic, VmLayout
from vdsm_ft.qmp import Event, Qmp, QmpError

if TYPE_CHECKING:
    from vdsm_ft.agent.daemon import Agent

log = logging.getLogger(__name__)

TICK_S = 1.0
# A secondary releases no output while it waits, so when etcd cannot answer (an election
# after the leader's host died, an outage) it keeps asking instead of fencing itself at
# once; a primary may not wait (the timing rule, docs/arbiter.md).
SECONDARY_ARBITER_PATIENCE_S = 60.0
QMP_CONNECT_TIMEOUT = 5.0


WAITING_FOR_ARBITER = "waiting for the arbiter (etcd) to confirm this side"


class VmController:
    def __init__(self, agent: "Agent", record: VmRecord):
        self.agent = agent
        self._record = record
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._removed = threading.Event()
        self.qmp: Qmp | None = None
        self.stats = CheckpointStats()
        self.traffic = TrafficMeter()
        self._pid: int | None = None
        self._peer_lost_at: float | None = None
        self._peer_lost_why = ""
        self._thread = threading.Thread(target=self._run, name=f"vm-{record.vm_id[:8]}",
                                        daemon=True)

    # -- record ----------------------------------------------------------------------

    @property
    def record(self) -> VmRecord:
        with self._lock:
            return self._record

    def update(self, **changes: object) -> VmRecord:
        with self._lock:
            self._record = self._record.evolve(**changes)
            self.agent.store.save(self._record)
            return self._record

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> "VmController":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._removed.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self.qmp is not None:
            self.qmp.close()

    # -- observation -----------------------------------------------------------------

    def layout(self) -> VmLayout:
        rec = self.record
        base = domxml.layout_from_domxml(rec.engine_xml, self.run_dir)
        disks = tuple(replace(d, size=size) for d, size in zip(base.disks,
                                                               rec.disk_sizes))
        if rec.role is Role.SECONDARY or rec.was_secondary:
            disks = tuple(self.agent.replica_disk(rec.vm_id, d) for d in disks)
        return replace(base, name=rec.domain, disks=disks)

    @property
    def run_dir(self) -> str:
        return self.agent.vm_run_dir(self.record.vm_id)

    def qemu_alive(self) -> bool:
        if self._pid is not None and domains.process_alive(self._pid):
            return True
        self._pid = domains.qemu_pid(self.record.domain)
        return self._pid is not None

    def _ensure_qmp(self) -> Qmp | None:
        if self.qmp is not None:
            return self.qmp
        if not self.qemu_alive():
            return None
        qmp = Qmp(os.path.join(self.run_dir, "qmp.sock"), self.record.domain)
        try:
            qmp.connect(timeout=QMP_CONNECT_TIMEOUT)
        except QmpError as exc:
            log.warning("%s: QMP not reachable yet: %s", self.record.name, exc)
            qmp.close()
            return None
        qmp.subscribe(self._on_event)
        self.qmp = qmp
        return qmp

    def _on_event(self, event: Event) -> None:
        self.stats.on_event(event)
        if event.name == "COLO_EXIT" and self.record.state is VmState.PROTECTED:
            self.peer_lost(f"COLO link lost ({event.data.get('reason')})")
        elif event.name == "SHUTDOWN" and event.data.get("guest"):
            # The guest powered off: an intentional stop on both sides, never a failure.
            self.update(stopping=True)
            self.wake()

    def colo_mode(self) -> str | None:
        qmp = self._ensure_qmp()
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
            peer_lost=self._peer_lost_at is not None)

    # -- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._removed.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._removed.is_set():
                return
            try:
                self.step()
            except Exception:  # one VM's failure must not stop its loop or the agent
                log.exception("%s: reconcile step failed", self.record.name)

    def step(self) -> None:
        seen = self.observe()
        rec = self.record
        row = states.next_row(rec.state, seen)
        if row is None:
            return
        if row.action == "none":
            (result,) = row.leads_to
        else:
            action: Callable[[], VmState] = getattr(self, "_do_" + row.action)
            result = states.check(row, action())
        if result is not self.record.state:
            log.info("%s: %s -> %s (%s, %s)", rec.name, rec.state.value, result.value,
                     row.condition, row.action)
            self.update(state=result)
            self.agent.state_changed(self)
            self.wake()  # the new state may have a row to take right away

    # -- actions (each returns the next state) ----------------------------------------

    def _do_mark_down(self) -> VmState:
        rec = self.record
        self._close_qmp()
        if rec.role is Role.SECONDARY:
            # A secondary's copy is only a replica; the primary decides what happens.
            self.agent.forget(self, reason="secondary QEMU exited")
            return VmState.DOWN
        if rec.peer is not None:
            reason = f"QEMU exited; the secondary on {rec.peer.host_id} takes over"
        else:
            reason = (f"QEMU exited; the last copy of the data is on this host "
                      f"({self.agent.config.host_id})")
        self.update(reason=reason)
        if rec.peer is None and rec.generation:
            self.agent.pair_down(rec, reason)
        return VmState.DOWN

    def _do_teardown(self) -> VmState:
        rec = self.record
        if rec.role is Role.SECONDARY:
            self.agent.forget(self, reason="stopped")
            return VmState.DOWN
        self._end_pair()
        self.update(reason="stopped by the admin or the guest", peer=None)
        if rec.generation:
            self.agent.pair_down(rec, "stopped by the admin or the guest")
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

    def _end_pair(self) -> bool:
        """End protection on purpose, so that the secondary never mistakes it for a loss.

        The primary first wins the generation itself (the secondary can then only lose
        and kill itself), then drops the secondary, then leaves COLO. Returns False when
        the secondary had already won: this side must not run on.
        """
        rec = self.record
        if rec.peer is not None and rec.generation:
            try:
                if not self.agent.arbiter.claim_live(rec.vm_id, rec.generation,
                                                     self.agent.config.host_id,
                                                     timeout=self.agent.arbiter_bound):
                    return False
            except ArbiterError as exc:
                log.warning("%s: ending protection without the arbiter: %s", rec.name, exc)
        self._drop_peer_secondary()
        self._leave_colo()
        return True

    def _do_abandon(self) -> VmState:
        qmp = self._ensure_qmp()
        if qmp is not None:
            colo.abandon(qmp, self.layout())
        self._drop_peer_secondary()
        self.update(peer=None, reason="protection was interrupted; it starts over")
        return VmState.NEED_SECONDARY

    def _do_protect(self) -> VmState:
        rec = self.update(state=VmState.SYNCING, reason="")
        self.agent.state_changed(self)
        qmp = self._ensure_qmp()
        if qmp is None:
            # This side is the problem, not the peer: another peer would not help.
            self.update(peer=None, reason="the VM's private QMP socket does not answer; "
                        "check the VM's QEMU log, then turn FT off and on again")
            return VmState.NOT_PROTECTED
        peer = rec.peer
        layout = self.layout()
        try:
            generation = self.agent.arbiter.begin_generation(
                rec.vm_id, self.agent.config.host_id, peer.host_id, state="Syncing")
            ports = self.agent.allocate_ports(rec.vm_id, "primary", 2 * len(layout.nics))
            self.update(generation=generation)
            client = self.agent.peer_client(peer)
            ready = client.prepare_secondary(PrepareSecondary(
                vm_id=rec.vm_id, name=rec.name, generation=generation,
                primary=self.agent.self_spec(), domain_xml=rec.engine_xml,
                disks=tuple((d.index, d.size) for d in layout.disks),
                nics=tuple((n.index, n.netdev, n.mac) for n in layout.nics),
                mirror_ports=tuple(ports[0::2]), compare_ports=tuple(ports[1::2]),
                colo_tls=self.agent.colo_tls() is not None))
            self.update(peer_ports=(ready.migration_port, ready.nbd_port))
            ep = ready.endpoints(self.agent.config.replication_address,
                                 peer.replication_address, tuple(ports[0::2]),
                                 tuple(ports[1::2]))
            colo.protect(qmp, layout, _RemoteSecondary(client, rec.vm_id), ep,
                         before_rewriter=rec.was_secondary,
                         checkpoint_delay_ms=colo.DEFAULT_CHECKPOINT_DELAY_MS,
                         tls=self.agent.colo_tls())
            self.agent.arbiter.update_pair(rec.vm_id, generation, state="Protected",
                                           primary=self.agent.config.host_id,
                                           secondary=peer.host_id)
        except (colo.ColoError, QmpError, AgentError, ArbiterError, OSError) as exc:
            return self._protect_failed(f"protection onto {peer.host_id} failed: {exc}")
        with self._lock:
            self._peer_lost_at = None
        return VmState.PROTECTED

    def _protect_failed(self, reason: str) -> VmState:
        log.warning("%s: %s", self.record.name, reason)
        self._drop_peer_secondary()
        self.agent.release_ports(self.record.vm_id, "primary")
        self.update(peer=None, reason=reason)
        return VmState.NEED_SECONDARY

    def _do_fail_over(self) -> VmState:
        rec = self.update(state=VmState.FAILING_OVER)
        self.agent.state_changed(self)
        with self._lock:
            detected = self._peer_lost_at or time.monotonic()
            why = self._peer_lost_why
        me = self.agent.config.host_id
        try:
            won = self.agent.arbiter.claim_live(rec.vm_id, rec.generation, me,
                                                timeout=self.agent.arbiter_bound)
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
        except ArbiterError as exc:
            won, lost_to = False, f"the arbiter did not confirm this side ({exc})"
        if not won:
            # The fencing rule: never let two copies release output.
            self.kill_qemu()
            log.warning("%s: fenced itself: %s", rec.name, lost_to)
            if rec.role is Role.SECONDARY:
                self.agent.forget(self, reason=lost_to)
            else:
                self.update(reason=f"stopped to avoid two live copies: {lost_to}")
            return VmState.DOWN
        qmp = self._ensure_qmp()
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
            duration_ms=took_ms, old_primary_cannot_run=rec.role is Role.SECONDARY)
        self.agent.release_ports(rec.vm_id, "secondary" if rec.role is Role.SECONDARY
                                 else "primary")
        self.update(role=Role.PRIMARY, was_secondary=rec.was_secondary or
                    rec.role is Role.SECONDARY, peer=None, failovers=rec.failovers + 1,
                    last_failover=failover, reason=f"failed over after: {why}")
        with self._lock:
            self._peer_lost_at = None
        try:
            self.agent.arbiter.update_pair(rec.vm_id, rec.generation,
                                           state="Need Secondary", primary=me,
                                           secondary=None)
        except ArbiterError as exc:
            log.warning("%s: pair record not updated after failover: %s", rec.name, exc)
        log.warning("%s: failed over in %.1f ms (%s)", rec.name, took_ms, why)
        return VmState.NEED_SECONDARY

    # -- helpers ---------------------------------------------------------------------

    def kill_qemu(self) -> None:
        pid = self._pid or domains.qemu_pid(self.record.domain)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._close_qmp()
        self.agent.destroy_domain(self.record.domain)

    def _close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def _leave_colo(self) -> None:
        qmp = self._ensure_qmp()
        if qmp is None:
            return
        try:
            if colo.colo_status(qmp)["mode"] != "none":
                colo.unprotect(qmp, self.layout())
            else:
                colo.abandon(qmp, self.layout())
        except (colo.ColoError, QmpError) as exc:
            log.warning("%s: leaving COLO: %s", self.record.name, exc)
        self.agent.release_ports(self.record.vm_id, "primary")

    def _drop_peer_secondary(self) -> None:
        peer = self.record.peer
        if peer is None:
            return
        try:
            self.agent.peer_client(peer).unprotect(self.record.vm_id)
        except AgentError as exc:
            log.warning("%s: peer %s did not drop its secondary: %s", self.record.name,
                        peer.host_id, exc)

    def status(self) -> VmStatus:
        rec = self.record
        if rec.state is VmState.STARTING and rec.role is Role.SECONDARY:
            # The primary polls this while it waits for COLO to begin: look now rather
            # than at the next tick.
            self.wake()
        me = self.agent.config.host_id
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
                        failovers=rec.failovers, last_failover=rec.last_failover)


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


def secondary_layout(request: PrepareSecondary, run_dir: str,
                     disks: tuple[Disk, ...]) -> VmLayout:
    return VmLayout(vm_id=request.vm_id, name=domxml.secondary_name(request.name),
                    run_dir=run_dir, disks=disks,
                    nics=tuple(Nic(i, n, m) for i, n, m in request.nics))
