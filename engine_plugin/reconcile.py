"""One reconcile pass: desired state (the engine's `ft` property) against actual state
(the agents' statuses) gives at most one step per VM, each with its reason, plus the
engine events that describe what changed. Pure: no I/O except the `groups_for` lookup
the caller passes in (affinity groups, fetched once per cluster per cycle).

Who is the primary: the agent that reports the VM in role primary with the highest
generation. After a failover that is the survivor on another host, while the engine
still shows the VM `unknown` on the dead host (docs/engine-view.md).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine_plugin.agents import AgentView
from engine_plugin.events import ALERT, ERROR, NORMAL, WARNING, Event
from engine_plugin.inventory import AffinityGroupInfo, HostInfo, Inventory, VmInfo
from engine_plugin.placement import HostLoad, Limits, affinity_rules, choose_peer
from vdsm_ft import ftvalue
from vdsm_ft.api import COPYING_BACK, PeerSpec, Role, VmState, VmStatus
from vdsm_ft.layout import SECONDARY_SUFFIX, secondary_uuid

# After a failover into the VM's own identity the engine moves the VM to the survivor's
# host once VDSM there adopted it (external_vm_lookup_interval, 60 s). Until then a
# checkpoint's pause caught by that adoption makes the engine destroy the VM
# (docs/engine-view.md, "COLO's own pauses"): re-protection waits for the move, this long
# at most.
ADOPTION_WAIT_S = 150.0

RUNNING_VM_STATES = frozenset({"up", "powering_up", "reboot_in_progress", "migrating",
                               "paused", "not_responding", "unknown", "powering_down"})

# A primary in Starting counts toward its host's caps once the engine runs it there.
STARTED_VM_STATES = RUNNING_VM_STATES | {"wait_for_launch"}


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


@dataclass(frozen=True)
class RemoveExternal:
    """The engine's record of a secondary's domain that is gone (an external VM the
    engine imported, now Down): after a failover the survivor runs as the VM itself."""
    vm_id: str                   # the external VM's id (the secondary's derived UUID)
    vm_name: str                 # its engine name, external-<vm>-ft-secondary


Action = Protect | Unprotect | FenceManual | RemoveExternal


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)   # vm name -> what/why this cycle


def ft_wanted(vm: VmInfo) -> bool | None:
    """True/False for ft=true/false (or unset); None for an invalid value."""
    return ftvalue.wanted(vm.ft)


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
            if st.role is Role.PRIMARY and st.state is VmState.STARTING and not (
                    vm and vm.host_id == host_id and vm.status in STARTED_VM_STATES):
                continue    # a start that never ran here holds nothing (issue 16)
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
                 avoid: Mapping[str, Mapping[str, str]], now: float):
        self.inv, self.view, self.limits, self.groups_for = inv, view, limits, groups_for
        self.avoid = avoid
        self.now = now
        self.plan = Plan()
        self.loads = loads_from(inv, view)
        self.hosts = sorted(inv.hosts.values(), key=lambda h: h.name)
        self.fence_proofs: dict[str, set[str]] = {}   # dead host id -> VM ids it proves
        self._groups: dict[str, list[AffinityGroupInfo]] = {}
        self._vm_hosts: dict[str, str | None] | None = None
        self._externals: dict[str, list[VmInfo]] | None = None

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
            self.reason(vm, f"invalid ft value {ftvalue.shown(vm.ft)}")
            self.event(vm, "invalid-ft", 0, ERROR,
                       f"VM {vm.name}: custom property ft={ftvalue.shown(vm.ft)} is not "
                       f"valid; use ft=true to protect it or ft=false (or no property) for no FT.",
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
        self.arbiter_alert(vm, host, st)
        self.stray_externals(vm, st)
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
        qemu = self.view.statuses[vm.host_id].qemu if vm.host_id in self.view.statuses \
            else None
        if qemu is not None and not qemu.capable:
            self.reason(vm, f"not protected: the QEMU on {host.name} cannot do COLO")
            self.event(vm, VmState.NOT_PROTECTED.value, 0, WARNING,
                       f"VM {vm.name} is not protected: it runs on host {host.name}, whose "
                       f"QEMU cannot do COLO ({', '.join(qemu.failed)}). Fix: install "
                       f"vdsm-ft-qemu there (docs/qemu.md), or start the VM on another "
                       f"FT host.", detail=f"qemu:{host.id}")
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
        """Say what the last failover did, once; prove the old host's VM dead for the
        fence while the engine still shows the VM there."""
        lf = st.last_failover
        if lf is None or st.state in (VmState.FAILING_OVER, VmState.TAKING_IDENTITY):
            return
        old = vm.host_id
        old_name = self.host_name(lf.from_host)
        if lf.domain:
            # Keyed on the failover itself: re-protection takes new generations.
            pause = (f"; the workload paused {lf.identity_pause_ms:.0f} ms while it moved"
                     if lf.identity_pause_ms is not None else "")
            self.event(vm, "failed-over", 0, WARNING,
                       f"VM {vm.name} failed over from host {old_name} to host "
                       f"{host.name}: the secondary took over in {lf.duration_ms:.0f} ms "
                       f"and now runs as {vm.name} itself{pause}.", detail=f"{lf.at:.6f}")
        elif old and old != host.id and lf.from_host == old:
            self.event(vm, "continues", st.generation, WARNING,
                       f"VM {vm.name} continues on host {host.name} as external-{vm.name}"
                       f"{SECONDARY_SUFFIX} after host {old_name} failed (failover took "
                       f"{lf.duration_ms:.0f} ms).")
        if old and old != host.id and lf.from_host == old and \
                lf.old_primary_cannot_run and vm.status == "unknown":
            self.fence_proofs.setdefault(old, set()).add(vm.id)

    def arbiter_alert(self, vm: VmInfo, host: HostInfo, st: VmStatus) -> None:
        """One alert event per ALERT the primary's agent raised about the arbiter. The
        ALERT names its generation, so it is its own dedup key across re-protections."""
        if st.arbiter_alert:
            self.event(vm, "arbiter-alert", 0, ALERT,
                       f"VM {vm.name} on host {host.name}: {st.arbiter_alert}. The VM runs "
                       f"on; someone outside vdsm-ft wrote to etcd: find who, fix the "
                       f"key's permissions (docs/operations.md).", detail=st.arbiter_alert)

    def stray_externals(self, vm: VmInfo, st: VmStatus) -> None:
        """Remove the engine's Down records of this VM's secondaries: their domains went
        with a failover (or a re-protection) and the engine keeps a Down external VM."""
        for ext in self.externals().get(vm.name, ()):
            if ext.status != "down":
                continue
            if any(ext.id == secondary_uuid(vm.id, g) for g in range(1, st.generation + 1)):
                self.plan.actions.append(RemoveExternal(ext.id, ext.name))

    def externals(self) -> dict[str, list[VmInfo]]:
        """External VMs named like a secondary's domain, by the FT VM's name."""
        if self._externals is None:
            self._externals = {}
            for v in self.inv.vms.values():
                if v.name.startswith("external-") and v.name.endswith(SECONDARY_SUFFIX):
                    base = v.name.removeprefix("external-").removesuffix(SECONDARY_SUFFIX)
                    self._externals.setdefault(base, []).append(v)
        return self._externals

    def by_state(self, vm: VmInfo, host: HostInfo, st: VmStatus) -> None:
        gen = st.generation
        if st.image_current_at is not None and st.failovers:
            # One event per failover that needed a copy-back (vdsm_ft.copyback).
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.image_current_at))
            self.event(vm, "image current", st.failovers, NORMAL,
                       f"VM {vm.name}: its disk image on the storage domain is current "
                       f"again (copied back from host {host.name} after the failover, "
                       f"done at {when}).")
        if st.state is VmState.NEED_SECONDARY and st.secondary_host:
            # The agent accepted a peer and has not started Syncing yet.
            self.reason(vm, f"protection onto {self.host_name(st.secondary_host)} pending")
        elif st.state is VmState.NEED_SECONDARY or (st.state is VmState.DISABLED
                                                    and not st.suspended):
            self.place(vm, host, st)
        elif st.state is VmState.DISABLED:
            self.reason(vm, "protection suspended by an admin")
        elif st.state is VmState.NOT_PROTECTED and st.reason.startswith(COPYING_BACK):
            # The reason carries the progress; one event for the whole copy.
            self.reason(vm, f"not protected: {st.reason}")
            self.event(vm, VmState.NOT_PROTECTED.value, gen, WARNING,
                       f"VM {vm.name} is not protected: {COPYING_BACK} after the "
                       f"failover; its image there is behind until then.",
                       detail=COPYING_BACK)
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

    def qemu_problems(self, primary_id: str) -> dict[str, str]:
        """Hosts whose QEMU cannot hold a secondary of a primary on `primary_id`: it cannot
        do COLO, or it is another build than the primary's (the peer would refuse)."""
        own = self.view.statuses.get(primary_id)
        build = own.qemu.build if own is not None and own.qemu is not None else ""
        problems = {}
        for host_id, hs in self.view.statuses.items():
            if hs.qemu is None:
                continue
            if not hs.qemu.capable:
                problems[host_id] = (f"its QEMU cannot do COLO ({', '.join(hs.qemu.failed)}; "
                                     "see the host's event)")
            elif build and hs.qemu.build != build:
                problems[host_id] = (f"its QEMU build {hs.qemu.build!r} is not the "
                                     f"primary's {build!r}")
        return problems

    def place(self, vm: VmInfo, primary: HostInfo, st: VmStatus) -> None:
        reprotect = st.failovers > 0
        if reprotect and not self.engine_followed(vm, primary, st):
            return
        groups = self.groups(vm.cluster_id)
        rules = affinity_rules(vm, groups, self.vm_hosts() if groups else {})
        # The VM's cluster is the engine's; a survivor outside it is still placed there.
        choice = choose_peer(vm, primary.id, self.hosts, self.loads, self.limits,
                             self.view.problems, rules, self.avoid.get(vm.id),
                             self.qemu_problems(primary.id))
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

    def engine_followed(self, vm: VmInfo, primary: HostInfo, st: VmStatus) -> bool:
        """Whether the engine shows the VM where its survivor runs as the VM itself, or
        has waited too long for that (then one warning event)."""
        lf = st.last_failover
        if lf is None or not lf.domain or vm.host_id == primary.id:
            return True
        waited = self.now - lf.at
        if waited < ADOPTION_WAIT_S:
            self.reason(vm, f"re-protection waits until the engine shows {vm.name} on "
                            f"{primary.name}, where VDSM adopts it ({waited:.0f} s so far)")
            return False
        self.event(vm, "adoption late", st.failovers, WARNING,
                   f"VM {vm.name} runs on host {primary.name} since its failover "
                   f"{waited:.0f} s ago, but the engine does not show it there yet. It is "
                   f"re-protected anyway; check VDSM on {primary.name}: while the engine "
                   f"has the VM on another host, a pause VDSM reports makes the engine "
                   f"destroy it.", detail=primary.id)
        return True

    def vm_hosts(self) -> dict[str, str | None]:
        if self._vm_hosts is None:
            self._vm_hosts = {v.id: v.host_id for v in self.inv.vms.values()}
        return self._vm_hosts

    def groups(self, cluster_id: str) -> list[AffinityGroupInfo]:
        if cluster_id not in self._groups:
            self._groups[cluster_id] = self.groups_for(cluster_id)
        return self._groups[cluster_id]

    # ---------------------------------------------------------------- per host

    def qemu_events(self) -> None:
        """One event per host whose QEMU cannot do COLO, with the probe's cause and fix.
        Its id comes from the host and the probe's findings: posted once, not per cycle,
        and again only for a different QEMU that cannot either."""
        for host_id, hs in sorted(self.view.statuses.items()):
            qemu = hs.qemu
            if qemu is None or qemu.capable:
                continue
            self.event(None, "qemu-incapable", 0, ERROR,
                       f"Host {self.host_name(host_id)} cannot run FT VMs: {qemu.reason}",
                       detail=f"{qemu.path}\0{qemu.build}\0{','.join(qemu.failed)}",
                       host_id=host_id)

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
         avoid: Mapping[str, Mapping[str, str]] | None = None, *, now: float) -> Plan:
    """Decide this cycle's steps. VMs are visited by name, so placement is repeatable.

    `avoid` maps VM id -> {host id: why}: peers that refused that VM recently. `now` is
    the wall clock of this cycle (the planner reads no clock).
    """
    p = _Planner(inv, view, limits, groups_for, avoid or {}, now)
    reported = view.vm_ids()
    for vm in sorted(inv.vms.values(), key=lambda v: (v.name, v.id)):
        if vm.ft is None and vm.id not in reported:
            continue                 # the common case at 10,000 VMs: not an FT VM at all
        p.vm(vm)
    p.qemu_events()
    p.fences()
    return p.plan

