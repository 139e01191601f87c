"""What a VM's controller may use of its host, passed in by the agent's wiring.

Controllers get everything outside their own VM from here: the registry's record writes
and removal (under a per-VM lock that a prepare-secondary shares), COLO ports, peer
agents, this host's spec, QEMU and COLO TLS, replica paths, libvirt's destroy and the
arbiter. None of it reaches back into the agent's APIs.
"""
from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

from vdsm_ft import colo, domains, domxml, emulator, hostconfig, libvirtconn, replica
from vdsm_ft.agent import ports as portplan
from vdsm_ft.agent.registry import Owned, Registry
from vdsm_ft.agent.store import VmRecord
from vdsm_ft.api import AgentClient, PeerSpec, Role, VmState
from vdsm_ft.arbiter import Arbiter, ArbiterError
from vdsm_ft.layout import Disk

log = logging.getLogger("vdsm_ft.agent")

# The peer prepares a whole secondary (disk images, domain start, QMP) in one call.
PREPARE_TIMEOUT = 120.0


class Controlled(Owned, Protocol):
    """What these services need of a controller (vdsm_ft.agent.controller.VmController)."""

    forget_when_down: bool

    @property
    def record(self) -> VmRecord: ...

    def update(self, **changes: object) -> VmRecord: ...

    def kill_qemu(self) -> None: ...

    def stop(self) -> None: ...


C = TypeVar("C", bound=Controlled)


class Services(Generic[C]):
    def __init__(self, config: hostconfig.HostConfig, registry: Registry[C],
                 arbiter: Arbiter, arbiter_bound: float, emulators: emulator.CachedEmulators,
                 client_ctx: ssl.SSLContext,
                 image_made_current: Callable[[str, str, int], None]):
        self.config = config
        self._registry = registry
        self.arbiter = arbiter
        self.arbiter_bound = arbiter_bound
        self._emulators = emulators
        self._client_ctx = client_ctx
        self._image_made_current = image_made_current
        self._clients: dict[tuple[str, int], AgentClient] = {}
        # Ports are chosen against every controller's record: one choice at a time.
        self._lock = threading.RLock()
        # vm_id -> (lock, holders and waiters): an entry goes with its last user, so the
        # map holds only VMs being worked on, not every VM this host has ever seen.
        self._vm_locks: dict[str, tuple[threading.RLock, int]] = {}

    # -- records -------------------------------------------------------------------

    def save(self, ctl: C, record: VmRecord) -> None:
        """Persist `record`; NotOwner when `ctl` no longer owns its VM."""
        self._registry.save(ctl, record)

    def state_changed(self, ctl: C) -> None:
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

    @contextmanager
    def vm_lock(self, vm_id: str) -> Iterator[None]:
        """Held by `forget` until the VM's QEMU, domain and disks are gone, and by a
        prepare-secondary (secondary.py) from its look for an older controller until
        its new one is installed: a new secondary never meets the old one's domain."""
        with self._lock:
            lock, users = self._vm_locks.get(vm_id, (threading.RLock(), 0))
            self._vm_locks[vm_id] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._vm_locks[vm_id]
                if users == 1:
                    del self._vm_locks[vm_id]
                else:
                    self._vm_locks[vm_id] = (lock, users - 1)

    def locked_vms(self) -> int:
        """How many VMs have their lock held or awaited now."""
        with self._lock:
            return len(self._vm_locks)

    def superseded(self, ctl: C) -> bool:
        """Another controller owns `ctl`'s VM now. Its QEMU and domain have the same
        name as `ctl`'s had, so `ctl` may no longer find them by name."""
        other = self._registry.get(ctl.vm_id)
        return other is not None and other is not ctl

    def forget(self, ctl: C, reason: str) -> None:
        """Remove a secondary (or a stopped VM) and everything it held on this host."""
        rec = ctl.record
        with self.vm_lock(rec.vm_id):
            if not self._registry.remove(ctl):
                # Removed or replaced already: what it held belongs to the new owner.
                return
            log.info("%s: forgetting (%s)", rec.name, reason)
            if rec.role is Role.SECONDARY:
                ctl.kill_qemu()
                replica.remove_secondary_disks(rec.vm_id, self.config.replica_dir,
                                               self.config.overlay_dir)
        threading.Thread(target=ctl.stop, daemon=True).start()

    def image_made_current(self, vm_id: str, name: str, generation: int) -> None:
        """A verified copy-back (vdsm_ft.agent.imagemarks tells etcd)."""
        self._image_made_current(vm_id, name, generation)

    # -- ports and peers -------------------------------------------------------------

    def allocate_ports(self, ctl: C, side: str, count: int) -> list[int]:
        with self._lock:
            held = [p for c in self._registry.all() for ps in c.record.ports.values()
                    for p in ps]
            chosen = portplan.allocate(count, self.config.colo_ports, held,
                                       self.config.replication_address)
            ctl.update(ports={**ctl.record.ports, side: chosen})
            return chosen

    def release_ports(self, ctl: C, side: str) -> None:
        with self._lock:
            if side in ctl.record.ports:
                ctl.update(ports={k: v for k, v in ctl.record.ports.items() if k != side})

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

    # -- this host: paths, QEMU, libvirt, COLO TLS -------------------------------------

    def vm_run_dir(self, vm_id: str) -> str:
        return self.config.vm_run_dir(vm_id)

    def replica_disk(self, vm_id: str, disk: Disk) -> Disk:
        return replica.secondary_disk(vm_id, disk, self.config.replica_dir,
                                      self.config.overlay_dir)

    def colo_tls(self) -> colo.ColoTls | None:
        """This host's COLO TLS creds (`[agent] colo_tls_dir`), or None: plain TCP."""
        if self.config.colo_tls_dir is None:
            return None
        return colo.ColoTls(self.config.colo_tls_dir, self.config.qemu_user)

    def emulator(self) -> emulator.Emulator:
        """This host's FT QEMU (`[qemu] emulator`); EmulatorError says what is wrong."""
        return self._emulators(self.config.qemu_emulator)

    def qemu_of(self, engine_xml: str) -> tuple[str, str]:
        """(build identity, machine type) an FT VM of `engine_xml` gets here."""
        emu = self.emulator()
        return emu.identity, emulator.colo_machine(domxml.engine_machine(engine_xml), emu)

    def running_domain(self, vm_id: str) -> str | None:
        """The name of the domain with UUID `vm_id` that libvirt runs here, or None;
        DomainError (LibvirtConnectError among them) when libvirt cannot say."""
        conn = libvirtconn.connect(self.config)
        try:
            return domains.running_name(conn, vm_id)
        finally:
            conn.close()

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
