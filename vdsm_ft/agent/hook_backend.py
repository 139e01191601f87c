"""The backend of the hook socket (`vdsm_ft.hookapi`): VDSM's hooks as agent requests.

`prepare` does the start hook's work with the agent's warm arbiter, emulator cache and
QEMU probe, and records the VM as a primary in Starting; `started`, `stopping` and
`destroyed` tell its loop what VDSM did. `image` answers starts without FT while the
VM's storage-domain image is behind. Refusals are `AgentRefused`, which the hook
protocol answers as 409 so that the start fails (rc 2) instead of being taken for an
unreachable agent.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vdsm_ft import (admission, domains, domxml, emulator, hostconfig, imagestate,
                     qemu_probe, replica)
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.imagemarks import ImageMarks
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import VmRecord
from vdsm_ft.agenterrors import QEMU_INCAPABLE, AgentRefused
from vdsm_ft.api import Role, VmState
from vdsm_ft.arbiter import Arbiter, ArbiterError
from vdsm_ft.hookapi import HookBackend

log = logging.getLogger("vdsm_ft.agent")


class AgentHookBackend(HookBackend):
    def __init__(self, config: hostconfig.HostConfig, registry: Registry[VmController],
                 services: Services[VmController], make: Callable[[VmRecord], VmController],
                 qemu_capability: Callable[[], qemu_probe.QemuCapability],
                 arbiter: Arbiter, arbiter_bound: float,
                 emulators: emulator.CachedEmulators, image_marks: ImageMarks):
        """`make(record)` builds the controller that `register` installs."""
        self.config = config
        self.registry = registry
        self.services = services
        self.make = make
        self.qemu_capability = qemu_capability
        self.arbiter = arbiter
        self.arbiter_bound = arbiter_bound
        self.emulators = emulators
        self.image_marks = image_marks

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
        try:
            sizes = tuple(replica.virtual_size(d.image, d.fmt if d.fmt != "raw" else None)
                          for d in layout.disks)
        except replica.ReplicaError as exc:
            # Refused with the cause (issue 16): a 500 left it in the agent's log only.
            raise AgentRefused(f"VM {vm_id} ({name}) not started: {exc}; check that the "
                               "disk's storage domain is attached on this host") from None
        try:
            build, machine = self.services.qemu_of(engine_xml)
        except (emulator.EmulatorError, domxml.DomXmlError) as exc:
            # Only a VM found running (discover) gets here with a broken [qemu] emulator:
            # its secondary's host then checks nothing but its own QEMU.
            log.warning("%s: this host's QEMU is unknown: %s", name, exc)
            build, machine = "", ""
        record = VmRecord(vm_id=vm_id, name=name, role=Role.PRIMARY, engine_xml=engine_xml,
                          domain=name, disk_sizes=sizes, qemu_build=build, machine=machine,
                          prepared_at=time.time())
        # A controller it had before is retired by the registry, and its writes refused:
        # no join here, its thread may be inside a long action.
        self.registry.install(record, self.make).start()

    def adopt(self, vm_id: str, engine_xml: str) -> None:
        """A primary the monitor found running without a record (discover); checked
        before it is registered, so that a refusal leaves no record."""
        self._refuse_unless_running(vm_id, domxml.layout_from_domxml(engine_xml, "/").name)
        self.register(vm_id, engine_xml)
        self.started(vm_id, None)

    def started(self, vm_id: str, live_xml: str | None) -> None:
        """The primary runs: only once libvirt here says so, since the socket's word
        alone is no proof (docs/security.md, "hook socket")."""
        ctl = self.registry.known(vm_id, self.config.host_id)
        self._refuse_unless_running(vm_id, ctl.record.domain)
        ctl.update(launched=True)
        ctl.wake()

    def _refuse_unless_running(self, vm_id: str, domain: str) -> None:
        where = f"libvirt on {self.config.host_id}"
        try:
            running = self.services.running_domain(vm_id)
        except domains.DomainError as exc:     # a LibvirtConnectError too
            why = f"{where} cannot say whether it runs ({exc})"
        else:
            if running == domain:
                return
            why = (f"{where} runs no domain with its UUID" if running is None else
                   f"{where} runs its UUID as domain {running!r}, not {domain!r}")
        raise AgentRefused(f"VM {vm_id} not taken as started: {why}; unless libvirt runs "
                           f"it, its record goes {self.config.launch_timeout:.0f} s after "
                           "its prepare")

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
        elif ctl.record.role is Role.PRIMARY and not ctl.record.launched:
            # A start that failed after prepare: the record held nothing, and left in
            # Starting it counted toward the poller's per-host caps (issue 16).
            self.services.forget(ctl, reason="VDSM released a VM that never started")
        else:
            ctl.wake()
