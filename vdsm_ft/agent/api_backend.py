"""The backend of the agent API (`vdsm_ft.api`): the poller, the CLI and peer agents.

Who may call what is the server's (`vdsm_ft.api._Gate`, by `pairing`). Requests are
checked against the VM's record, change only that record (the desired
spec) and wake the VM's loop, which does the work; the answer is the status right after.
prepare-secondary is the secondary bring-up's (`secondary.py`).
"""
from __future__ import annotations

from vdsm_ft import hostconfig
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.hostqemu import HostQemu
from vdsm_ft.agent.metrics import render_metrics
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.secondary import Secondaries
from vdsm_ft.agenterrors import BadRequest, Conflict
from vdsm_ft.api import (Backend, HostStatus, PeerSpec, PrepareSecondary, Role, SecondaryReady,
                         VmState, VmStatus)


class AgentApiBackend(Backend):
    def __init__(self, config: hostconfig.HostConfig, registry: Registry[VmController],
                 secondaries: Secondaries, host_qemu: HostQemu, agent_version: str):
        self.config = config
        self.registry = registry
        self.secondaries = secondaries
        self.host_qemu = host_qemu
        self.agent_version = agent_version

    def _ctl(self, vm_id: str) -> VmController:
        return self.registry.known(vm_id, self.config.host_id)

    def host_status(self) -> HostStatus:
        ctls = self.registry.all()
        return HostStatus(host_id=self.config.host_id,
                          replication_address=self.config.replication_address,
                          agent_version=self.agent_version,
                          vms=tuple(c.status() for c in ctls), qemu=self.host_qemu.last)

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
            # Recorded for its loop (row "dropped by its primary"), which tears it down.
            # The primary's next prepare-secondary, maybe to this host, may come first:
            # it waits for that teardown (Services.vm_lock).
            ctl.update(dropped=True)
            ctl.wake()
            return ctl.status()
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
        return render_metrics(self.config.host_id, self.registry.all())

    def pairing(self, vm_id: str) -> tuple[Role, PeerSpec | None] | None:
        ctl = self.registry.get(vm_id)
        if ctl is None:
            return None
        rec = ctl.record
        return rec.role, rec.peer


def _refuse_while_stale(ctl: VmController, what: str) -> None:
    """Protection cannot end while the VM runs on its replica: the next start, without
    FT, would read the engine's image, which is behind (docs/decisions.md, D2)."""
    rec = ctl.record
    if rec.on_replica:
        why = rec.reason or "copying back to the storage domain"
        raise Conflict(f"VM {rec.vm_id} cannot be {what} now: {why}; retry once its "
                       "storage-domain image is current")
