"""Plain snapshots of what the engine reported in one cycle.

`engine.py` builds these from ovirtsdk4 objects; placement and reconcile work on them
only, so they can be tested without an engine and stay cheap at 10,000 VMs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FT_PROPERTY = "ft"


@dataclass(frozen=True)
class HostInfo:
    id: str
    name: str
    cluster_id: str
    status: str                   # types.HostStatus value: "up", "non_responsive", ...
    address: str
    max_scheduling_memory: int    # bytes
    hook_installed: bool


@dataclass(frozen=True)
class VmInfo:
    id: str
    name: str
    cluster_id: str
    status: str                   # types.VmStatus value: "up", "unknown", "down", ...
    host_id: str | None           # where the engine says it runs
    memory: int                   # bytes
    vcpus: int
    custom_properties: tuple[tuple[str, str], ...] = ()
    ha_enabled: bool = False
    has_lease: bool = False

    @property
    def ft(self) -> str | None:
        """The raw `ft` custom property, or None when unset."""
        for name, value in self.custom_properties:
            if name == FT_PROPERTY:
                return value
        return None


@dataclass(frozen=True)
class AffinityGroupInfo:
    id: str
    name: str
    cluster_id: str
    enforcing: bool
    vms_positive: bool | None     # None: the group has no VM rule
    hosts_positive: bool | None   # None: the group has no host rule
    vm_ids: frozenset[str] = frozenset()
    host_ids: frozenset[str] = frozenset()


@dataclass
class Inventory:
    hosts: dict[str, HostInfo] = field(default_factory=dict)
    vms: dict[str, VmInfo] = field(default_factory=dict)

    def vm_by_name(self, name: str) -> VmInfo | None:
        for vm in self.vms.values():
            if vm.name == name:
                return vm
        return None
