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

from vdsm_ft import colo, domains, domxml, hostconfig, libvirtconn, replica
from vdsm_ft.agent import ports as portplan
from vdsm_ft.agent.controller import VmController, secondary_layout
from vdsm_ft.agent.heartbeat import Heartbeat, HeartbeatKeyError, probe, read_key
from vdsm_ft.agent.metrics import render_metrics
from vdsm_ft.agent.store import Store, VmRecord
from vdsm_ft.api import (AgentClient, AgentServer, Backend, BadRequest, Conflict,
                         HostStatus, NotFound, PeerSpec, PrepareSecondary, Role,
                         SecondaryReady, TlsFiles, Unavailable, VmState, VmStatus,
                         client_context)
from vdsm_ft.arbiter import ARBITER_BOUND_S, Arbiter, ArbiterError, check_fencing_budget
from vdsm_ft.hookapi import AgentRefused, HookBackend, kvm_gid, serve_hooks
from vdsm_ft.hooks import (ENGINE_XML, CachedQemuVersion, HookContext, StartRefused,
                           prepare_primary)
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


def _transport(tls: bool) -> str:
    return "TLS ([agent] colo_tls_dir set)" if tls else "plain TCP (no colo_tls_dir)"


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
        # What the start hook's work needs, kept warm across starts (docs/hooks.md).
        self._start_parts = HookContext({}, config=config, arbiter=self.arbiter,
                                        qemu_probe=CachedQemuVersion())
        self.tls = TlsFiles(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
        self._client_ctx = client_context(self.tls)
        self._clients: dict[tuple[str, int], AgentClient] = {}
        self._lock = threading.RLock()
        self._vms: dict[str, VmController] = {}
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

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "Agent":
        for record in self.store.load_all():
            self._vms[record.vm_id] = VmController(self, record)
        for ctl in self._vms.values():
            ctl.start()
            ctl.wake()
        self.discover()
        self.heartbeat.start()
        self.api = AgentServer((self.config.api_address, self.config.api_port), self,
                               self.tls)
        self.api.start()
        self.hooks = serve_hooks(self.config.hook_socket, self, kvm_gid())
        self._monitor.start()
        log.info("agent %s up: %d VMs, API %s:%d, replication %s", self.config.host_id,
                 len(self._vms), self.config.api_address, self.config.api_port,
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
        for ctl in list(self._vms.values()):
            ctl.stop()

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

    def allocate_ports(self, vm_id: str, side: str, count: int) -> list[int]:
        with self._lock:
            held = [p for c in self._vms.values() for ps in c.record.ports.values()
                    for p in ps]
            chosen = portplan.allocate(count, self.config.colo_ports, held,
                                       self.config.replication_address)
            ctl = self._vms[vm_id]
            ctl.update(ports={**ctl.record.ports, side: chosen})
            return chosen

    def release_ports(self, vm_id: str, side: str) -> None:
        with self._lock:
            ctl = self._vms.get(vm_id)
            if ctl is not None and side in ctl.record.ports:
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
        log.info("%s: forgetting (%s)", rec.name, reason)
        if rec.role is Role.SECONDARY:
            ctl.kill_qemu()
            replica.remove_secondary_disks(rec.vm_id, self.config.replica_dir,
                                           self.config.overlay_dir)
        with self._lock:
            self._vms.pop(rec.vm_id, None)
        self.store.delete(rec.vm_id)
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
            path = os.path.join(vms_dir, vm_id, ENGINE_XML)
            with self._lock:
                known = vm_id in self._vms
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
        with self._lock:
            ctls = list(self._vms.values())
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
        with self._lock:
            ours = {vm_id: ctl for vm_id, ctl in self._vms.items()
                    if ctl.record.role is Role.SECONDARY and vm_id in usage}
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
        with self._lock:
            ctl = self._vms.get(vm_id)
        if ctl is None:
            raise NotFound(f"VM {vm_id} is not known to the agent on "
                           f"{self.config.host_id}")
        return ctl

    def host_status(self) -> HostStatus:
        with self._lock:
            ctls = list(self._vms.values())
        return HostStatus(host_id=self.config.host_id,
                          replication_address=self.config.replication_address,
                          agent_version=VERSION, vms=tuple(c.status() for c in ctls))

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
            status = ctl.status()
            self.forget(ctl, reason="the primary dropped its secondary")
            return status
        ctl.update(disabled=True, suspended=False)
        ctl.wake()
        return ctl.status()

    def suspend(self, vm_id: str) -> VmStatus:
        ctl = self._primary(vm_id)
        ctl.update(disabled=True, suspended=True)
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
        ctl.kill_qemu()
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
        target = to or rec.peer
        ctl.update(disabled=True)
        ctl.wake()
        deadline = time.monotonic() + 60
        while ctl.record.state is not VmState.DISABLED and time.monotonic() < deadline:
            time.sleep(0.05)
        ctl.update(disabled=False, peer=target)
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

    def prepare_secondary(self, request: PrepareSecondary) -> SecondaryReady:
        mine = self.colo_tls() is not None
        if request.colo_tls != mine:
            raise Conflict(f"COLO transport mismatch: primary {request.primary.host_id} "
                           f"uses {_transport(request.colo_tls)}, {self.config.host_id} "
                           f"uses {_transport(mine)}; set [agent] colo_tls_dir on both "
                           "hosts or on neither")
        with self._lock:
            existing = self._vms.get(request.vm_id)
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
                          disk_sizes=tuple(size for _, size in sorted(request.disks)))
        ctl = VmController(self, record)
        with self._lock:
            self._vms[request.vm_id] = ctl
        self.store.save(record)
        try:
            return self._start_secondary(ctl, request)
        except Exception as exc:
            self.forget(ctl, reason=f"could not start: {exc}")
            if isinstance(exc, (replica.ReplicaError, portplan.PortsExhausted)):
                raise Unavailable(str(exc)) from None
            if isinstance(exc, (domains.DomainError, domxml.DomXmlError, QmpError,
                                colo.ColoError)):
                raise Conflict(f"the secondary did not start on "
                               f"{self.config.host_id}: {exc}") from None
            raise

    def _start_secondary(self, ctl: VmController, request: PrepareSecondary
                         ) -> SecondaryReady:
        run_dir = _qemu_dir(self.vm_run_dir(request.vm_id), self.config.qemu_user)
        migration_port, nbd_port = self.allocate_ports(request.vm_id, "secondary", 2)
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
        conn = libvirtconn.connect(self.config)
        try:
            version = conn.getVersion()
            xml = domxml.secondary_xml(request.domain_xml, run_dir, list(disks), ep,
                                       request.generation,
                                       (version // 1_000_000, version // 1000 % 1000,
                                        version % 1000), tls.dir if tls else None)
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
        with self._lock:
            ctls = list(self._vms.values())
        return render_metrics(self.config.host_id, ctls)

    # -- hook backend ------------------------------------------------------------------

    def prepare(self, vm_id: str, engine_xml: str) -> str:
        """The start hook's work, done here with lxml, etcd and QEMU's version warm."""
        self._refuse_beside_secondary(vm_id)    # before the run dir they share is touched
        try:
            primary_xml = prepare_primary(self._start_parts, vm_id, engine_xml)
        except StartRefused as exc:
            raise AgentRefused(str(exc)) from None
        self.register(vm_id, engine_xml)
        return primary_xml

    def _refuse_beside_secondary(self, vm_id: str) -> None:
        with self._lock:
            existing = self._vms.get(vm_id)
        if existing is not None and existing.record.role is Role.SECONDARY:
            # The hook protocol's refusal, so that the start is refused (rc 2) rather
            # than taken for an unreachable agent.
            raise AgentRefused(f"VM {vm_id} not started: it runs as a secondary on this "
                               "host, and a second copy here would split its brain")

    def register(self, vm_id: str, engine_xml: str) -> None:
        """Take on a primary that is about to start, or that `discover` found running."""
        layout = domxml.layout_from_domxml(engine_xml, "/")
        name = layout.name
        with self._lock:
            self._refuse_beside_secondary(vm_id)
            existing = self._vms.get(vm_id)
            if existing is not None:
                existing.stop()
        sizes = tuple(replica.virtual_size(d.image, d.fmt if d.fmt != "raw" else None)
                      for d in layout.disks)
        record = VmRecord(vm_id=vm_id, name=name, role=Role.PRIMARY, engine_xml=engine_xml,
                          domain=name, disk_sizes=sizes)
        self.store.save(record)
        ctl = VmController(self, record)
        with self._lock:
            self._vms[vm_id] = ctl
        ctl.start()

    def started(self, vm_id: str, live_xml: str | None) -> None:
        ctl = self._ctl(vm_id)
        ctl.update(launched=True)
        ctl.wake()

    def stopping(self, vm_id: str) -> None:
        with self._lock:
            ctl = self._vms.get(vm_id)
        if ctl is None:
            return                  # already forgotten (its QEMU died first): nothing to stop
        ctl.update(stopping=True)
        ctl.wake()

    def destroyed(self, vm_id: str) -> None:
        with self._lock:
            ctl = self._vms.get(vm_id)
        if ctl is None:
            return
        if ctl.record.stopping or ctl.record.state is VmState.DOWN:
            self.forget(ctl, reason="VDSM released the VM")
        else:
            ctl.wake()


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
