"""A secondary's bring-up on this host, as its primary's prepare-secondary asks for it.

Checks that this host's QEMU and COLO transport can pair with the primary's, then makes
the replica disks, starts the secondary's domain and readies COLO on its QMP before
answering the ports the primary connects to.
"""
from __future__ import annotations

import os
import pwd
from collections.abc import Callable

from vdsm_ft import (colo, domains, domxml, emulator, hostconfig, libvirtconn, qemu_probe,
                     replica, runfiles)
from vdsm_ft.agent import ports as portplan
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import VmRecord
from vdsm_ft.agenterrors import BadRequest, Conflict, Unavailable
from vdsm_ft.api import PrepareSecondary, Role, SecondaryReady
from vdsm_ft.layout import Disk, Endpoints, Nic, VmLayout
from vdsm_ft.qmp import QmpError


class Secondaries:
    def __init__(self, config: hostconfig.HostConfig, services: Services[VmController],
                 registry: Registry[VmController], make: Callable[[VmRecord], VmController],
                 qemu_capability: Callable[[], qemu_probe.QemuCapability]):
        self.config = config
        self.services = services
        self.registry = registry
        self.make = make
        self.qemu_capability = qemu_capability

    def prepare(self, request: PrepareSecondary) -> SecondaryReady:
        mine = self.services.colo_tls() is not None
        if request.colo_tls != mine:
            raise Conflict(f"COLO transport mismatch: primary {request.primary.host_id} "
                           f"uses {_transport(request.colo_tls)}, {self.config.host_id} "
                           f"uses {_transport(mine)}; set [agent] colo_tls_dir on both "
                           "hosts or on neither")
        emu, machine = self._qemu(request)
        # An older secondary's loop may be tearing it down (its primary's unprotect came
        # just before): that ends before this looks, or this finds it and replaces it.
        with self.services.vm_lock(request.vm_id):
            existing = self.registry.get(request.vm_id)
            if existing is not None:
                if existing.record.role is Role.PRIMARY and existing.qemu_alive():
                    raise Conflict(f"VM {request.vm_id} runs as primary on "
                                   f"{self.config.host_id}; it cannot be its own secondary")
                # A secondary of an older generation, or a primary that died here (a
                # host that came back after a crash): the new pairing replaces it.
                self.services.forget(existing, reason="replaced by a new generation")
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
            ctl = self.registry.install(record, self.make)
        try:
            return self._start(ctl, request, emu)
        except Exception as exc:
            self.services.forget(ctl, reason=f"could not start: {exc}")
            if isinstance(exc, (replica.ReplicaError, portplan.PortsExhausted)):
                raise Unavailable(str(exc)) from None
            if isinstance(exc, (domains.DomainError, domxml.DomXmlError, QmpError,
                                colo.ColoError)):
                raise Conflict(f"the secondary did not start on "
                               f"{self.config.host_id}: {exc}") from None
            raise

    def _qemu(self, request: PrepareSecondary) -> tuple[emulator.Emulator, str]:
        """This host's QEMU and the machine type for the secondary, or Conflict when it
        cannot pair with the primary's QEMU: refused before anything is started."""
        primary = request.primary.host_id
        qemu = self.qemu_capability()
        if not qemu.capable:
            raise Conflict(f"{self.config.host_id} cannot run the secondary: {qemu.reason}")
        try:
            emu = self.services.emulator()
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

    def _start(self, ctl: VmController, request: PrepareSecondary,
               emu: emulator.Emulator) -> SecondaryReady:
        run_dir = _qemu_dir(self.services.vm_run_dir(request.vm_id), self.config.qemu_user)
        migration_port, nbd_port = self.services.allocate_ports(ctl, "secondary", 2)
        ep = Endpoints(primary_host=request.primary.replication_address,
                       secondary_host=self.config.replication_address,
                       migration_port=migration_port, nbd_port=nbd_port,
                       mirror_ports=request.mirror_ports,
                       compare_ports=request.compare_ports)
        tls = self.services.colo_tls()
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
        qmp = ctl.ensure_qmp()
        if qmp is None:
            raise QmpError("the secondary's QMP socket does not answer")
        colo.prepare_secondary(qmp, secondary_layout(request, run_dir, disks), ep,
                               colo.DEFAULT_CHECKPOINT_DELAY_MS, tls)
        ctl.start()
        return SecondaryReady(vm_id=request.vm_id, generation=request.generation,
                              migration_port=migration_port, nbd_port=nbd_port)


def secondary_layout(request: PrepareSecondary, run_dir: str,
                     disks: tuple[Disk, ...]) -> VmLayout:
    return VmLayout(vm_id=request.vm_id, name=domxml.secondary_name(request.name),
                    run_dir=run_dir, disks=disks,
                    nics=tuple(Nic(i, n, m) for i, n, m in request.nics))


def _transport(tls: bool) -> str:
    return "TLS ([agent] colo_tls_dir set)" if tls else "plain TCP (no colo_tls_dir)"


def _qemu_dir(path: str, user: str) -> str:
    os.makedirs(path, mode=0o750, exist_ok=True)
    owner = pwd.getpwnam(user)
    os.chown(path, owner.pw_uid, owner.pw_gid)
    return path
