"""The only owner of the agent's VM controllers.

Each controller is installed with an owner epoch, kept in the VM's record. A record is
written only by the controller that currently owns its VM, and removal happens here, so
a controller that was removed or replaced (its thread may still be inside a long action)
can never write its old record back over the new owner's, or over a deleted one.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from vdsm_ft.agent.store import Store, VmRecord
from vdsm_ft.api import NotFound


class NotOwner(NotFound):
    """A controller that no longer owns its VM tried to write the VM's record."""


class Owned(Protocol):
    """What the registry needs of a controller (vdsm_ft.agent.controller.VmController)."""

    vm_id: str
    epoch: int

    def retire(self) -> None: ...


C = TypeVar("C", bound=Owned)


class Registry(Generic[C]):
    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._vms: dict[str, C] = {}
        self._epoch = 0

    def load(self) -> list[VmRecord]:
        """The persisted records; epochs handed out from here on are higher."""
        records = self.store.load_all()
        with self._lock:
            self._epoch = max([self._epoch] + [r.epoch for r in records])
        return records

    def install(self, record: VmRecord, make: Callable[[VmRecord], C]) -> C:
        """Make `record`'s VM owned by a new controller; one it had before is retired."""
        with self._lock:
            self._epoch += 1
            record = record.evolve(epoch=self._epoch)
            ctl = make(record)
            old = self._vms.get(record.vm_id)
            self._vms[record.vm_id] = ctl
            self.store.save(record)
        if old is not None:
            old.retire()
        return ctl

    def save(self, ctl: C, record: VmRecord) -> None:
        with self._lock:
            if not self._owns(ctl, record):
                raise NotOwner(f"VM {record.vm_id} is no longer owned by this controller "
                               f"(epoch {record.epoch})")
            self.store.save(record)

    def remove(self, ctl: C) -> bool:
        """Drop the VM's record and its controller; False when `ctl` did not own it."""
        with self._lock:
            if self._vms.get(ctl.vm_id) is not ctl:
                return False
            del self._vms[ctl.vm_id]
            self.store.delete(ctl.vm_id)
        ctl.retire()
        return True

    def owns(self, ctl: C) -> bool:
        with self._lock:
            return self._vms.get(ctl.vm_id) is ctl

    def get(self, vm_id: str) -> C | None:
        with self._lock:
            return self._vms.get(vm_id)

    def known(self, vm_id: str, host_id: str) -> C:
        """The VM's controller; NotFound, naming this host (`host_id`), without one."""
        ctl = self.get(vm_id)
        if ctl is None:
            raise NotFound(f"VM {vm_id} is not known to the agent on {host_id}")
        return ctl

    def all(self) -> list[C]:
        with self._lock:
            return list(self._vms.values())

    def _owns(self, ctl: C, record: VmRecord) -> bool:
        return self._vms.get(record.vm_id) is ctl and record.epoch == ctl.epoch
