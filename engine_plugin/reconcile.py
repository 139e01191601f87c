"""One reconcile pass: desired state (the engine's `ft` property) against actual state
(the agents' statuses) gives at most one step per VM, each with its reason, plus the
engine events that describe what changed. Pure: no I/O except the `groups_for` lookup
the caller passes in (affinity groups, fetched once per cluster per cycle).

Who is the primary: the agent that reports the VM in role primary with the highest
generation. After a failover that is the survivor on another host, while the engine
still shows the VM `unknown` on the dead host (docs/engine-view.md).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine_plugin.agents import AgentView
from engine_plugin.events import ERROR, NORMAL, WARNING, Event
from engine_plugin.inventory import AffinityGroupInfo, HostInfo, Inventory, VmInfo
from engine_plugin.placement import HostLoad, Limits, affinity_rules, choose_peer
from vdsm_ft.api import PeerSpec, Role, VmState, VmStatus

RUNNING_VM_STATES = frozenset({"up", "powering_up", "reboot_in_progress", "migrating",
                               "paused", "not_responding", "unknown", "powering_down"})
SECONDARY_SUFFIX = "-ft-secondary"


@dataclass(frozen=True)
class Protect:
    vm_id: str
    vm_name: str
    primary: HostInfo            # whose agent is asked
    peer: HostInfo
    peer_spec: PeerSpec
    reprotect: bool              # after a failover


@dataclass(frozen=True)
class Unprotect:
    vm_id: str
    vm_name: str
    primary: HostInfo


@dataclass(frozen=True)
class FenceManual:
    host: HostInfo
    vm_names: tuple[str, ...]


Action = Protect | Unprotect | FenceManual


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)   # vm name -> what/why this cycle


def ft_wanted(vm: VmInfo) -> bool | None:
    """True/False for ft=true/false (or unset); None for an invalid value."""
    value = vm.ft
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    return None


def loads_from(inv: Inventory, view: AgentView) -> dict[str, HostLoad]:
    """FT load per host from what the agents run: every live pair member counts toward
    the caps; an existing secondary also holds one extra copy of the guest RAM that the
    engine's figure for the external VM does not include."""
    loads: dict[str, HostLoad] = {}
    for host_id, hs in view.statuses.items():
        load = loads.setdefault(host_id, HostLoad())
        for st in hs.vms:
            if st.state is VmState.DOWN or st.role is Role.NONE:
                continue
            vm = inv.vms.get(st.vm_id)
            load.ft_vms += 1
            load.ft_vcpus += vm.vcpus if vm else 1
            if st.role is Role.SECONDARY and vm:
                load.reserved_memory += vm.memory
    return loads


def _primary(reports: list[tuple[str, VmStatus]]) -> tuple[str, VmStatus] | None:
    live = [(h, s) for h, s in reports if s.role is Role.PRIMARY and s.state is not VmState.DOWN]
    return max(live, key=lambda r: r[1].generation) if live else None


class _Planner:
    def __init__(self, inv: Inventory, view: AgentView, limits: Limits,
                 groups_for: Callable[[str], list[AffinityGroupInfo]],
                 avoid: Mapping[str, Mapping[str, str]]):
        self.inv, self.view, self.limits, self.groups_for = inv, view, limits, groups_for
        self.avoid = avoid
        self.plan = Plan()
        self.loads = loads_from(inv, view)
        self.hosts = sorted(inv.hosts.values(), key=lambda h: h.name)
        self.fence_proofs: dict[str, set[str]] = {}   # dead host id -> VM ids it proves
        self._groups: dict[str, list[AffinityGroupInfo]] = {}
        self._vm_hosts: dict[str, str | None] | None = None

    def event(self, vm: VmInfo | None, kind: str, gen: int, sev: str, text: str,
              detail: str = "", host_id: str | None = None,
              informational: bool = False) -> None:
        self.plan.events.append(Event(vm_id=vm.id if vm else None, host_id=host_id, kind=kind,
                                      generation=gen, severity=sev, description=text,
                                      detail=detail, informational=informational))

    def reason(self, vm: VmInfo, text: str) -> None:
        self.plan.reasons[vm.name] = text

    def host_name(self, host_id: str | None) -> str:
        h = self.inv.hosts.get(host_id or "")
        return h.name if h else (host_id or "?")

    # ---------------------------------------------------------------- per VM

    def vm(self, vm: VmInfo) -> None:
        wanted = ft_wanted(vm)
        reports = self.view.reports(vm.id)
        if wanted is None:
            self.reason(vm, f"invalid ft value {vm.ft!r}")
            self.event(vm, "invalid-ft", 0, ERROR,
                       f"VM {vm.name}: custom property ft={vm.ft!r} is not valid; use "
                       f"ft=true to protect it or ft=false (or no property) for no FT.",
                       detail=vm.ft or "")
            return
        primary = _primary(reports)
        if not wanted:
            if primary and primary[1].state not in (VmState.DISABLED, VmState.DOWN):
                self.unprotect(vm, primary, "ft is off")
            return
        if vm.ha_enabled or vm.has_lease:
            self.refuse_ha(vm, primary)
            return
        if primary is None:
            self.unreported(vm)
            return
        host_id, st = primary
        host = self.inv.hosts.get(host_id)
        if host is None:
            self.reason(vm, f"primary reported by host {host_id}, unknown to the engine")
            return
        self.after_failover(vm, host, st)
        self.by_state(vm, host, st)

    def unprotect(self, vm: VmInfo, primary: tuple[str, VmStatus], why: str) -> None:
        host = self.inv.hosts.get(primary[0])
        if host is None:
            return
        self.plan.actions.append(Unprotect(vm.id, vm.name, host))
        self.reason(vm, f"turning protection off: {why}")
        self.event(vm, "unprotect", primary[1].generation, NORMAL,
                   f"FT protection of VM {vm.name} is being turned off ({why}).", detail=why)

    def refuse_ha(self, vm: VmInfo, primary: tuple[str, VmStatus] | None) -> None:
        what = " and ".join(w for w, on in (("high availability", vm.ha_enabled),
                                            ("a VM lease", vm.has_lease)) if on)
        self.reason(vm, f"refused: ft=true with {what}")
        self.event(vm, "refused-ha", 0, ERROR,
                   f"VM {vm.name} has ft=true and {what}. FT is refused: after a failover "
                   f"the engine would restart the VM beside its promoted secondary. Turn off "
                   f"{what} or set ft=false.", detail=what)
        host = self.inv.hosts.get(primary[0]) if primary else None
        if host and primary[1].state not in (VmState.DISABLED, VmState.DOWN):
            self.plan.actions.append(Unprotect(vm.id, vm.name, host))

    def unreported(self, vm: VmInfo) -> None:
        if vm.status not in RUNNING_VM_STATES or not vm.host_id:
            self.reason(vm, f"VM is {vm.status}")
            return
        host = self.inv.hosts.get(vm.host_id)
        if host is None:
            self.reason(vm, "runs on a host unknown to the engine listing")
            return
        if vm.host_id in self.view.problems:
            problem = self.view.problems[vm.host_id]
            self.reason(vm, f"agent on {host.name} not usable: {problem}")
            if host.status == "up":
                self.event(vm, VmState.NOT_PROTECTED.value, 0, WARNING,
                           f"VM {vm.name} is not protected: the FT agent on host {host.name} "
                           f"cannot be reached ({problem}).", detail=f"agent:{host.id}")
            return
        self.reason(vm, f"the FT agent on {host.name} does not know the VM")
        self.event(vm, VmState.NOT_PROTECTED.value, 0, WARNING,
                   f"VM {vm.name} is not protected: it was started without the FT hook "
                   f"(ft=true was set while it ran?). Restart the VM to protect it.",
                   detail=f"unregistered:{host.id}")

    def after_failover(self, vm: VmInfo, host: HostInfo, st: VmStatus) -> None:
        """The engine still shows the VM on the old host while the survivor runs here."""
        old = vm.host_id
        if not old or old == host.id or st.last_failover is None:
            return
        if st.last_failover.from_host != old:
            return
        old_name = self.host_name(old)
        self.event(vm, "continues", st.generation, WARNING,
                   f"VM {vm.name} continues on host {host.name} as external-{vm.name}"
                   f"{SECONDARY_SUFFIX} after host {old_name} failed (failover took "
                   f"{st.last_failover.duration_ms:.0f} ms).")
        if st.last_failover.old_primary_cannot_run and vm.status == "unknown":
            self.fence_proofs.setdefault(old, set()).add(vm.id)

    def by_state(self, vm: VmInfo, host: HostInfo, st: VmStatus) -> None:
        gen = st.generation
        if st.state is VmState.NEED_SECONDARY and st.secondary_host:
            # The agent accepted a peer and has not started Syncing yet.
            self.reason(vm, f"protection onto {self.host_name(st.secondary_host)} pending")
        elif st.state is VmState.NEED_SECONDARY or (st.state is VmState.DISABLED
                                                    and not st.suspended):
            self.place(vm, host, st)
        elif st.state is VmState.DISABLED:
            self.reason(vm, "protection suspended by an admin")
        elif st.state is VmState.NOT_PROTECTED:
            self.reason(vm, f"not protected: {st.reason}")
            self.event(vm, VmState.NOT_PROTECTED.value, gen, WARNING,
                       f"VM {vm.name} is not protected: {st.reason}", detail=st.reason)
        elif st.state is VmState.PROTECTED:
            self.reason(vm, f"protected onto {self.host_name(st.secondary_host)}")
            again = "again " if st.failovers else ""
            self.event(vm, VmState.PROTECTED.value, gen, NORMAL,
                       f"VM {vm.name} is protected {again}by FT: primary on {host.name}, "
                       f"secondary on {self.host_name(st.secondary_host)} "
                       f"(generation {gen}).", informational=True)
        elif st.state is VmState.FAILING_OVER:
            self.reason(vm, "failing over")
            self.event(vm, VmState.FAILING_OVER.value, gen, WARNING,
                       f"VM {vm.name} is failing over to host {host.name}.")
        else:
            self.reason(vm, st.state.value)

    def place(self, vm: VmInfo, primary: HostInfo, st: VmStatus) -> None:
        reprotect = st.failovers > 0
        groups = self.groups(vm.cluster_id)
        rules = affinity_rules(vm, groups, self.vm_hosts() if groups else {})
        # The VM's cluster is the engine's; a survivor outside it is still placed there.
        choice = choose_peer(vm, primary.id, self.hosts, self.loads, self.limits,
                             self.view.problems, rules, self.avoid.get(vm.id))
        if choice.host is None:
            self.reason(vm, choice.refusal)
            self.event(vm, "refused", st.generation, WARNING,
                       f"FT cannot protect VM {vm.name}: {choice.refusal}",
                       detail=choice.refusal)
            return
        peer = choice.host
        self.loads.setdefault(peer.id, HostLoad()).add_secondary(vm)
        self.plan.actions.append(Protect(vm.id, vm.name, primary, peer,
                                         self.view.peer_spec(peer), reprotect))
        self.reason(vm, f"{'re-' if reprotect else ''}protecting onto {peer.name}")
        if reprotect:
            # Keyed on the failover, not the generation: each attempt takes a new
            # generation, and a retried re-protection onto the same host is one event.
            self.event(vm, "reprotect", st.failovers, NORMAL,
                       f"VM {vm.name} is being re-protected on host {peer.name} "
                       f"(primary on {primary.name}).", detail=peer.id)

    def vm_hosts(self) -> dict[str, str | None]:
        if self._vm_hosts is None:
            self._vm_hosts = {v.id: v.host_id for v in self.inv.vms.values()}
        return self._vm_hosts

    def groups(self, cluster_id: str) -> list[AffinityGroupInfo]:
        if cluster_id not in self._groups:
            self._groups[cluster_id] = self.groups_for(cluster_id)
        return self._groups[cluster_id]

    # ---------------------------------------------------------------- per host

    def fences(self) -> None:
        """Confirm a dead host only when the arbiter's proof covers every VM the engine
        still places there: manual fencing sets them all Down, and a non-FT VM on a host
        that is merely cut off would then be restarted elsewhere by HA."""
        for host_id, proven in sorted(self.fence_proofs.items()):
            host = self.inv.hosts.get(host_id)
            if host is None or host.status != "non_responsive":
                continue
            there = [v for v in self.inv.vms.values()
                     if v.host_id == host_id and v.status in RUNNING_VM_STATES]
            if not any(v.status == "unknown" for v in there):
                continue
            unproven = sorted(v.name for v in there if v.id not in proven)
            if unproven:
                self.event(None, "fence-withheld", 0, WARNING,
                           f"Host {host.name} is not confirmed as rebooted: VMs "
                           f"{', '.join(unproven)} there are not covered by the FT "
                           f"arbiter's proof. Confirm it by hand once the host is known "
                           f"to be down.", detail=",".join(unproven), host_id=host_id)
                continue
            names = tuple(sorted(v.name for v in there))
            self.plan.actions.append(FenceManual(host, names))
            self.event(None, "fence", 0, WARNING,
                       f"Confirming host {host.name} as rebooted (fence manual): the FT "
                       f"arbiter shows that {', '.join(names)} can no longer run there.",
                       detail=",".join(names), host_id=host_id)


def plan(inv: Inventory, view: AgentView, limits: Limits,
         groups_for: Callable[[str], list[AffinityGroupInfo]],
         avoid: Mapping[str, Mapping[str, str]] | None = None) -> Plan:
    """Decide this cycle's steps. VMs are visited by name, so placement is repeatable.

    `avoid` maps VM id -> {host id: why}: peers that refused that VM recently.
    """
    p = _Planner(inv, view, limits, groups_for, avoid or {})
    reported = view.vm_ids()
    for vm in sorted(inv.vms.values(), key=lambda v: (v.name, v.id)):
        if vm.ft is None and vm.id not in reported:
            continue                 # the common case at 10,000 VMs: not an FT VM at all
        p.vm(vm)
    p.fences()
    return p.plan

