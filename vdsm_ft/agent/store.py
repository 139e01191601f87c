"""The agent's persisted state, so a restarted agent resumes where it was.

- One JSON record per VM, mode 0600: the engine XML it holds describes the VM's disks
  and networks.
- One note per VM whose copy-back this host verified while etcd still marks its image
  stale (`ImageNotes`): it outlives the VM's record, which a stop removes.

Every file is written atomically (temp file + rename + fsync).
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
    # When `prepare` registered it (time.time()): a primary not launched within [agent]
    # launch_timeout is removed. Records older than this field read 0, so are overdue.
    prepared_at: float = 0.0
    generation: int = 0
    peer: PeerSpec | None = None  # the other member (secondary of a primary and back)
    ports: dict[str, list[int]] = field(default_factory=dict)
    peer_ports: tuple[int, ...] = ()  # the secondary's migration and NBD ports
    disk_sizes: tuple[int, ...] = ()
    # Its NICs carry a filter-rewriter (docs/colo-facts.md, "An ex-secondary keeps its
    # filter-rewriter").
    was_secondary: bool = False
    # Its disks are this host's replicas (after a failover): the engine's images are
    # behind until the copy-back (vdsm_ft.copyback).
    on_replica: bool = False
    suspended: bool = False
    disabled: bool = False
    stopping: bool = False
    failovers: int = 0
    last_failover: Failover | None = None
    # The identity of the QEMU build that runs this VM here and its machine type
    # (vdsm_ft.emulator): a new secondary must match both.
    qemu_build: str = ""
    machine: str = ""
    # When the copy-back (vdsm_ft.copyback) made the engine's image current again.
    image_current_at: float | None = None
    # The owner epoch of the controller that wrote it (vdsm_ft/agent/registry.py).
    epoch: int = 0
    # restart-secondary / migrate-secondary: the loop ends the pair, then protects onto
    # this peer (the request handler only records it).
    move_to: PeerSpec | None = None
    # test-failover: the loop kills this primary's QEMU (the request handler only
    # records it); cleared by the kill and by the next protect.
    test_failover: bool = False
    # unprotect from its primary: the loop tears this secondary down (row "dropped by
    # its primary"; the request handler only records it).
    dropped: bool = False

    def evolve(self, **changes: object) -> "VmRecord":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["role"] = self.role.value
        data["state"] = self.state.value
        data["peer"] = self.peer.to_dict() if self.peer else None
        data["move_to"] = self.move_to.to_dict() if self.move_to else None
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
        data["move_to"] = (PeerSpec.from_dict(data["move_to"]) if data.get("move_to")
                           else None)
        data["last_failover"] = (Failover.from_dict(data["last_failover"])
                                 if data.get("last_failover") else None)
        data["disk_sizes"] = tuple(data.get("disk_sizes", ()))
        data["peer_ports"] = tuple(data.get("peer_ports", ()))
        return cls(**data)


class _JsonDir:
    """One JSON file per VM id in a directory of mode 0700."""

    def __init__(self, directory: str, what: str):
        self.directory = directory
        self.what = what
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, vm_id: str) -> str:
        return os.path.join(self.directory, f"{uuid.UUID(vm_id)}.json")

    def _write(self, vm_id: str, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(vm_id))
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise StoreError(f"cannot save the {self.what} of {vm_id}: {exc}") from None

    def delete(self, vm_id: str) -> None:
        try:
            os.unlink(self._path(vm_id))
        except FileNotFoundError:
            pass

    def _read_all(self) -> list[tuple[str, dict]]:
        return [self._read(os.path.join(self.directory, entry))
                for entry in sorted(os.listdir(self.directory))
                if entry.endswith(".json") and not entry.startswith(".")]

    def _read(self, path: str) -> tuple[str, dict]:
        try:
            with open(path) as f:
                return path, json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.what} {path} is unreadable ({exc}); move it away "
                             "to let the agent start, and check that VM by hand") from None


class Store(_JsonDir):
    def __init__(self, directory: str):
        super().__init__(directory, "record")

    def save(self, record: VmRecord) -> None:
        self._write(record.vm_id, record.to_dict())

    def load_all(self) -> list[VmRecord]:
        records = []
        for path, data in self._read_all():
            try:
                records.append(VmRecord.from_dict(data))
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"record {path} is unreadable ({exc}); move it away to "
                                 "let the agent start, and check that VM by hand") from None
        return records


@dataclass(frozen=True)
class ImageNote:
    """This host's copy-back made the VM's storage-domain image current in `generation`,
    and etcd's stale-image mark of it (vdsm_ft.arbiter) may not be gone yet."""
    vm_id: str
    name: str
    generation: int


class ImageNotes(_JsonDir):
    def __init__(self, directory: str):
        super().__init__(directory, "image note")

    def save(self, note: ImageNote) -> None:
        self._write(note.vm_id, asdict(note))

    def load_all(self) -> list[ImageNote]:
        return [self._note(path, data) for path, data in self._read_all()]

    def get(self, vm_id: str) -> ImageNote | None:
        """The VM's note, or None: one file, not the whole directory."""
        path = self._path(vm_id)
        if not os.path.exists(path):
            return None
        return self._note(*self._read(path))

    @staticmethod
    def _note(path: str, data: dict) -> ImageNote:
        try:
            return ImageNote(str(data["vm_id"]), str(data["name"]), int(data["generation"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"image note {path} is unreadable ({exc}); move it "
                             "away to let the agent start") from None
