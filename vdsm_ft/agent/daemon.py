"""The per-host agent: the APIs' backend over one reconcile loop per VM.

It serves the poller and peer agents over HTTPS with mutual TLS (`vdsm_ft.api`) and the
hooks over a unix socket (`vdsm_ft.hookapi`), and wires the parts that do the work: the
registry of VM controllers, their services, the monitor, the secondary bring-up, this
host's QEMU probe and the image marks. State is persisted per VM, so a restarted agent
re-attaches to the running QEMUs and protection carries on without a failover.
"""
from __future__ import annotations

import logging
import os

from vdsm_ft import admission, colo, domxml, emulator, hostconfig, imagestate, replica
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.heartbeat import Heartbeat, read_key
from vdsm_ft.agent.hostqemu import HostQemu
from vdsm_ft.agent.imagemarks import ImageMarks
from vdsm_ft.agent.metrics import render_metrics
from vdsm_ft.agent.monitor import Monitor
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.secondary import Secondaries
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import ImageNotes, Store, VmRecord
from vdsm_ft.agenterrors import QEMU_INCAPABLE, AgentRefused, BadRequest, Conflict, NotFound
from vdsm_ft.api import (AgentServer, Backend, HostStatus, PeerSpec, PrepareSecondary, Role,
                         SecondaryReady, TlsFiles, VmState, VmStatus, client_context)
from vdsm_ft.arbiter import ARBITER_BOUND_S, Arbiter, ArbiterError, check_fencing_budget
from vdsm_ft.hookapi import HookBackend, kvm_gid, serve_hooks

log = logging.getLogger("vdsm_ft.agent")

VERSION = "0.1.0"


class Agent(Backend, HookBackend):
    def __init__(self, config: hostconfig.HostConfig):
        self.config = config
        detection_ms = int((config.heartbeat_timeout + config.heartbeat_interval) * 1000)
        check_fencing_budget(detection_ms, colo.COMPARE_TIMEOUT_MS)
        self.store = Store(os.path.join(config.state_dir, "vms"))
        self.arbiter = Arbiter(config.etcd_endpoints, ca_cert=config.etcd_ca,
                               cert=config.etcd_cert, key=config.etcd_key,
                               username=config.etcd_username, password=config.etcd_password)
        self.arbiter_bound = ARBITER_BOUND_S
        self.emulators = emulator.CachedEmulators()
        self.tls = TlsFiles(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
        self.registry: Registry[VmController] = Registry(self.store)
        self.image_marks = ImageMarks(config.host_id, self.arbiter, self.arbiter_bound,
                                      ImageNotes(os.path.join(config.state_dir,
                                                              "image-current")))
        self.services: Services[VmController] = Services(
            config, self.registry, self.arbiter, self.arbiter_bound, self.emulators,
            client_context(self.tls), self.image_marks.made_current)
        key = read_key(config.heartbeat_key_file) if config.heartbeat_key_file else None
        if key is None:
            log.warning("no [agent] heartbeat_key_file: heartbeats are unsigned, so anyone "
                        "on the replication network can forge them (docs/security.md)")
        self.heartbeat = Heartbeat(config.host_id, config.replication_address,
                                   config.api_port, key)
        self.host_qemu = HostQemu(config, self.arbiter, VERSION)
        self.monitor = Monitor(config, self.registry, self.services, self.heartbeat,
                               self._adopt)
        self.secondaries = Secondaries(config, self.services, self.registry,
                                       self._controller, self.host_qemu.capability)
        self.api: AgentServer | None = None
        self.hooks = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Agent":
        self.host_qemu.capability()
        for record in self.registry.load():
            if record.role is Role.SECONDARY and record.state is VmState.DOWN:
                # Written back after its forget by agents before the registry owned
                # removal; it would refuse the VM's start here (_refuse_beside_secondary).
                log.info("%s: dropping a leftover Down secondary record", record.name)
                self.store.delete(record.vm_id)
                replica.remove_secondary_disks(record.vm_id, self.config.replica_dir,
                                               self.config.overlay_dir)
                continue
            self.registry.install(record, self._controller).start().wake()
        self.monitor.discover()
        self.heartbeat.start()
        self.api = AgentServer((self.config.api_address, self.config.api_port), self,
                               self.tls)
        self.api.start()
        self.hooks = serve_hooks(self.config.hook_socket, self, kvm_gid())
        self.monitor.start()
        self.host_qemu.start()
        self.image_marks.start()
        log.info("agent %s up: %d VMs, API %s:%d, replication %s", self.config.host_id,
                 len(self.registry.all()), self.config.api_address, self.config.api_port,
                 self.config.replication_address)
        return self

    def stop(self) -> None:
        self.monitor.stop()
        self.host_qemu.stop()
        self.image_marks.stop()
        if self.api is not None:
            self.api.shutdown()
            self.api.server_close()
        if self.hooks is not None:
            self.hooks.close()
        self.heartbeat.stop()
        for ctl in self.registry.all():
            ctl.stop()

    def _controller(self, record: VmRecord) -> VmController:
        return VmController(self.services, record)

    def _adopt(self, vm_id: str, engine_xml: str) -> None:
        """A primary the monitor found running without a record (discover)."""
        self.register(vm_id, engine_xml)
        self.started(vm_id, None)

    # -- API backend (poller, CLI, peer agents) ----------------------------------------

    def _ctl(self, vm_id: str) -> VmController:
        ctl = self.registry.get(vm_id)
        if ctl is None:
            raise NotFound(f"VM {vm_id} is not known to the agent on "
                           f"{self.config.host_id}")
        return ctl

    def host_status(self) -> HostStatus:
        ctls = self.registry.all()
        return HostStatus(host_id=self.config.host_id,
                          replication_address=self.config.replication_address,
                          agent_version=VERSION, vms=tuple(c.status() for c in ctls),
                          qemu=self.host_qemu.last)

    def vm_status(self, vm_id: str) -> VmStatus:
        return self._ctl(vm_id).status()

    def protect(self, vm_id: str, peer: PeerSpec) -> VmStatus:
        ctl = self._ctl(vm_id)
        rec = ctl.record
        if rec.role is not Role.PRIMARY:
            raise Conflict(f"VM {vm_id} is the secondary here; protect its primary")
        if peer.host_id == self.config.host_id:
            raise BadRequest("the peer must be another host")
        if rec.peer is not None and rec.peer.host_id != peer.host_id:
            raise Conflict(f"VM {vm_id} is already paired with {rec.peer.host_id}")
        if rec.suspended:
            raise Conflict(f"protection of VM {vm_id} is suspended by an admin; resume it")
        if rec.state in (VmState.NEED_SECONDARY, VmState.NOT_PROTECTED, VmState.STARTING,
                         VmState.DISABLED):
            ctl.update(peer=peer, disabled=False)
            ctl.wake()
        return ctl.status()

    def unprotect(self, vm_id: str) -> VmStatus:
        ctl = self._ctl(vm_id)
        if ctl.record.role is Role.SECONDARY:
            # Forgotten here, not by its loop: the primary sends the next secondary's
            # prepare right after, and the old one's QEMU and disks must be gone by then.
            status = ctl.status()
            self.services.forget(ctl, reason="the primary dropped its secondary")
            return status
        _refuse_while_stale(ctl, "turned off")
        ctl.update(disabled=True, suspended=False, move_to=None)
        ctl.wake()
        return ctl.status()

    def suspend(self, vm_id: str) -> VmStatus:
        ctl = self._primary(vm_id)
        _refuse_while_stale(ctl, "suspended")
        ctl.update(disabled=True, suspended=True, move_to=None)
        ctl.wake()
        return ctl.status()

    def resume(self, vm_id: str) -> VmStatus:
        ctl = self._primary(vm_id)
        ctl.update(disabled=False, suspended=False)
        ctl.wake()
        return ctl.status()

    def test_failover(self, vm_id: str) -> VmStatus:
        """vSphere's test failover: the primary's QEMU goes, the secondary takes over."""
        ctl = self._primary(vm_id)
        if ctl.record.state is not VmState.PROTECTED:
            raise Conflict(f"VM {vm_id} is {ctl.record.state.value}, not Protected")
        # Recorded for the loop (row "test failover requested"), which kills the QEMU.
        ctl.update(test_failover=True)
        ctl.wake()
        return ctl.status()

    def restart_secondary(self, vm_id: str) -> VmStatus:
        return self._new_secondary(vm_id, None)

    def migrate_secondary(self, vm_id: str, to: PeerSpec) -> VmStatus:
        return self._new_secondary(vm_id, to)

    def _new_secondary(self, vm_id: str, to: PeerSpec | None) -> VmStatus:
        ctl = self._primary(vm_id)
        rec = ctl.record
        if rec.state is not VmState.PROTECTED or rec.peer is None:
            raise Conflict(f"VM {vm_id} is {rec.state.value}; it has no secondary to move")
        # Recorded for the loop (row "move requested"), answered at once: ending the pair
        # and the new resync take longer than a client waits.
        ctl.update(move_to=to or rec.peer)
        ctl.wake()
        return ctl.status()

    def _primary(self, vm_id: str) -> VmController:
        ctl = self._ctl(vm_id)
        if ctl.record.role is not Role.PRIMARY:
            raise Conflict(f"VM {vm_id} is the secondary on {self.config.host_id}; "
                           "ask the agent of its primary")
        return ctl

    def prepare_secondary(self, request: PrepareSecondary) -> SecondaryReady:
        return self.secondaries.prepare(request)

    def metrics(self) -> str:
        ctls = self.registry.all()
        return render_metrics(self.config.host_id, ctls)

    # -- hook backend ------------------------------------------------------------------

    def prepare(self, vm_id: str, engine_xml: str) -> str:
        """The start hook's work, done here with lxml, etcd and the QEMU's facts warm."""
        self._refuse_beside_secondary(vm_id)    # before the run dir they share is touched
        self._refuse_while_behind(vm_id)
        qemu = self.host_qemu.capability()
        if not qemu.capable:
            # The hook applies [hooks] qemu_incapable to this refusal.
            raise AgentRefused(f"VM {vm_id}: {qemu.reason}", code=QEMU_INCAPABLE)
        try:
            # The start hook's work, with this agent's arbiter and emulator cache warm
            # (docs/hooks.md).
            primary_xml = admission.prepare_primary(self.config, self.arbiter, self.emulators,
                                                    vm_id, engine_xml)
        except admission.StartRefused as exc:
            raise AgentRefused(str(exc)) from None
        self.register(vm_id, engine_xml)
        return primary_xml

    def _refuse_beside_secondary(self, vm_id: str) -> None:
        existing = self.registry.get(vm_id)
        if existing is not None and existing.record.role is Role.SECONDARY and (
                existing.record.state is not VmState.DOWN or existing.qemu_alive()):
            # The hook protocol's refusal, so that the start is refused (rc 2) rather
            # than taken for an unreachable agent.
            raise AgentRefused(f"VM {vm_id} not started: it runs as a secondary on this "
                               "host, and a second copy here would split its brain")

    def _refuse_while_behind(self, vm_id: str) -> None:
        existing = self.registry.get(vm_id)
        if existing is not None and existing.record.on_replica:
            # A new start would read the engine's image, which is behind
            # (docs/decisions.md, D2).
            why = existing.record.reason or "its storage-domain image is behind its replica"
            raise AgentRefused(f"VM {vm_id} not started: {why}")

    def image(self, vm_id: str, ft: str | None) -> str:
        """A start without FT: refused while the VM's storage-domain image is behind
        (vdsm_ft.imagestate), known here or from etcd."""
        ctl = self.registry.get(vm_id)
        try:
            if ctl is not None and ctl.record.on_replica:
                raise imagestate.ImageStale(imagestate.behind_here(
                    vm_id, ctl.record.reason or "copying back to the storage domain"))
            try:
                mark = self.arbiter.stale_image(vm_id, timeout=self.arbiter_bound)
            except ArbiterError as exc:
                return imagestate.decide(vm_id, ft, unknown=f"etcd: {exc}",
                                         ft_history=ctl is not None)
            if self.image_marks.noted_current(mark):
                # etcd was out when this host's copy-back ended: the image is current,
                # and the mark goes at the next retry (vdsm_ft.agent.imagemarks).
                mark = None
            return imagestate.decide(vm_id, ft, mark=mark)
        except imagestate.ImageStale as exc:
            raise AgentRefused(str(exc)) from None

    def register(self, vm_id: str, engine_xml: str) -> None:
        """Take on a primary that is about to start, or that `discover` found running."""
        layout = domxml.layout_from_domxml(engine_xml, "/")
        name = layout.name
        self._refuse_beside_secondary(vm_id)
        sizes = tuple(replica.virtual_size(d.image, d.fmt if d.fmt != "raw" else None)
                      for d in layout.disks)
        try:
            build, machine = self.services.qemu_of(engine_xml)
        except (emulator.EmulatorError, domxml.DomXmlError) as exc:
            # Only a VM found running (discover) gets here with a broken [qemu] emulator:
            # its secondary's host then checks nothing but its own QEMU.
            log.warning("%s: this host's QEMU is unknown: %s", name, exc)
            build, machine = "", ""
        record = VmRecord(vm_id=vm_id, name=name, role=Role.PRIMARY, engine_xml=engine_xml,
                          domain=name, disk_sizes=sizes, qemu_build=build, machine=machine)
        # A controller it had before is retired by the registry, and its writes refused:
        # no join here, its thread may be inside a long action.
        self.registry.install(record, self._controller).start()

    def started(self, vm_id: str, live_xml: str | None) -> None:
        ctl = self._ctl(vm_id)
        ctl.update(launched=True)
        ctl.wake()

    def stopping(self, vm_id: str) -> None:
        ctl = self.registry.get(vm_id)
        if ctl is None:
            return                  # already forgotten (its QEMU died first): nothing to stop
        rec = ctl.record
        if rec.role is Role.PRIMARY and rec.peer is not None and rec.generation:
            # VDSM kills QEMU as soon as before_vm_destroy returns, and the secondary
            # takes that for a crash and claims the generation. Hold it here, before
            # answering (claims are idempotent; the loop's teardown claims again): the
            # secondary can then only lose. Done by the loop alone, an admin stop became
            # a failover when the loop was slower than the secondary (seen in a loaded
            # run of test_admin_stop_tears_the_pair_down_and_is_never_a_failover).
            try:
                if not ctl.hold_generation():
                    log.warning("%s: stopped while its secondary took over generation %d",
                                rec.name, rec.generation)
            except ArbiterError as exc:
                log.warning("%s: stopping without the arbiter's claim: %s", rec.name, exc)
        ctl.update(stopping=True)
        ctl.wake()

    def destroyed(self, vm_id: str) -> None:
        ctl = self.registry.get(vm_id)
        if ctl is None:
            return
        if ctl.record.on_replica:
            # It is finishing (or retrying) the copy-back from its replica: forget it
            # once the engine's image is current.
            ctl.forget_when_down = True
            ctl.wake()
        elif ctl.record.stopping or ctl.record.state is VmState.DOWN:
            self.services.forget(ctl, reason="VDSM released the VM")
        else:
            ctl.wake()


def _refuse_while_stale(ctl: VmController, what: str) -> None:
    """Protection cannot end while the VM runs on its replica: the next start, without
    FT, would read the engine's image, which is behind (docs/decisions.md, D2)."""
    rec = ctl.record
    if rec.on_replica:
        why = rec.reason or "copying back to the storage domain"
        raise Conflict(f"VM {rec.vm_id} cannot be {what} now: {why}; retry once its "
                       "storage-domain image is current")
