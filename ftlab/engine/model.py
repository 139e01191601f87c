"""The fake engine's database: plain records, one per engine entity.

Statuses use the REST/SDK spelling (`types.VmStatus` / `types.HostStatus` values). Every
record carries a `cache` slot that the renderer fills with its serialized XML; whoever
changes a record must call `touch()` so the next list call re-serializes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

GiB = 1 << 30
# The Blank template's fixed id in every oVirt installation (0000_config.sql, vm_static).
BLANK_TEMPLATE_ID = "00000000-0000-0000-0000-000000000000"
# The lab has one data center, named as oVirt's default one; every cluster is in it.
DATA_CENTER_ID = "5849b030-626e-47cb-ad90-3ce782d831b3"
DATA_CENTER_NAME = "Default"

# VM statuses in which the VM holds memory on its host (the engine's "running" set).
VM_RUNNING_STATUSES = frozenset({
    "up", "powering_up", "powering_down", "paused", "migrating", "wait_for_launch",
    "reboot_in_progress", "saving_state", "restoring_state", "not_responding", "unknown",
})


@dataclass
class Record:
    id: str
    name: str
    cache: Optional[bytes] = field(default=None, repr=False, compare=False)

    def touch(self) -> None:
        self.cache = None


@dataclass
class Cluster(Record):
    description: str = ""


@dataclass
class Hook:
    event_name: str
    name: str
    md5: str


@dataclass
class Host(Record):
    address: str = ""
    cluster_id: str = ""
    memory: int = 64 * GiB
    # The engine keeps some memory back for the host itself (vds_dynamic.reserved_mem).
    reserved_memory: int = 1 * GiB
    status: str = "up"
    spm: bool = False
    power_management: bool = False
    hooks: List[Hook] = field(default_factory=list)
    tags: Set[str] = field(default_factory=set)
    # Lab-side truth, invisible through REST: is the host's VDSM answering the engine?
    reachable: bool = True
    unreachable_since: Optional[float] = None
    # Committed memory is recomputed by the state; stored so rendering needs no scan.
    committed_memory: int = 0
    running_vms: int = 0

    @property
    def max_scheduling_memory(self) -> int:
        return max(0, self.memory - self.reserved_memory - self.committed_memory)


@dataclass
class VmDisk:
    """A managed disk attached to a VM. Its id is the disk's and the device's id, so the
    domain XML names it `ua-<id>` (alias) and carries it as the serial."""

    id: str
    name: str
    size: int = 64 << 20
    interface: str = "virtio"
    bootable: bool = False
    plugged: bool = True                   # DiskAttachment.active (vm_device.is_plugged)


@dataclass
class VmNic:
    """A managed vNIC; in the domain XML its alias is `ua-<id>`."""

    id: str
    name: str
    mac: str
    interface: str = "virtio"
    plugged: bool = True


@dataclass
class Template(Record):
    """What a new VM copies: the disks (name, size, interface, bootable) and NIC names."""

    cluster_id: Optional[str] = None
    description: str = ""
    memory: int = 1 * GiB
    disks: List[Tuple[str, int, str, bool]] = field(default_factory=list)
    nics: List[str] = field(default_factory=list)


@dataclass
class Vm(Record):
    cluster_id: str = ""
    memory: int = 1 * GiB
    cpus: int = 1
    status: str = "down"
    host_id: Optional[str] = None          # run_on_vds
    custom_properties: Dict[str, str] = field(default_factory=dict)
    ha_enabled: bool = False
    ha_priority: int = 0
    lease_storage_domain: Optional[str] = None
    placement_hosts: List[str] = field(default_factory=list)
    placement_affinity: str = "migratable"
    tags: Set[str] = field(default_factory=set)
    origin: str = "ovirt"                  # "external" for VMs imported from a host report
    description: str = ""
    run_once: bool = False
    # The custom properties in effect for the current run (run-once replaces the set).
    run_custom_properties: Optional[Dict[str, str]] = None
    start_time: Optional[float] = None
    stop_reason: str = ""
    template_id: str = BLANK_TEMPLATE_ID
    disks: List[VmDisk] = field(default_factory=list)
    nics: List[VmNic] = field(default_factory=list)
    # migrating_to_vds: set while a migration to that host runs (the lab never migrates).
    migrating_to_host_id: Optional[str] = None


@dataclass
class Event:
    index: int
    code: int
    description: str
    severity: str
    origin: str
    custom_id: int
    flood_rate: int = 0
    time: float = field(default_factory=time.time)
    vm_id: Optional[str] = None
    host_id: Optional[str] = None
    cluster_id: Optional[str] = None
    correlation_id: Optional[str] = None
    cache: Optional[bytes] = field(default=None, repr=False, compare=False)


@dataclass
class Tag(Record):
    description: str = ""


@dataclass
class AffinityRule:
    enabled: bool = True
    enforcing: bool = True
    positive: bool = False


@dataclass
class AffinityGroup(Record):
    cluster_id: str = ""
    enforcing: bool = True
    priority: float = 1.0
    vms_rule: Optional[AffinityRule] = None
    hosts_rule: Optional[AffinityRule] = None
    vm_ids: List[str] = field(default_factory=list)
    host_ids: List[str] = field(default_factory=list)


@dataclass
class AffinityLabel(Record):
    vm_ids: List[str] = field(default_factory=list)
    host_ids: List[str] = field(default_factory=list)
