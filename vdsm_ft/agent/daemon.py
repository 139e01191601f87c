"""The per-host agent: one reconcile loop per VM, the APIs, heartbeats and the monitor.

It serves the poller and peer agents over HTTPS with mutual TLS (`vdsm_ft.api`) and the
hooks over a unix socket (`vdsm_ft.hookapi`). State is persisted per VM, so a restarted
agent re-attaches to the running QEMUs and protection carries on without a failover.
"""
from __future__ import annotations

import argparse
import logging
import os
import pwd
import signal
import threading
import time

from vdsm_ft import (admission, colo, domains, domxml, emulator, hostconfig, imagestate, libvirtconn,
                     qemu_probe, replica, runfiles)
from vdsm_ft.agent import ports as portplan
from vdsm_ft.agent.controller import VmController, secondary_layout
from vdsm_ft.agent.heartbeat import Heartbeat, HeartbeatKeyError, probe, read_key
from vdsm_ft.agent.metrics import render_metrics
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.store import ImageNote, ImageNotes, Store, StoreError, VmRecord
from vdsm_ft.agenterrors import (QEMU_INCAPABLE, AgentRefused, BadRequest, Conflict,
                                 NotFound, Unavailable)
from vdsm_ft.api import (AgentClient, AgentServer, Backend, HostStatus, PeerSpec,
                         PrepareSecondary, Role, SecondaryReady, TlsFiles, VmState,
                         VmStatus, client_context)
from vdsm_ft.arbiter import (ARBITER_BOUND_S, Arbiter, ArbiterError, HostRecord, StaleImage,
                             check_fencing_budget)
from vdsm_ft.hookapi import HookBackend, kvm_gid, serve_hooks
from vdsm_ft.layout import Disk, Endpoints
from vdsm_ft.qmp import QmpError

log = logging.getLogger("vdsm_ft.agent")

VERSION = "0.1.0"
# The peer prepares a whole secondary (disk images, domain start, QMP) in one call.
PREPARE_TIMEOUT = 120.0
# How often to look for FT VMs the start hook could not register.
DISCOVERY_INTERVAL = 5.0
# How often to measure the overlays against [storage] overlay_size_cap.
OVERLAY_CHECK_INTERVAL = 1.0
# How often to look whether the QEMU binary changed (then it is probed again), and to
# retry publishing the host record.
QEMU_CHECK_INTERVAL = 2.0
# How often to tell etcd again that a copy-back made an image current (ImageNotes).
IMAGE_MARK_RETRY_S = 30.0


def _transport(tls: bool) -> str:
    return "TLS ([agent] colo_tls_dir set)" if tls else "plain TCP (no colo_tls_dir)"


class Agent(Backend, HookBackend):
    def __init__(self, config: hostconfig.HostConfig):
        self.config = config
        detection_ms = int((config.heartbeat_timeout + config.heartbeat_interval) * 1000)
        check_fencing_budget(detection_ms, colo.COMPARE_TIMEOUT_MS)
        self.store = Store(os.path.join(config.state_dir, "vms"))
        self.image_notes = ImageNotes(os.path.join(config.state_dir, "image-current"))
        self.arbiter = Arbiter(config.etcd_endpoints, ca_cert=config.etcd_ca,
                               cert=config.etcd_cert, key=config.etcd_key,
                               username=config.etcd_username, password=config.etcd_password)
        self.arbiter_bound = ARBITER_BOUND_S
        self.emulators = emulator.CachedEmulators()
        self.tls = TlsFiles(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
        self._client_ctx = client_context(self.tls)
        self._clients: dict[tuple[str, int], AgentClient] = {}
        self._lock = threading.RLock()
        self.registry = Registry(self.store)
        self._stopped = threading.Event()
        key = read_key(config.heartbeat_key_file) if config.heartbeat_key_file else None
        if key is None:
            log.warning("no [agent] heartbeat_key_file: heartbeats are unsigned, so anyone "
                        "on the replication network can forge them (docs/security.md)")
        self.heartbeat = Heartbeat(config.host_id, config.replication_address,
                                   config.api_port, key)
        self.api: AgentServer | None = None
        self.hooks = None
        self._monitor = threading.Thread(target=self._monitor_loop, name="monitor",
                                         daemon=True)
        self._probed: dict[str, tuple[float, bool]] = {}
        self._overlay_warned = False
        # This host's QEMU, as last probed (kept across restarts in the state dir).
        self.qemu: qemu_probe.QemuCapability | None = qemu_probe.load(config.state_dir)
        self._qemu_lock = threading.Lock()
        self._published: qemu_probe.QemuCapability | None = None
        self._qemu_watch = threading.Thread(target=self._qemu_loop, name="qemu-probe",
                                            daemon=True)
        self._image_marks = threading.Thread(target=self._image_marks_loop,
                                             name="image-marks", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Agent":
        self.qemu_capability()
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
        self.discover()
        self.heartbeat.start()
        self.api = AgentServer((self.config.api_address, self.config.api_port), self,
                               self.tls)
        self.api.start()
        self.hooks = serve_hooks(self.config.hook_socket, self, kvm_gid())
        self._monitor.start()
        self._qemu_watch.start()
        self._image_marks.start()
        log.info("agent %s up: %d VMs, API %s:%d, replication %s", self.config.host_id,
                 len(self.registry.all()), self.config.api_address, self.config.api_port,
                 self.config.replication_address)
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self.api is not None:
            self.api.shutdown()
            self.api.server_close()
        if self.hooks is not None:
            self.hooks.close()
        self.heartbeat.stop()
        for ctl in self.registry.all():
            ctl.stop()

    # -- this host's QEMU -------------------------------------------------------------

    def qemu_capability(self) -> qemu_probe.QemuCapability:
        """The probe of `[qemu] emulator`, made again when the binary changed."""
        with self._qemu_lock:
            known = self.qemu
            if known is not None and known.path == self.config.qemu_emulator \
                    and known.current():
                return known
            result = qemu_probe.probe(self.config.qemu_emulator,
                                      os.path.join(self.config.state_dir, "probe"))
            if result.capable:
                log.info("QEMU %s (%s, %s) can do COLO (probed in %.0f ms)", result.path,
                         result.version, result.build, result.took_ms)
            else:
                log.error("FT VMs cannot run on this host: %s", result.reason)
            try:
                qemu_probe.save(self.config.state_dir, result)
            except OSError as exc:
                log.warning("QEMU probe result not kept in %s: %s", self.config.state_dir,
                            exc)
            self.qemu = result
        self.publish_host()
        return result

    def publish_host(self) -> None:
        """This host's record in the arbiter; retried by the QEMU watch until it lands."""
        qemu = self.qemu
        if qemu is None or qemu == self._published:
            return
        try:
            self.arbiter.put_host(HostRecord(host_id=self.config.host_id,
                                             agent_version=VERSION, qemu=qemu))
        except ArbiterError as exc:
            log.warning("host record not published (retried): %s", exc)
            return
        self._published = qemu

    def _qemu_loop(self) -> None:
        while not self._stopped.wait(QEMU_CHECK_INTERVAL):
            try:
                self.qemu_capability()
                self.publish_host()
            except Exception:   # the watch must outlive one bad probe
                log.exception("QEMU probe failed")

    # -- the storage-domain image's mark in etcd ---------------------------------------

    def image_made_current(self, vm_id: str, name: str, generation: int) -> None:
        """A verified copy-back: etcd may drop the image's stale mark. The note is kept
        until etcd took it, also across a stop (which forgets the VM) and an agent
        restart, so that an etcd outage at that moment cannot leave a current image
        refused for good."""
        if not generation:
            return
        note = ImageNote(vm_id, name, generation)
        self.image_notes.save(note)
        self._tell_image_current(note)

    def _tell_image_current(self, note: ImageNote) -> None:
        try:
            self.arbiter.image_current(note.vm_id, note.generation, self.config.host_id,
                                       timeout=self.arbiter_bound)
        except ArbiterError as exc:
            log.warning("%s: the arbiter still marks the storage-domain image stale "
                        "(retried in %.0f s): %s", note.name, IMAGE_MARK_RETRY_S, exc)
            return
        self.image_notes.delete(note.vm_id)

    def _image_marks_loop(self) -> None:
        # Its own thread: an etcd call may take the arbiter's whole bound, which neither
        # the monitor's heartbeats nor a VM's steps can wait for.
        while True:
            try:
                for note in self.image_notes.load_all():
                    self._tell_image_current(note)
            except StoreError:
                log.exception("image notes unreadable")
            if self._stopped.wait(IMAGE_MARK_RETRY_S):
                return

    def _image_noted_current(self, mark: StaleImage | None) -> bool:
        """This host verified a copy-back of the mark's generation or a later one."""
        if mark is None or mark.host != self.config.host_id:
            return False
        try:
            note = self.image_notes.get(mark.vm_id)
        except StoreError:
            return False
        return note is not None and note.generation >= mark.generation

    # -- services for controllers ------------------------------------------------------

    def vm_run_dir(self, vm_id: str) -> str:
        return os.path.join(self.config.run_dir, "vms", vm_id)

    def replica_disk(self, vm_id: str, disk: Disk) -> Disk:
        return replica.secondary_disk(vm_id, disk, self.config.replica_dir,
                                      self.config.overlay_dir)

    def self_spec(self) -> PeerSpec:
        return PeerSpec(host_id=self.config.host_id,
                        agent_address=self.config.replication_address,
                        agent_port=self.config.api_port,
                        replication_address=self.config.replication_address)

    def peer_client(self, peer: PeerSpec) -> AgentClient:
        key = (peer.agent_address, peer.agent_port)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = AgentClient(peer.agent_address, peer.agent_port,
                                                 self._client_ctx, timeout=PREPARE_TIMEOUT)
            return self._clients[key]

    def _controller(self, record: VmRecord) -> VmController:
        return VmController(self, record)

    def allocate_ports(self, ctl: VmController, side: str, count: int) -> list[int]:
        with self._lock:
            held = [p for c in self.registry.all() for ps in c.record.ports.values()
                    for p in ps]
            chosen = portplan.allocate(count, self.config.colo_ports, held,
                                       self.config.replication_address)
            ctl.update(ports={**ctl.record.ports, side: chosen})
            return chosen

    def release_ports(self, ctl: VmController, side: str) -> None:
        with self._lock:
            if side in ctl.record.ports:
                ctl.update(ports={k: v for k, v in ctl.record.ports.items() if k != side})

    def destroy_domain(self, name: str) -> None:
        try:
            conn = libvirtconn.connect(self.config)
        except libvirtconn.LibvirtConnectError as exc:
            # Only kill_qemu calls this, after it killed QEMU: libvirt reaps the domain
            # itself, and the caller's own error (e.g. the same login) is the one to report.
            log.warning("%s: not destroyed through libvirt: %s", name, exc)
            return
        try:
            domains.destroy(conn, name)
        finally:
            conn.close()

    def state_changed(self, ctl: VmController) -> None:
        rec = ctl.record
        if ctl.forget_when_down and rec.state is VmState.DOWN and not rec.on_replica:
            self.forget(ctl, reason="VDSM released the VM")
            return
        if rec.role is not Role.PRIMARY or not rec.generation:
            return
        try:
            self.arbiter.update_pair(rec.vm_id, rec.generation, state=rec.state.value,
                                     reason=rec.reason[:512])
        except ArbiterError as exc:
            log.debug("%s: pair state not recorded: %s", rec.name, exc)

    def pair_down(self, rec: VmRecord, reason: str) -> None:
        try:
            self.arbiter.update_pair(rec.vm_id, rec.generation, state="Down",
                                     reason=reason[:512])
        except ArbiterError as exc:
            log.warning("%s: could not record the pair as Down: %s", rec.name, exc)

    def forget(self, ctl: VmController, reason: str) -> None:
        """Remove a secondary (or a stopped VM) and everything it held on this host."""
        rec = ctl.record
        if not self.registry.remove(ctl):
            # Removed or replaced already: what it held belongs to the new owner.
            return
        log.info("%s: forgetting (%s)", rec.name, reason)
        if rec.role is Role.SECONDARY:
            ctl.kill_qemu()
            replica.remove_secondary_disks(rec.vm_id, self.config.replica_dir,
                                           self.config.overlay_dir)
        threading.Thread(target=ctl.stop, daemon=True).start()

    def discover(self) -> None:
        """Adopt FT VMs that started while this agent was down.

        The start hook keeps each VM's engine XML in its run dir; a live QEMU for it
        without a record here means the hook could not register it.
        """
        vms_dir = os.path.join(self.config.run_dir, "vms")
        try:
            entries = os.listdir(vms_dir)
        except FileNotFoundError:
            return
        for vm_id in entries:
            path = os.path.join(vms_dir, vm_id, admission.ENGINE_XML)
            known = self.registry.get(vm_id) is not None
            if known or not os.path.exists(path):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    engine_xml = f.read()
                name = domxml.layout_from_domxml(engine_xml, "/").name
            except (OSError, domxml.DomXmlError) as exc:
                log.warning("ignoring %s: %s", path, exc)
                continue
            if domains.qemu_pid(name) is None:
                continue
            log.info("%s: found running without a record; adopting it", name)
            self.register(vm_id, engine_xml)
            self.started(vm_id, None)

    # -- monitor: heartbeats out, liveness in ------------------------------------------

    def _monitor_loop(self) -> None:
        interval = self.config.heartbeat_interval
        next_discovery = time.monotonic() + DISCOVERY_INTERVAL
        next_overlay_check = time.monotonic()
        while not self._stopped.wait(interval):
            try:
                self._monitor_once()
                if time.monotonic() > next_overlay_check:
                    next_overlay_check = time.monotonic() + OVERLAY_CHECK_INTERVAL
                    self.enforce_overlay_cap()
                if time.monotonic() > next_discovery:
                    next_discovery = time.monotonic() + DISCOVERY_INTERVAL
                    self.discover()
            except Exception:  # the monitor must outlive any single bad record
                log.exception("monitor step failed")

    def _monitor_once(self) -> None:
        beats: dict[tuple[str, int], dict[str, tuple[int, bool]]] = {}
        ctls = self.registry.all()
        for ctl in ctls:
            rec = ctl.record
            alive = ctl.qemu_alive() if rec.launched else True
            if rec.launched and not alive and rec.state is not VmState.DOWN:
                ctl.wake()
            if rec.peer is None or rec.state not in (VmState.STARTING, VmState.SYNCING,
                                                     VmState.PROTECTED):
                continue
            key = (rec.peer.replication_address, rec.peer.agent_port)
            beats.setdefault(key, {})[rec.vm_id] = (rec.generation, alive)
            why = self._peer_suspicion(rec)
            if why:
                ctl.peer_lost(why)
        for (address, port), vms in beats.items():
            self.heartbeat.send(address, port, vms)

    def enforce_overlay_cap(self) -> None:
        """Overlays are RAM: past the cap, drop the secondary whose overlays take most.
        Its primary sees COLO break, runs on alone and asks for a new secondary."""
        usage = replica.overlay_usage(self.config.overlay_dir)
        total, cap = sum(usage.values()), self.config.overlay_size_cap
        if total <= cap:
            self._overlay_warned = False
            return
        ours = {ctl.vm_id: ctl for ctl in self.registry.all()
                if ctl.record.role is Role.SECONDARY and ctl.vm_id in usage}
        why = (f"this host's overlays take {replica.mib(total)} in "
               f"{self.config.overlay_dir}, over [storage] overlay_size_cap "
               f"({replica.mib(cap)})")
        if not ours:
            if not self._overlay_warned:
                log.warning("%s, but no secondary of this agent holds them", why)
                self._overlay_warned = True
            return
        vm_id = max(ours, key=lambda v: usage[v])
        ctl = ours[vm_id]
        log.warning("%s: dropping this secondary: its overlays take %s; %s",
                    ctl.record.name, replica.mib(usage[vm_id]), why)
        self.forget(ctl, reason=f"dropped: {why}")

    def _peer_suspicion(self, rec: VmRecord) -> str:
        peer = rec.peer
        vm = self.heartbeat.peer_vm(peer.host_id, rec.vm_id)
        if vm is not None and vm.generation == rec.generation and not vm.qemu_alive:
            return f"{peer.host_id} reports its QEMU for this VM exited"
        silent = self.heartbeat.silent_for(peer.host_id)
        if silent <= self.config.heartbeat_timeout:
            return ""
        # Silence alone may be an agent restart; a host whose kernel answers is alive.
        now = time.monotonic()
        last = self._probed.get(peer.host_id)
        if last is None or now - last[0] > self.config.heartbeat_interval:
            answered = probe(peer.agent_address, peer.agent_port,
                             self.config.heartbeat_interval)
            self._probed[peer.host_id] = (now, answered)
        else:
            answered = last[1]
        if answered:
            return ""
        return (f"no heartbeat from {peer.host_id} for {silent * 1000:.0f} ms and its "
                "host does not answer")

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
                          qemu=self.qemu)

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
            self.forget(ctl, reason="the primary dropped its secondary")
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

    def colo_tls(self) -> colo.ColoTls | None:
        """This host's COLO TLS creds (`[agent] colo_tls_dir`), or None: plain TCP."""
        if self.config.colo_tls_dir is None:
            return None
        return colo.ColoTls(self.config.colo_tls_dir, self.config.qemu_user)

    def emulator(self) -> emulator.Emulator:
        """This host's FT QEMU (`[qemu] emulator`); EmulatorError says what is wrong."""
        return self.emulators(self.config.qemu_emulator)

    def qemu_of(self, engine_xml: str) -> tuple[str, str]:
        """(build identity, machine type) an FT VM of `engine_xml` gets here."""
        emu = self.emulator()
        return emu.identity, emulator.colo_machine(domxml.engine_machine(engine_xml), emu)

    def _secondary_qemu(self, request: PrepareSecondary) -> tuple[emulator.Emulator, str]:
        """This host's QEMU and the machine type for the secondary, or Conflict when it
        cannot pair with the primary's QEMU: refused before anything is started."""
        primary = request.primary.host_id
        qemu = self.qemu_capability()
        if not qemu.capable:
            raise Conflict(f"{self.config.host_id} cannot run the secondary: {qemu.reason}")
        try:
            emu = self.emulator()
        except emulator.EmulatorError as exc:
            raise Conflict(f"{self.config.host_id} cannot run the secondary: {exc}") from None
        if request.qemu_build and request.qemu_build != emu.identity:
            raise Conflict(f"QEMU builds differ: primary {primary} runs "
                           f"{request.qemu_build!r}, {self.config.host_id} has "
                           f"{emu.identity!r} ({emu.path}); both hosts of a pair need the "
                           "same vdsm-ft-qemu build (docs/qemu.md)")
        try:
            machine = emulator.colo_machine(request.machine or domxml.engine_machine(
                request.domain_xml), emu)
        except (emulator.EmulatorError, domxml.DomXmlError) as exc:
            raise Conflict(f"{self.config.host_id} cannot run the secondary: {exc}") from None
        if request.machine and machine != request.machine:
            raise Conflict(f"{emu.path} on {self.config.host_id} has no machine type "
                           f"{request.machine}, which the primary on {primary} runs")
        return emu, machine

    def prepare_secondary(self, request: PrepareSecondary) -> SecondaryReady:
        mine = self.colo_tls() is not None
        if request.colo_tls != mine:
            raise Conflict(f"COLO transport mismatch: primary {request.primary.host_id} "
                           f"uses {_transport(request.colo_tls)}, {self.config.host_id} "
                           f"uses {_transport(mine)}; set [agent] colo_tls_dir on both "
                           "hosts or on neither")
        emu, machine = self._secondary_qemu(request)
        existing = self.registry.get(request.vm_id)
        if existing is not None:
            if existing.record.role is Role.PRIMARY and existing.qemu_alive():
                raise Conflict(f"VM {request.vm_id} runs as primary on "
                               f"{self.config.host_id}; it cannot be its own secondary")
            # A secondary of an older generation, or a primary that died here (a host
            # that came back after a crash): the new pairing replaces it.
            self.forget(existing, reason="replaced by a new generation")
        try:
            domxml.layout_from_domxml(request.domain_xml, "/")
        except domxml.DomXmlError as exc:
            raise BadRequest(f"the VM's domain XML is not usable: {exc}") from None
        record = VmRecord(vm_id=request.vm_id, name=request.name, role=Role.SECONDARY,
                          engine_xml=request.domain_xml,
                          domain=domxml.secondary_name(request.name),
                          generation=request.generation, peer=request.primary,
                          disk_sizes=tuple(size for _, size in sorted(request.disks)),
                          qemu_build=emu.identity, machine=machine)
        ctl = self.registry.install(record, self._controller)
        try:
            return self._start_secondary(ctl, request, emu)
        except Exception as exc:
            self.forget(ctl, reason=f"could not start: {exc}")
            if isinstance(exc, (replica.ReplicaError, portplan.PortsExhausted)):
                raise Unavailable(str(exc)) from None
            if isinstance(exc, (domains.DomainError, domxml.DomXmlError, QmpError,
                                colo.ColoError)):
                raise Conflict(f"the secondary did not start on "
                               f"{self.config.host_id}: {exc}") from None
            raise

    def _start_secondary(self, ctl: VmController, request: PrepareSecondary,
                         emu: emulator.Emulator) -> SecondaryReady:
        run_dir = _qemu_dir(self.vm_run_dir(request.vm_id), self.config.qemu_user)
        migration_port, nbd_port = self.allocate_ports(ctl, "secondary", 2)
        ep = Endpoints(primary_host=request.primary.replication_address,
                       secondary_host=self.config.replication_address,
                       migration_port=migration_port, nbd_port=nbd_port,
                       mirror_ports=request.mirror_ports,
                       compare_ports=request.compare_ports)
        tls = self.colo_tls()
        if tls is not None:     # before QEMU starts: its own error would be less clear
            colo.check_tls_dir(tls, colo.TLS_SERVER_FILES + colo.TLS_CLIENT_FILES)
        base = domxml.layout_from_domxml(request.domain_xml, run_dir)
        sized = tuple(Disk(index=d.index, image=d.image, size=size, fmt=d.fmt)
                      for d, (_, size) in zip(base.disks, sorted(request.disks)))
        disks = replica.create_secondary_disks(
            request.vm_id, sized, _qemu_dir(self.config.replica_dir, self.config.qemu_user),
            _qemu_dir(self.config.overlay_dir, self.config.qemu_user),
            self.config.qemu_user, self.config.overlay_size_cap)
        xml = domxml.secondary_xml(request.domain_xml, run_dir, list(disks), ep,
                                   request.generation, emu.version, tls.dir if tls else None,
                                   emulator=emu.path, machine=ctl.record.machine)
        conn = libvirtconn.connect(self.config)
        try:
            runfiles.make_placeholders(xml)
            domains.start(conn, xml)
        finally:
            conn.close()
        ctl.update(launched=True)
        qmp = ctl._ensure_qmp()
        if qmp is None:
            raise QmpError("the secondary's QMP socket does not answer")
        colo.prepare_secondary(qmp, secondary_layout(request, run_dir, disks), ep,
                               colo.DEFAULT_CHECKPOINT_DELAY_MS, tls)
        ctl.start()
        return SecondaryReady(vm_id=request.vm_id, generation=request.generation,
                              migration_port=migration_port, nbd_port=nbd_port)

    def metrics(self) -> str:
        ctls = self.registry.all()
        return render_metrics(self.config.host_id, ctls)

    # -- hook backend ------------------------------------------------------------------

    def prepare(self, vm_id: str, engine_xml: str) -> str:
        """The start hook's work, done here with lxml, etcd and the QEMU's facts warm."""
        self._refuse_beside_secondary(vm_id)    # before the run dir they share is touched
        self._refuse_while_behind(vm_id)
        qemu = self.qemu_capability()
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
            if self._image_noted_current(mark):
                # etcd was out when this host's copy-back ended: the image is current,
                # and the mark goes at the next retry (_image_marks_loop).
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
            build, machine = self.qemu_of(engine_xml)
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
            self.forget(ctl, reason="VDSM released the VM")
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


def _qemu_dir(path: str, user: str) -> str:
    os.makedirs(path, mode=0o750, exist_ok=True)
    owner = pwd.getpwnam(user)
    os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdsm-ft-agent",
                                     description="vdsm-ft per-host agent")
    parser.add_argument("--config", help="host config file (default: $VDSM_FT_CONFIG "
                        f"or {hostconfig.DEFAULT_PATH})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # qemu.qmp logs every refused connect as an error; vdsm_ft.qmp reports the outcome.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        config = hostconfig.load(args.config)
        agent = Agent(config)
    except (hostconfig.ConfigError, HeartbeatKeyError) as exc:
        log.error("%s", exc)
        return 2
    agent.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    agent.stop()
    return 0
