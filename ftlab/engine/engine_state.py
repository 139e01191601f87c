"""The fake engine's behaviour: inventory, VM and host life cycles, events.

This models what ovirt-engine does and what vdsm-ft depends on (docs/ovirt-facts.md,
"Host loss, fencing and HA"; docs/engine-view.md):
host loss (Up -> Connecting -> NonResponsive, VMs -> Unknown), fencing including manual
confirmation (VMs -> Down, HA VMs restarted elsewhere), VMs with leases restarted without
fencing, run-once starts whose custom properties replace the VM's set, VDSM reports
(external VMs imported as `external-<name>`, a known UUID followed to another host, a
paused copy destroyed), external events unique per (origin, custom_id) with flood control.

All state is guarded by one lock; the REST layer and the lab's control API both call in.
Calls to the lab's hosts (the `HostDriver`) are made outside the lock.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Set, Tuple
from xml.etree import ElementTree

from . import model
from .errors import BadRequest, Conflict, IncompleteParameters, LabError, NotFound
from .model import (BLANK_TEMPLATE_ID, AffinityGroup, AffinityLabel, AffinityRule, Cluster, Event,
                    GiB, Hook, Host, Tag, Template, Vm, VmDisk, VmNic)

ENGINE_USER = "admin@internal"
SEVERITIES = ("normal", "warning", "error", "alert")
# AuditLogType codes the fake writes (ovirt-engine AuditLogType.java).
EV_VDS_DETECTED = 13
EV_USER_RUN_VM = 32
EV_USER_STOP_VM = 33
EV_USER_FAILED_RUN_VM = 54
EV_USER_SHUTDOWN_VM = 73
EV_VM_DOWN_ERROR = 119
EV_VM_SET_TO_UNKNOWN = 142
EV_VM_DOWN_FENCED = 143
EV_USER_STARTED_VM = 153
EV_VDS_NOT_RESPONDING_CONNECTING = 9008
EV_VDS_NOT_RESPONDING = 9027
EV_HA_VM_FAILED = 9602
EV_HA_VM_RESTART_FAILED = 9603
EV_EXTERNAL = {"normal": 9801, "warning": 9802, "error": 9803, "alert": 9804}
EV_VM_DETECTED_ON_OTHER_HOST = 9999   # the engine only logs this line; kept as an event
EXTERNAL_EVENT_DEFAULT_FLOOD = 30     # EventFloodRegulator: external events with rate 0
# The default MAC pool's range start (MacPoolPerCluster: 56:6f:...).
MAC_POOL_PREFIX = "56:6f:ff"
# VDSM statuses a report may carry beyond the REST ones ("Migration Destination" and
# "Migration Source", VdsBrokerObjectsBuilder.convertToVmStatus); the record shows "migrating".
REPORT_ONLY_STATUSES = {"migrating_to": "migrating", "migrating_from": "migrating"}
# The actions ActionUtils.canExecute refuses while a VM is Unknown.
REFUSED_WHEN_UNKNOWN = ("run", "run once", "stop", "shutdown", "migrate", "create a snapshot of")


@dataclass(frozen=True)
class EngineTiming:
    """Engine timers. `real()` is ovirt-engine's defaults (0000_config.sql); tests scale down."""

    refresh: float = 0.05                 # VdsRefreshRate (3 s)
    grace: float = 1.0                    # TimeoutToResetVdsInSeconds (60 s)
    grace_spm_extra: float = 0.0          # DelayResetForSpmInSeconds (20 s)
    grace_per_vm: float = 0.0             # DelayResetPerVmInSeconds (0.5 s)
    lease_restart_delay: float = 0.5      # NumberVdsRefreshesBeforeTryToStartUnknownVms x refresh

    @classmethod
    def real(cls) -> "EngineTiming":
        return cls(refresh=3.0, grace=60.0, grace_spm_extra=20.0, grace_per_vm=0.5,
                   lease_restart_delay=30.0)


@dataclass(frozen=True)
class StartRequest:
    """What the engine sends VDSM's `VM.create` on the chosen host, reduced to what matters."""

    vm_id: str
    vm_name: str
    host_id: str
    host_name: str
    host_address: str
    memory: int
    cpus: int
    custom_properties: Dict[str, str]
    run_once: bool
    # The plugged devices only: LibvirtVmXmlBuilder writes no unplugged disk or NIC, so a
    # VM whose disks the engine unplugged boots without them.
    disks: Tuple[VmDisk, ...] = ()
    nics: Tuple[VmNic, ...] = ()


class HostDriver(Protocol):
    """How the engine reaches a host's VDSM. The lab plugs in its VDSM stand-in."""

    def start_vm(self, request: StartRequest) -> None:
        """Create the VM on request.host_id; raise to report a failed start."""

    def stop_vm(self, host_id: str, vm_id: str, graceful: bool) -> None:
        """Destroy (or shut down) the VM on the host."""

    def destroy_vm(self, host_id: str, vm_id: str) -> None:
        """Destroy a domain the engine found where it must not run."""


@dataclass
class ObservedAction:
    """Something the engine did to a host that the lab may want to assert on."""

    kind: str          # "start", "stop", "shutdown", "destroy", "fence"
    host_id: str
    vm_id: Optional[str] = None
    detail: str = ""
    time: float = field(default_factory=time.time)


@dataclass
class VmReport:
    """One domain in a VDSM report (`Host.getAllVmStats`), reduced."""

    uuid: str
    name: str
    status: str = "up"
    has_ovirt_metadata: bool = True
    memory: int = 1 * GiB
    # The live domain XML (Host.dumpxmls). None: the devices hash did not change, so the
    # engine does not fetch it this cycle (VmsMonitoring, vmsWithChangedDevices).
    domxml: Optional[str] = None


def _new_id() -> str:
    return str(uuid.uuid4())


def device_aliases(domxml: str) -> Set[str]:
    """The device ids behind the `ua-<id>` aliases of a domain XML's disks and NICs."""
    try:
        root = ElementTree.fromstring(domxml)
    except ElementTree.ParseError as e:
        raise LabError("VDSM reported a domain XML that does not parse: %s" % e) from None
    out = set()
    for el in [*root.iterfind("devices/disk"), *root.iterfind("devices/interface")]:
        alias = el.find("alias")
        name = alias.get("name", "") if alias is not None else ""
        if name.startswith("ua-"):
            out.add(name[3:])
    return out


class EngineState:
    def __init__(self, driver: Optional[HostDriver] = None,
                 timing: Optional[EngineTiming] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.driver = driver
        self.timing = timing or EngineTiming()
        self.clock = clock
        self.clusters: Dict[str, Cluster] = {}
        self.hosts: Dict[str, Host] = {}
        self.vms: Dict[str, Vm] = {}
        self.tags: Dict[str, Tag] = {}
        self.affinity_groups: Dict[str, AffinityGroup] = {}
        self.affinity_labels: Dict[str, AffinityLabel] = {}
        self.events: List[Event] = []
        self._event_keys: Dict[Tuple[str, int], int] = {}
        self._flood: Dict[tuple, float] = {}
        self._event_index = itertools.count(1)
        self.actions: List[ObservedAction] = []
        self._lease_restart_at: Dict[str, float] = {}
        self._memory_dirty = False
        self._vm_names: Dict[str, str] = {}     # name -> id; VM names are unique
        self.templates: Dict[str, Template] = {
            BLANK_TEMPLATE_ID: Template(id=BLANK_TEMPLATE_ID, name="Blank",
                                        description="Blank template")}
        self._macs = itertools.count(1)
        # Bumped on every change that a list cache depends on (VM set, host set).
        self.generation = 0

    # ----- lookups -------------------------------------------------------------------------

    @staticmethod
    def _find(table: Dict[str, model.Record], key: str) -> model.Record:
        """By id, else by name (the engine's REST accepts either in references)."""
        rec = table.get(key)
        if rec is not None:
            return rec
        for rec in table.values():
            if rec.name == key:
                return rec
        raise NotFound(key)

    def cluster(self, key: str) -> Cluster:
        return self._find(self.clusters, key)  # type: ignore[return-value]

    def host(self, key: str) -> Host:
        return self._find(self.hosts, key)  # type: ignore[return-value]

    def vm(self, key: str) -> Vm:
        vm = self.vms.get(key) or self.vms.get(self._vm_names.get(key, ""))
        if vm is None:
            raise NotFound(key)
        return vm

    def tag(self, key: str) -> Tag:
        return self._find(self.tags, key)  # type: ignore[return-value]

    def template(self, key: str) -> Template:
        return self._find(self.templates, key)  # type: ignore[return-value]

    def _changed(self, *records: model.Record) -> None:
        for r in records:
            r.touch()
        self.generation += 1
        self.changed.notify_all()

    # ----- inventory (lab control API) -----------------------------------------------------

    def add_cluster(self, name: str, cluster_id: Optional[str] = None) -> Cluster:
        with self.lock:
            c = Cluster(id=cluster_id or _new_id(), name=name)
            self.clusters[c.id] = c
            self._changed(c)
            return c

    def add_host(self, name: str, cluster: str, address: str = "", memory: int = 64 * GiB,
                 reserved_memory: int = 1 * GiB, status: str = "up",
                 hooks: Iterable[Hook] = (), power_management: bool = False, spm: bool = False,
                 host_id: Optional[str] = None) -> Host:
        with self.lock:
            h = Host(id=host_id or _new_id(), name=name, address=address or name,
                     cluster_id=self.cluster(cluster).id, memory=memory,
                     reserved_memory=reserved_memory, status=status, hooks=list(hooks),
                     power_management=power_management, spm=spm)
            self.hosts[h.id] = h
            self._changed(h)
            return h

    def set_host_hooks(self, host: str, hooks: Iterable[Hook]) -> None:
        with self.lock:
            h = self.host(host)
            h.hooks = list(hooks)
            self._changed(h)

    def add_vm(self, name: str, cluster: str, memory: int = 1 * GiB, cpus: int = 1,
               custom_properties: Optional[Dict[str, str]] = None, ha: bool = False,
               ha_priority: int = 1, lease_storage_domain: Optional[str] = None,
               status: str = "down", host: Optional[str] = None, tags: Iterable[str] = (),
               vm_id: Optional[str] = None, origin: str = "ovirt",
               template: Optional[str] = None) -> Vm:
        """AddVm: the new VM gets copies of the template's disks and NICs, with new ids
        (and MACs from the pool)."""
        with self.lock:
            if name in self._vm_names:
                raise Conflict("[Cannot add VM. The given name is already in use.]")
            tpl = self.template(template) if template else self.templates[BLANK_TEMPLATE_ID]
            v = Vm(id=vm_id or _new_id(), name=name, cluster_id=self.cluster(cluster).id,
                   memory=memory, cpus=cpus, custom_properties=dict(custom_properties or {}),
                   ha_enabled=ha, ha_priority=ha_priority,
                   lease_storage_domain=lease_storage_domain, origin=origin,
                   tags={self.tag(t).id for t in tags}, template_id=tpl.id,
                   disks=[VmDisk(id=_new_id(), name="%s_Disk%d" % (name, i + 1), size=size,
                                 interface=iface, bootable=boot)
                          for i, (_, size, iface, boot) in enumerate(tpl.disks)])
            for nic in tpl.nics:
                v.nics.append(VmNic(id=_new_id(), name=nic, mac=self._new_mac()))
            self.vms[v.id] = v
            self._vm_names[v.name] = v.id
            if host is not None:
                h = self.host(host)
                v.host_id, v.status = h.id, status if status != "down" else "up"
                v.run_custom_properties = dict(v.custom_properties)
                v.start_time = time.time()
            else:
                v.status = status
            self._recompute_memory()
            self._changed(v)
            return v

    def add_template(self, name: str, disks: Sequence[Tuple[str, int, str, bool]] = (),
                     nics: Sequence[str] = (), memory: int = 1 * GiB,
                     description: str = "") -> Template:
        """A template whose VMs get these disks (name, size, interface, bootable) and NICs."""
        with self.lock:
            if any(t.name == name for t in self.templates.values()):
                raise Conflict("[Cannot add Template. The given name is already in use.]")
            t = Template(id=_new_id(), name=name, memory=memory, description=description,
                         disks=list(disks), nics=list(nics))
            self.templates[t.id] = t
            self._changed(t)
            return t

    def _new_mac(self) -> str:
        n = next(self._macs)
        return "%s:%02x:%02x:%02x" % (MAC_POOL_PREFIX, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF)

    def add_nic(self, vm_key: str, name: str, mac: Optional[str] = None,
                interface: str = "virtio") -> VmNic:
        """AddVmInterface (hot plug is not modelled: a NIC added to a running VM waits for
        the next start, unplugged)."""
        with self.lock:
            vm = self.vm(vm_key)
            if any(n.name == name for n in vm.nics):
                raise Conflict("[Cannot add Interface. The VM Network Interface name is "
                               "already in use.]")
            nic = VmNic(id=_new_id(), name=name, mac=mac or self._new_mac(), interface=interface,
                        plugged=vm.status == "down")
            vm.nics.append(nic)
            self._changed(vm)
            return nic

    def add_tag(self, name: str, description: str = "") -> Tag:
        with self.lock:
            if any(t.name == name for t in self.tags.values()):
                raise Conflict("The specified Tag name already exists.")
            t = Tag(id=_new_id(), name=name, description=description)
            self.tags[t.id] = t
            self._changed(t)
            return t

    # ----- memory accounting ---------------------------------------------------------------

    def _recompute_memory(self) -> None:
        # Lazy: a full scan per change would make building a 10,000-VM lab quadratic.
        self._memory_dirty = True

    def refresh_memory(self) -> None:
        """Bring every host's committed memory up to date (call under the lock).

        HostMonitoring.refreshCommitedMemory: the sum over the VMs whose run_on_vds is the
        host, external ones included; a copy another host runs under this VM's id counts
        only where run_on_vds points."""
        if not self._memory_dirty:
            return
        self._memory_dirty = False
        committed: Dict[str, Tuple[int, int]] = {h: (0, 0) for h in self.hosts}
        for v in self.vms.values():
            if v.host_id in committed and v.status in model.VM_RUNNING_STATUSES:
                mem, n = committed[v.host_id]
                committed[v.host_id] = (mem + v.memory, n + 1)
        for hid, (mem, n) in committed.items():
            h = self.hosts[hid]
            if (h.committed_memory, h.running_vms) != (mem, n):
                h.committed_memory, h.running_vms = mem, n
                h.touch()

    # ----- events --------------------------------------------------------------------------

    def _log(self, code: int, description: str, severity: str = "normal",
             vm: Optional[Vm] = None, host: Optional[Host] = None) -> Event:
        ev = Event(index=next(self._event_index), code=code, description=description,
                   severity=severity, origin="oVirt", custom_id=-1,
                   vm_id=vm.id if vm else None, host_id=host.id if host else None,
                   cluster_id=(vm.cluster_id if vm else host.cluster_id if host else None))
        self.events.append(ev)
        self.generation += 1
        return ev

    def add_external_event(self, origin: Optional[str], severity: Optional[str],
                           custom_id: Optional[int], description: Optional[str],
                           flood_rate: Optional[int] = None, vm_id: Optional[str] = None,
                           host_id: Optional[str] = None, cluster_id: Optional[str] = None,
                           correlation_id: Optional[str] = None) -> Event:
        """`AddExternalEventCommand` as reached through `POST /events`."""
        missing = [n for n, v in (("origin", origin), ("severity", severity),
                                  ("customId", custom_id), ("description", description))
                   if v is None]
        if missing:
            raise IncompleteParameters("Event [%s] required for add" % ", ".join(missing))
        assert origin is not None and severity is not None and custom_id is not None
        with self.lock:
            if origin.lower() == "ovirt":
                raise BadRequest("[Cannot add External Event. Illegal Origin for External "
                                 "Event : oVirt]")
            if severity not in SEVERITIES:
                raise BadRequest("Invalid value '%s' for severity" % severity)
            if (origin, custom_id) in self._event_keys:
                raise BadRequest("[Cannot add External Event. External Event with this custom "
                                 "id already exists.]")
            vm = self.vm(vm_id) if vm_id else None
            host = self.host(host_id) if host_id else None
            code = EV_EXTERNAL[severity]
            # EventFloodRegulator: the key is the type plus the entities, not the custom id.
            rate = flood_rate if flood_rate else EXTERNAL_EVENT_DEFAULT_FLOOD
            key = (code, vm.id if vm else "", host.id if host else "", cluster_id or "")
            now = self.clock()
            if self._flood.get(key, -1.0) > now:
                # The event is not logged, so the command does not succeed and the REST layer
                # answers 400 with an empty message list (AddExternalEventCommand, doAction).
                raise BadRequest("[]")
            self._flood[key] = now + rate
            ev = Event(index=next(self._event_index), code=code, description=description or "",
                       severity=severity, origin=origin, custom_id=custom_id,
                       flood_rate=flood_rate or 0, vm_id=vm.id if vm else None,
                       host_id=host.id if host else None,
                       cluster_id=cluster_id or (vm.cluster_id if vm else None),
                       correlation_id=correlation_id)
            self.events.append(ev)
            self._event_keys[(origin, custom_id)] = ev.index
            self.generation += 1
            return ev

    # ----- placement -----------------------------------------------------------------------

    def _affinity_violation(self, vm: Vm, host: Host) -> Optional[str]:
        for g in self.affinity_groups.values():
            if vm.id not in g.vm_ids:
                continue
            r = g.vms_rule
            if r is not None and r.enabled and r.enforcing:
                others = [self.vms[o] for o in g.vm_ids if o != vm.id and o in self.vms]
                on_host = [o for o in others if o.host_id == host.id
                           and o.status in model.VM_RUNNING_STATUSES]
                if not r.positive and on_host:
                    return "negative VM affinity group %s (%s runs on %s)" % (
                        g.name, on_host[0].name, host.name)
            hr = g.hosts_rule
            if hr is not None and hr.enabled and hr.enforcing and g.host_ids:
                if hr.positive and host.id not in g.host_ids:
                    return "positive host affinity group %s" % g.name
                if not hr.positive and host.id in g.host_ids:
                    return "negative host affinity group %s" % g.name
        return None

    def _host_filter(self, vm: Vm, host: Host) -> Optional[str]:
        if host.status != "up":
            return "host %s is %s" % (host.name, host.status)
        if host.cluster_id != vm.cluster_id:
            return "host %s is not in the VM's cluster" % host.name
        if host.max_scheduling_memory < vm.memory:
            return "host %s has %d bytes schedulable, the VM needs %d" % (
                host.name, host.max_scheduling_memory, vm.memory)
        return self._affinity_violation(vm, host)

    def _schedule(self, vm: Vm, candidates: Sequence[Host]) -> Host:
        self.refresh_memory()
        reasons = []
        best: Optional[Host] = None
        for h in candidates:
            why = self._host_filter(vm, h)
            if why:
                reasons.append(why)
            elif best is None or h.max_scheduling_memory > best.max_scheduling_memory:
                best = h
        if best is None:
            raise Conflict("[Cannot run VM. There is no host that satisfies current scheduling "
                           "constraints. See below for details:, %s]" % "; ".join(reasons or
                                                                                ["no hosts"]))
        return best

    # ----- VM life cycle -------------------------------------------------------------------

    def start_vm(self, vm_key: str, placement_hosts: Sequence[str] = (),
                 custom_properties: Optional[Dict[str, str]] = None,
                 run_once: bool = False) -> Vm:
        """`RunVm`/`RunVmOnce`. The first placement host is the destination; run-once custom
        properties replace the VM's set for this run (RunVmOnceCommand)."""
        with self.lock:
            vm = self.vm(vm_key)
            self.refuse_if_unknown(vm, "run once" if run_once else "run")
            if vm.status in ("up", "powering_up", "wait_for_launch", "paused", "migrating"):
                raise Conflict("[Cannot run VM. VM is running.]")
            if vm.status != "down":
                raise Conflict("[Cannot run VM because the VM is in %s status.]" % vm.status)
            if placement_hosts:
                candidates = [self.host(placement_hosts[0])]
            elif vm.placement_hosts:
                candidates = [self.hosts[h] for h in vm.placement_hosts if h in self.hosts]
            else:
                candidates = sorted(self.hosts.values(), key=lambda h: h.name)
            host = self._schedule(vm, candidates)
            props = dict(custom_properties) if custom_properties is not None \
                else dict(vm.custom_properties)
            request = self._launch(vm, host, props, run_once)
            self._log(EV_USER_RUN_VM if not run_once else EV_USER_STARTED_VM,
                      "VM %s was started by %s (Host: %s)." % (vm.name, ENGINE_USER, host.name),
                      vm=vm, host=host)
        self._run_on_host(request)
        return vm

    def _launch(self, vm: Vm, host: Host, props: Dict[str, str], run_once: bool) -> StartRequest:
        vm.status = "wait_for_launch"
        vm.host_id = host.id
        vm.run_once = run_once
        vm.run_custom_properties = props
        vm.stop_reason = ""
        vm.start_time = time.time()
        self._recompute_memory()
        self._changed(vm, host)
        self.actions.append(ObservedAction("start", host.id, vm.id,
                                           ";".join("%s=%s" % kv for kv in props.items())))
        return StartRequest(vm_id=vm.id, vm_name=vm.name, host_id=host.id, host_name=host.name,
                            host_address=host.address, memory=vm.memory, cpus=vm.cpus,
                            custom_properties=dict(props), run_once=run_once,
                            disks=tuple(dataclasses.replace(d) for d in vm.disks if d.plugged),
                            nics=tuple(dataclasses.replace(n) for n in vm.nics if n.plugged))

    def _run_on_host(self, request: StartRequest) -> None:
        if self.driver is None:
            self._start_finished(request, None)
            return
        # VDSM's create returns at once and the VM comes up later; do the same so a slow
        # host (hooks, libvirt) does not hold the REST call.
        threading.Thread(target=self._drive_start, args=(request,), daemon=True,
                         name="engine-start-%s" % request.vm_name).start()

    def _drive_start(self, request: StartRequest) -> None:
        assert self.driver is not None
        try:
            self.driver.start_vm(request)
        except Exception as e:  # the host's failure becomes the VM's down reason
            self._start_finished(request, "%s: %s" % (type(e).__name__, e))
        else:
            self._start_finished(request, None)

    def _start_finished(self, request: StartRequest, error: Optional[str]) -> None:
        with self.lock:
            vm = self.vms.get(request.vm_id)
            if vm is None or vm.host_id != request.host_id or vm.status != "wait_for_launch":
                return
            host = self.hosts[request.host_id]
            if error is None:
                vm.status = "up"
            else:
                vm.status, vm.host_id, vm.stop_reason = "down", None, error
                self._log(EV_USER_FAILED_RUN_VM, "Failed to run VM %s on Host %s: %s"
                          % (vm.name, host.name, error), "error", vm=vm, host=host)
            self._recompute_memory()
            self._changed(vm, host)

    def stop_vm(self, vm_key: str, graceful: bool) -> Vm:
        with self.lock:
            vm = self.vm(vm_key)
            verb = "shutdown" if graceful else "stop"
            self.refuse_if_unknown(vm, verb)
            if vm.status == "down":
                raise Conflict("[Cannot %s VM. VM is not running.]" % verb)
            host = self.hosts.get(vm.host_id or "")
            vm.stop_reason = "user"
        if host is not None and self.driver is not None:
            self.driver.stop_vm(host.id, vm.id, graceful)
        with self.lock:
            if host is not None:
                self.actions.append(ObservedAction(verb, host.id, vm.id))
            self._set_down(vm, "user")
            if graceful:
                self._log(EV_USER_SHUTDOWN_VM, "VM shutdown initiated by %s on VM %s (Host: %s)."
                          % (ENGINE_USER, vm.name, host.name if host else "-"), vm=vm, host=host)
            else:
                self._log(EV_USER_STOP_VM, "VM %s powered off by %s (Host: %s)."
                          % (vm.name, ENGINE_USER, host.name if host else "-"), vm=vm, host=host)
            return vm

    @staticmethod
    def refuse_if_unknown(vm: Vm, action: str) -> None:
        """ActionUtils.canExecute: no run, run once, stop, shutdown, migrate or snapshot of
        a VM in Unknown status (only a fence confirmation clears it)."""
        assert action in REFUSED_WHEN_UNKNOWN
        if vm.status == "unknown":
            raise Conflict("[Cannot %s VM because the VM is in Unknown status.]" % action)

    def migrate_vm(self, vm_key: str) -> None:
        """MigrateVm: refused while Unknown; the lab has no migration to offer otherwise."""
        with self.lock:
            vm = self.vm(vm_key)
            self.refuse_if_unknown(vm, "migrate")
            raise Conflict("[Cannot migrate VM %s: the lab's engine does not migrate VMs.]"
                           % vm.name)

    def create_snapshot(self, vm_key: str) -> None:
        """CreateSnapshotForVm: refused while Unknown; the lab has no snapshots otherwise."""
        with self.lock:
            vm = self.vm(vm_key)
            self.refuse_if_unknown(vm, "create a snapshot of")
            raise Conflict("[Cannot create a snapshot of VM %s: the lab's engine has no "
                           "storage to snapshot.]" % vm.name)

    def _set_down(self, vm: Vm, reason: str) -> None:
        old = self.hosts.get(vm.host_id or "")
        vm.migrating_to_host_id = None
        vm.status, vm.host_id, vm.stop_reason = "down", None, reason
        vm.run_custom_properties, vm.run_once = None, False
        self._lease_restart_at.pop(vm.id, None)
        self._recompute_memory()
        self._changed(vm, *([old] if old else []))

    def update_vm(self, vm_key: str, changes: Dict[str, object]) -> Vm:
        """`UpdateVm`. `custom_properties`, when given, replaces the whole set."""
        with self.lock:
            vm = self.vm(vm_key)
            if "name" in changes and changes["name"] != vm.name:
                if changes["name"] in self._vm_names:
                    raise Conflict("[Cannot edit VM. The given name is already in use.]")
                del self._vm_names[vm.name]
                self._vm_names[str(changes["name"])] = vm.id
            for k, v in changes.items():
                if k == "custom_properties":
                    vm.custom_properties = dict(v)  # type: ignore[arg-type]
                elif k == "placement_hosts":
                    vm.placement_hosts = [self.host(h).id for h in v]  # type: ignore[union-attr]
                elif k in ("name", "description", "memory", "cpus", "ha_enabled", "ha_priority",
                           "lease_storage_domain", "placement_affinity"):
                    setattr(vm, k, v)
                else:
                    raise BadRequest("the fake engine cannot update %r" % k)
            self._recompute_memory()
            self._changed(vm)
            return vm

    def remove_vm(self, vm_key: str) -> None:
        with self.lock:
            vm = self.vm(vm_key)
            if vm.status != "down":
                raise Conflict("[Cannot remove VM. VM is running.]")
            del self.vms[vm.id]
            self._vm_names.pop(vm.name, None)
            for g in self.affinity_groups.values():
                if vm.id in g.vm_ids:
                    g.vm_ids.remove(vm.id)
                    g.touch()
            self._changed(vm)

    # ----- host loss, fencing, HA ----------------------------------------------------------

    def kill_host(self, host_key: str) -> None:
        """The lab host died or lost its link: VDSM stops answering the engine."""
        with self.lock:
            h = self.host(host_key)
            if h.reachable:
                h.reachable = False
                h.unreachable_since = self.clock()
                self._changed(h)

    def revive_host(self, host_key: str) -> None:
        """VDSM answers again; the next host monitoring round sets the host Up. VMs left
        Unknown stay so until the host reports them."""
        with self.lock:
            h = self.host(host_key)
            h.reachable, h.unreachable_since = True, None
            self._changed(h)

    def _grace(self, h: Host) -> float:
        n = sum(1 for v in self.vms.values() if v.host_id == h.id)
        t = self.timing
        return t.grace + (t.grace_spm_extra if h.spm else 0.0) + t.grace_per_vm * n

    def tick(self) -> None:
        """One monitoring round (VdsManager.onTimer for every host)."""
        fences: List[str] = []
        starts: List[StartRequest] = []
        with self.lock:
            now = self.clock()
            for h in self.hosts.values():
                if h.reachable and h.status in ("connecting", "non_responsive"):
                    # HostMonitoring.refresh: VDSM answered getVdsStats, the host is Up again.
                    h.status = "up"
                    self._log(EV_VDS_DETECTED, "Status of host %s was set to Up." % h.name,
                              host=h)
                    self._changed(h)
                    continue
                if h.reachable or h.unreachable_since is None:
                    continue
                if h.status == "up":
                    h.status = "connecting"
                    self._log(EV_VDS_NOT_RESPONDING_CONNECTING,
                              "Host %s is not responding. It will stay in Connecting state for "
                              "a grace period of %d seconds and after that an attempt to fence "
                              "the host will be issued." % (h.name, round(self._grace(h))),
                              "warning", host=h)
                    self._changed(h)
                elif h.status == "connecting" and now - h.unreachable_since >= self._grace(h):
                    self._host_not_responding(h, now)
                    if h.power_management:
                        fences.append(h.id)
            for vm_id, at in list(self._lease_restart_at.items()):
                vm = self.vms.get(vm_id)
                if vm is None or vm.status != "unknown":
                    self._lease_restart_at.pop(vm_id, None)
                elif now >= at:
                    # restartVmsWithLeaseIfNeeded: sanlock guarantees the old copy lost its
                    # lease, so the engine starts the VM elsewhere without any fencing.
                    self._lease_restart_at.pop(vm_id, None)
                    old_host = vm.host_id
                    self._set_down(vm, "lease")
                    req = self._ha_restart(vm, exclude=old_host)
                    if req is not None:
                        starts.append(req)
        for host_id in fences:
            # VdsNotRespondingTreatment with power management: RestartVds.
            self.fence(host_id, "restart")
        for req in starts:
            self._run_on_host(req)

    def _host_not_responding(self, h: Host, now: float) -> None:
        h.status = "non_responsive"
        self._log(EV_VDS_NOT_RESPONDING, "Host %s is non responsive." % h.name, "warning", host=h)
        for vm in self.vms.values():
            if vm.host_id == h.id and vm.status in model.VM_RUNNING_STATUSES:
                vm.status = "unknown"
                vm.touch()
                self._log(EV_VM_SET_TO_UNKNOWN, "VM %s was set to the Unknown status." % vm.name,
                          "warning", vm=vm, host=h)
                if vm.lease_storage_domain:
                    self._lease_restart_at[vm.id] = now + self.timing.lease_restart_delay
        self._changed(h)

    def fence(self, host_key: str, fence_type: str) -> str:
        """`POST hosts/<id>/fence`. Returns the power status for `status`, else ''."""
        starts: List[StartRequest] = []
        with self.lock:
            h = self.host(host_key)
            if fence_type == "manual":
                if h.status not in ("non_responsive", "connecting", "reboot", "kdumping"):
                    raise Conflict("[Cannot confirm 'Host has been rebooted' Host. Operation can "
                                   "be performed only when Host status is Non Responsive.]")
                self.actions.append(ObservedAction("fence", h.id, detail="manual"))
                starts = self._clear_host_vms(h)
            elif fence_type in ("restart", "stop", "start", "status"):
                if not h.power_management:
                    raise Conflict("[Cannot %s Host. Power Management is not enabled for Host.]"
                                   % fence_type)
                self.actions.append(ObservedAction("fence", h.id, detail=fence_type))
                if fence_type == "status":
                    return "on" if h.reachable else "off"
                if fence_type in ("restart", "stop"):
                    starts = self._clear_host_vms(h)
                    h.status = "down" if fence_type == "stop" else h.status
                if fence_type in ("restart", "start") and h.reachable:
                    h.status = "up"
                h.touch()
            else:
                raise BadRequest("Invalid value '%s' for fence_type" % fence_type)
            self._changed(h)
        for req in starts:
            self._run_on_host(req)
        return ""

    def _clear_host_vms(self, h: Host) -> List[StartRequest]:
        """ClearNonResponsiveVdsVms: every VM of the host goes Down; HA VMs are re-run."""
        ha: List[Vm] = []
        for vm in list(self.vms.values()):
            if vm.host_id != h.id:
                continue
            self._set_down(vm, "fenced")
            self._log(EV_VM_DOWN_FENCED, "Vm %s was shut down due to %s host reboot or manual "
                      "fence" % (vm.name, h.name), vm=vm, host=h)
            if vm.ha_enabled and vm.origin != "external":
                ha.append(vm)
        starts = []
        for vm in sorted(ha, key=lambda v: -v.ha_priority):
            req = self._ha_restart(vm, exclude=h.id)
            if req is not None:
                starts.append(req)
        return starts

    def _ha_restart(self, vm: Vm, exclude: Optional[str]) -> Optional[StartRequest]:
        self._log(EV_HA_VM_FAILED, "Highly Available VM %s failed. It will be restarted "
                  "automatically." % vm.name, "error", vm=vm)
        candidates = [h for h in sorted(self.hosts.values(), key=lambda h: h.name)
                      if h.id != exclude]
        try:
            host = self._schedule(vm, candidates)
        except Conflict as e:
            self._log(EV_HA_VM_RESTART_FAILED, "Restart of the Highly Available VM %s failed: %s"
                      % (vm.name, e.detail), "error", vm=vm)
            return None
        return self._launch(vm, host, dict(vm.custom_properties), run_once=False)

    # ----- VDSM reports --------------------------------------------------------------------

    def report_vms(self, host_key: str, reports: Iterable[VmReport], full: bool = True) -> None:
        """A host's VDSM reports its domains (VmsMonitoring / VmAnalyzer). With `full`, a VM
        the engine runs on this host that is missing from the report went Down.

        The report changes no host status: host monitoring does (see tick). A host that is
        not Up is not polled (VdsManager.isMonitoringNeeded): its report is dropped."""
        destroys: List[Tuple[str, str]] = []
        ha_starts: List[StartRequest] = []
        with self.lock:
            h = self.host(host_key)
            if not h.reachable:
                raise LabError("host %s is dead: it cannot report VMs" % h.name)
            if h.status in ("connecting", "non_responsive"):
                return
            seen = set()
            for r in reports:
                r = r if isinstance(r, VmReport) else VmReport(**r)  # type: ignore[arg-type]
                seen.add(r.uuid)
                vm = self.vms.get(r.uuid)
                if vm is None:
                    vm = self._import_external(h, r, destroys)
                elif r.status == "down":
                    if vm.host_id == h.id:
                        ha_starts += self._vm_went_down(vm, h, "reported down by VDSM")
                    destroys.append((h.id, r.uuid))
                    continue
                elif vm.host_id == h.id:
                    status = REPORT_ONLY_STATUSES.get(r.status, r.status)
                    if vm.status != status:
                        vm.status = status
                        self._changed(vm)
                else:
                    self._reported_on_other_host(vm, h, r, destroys)
                if vm is not None and vm.host_id == h.id and r.domxml is not None:
                    self._monitor_devices(vm, r.domxml)
            if full:
                for vm in list(self.vms.values()):
                    if vm.host_id == h.id and vm.id not in seen \
                            and vm.status != "wait_for_launch":
                        ha_starts += self._vm_went_down(vm, h, "no longer reported by VDSM")
            self._recompute_memory()
            self._changed(h)
        for host_id, vm_id in destroys:
            if self.driver is not None:
                self.driver.destroy_vm(host_id, vm_id)
        for req in ha_starts:
            self._run_on_host(req)

    def _import_external(self, h: Host, r: VmReport,
                         destroys: List[Tuple[str, str]]) -> Optional[Vm]:
        # processUnmanagedVm: Down or paused-on-EIO external domains are destroyed, the rest
        # is imported (AddUnmanagedVms) whatever VDSM's metadata says.
        if r.status == "down":
            destroys.append((h.id, r.uuid))
            self.actions.append(ObservedAction("destroy", h.id, r.uuid, "external VM down"))
            return None
        vm = Vm(id=r.uuid, name="external-%s" % r.name, cluster_id=h.cluster_id,
                memory=r.memory, status=REPORT_ONLY_STATUSES.get(r.status, r.status),
                host_id=h.id, origin="external", start_time=time.time())
        vm.run_custom_properties = {}
        self.vms[vm.id] = vm
        self._vm_names[vm.name] = vm.id
        self._changed(vm)
        return vm

    def _reported_on_other_host(self, vm: Vm, h: Host, r: VmReport,
                                destroys: List[Tuple[str, str]]) -> None:
        """VmAnalyzer.proceedVmReportedOnOtherHost, by the reported status."""
        if r.status == "migrating_to" and vm.host_id is not None:
            return      # the destination of a migration: the source still owns the VM
        if r.status == "migrating_from":
            return
        if r.status == "paused" and vm.host_id is not None and vm.status != "unknown" \
                and vm.migrating_to_host_id != h.id:
            destroys.append((h.id, vm.id))
            self.actions.append(ObservedAction(
                "destroy", h.id, vm.id, "paused copy of %s while it runs on %s"
                % (vm.name, self.hosts[vm.host_id].name if vm.host_id in self.hosts else "?")))
            return
        if r.status == "wait_for_launch" and vm.status == "unknown":
            return
        # updateRuntimeData: status and run_on_vds := the reporter, whatever the old host's
        # state, and also when the record is Down.
        old = self.hosts.get(vm.host_id or "")
        self._log(EV_VM_DETECTED_ON_OTHER_HOST, "VM %s was unexpectedly detected as '%s' on VDS "
                  "%s (expected on %s)" % (vm.name, r.status, h.name, old.name if old else None),
                  "warning", vm=vm, host=h)
        vm.host_id, vm.status = h.id, REPORT_ONLY_STATUSES.get(r.status, r.status)
        vm.migrating_to_host_id = None
        if vm.start_time is None or old is None:
            vm.start_time = time.time()
        self._lease_restart_at.pop(vm.id, None)
        self._changed(vm, *([old] if old else []))

    def _monitor_devices(self, vm: Vm, domxml: str) -> None:
        """VmDevicesMonitoring: the managed disks and NICs found in the domain XML (by alias
        `ua-<device id>`, VmDevicesConverter.parseDisks/parseNics) are plugged; those
        missing from it are unplugged (handleRemovedDevices)."""
        present = device_aliases(domxml)
        changed = False
        for dev in [*vm.disks, *vm.nics]:
            plugged = dev.id in present
            if dev.plugged != plugged:
                dev.plugged = plugged
                changed = True
        if changed:
            self._changed(vm)

    def _vm_went_down(self, vm: Vm, h: Host, why: str) -> List[StartRequest]:
        user_stop = vm.stop_reason == "user"
        self._set_down(vm, why)
        self._log(EV_VM_DOWN_ERROR, "VM %s is down with error. Exit message: %s." % (vm.name, why),
                  "error", vm=vm, host=h)
        # A crash (not a user stop) of an HA VM on a live host re-runs it (HA_VM_FAILED).
        if vm.ha_enabled and not user_stop and vm.origin != "external":
            req = self._ha_restart(vm, exclude=None)
            return [req] if req is not None else []
        return []

    # ----- tags, affinity ------------------------------------------------------------------

    def assign_tag(self, entity: model.Record, tag_key: str) -> Tag:
        with self.lock:
            t = self.tag(tag_key)
            entity.tags.add(t.id)  # type: ignore[attr-defined]
            self._changed(entity)
            return t

    def unassign_tag(self, entity: model.Record, tag_key: str) -> None:
        with self.lock:
            t = self.tag(tag_key)
            if t.id not in entity.tags:  # type: ignore[attr-defined]
                raise NotFound(tag_key)
            entity.tags.discard(t.id)  # type: ignore[attr-defined]
            self._changed(entity)

    def add_affinity_group(self, cluster_key: str, name: str, vms_rule: Optional[AffinityRule],
                           hosts_rule: Optional[AffinityRule], vms: Sequence[str] = (),
                           hosts: Sequence[str] = (), enforcing: bool = True,
                           priority: float = 1.0) -> AffinityGroup:
        with self.lock:
            c = self.cluster(cluster_key)
            if any(g.name == name and g.cluster_id == c.id for g in self.affinity_groups.values()):
                raise BadRequest("[Cannot add Affinity Group. Affinity Group with the same name "
                                 "already exists.]")
            g = AffinityGroup(id=_new_id(), name=name, cluster_id=c.id, enforcing=enforcing,
                              priority=priority, vms_rule=vms_rule, hosts_rule=hosts_rule,
                              vm_ids=[self.vm(v).id for v in vms],
                              host_ids=[self.host(h).id for h in hosts])
            self.affinity_groups[g.id] = g
            self._changed(g)
            return g

    def affinity_group(self, cluster_key: str, key: str) -> AffinityGroup:
        c = self.cluster(cluster_key)
        g = self._find(self.affinity_groups, key)
        if g.cluster_id != c.id:  # type: ignore[attr-defined]
            raise NotFound(key)
        return g  # type: ignore[return-value]

    def add_affinity_label(self, name: str) -> AffinityLabel:
        with self.lock:
            lab = AffinityLabel(id=_new_id(), name=name)
            self.affinity_labels[lab.id] = lab
            self._changed(lab)
            return lab

    # ----- waiting (lab helper) ------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("fake engine: timed out after %.1fs waiting for %s"
                                       % (timeout, what))
                self.changed.wait(min(left, self.timing.refresh))
