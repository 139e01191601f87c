"""Where a VM's COLO secondary may go: a pure function of hosts, load and rules.

A host qualifies when all of these hold:
- it is Up, in the VM's cluster, and not the primary's host (the pair is always split);
- its schedulable memory, minus what this cycle already reserved there, covers 2x the
  VM's memory (a COLO secondary holds the guest RAM twice, docs/decisions.md D2);
- the FT hook is installed and its agent answered this cycle;
- its QEMU can do COLO (the agent's probe) and is the primary's build (`qemu_problems`);
- the per-host caps on FT VMs and FT vCPUs (primaries and secondaries both count, as in
  vSphere FT) stay respected;
- the engine's enforcing affinity groups of the VM allow it (see `affinity_rules`).
Among qualifying hosts the one with the fewest FT VMs wins (spread), then the one with
the most free memory, then the name (deterministic).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine_plugin.inventory import AffinityGroupInfo, HostInfo, VmInfo

GiB = 1 << 30
# How many per-host reasons a refusal message names before it summarizes.
MAX_REASONS_SHOWN = 8


@dataclass(frozen=True)
class Limits:
    max_vms_per_host: int = 4
    max_vcpus_per_host: int = 8

    def __post_init__(self) -> None:
        if self.max_vms_per_host < 1 or self.max_vcpus_per_host < 1:
            raise ValueError("per-host FT caps must be at least 1 "
                             f"(got {self.max_vms_per_host} VMs, {self.max_vcpus_per_host} vCPUs)")


@dataclass
class HostLoad:
    """FT load of one host: existing pairs' members plus what this cycle placed."""

    ft_vms: int = 0
    ft_vcpus: int = 0
    reserved_memory: int = 0    # bytes the engine's figure does not yet account for

    def add_secondary(self, vm: VmInfo) -> None:
        self.ft_vms += 1
        self.ft_vcpus += vm.vcpus
        self.reserved_memory += 2 * vm.memory


@dataclass(frozen=True)
class AffinityRules:
    """What the VM's enforcing affinity groups say about the secondary's host."""

    excluded: frozenset[str] = frozenset()          # host ids
    required: frozenset[str] | None = None          # host ids; None: no restriction
    why: Mapping[str, str] = field(default_factory=dict)   # host id -> group name


@dataclass(frozen=True)
class Choice:
    host: HostInfo | None
    rejected: Mapping[str, str]          # host name -> why it does not qualify

    @property
    def refusal(self) -> str:
        """One line naming why no host qualifies (empty when a host was chosen)."""
        if self.host is not None:
            return ""
        if not self.rejected:
            return "no host qualifies: the cluster has no other host"
        items = sorted(self.rejected.items())
        shown = "; ".join(f"{name}: {why}" for name, why in items[:MAX_REASONS_SHOWN])
        more = len(items) - MAX_REASONS_SHOWN
        return f"no host qualifies: {shown}" + (f"; and {more} more" if more > 0 else "")


def affinity_rules(vm: VmInfo, groups: Iterable[AffinityGroupInfo],
                   vm_hosts: Mapping[str, str | None]) -> AffinityRules:
    """Read the VM's enforcing groups: after a failover the VM runs where its secondary
    is, so the secondary must obey the rules the VM itself obeys.

    - a negative host rule excludes the group's hosts; a positive one restricts to them;
    - a negative VM rule excludes the hosts where the group's other VMs run (`vm_hosts`);
    - positive VM rules and non-enforcing groups do not constrain the secondary.
    """
    excluded: set[str] = set()
    why: dict[str, str] = {}
    required: set[str] | None = None
    for g in groups:
        if vm.id not in g.vm_ids or not g.enforcing:
            continue
        if g.hosts_positive is False:
            for h in g.host_ids:
                excluded.add(h)
                why[h] = f"negative host affinity (group {g.name})"
        elif g.hosts_positive is True:
            required = set(g.host_ids) if required is None else required & g.host_ids
        if g.vms_positive is False:
            for other in g.vm_ids - {vm.id}:
                h = vm_hosts.get(other)
                if h:
                    excluded.add(h)
                    why[h] = f"negative VM affinity with a VM there (group {g.name})"
    return AffinityRules(frozenset(excluded),
                         None if required is None else frozenset(required), why)


def choose_peer(vm: VmInfo, primary_host_id: str | None, hosts: Sequence[HostInfo],
                loads: Mapping[str, HostLoad], limits: Limits,
                agent_problems: Mapping[str, str],
                affinity: AffinityRules = AffinityRules(),
                avoid: Mapping[str, str] | None = None,
                qemu_problems: Mapping[str, str] | None = None) -> Choice:
    """Pick the secondary's host for `vm`, whose primary runs on `primary_host_id`.

    `agent_problems` maps host id -> why its agent is not usable this cycle (absent:
    usable). `avoid` maps host id -> why this VM should not go there for now (a peer
    that just refused it). `qemu_problems` maps host id -> why its QEMU cannot run this
    VM's secondary. `loads` is read, never changed: the caller records the choice.
    """
    avoid = avoid or {}
    qemu_problems = qemu_problems or {}
    rejected: dict[str, str] = {}
    ok: list[tuple[int, int, str, HostInfo]] = []
    need = 2 * vm.memory
    for h in hosts:
        if h.cluster_id != vm.cluster_id:
            continue                        # other clusters are not candidates at all
        load = loads.get(h.id) or HostLoad()
        free = h.max_scheduling_memory - load.reserved_memory
        if h.id == primary_host_id:
            reason = "runs the primary"
        elif h.status != "up":
            reason = f"not Up ({h.status})"
        elif not h.hook_installed:
            reason = "FT hook not installed"
        elif h.id in avoid:
            reason = avoid[h.id]
        elif h.id in agent_problems:
            reason = f"agent not usable: {agent_problems[h.id]}"
        elif h.id in qemu_problems:
            reason = qemu_problems[h.id]
        elif h.id in affinity.excluded:
            reason = affinity.why.get(h.id, "excluded by affinity")
        elif affinity.required is not None and h.id not in affinity.required:
            reason = "outside the VM's positive host affinity"
        elif free < need:
            reason = (f"needs {_gib(need)} schedulable memory (2x VM memory), "
                      f"has {_gib(max(free, 0))}")
        elif load.ft_vms + 1 > limits.max_vms_per_host:
            reason = (f"already has {load.ft_vms} FT VMs (cap {limits.max_vms_per_host}, "
                      "[placement] max_vms_per_host)")
        elif vm.vcpus > limits.max_vcpus_per_host:
            reason = (f"the VM's {vm.vcpus} vCPUs exceed the per-host FT vCPU cap on "
                      f"every host (cap {limits.max_vcpus_per_host}, [placement] "
                      "max_vcpus_per_host): raise it or give the VM fewer vCPUs")
        elif load.ft_vcpus + vm.vcpus > limits.max_vcpus_per_host:
            reason = (f"FT vCPUs would be {load.ft_vcpus + vm.vcpus} "
                      f"(cap {limits.max_vcpus_per_host}, [placement] max_vcpus_per_host)")
        else:
            ok.append((load.ft_vms, -free, h.name, h))
            continue
        rejected[h.name] = reason
    if not ok:
        return Choice(None, rejected)
    return Choice(min(ok, key=lambda t: t[:3])[3], rejected)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
