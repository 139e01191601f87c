"""The agent's persisted per-VM records, so a restarted agent resumes where it was.

One JSON file per VM, written atomically (temp file + rename + fsync), mode 0600:
the engine XML it holds describes the VM's disks and networks.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace

from vdsm_ft.api import Failover, PeerSpec, Role, VmState


class StoreError(RuntimeError):
    """A record could not be read or written."""


@dataclass(frozen=True)
class VmRecord:
    vm_id: str
    name: str
    role: Role
    engine_xml: str
    state: VmState = VmState.STARTING
    reason: str = ""
    domain: str = ""              # libvirt domain name on this host
    launched: bool = False        # its domain was started (hooks register before that)
    generation: int = 0
    peer: PeerSpec | None = None  # the other member (secondary of a primary and back)
    ports: dict[str, list[int]] = field(default_factory=dict)
    peer_ports: tuple[int, ...] = ()  # the secondary's migration and NBD ports
    disk_sizes: tuple[int, ...] = ()
    was_secondary: bool = False   # its NICs carry a filter-rewriter (colo.md §9.2)
    suspended: bool = False
    disabled: bool = False
    stopping: bool = False
    failovers: int = 0
    last_failover: Failover | None = None

    def evolve(self, **changes: object) -> "VmRecord":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["role"] = self.role.value
        data["state"] = self.state.value
        data["peer"] = self.peer.to_dict() if self.peer else None
        data["last_failover"] = self.last_failover.to_dict() if self.last_failover else None
        data["disk_sizes"] = list(self.disk_sizes)
        data["peer_ports"] = list(self.peer_ports)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VmRecord":
        data = dict(data)
        data["role"] = Role(data["role"])
        data["state"] = VmState(data["state"])
        data["peer"] = PeerSpec.from_dict(data["peer"]) if data.get("peer") else None
        data["last_failover"] = (Failover.from_dict(data["last_failover"])
                                 if data.get("last_failover") else None)
        data["disk_sizes"] = tuple(data.get("disk_sizes", ()))
        data["peer_ports"] = tuple(data.get("peer_ports", ()))
        return cls(**data)


class Store:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, vm_id: str) -> str:
        return os.path.join(self.directory, f"{uuid.UUID(vm_id)}.json")

    def save(self, record: VmRecord) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(record.vm_id))
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise StoreError(f"cannot save the record of {record.vm_id}: {exc}") from None

    def delete(self, vm_id: str) -> None:
        try:
            os.unlink(self._path(vm_id))
        except FileNotFoundError:
            pass

    def load_all(self) -> list[VmRecord]:
        records = []
        for entry in sorted(os.listdir(self.directory)):
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            path = os.path.join(self.directory, entry)
            try:
                with open(path) as f:
                    records.append(VmRecord.from_dict(json.load(f)))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"record {path} is unreadable ({exc}); move it away to "
                                 "let the agent start, and check that VM by hand") from None
        return records
