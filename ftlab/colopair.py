"""A COLO pair driven by hand on lab hosts: libvirt + generated XML + `vdsm_ft.colo`.

Tier 1 tests and the benchmarks use it to exercise the COLO core without the agent.
Every domain is started by the lab host's own libvirtd from the XML that
`vdsm_ft.domxml` generates, exactly as VDSM would start it after the hook ran.
"""
from __future__ import annotations

import functools
import os
import pwd
import signal
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

from ftlab import netns, qemubuild
from ftlab.host import LabHost
from vdsm_ft import colo, domains, domxml, emulator, replica, runfiles
from vdsm_ft.layout import Endpoints, VmLayout
from vdsm_ft.qmp import Qmp

QEMU_USER = "libvirt-qemu"
PORT_BASE = 20000


def _qemu_dir(path: str) -> str:
    """A directory QEMU (running as the QEMU user) can create sockets in."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    user = pwd.getpwnam(QEMU_USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


@dataclass
class Member:
    """One running side of the pair."""

    host: LabHost
    layout: VmLayout
    qmp: Qmp
    was_secondary: bool
    generation: int = 0          # the secondary generation it was started as; 0: primary

    @property
    def name(self) -> str:
        return self.layout.name

    def pid(self) -> int:
        pid = domains.qemu_pid(self.name, among=self.host.pids())
        if pid is None:
            raise RuntimeError(f"no QEMU for {self.name} on {self.host.name}")
        return pid

    def kill(self) -> None:
        """SIGKILL this side's QEMU: a QEMU crash."""
        os.kill(self.pid(), signal.SIGKILL)

    def destroy(self) -> None:
        self.qmp.close()
        conn = self.host.connect()
        try:
            domains.destroy(conn, self.name)
        finally:
            conn.close()


class ColoPair:
    """One VM's members across lab hosts, generation by generation."""

    def __init__(self, engine_xml: str, qemu: str | None = None):
        self.engine_xml = engine_xml
        # Both members run on this QEMU (default: the lab's choice, ftlab.qemubuild).
        self.emulator = emulator.identify(qemu or qemubuild.ft_emulator().path)
        self.machine = emulator.colo_machine(domxml.engine_machine(engine_xml),
                                             self.emulator)
        self.vm_id = domxml.layout_from_domxml(engine_xml, "/").vm_id
        self.members: list[Member] = []
        # Lab host name -> its COLO TLS creds dir; empty: plain TCP, as by default.
        self.tls_dirs: dict[str, str] = {}

    def _tls(self, host: LabHost) -> colo.ColoTls | None:
        directory = self.tls_dirs.get(host.name)
        return None if directory is None else colo.ColoTls(directory, QEMU_USER)

    def _run_dir(self, host: LabHost) -> str:
        return _qemu_dir(host.path("vms", self.vm_id))

    def start_primary(self, host: LabHost) -> Member:
        run_dir = self._run_dir(host)
        xml = domxml.primary_xml(self.engine_xml, run_dir, self.emulator.version,
                                 emulator=self.emulator.path, machine=self.machine)
        layout = domxml.layout_from_domxml(self.engine_xml, run_dir)
        runfiles.make_placeholders(xml)
        layout = replace(layout, disks=tuple(
            replace(d, size=replica.virtual_size(d.image, d.fmt)) for d in layout.disks))
        return self._start(host, xml, layout, was_secondary=False)

    def endpoints(self, primary: Member, host: LabHost, generation: int) -> Endpoints:
        base = PORT_BASE + 10 * generation
        nics = len(primary.layout.nics)
        return Endpoints(primary_host=primary.host.address, secondary_host=host.address,
                         migration_port=base, nbd_port=base + 1,
                         mirror_ports=tuple(base + 2 + 2 * i for i in range(nics)),
                         compare_ports=tuple(base + 3 + 2 * i for i in range(nics)))

    def start_secondary(self, host: LabHost, primary: Member,
                        generation: int) -> tuple[Member, Endpoints]:
        run_dir = self._run_dir(host)
        ep = self.endpoints(primary, host, generation)
        disks = replica.create_secondary_disks(
            self.vm_id, primary.layout.disks, _qemu_dir(host.path("replica")),
            _qemu_dir(os.path.join("/dev/shm", f"ftlab-{host.name}")), QEMU_USER)
        tls = self._tls(host)
        xml = domxml.secondary_xml(self.engine_xml, run_dir, list(disks), ep, generation,
                                   self.emulator.version, tls.dir if tls else None,
                                   emulator=self.emulator.path, machine=self.machine)
        runfiles.make_placeholders(xml)
        name = domxml.secondary_name(primary.layout.name.removesuffix(
            domxml.SECONDARY_SUFFIX))
        layout = VmLayout(vm_id=self.vm_id, name=name, run_dir=run_dir, disks=disks,
                          nics=primary.layout.nics)
        return self._start(host, xml, layout, was_secondary=True, generation=generation), ep

    def console_log(self, member: Member) -> str | None:
        """The file `member`'s serial console goes to (secondary_xml gives each
        secondary its own, named by its uuid); None if the VM has no file console."""
        source = ET.fromstring(self.engine_xml).find("devices/serial[@type='file']/source")
        if source is None:
            return None
        path = source.get("path", "")
        if not member.was_secondary:
            return path
        return path.replace(self.vm_id, domxml.secondary_uuid(self.vm_id, member.generation))

    def _start(self, host: LabHost, xml: str, layout: VmLayout,
               was_secondary: bool, generation: int = 0) -> Member:
        conn = host.connect()
        try:
            domains.start(conn, xml)
        finally:
            conn.close()
        member = Member(host, layout, Qmp(layout.qmp_socket, f"{host.name}/{layout.name}"),
                        was_secondary, generation)
        member.qmp.connect(timeout=30.0)
        self.members.append(member)
        return member

    def protect(self, primary: Member, secondary: Member, ep: Endpoints,
                checkpoint_delay_ms: int = colo.DEFAULT_CHECKPOINT_DELAY_MS) -> None:
        colo.protect(primary.qmp, primary.layout,
                     colo.LocalSecondary(secondary.qmp, secondary.layout,
                                         self._tls(secondary.host),
                                         functools.partial(netns.in_netns,
                                                           secondary.host.netns)), ep,
                     before_rewriter=primary.was_secondary,
                     checkpoint_delay_ms=checkpoint_delay_ms, tls=self._tls(primary.host),
                     opener=functools.partial(netns.in_netns, primary.host.netns))

    def destroy_all(self) -> None:
        for member in self.members:
            try:
                member.destroy()
            except Exception:  # a crashed host has no libvirtd left to ask
                pass
        for host in {m.host.name: m.host for m in self.members}.values():
            overlays = os.path.join("/dev/shm", f"ftlab-{host.name}")
            replica.remove_secondary_disks(self.vm_id, host.path("replica"), overlays)
            if os.path.isdir(overlays) and not os.listdir(overlays):
                os.rmdir(overlays)
