"""Every ovirtsdk4 call of the poller and the CLI, with typed errors.

The connection is built lazily and dropped on a transient failure (curl 7 "connect",
28 "timeout", and friends; after SSO these come as plain `sdk.Error`: docs/ovirt-facts.md,
"ovirtsdk4 errors") or an auth failure, so the next call rebuilds it and re-authenticates.
Callers back off on `EngineUnavailable`; nothing here sleeps or exits.

API calls per poller cycle: `inventory()` makes exactly 2 (hosts with their hooks
inlined by `follow=hooks`, and all VMs); `affinity_groups()` one per cluster that has a
VM to place this cycle. Neither depends on the number of VMs or hosts.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypeVar

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

from engine_plugin.config import EngineSettings
from engine_plugin.events import ORIGIN, Event
from engine_plugin.inventory import AffinityGroupInfo, HostInfo, Inventory, VmInfo

log = logging.getLogger(__name__)

T = TypeVar("T")
HOOK_EVENT = "before_vm_start"
# libcurl errors that mean "the engine is not reachable right now": 6 resolve, 7 connect,
# 28 timeout, 35 TLS connect, 52 empty reply, 55/56 send/receive failure.
_TRANSIENT_CURL = re.compile(r"[(\[,]\s*(6|7|28|35|52|55|56),\s*'")
# How many of our own recent events `recent_event_ids` reads at start-up.
RECENT_EVENTS = 2000


class EngineError(Exception):
    """Base of every engine failure."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached or timed out: back off and retry."""


class EngineAuthFailed(EngineError):
    """The engine refused our credentials (401/403)."""


class EngineNotFound(EngineError):
    """The entity no longer exists (404)."""


class EngineConflict(EngineError):
    """The entity's state forbids the operation now (409)."""


class EngineRejected(EngineError):
    """The engine refused the request (400 and other faults)."""


def classify(e: Exception, what: str) -> EngineError:
    """Map an ovirtsdk4 exception to a typed EngineError, with a one-line message."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, sdk.AuthError):
        return EngineAuthFailed(f"{what}: authentication failed: {text}")
    if isinstance(e, sdk.NotFoundError):
        return EngineNotFound(f"{what}: not found")
    if isinstance(e, (sdk.ConnectionError, sdk.TimeoutError)) or _TRANSIENT_CURL.search(text):
        return EngineUnavailable(f"{what}: engine unreachable: {_curl_text(text)}")
    code = getattr(e, "code", None)
    if code in (401, 403):
        return EngineAuthFailed(f"{what}: authentication failed: {text}")
    if code == 409:
        return EngineConflict(f"{what}: {_fault(e, text)}")
    return EngineRejected(f"{what}: {_fault(e, text)}")


def _curl_text(text: str) -> str:
    m = re.search(r"(\d+), '([^']*)'", text)
    return f"curl error {m.group(1)}: {m.group(2)}" if m else text


def _fault(e: Exception, text: str) -> str:
    fault = getattr(e, "fault", None)
    if fault is not None and (fault.detail or fault.reason):
        return f"{fault.reason or ''} {fault.detail or ''}".strip()
    return text


class Engine:
    """One engine connection; not thread-safe (the SDK serializes it anyway)."""

    def __init__(self, settings: EngineSettings, hook_name: str = "50_ft"):
        self.settings = settings
        self.hook_name = hook_name
        self._conn: sdk.Connection | None = None

    def _connection(self) -> sdk.Connection:
        if self._conn is None:
            s = self.settings
            self._conn = sdk.Connection(url=s.url, username=s.username, password=s.password,
                                        ca_file=s.ca_file, timeout=int(max(1, s.timeout)))
        return self._conn

    def close(self) -> None:
        """Drop the connection; the next call builds a new one and authenticates."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close(logout=False)
            except Exception as e:  # a dead engine cannot break closing our side
                log.debug("closing the engine connection: %s", e)

    def _call(self, what: str, fn: Callable[[sdk.Connection], T]) -> T:
        try:
            return fn(self._connection())
        except sdk.Error as e:
            err = classify(e, what)
            if isinstance(err, (EngineUnavailable, EngineAuthFailed)):
                self.close()
            raise err from None

    # ---------------------------------------------------------------- reads

    def inventory(self, hosts_listed: Callable[[Inventory], None] | None = None) -> Inventory:
        """All hosts (hooks inlined) and all VMs: two calls, whatever the sizes.

        `hosts_listed(inv)` runs between the two calls, with `inv.hosts` filled, so the
        caller can start asking the agents while the (much longer) VM list loads.
        """
        hosts = self._call("list hosts", lambda c: c.system_service().hosts_service()
                           .list(follow="hooks"))
        inv = Inventory()
        for h in hosts:
            info = self._host(h)
            inv.hosts[info.id] = info
        if hosts_listed is not None:
            hosts_listed(inv)
        vms = self._call("list VMs", lambda c: c.system_service().vms_service().list())
        for v in vms:
            info = _vm(v)
            inv.vms[info.id] = info
        return inv

    def affinity_groups(self, cluster_id: str) -> list[AffinityGroupInfo]:
        groups = self._call(f"list affinity groups of cluster {cluster_id}",
                            lambda c: c.system_service().clusters_service()
                            .cluster_service(cluster_id).affinity_groups_service().list())
        return [_group(g, cluster_id) for g in groups]

    def find_vm(self, name: str) -> VmInfo:
        """The VM called `name` (exact match); EngineNotFound if there is none."""
        found = self._call(f"search VM {name}", lambda c: c.system_service().vms_service()
                           .list(search=f"name={_quote(name)}"))
        for v in found:
            if v.name == name:
                return _vm(v)
        raise EngineNotFound(f"no VM named {name!r} in the engine")

    def recent_event_ids(self) -> set[int]:
        """custom_ids of our origin's most recent events (one call, at start-up)."""
        events = self._call("list our events", lambda c: c.system_service().events_service()
                            .list(search=f"origin={ORIGIN}", max=RECENT_EVENTS))
        return {e.custom_id for e in events if e.origin == ORIGIN and e.custom_id is not None}

    def _host(self, h: types.Host) -> HostInfo:
        hooks = h.hooks or []
        installed = any(k.event_name == HOOK_EVENT and k.name == self.hook_name for k in hooks)
        return HostInfo(id=h.id, name=h.name or h.id,
                        cluster_id=h.cluster.id if h.cluster else "",
                        status=h.status.value if h.status else "unknown",
                        address=h.address or "",
                        max_scheduling_memory=h.max_scheduling_memory or 0,
                        hook_installed=installed)

    # ---------------------------------------------------------------- writes

    def add_event(self, event: Event, flood_rate: int) -> None:
        ev = types.Event(origin=ORIGIN, custom_id=event.custom_id,
                         severity=types.LogSeverity(event.severity),
                         description=event.description, flood_rate=flood_rate,
                         vm=types.Vm(id=event.vm_id) if event.vm_id else None,
                         host=types.Host(id=event.host_id) if event.host_id else None)
        self._call(f"post event {event.custom_id}",
                   lambda c: c.system_service().events_service().add(ev))

    def fence_manual(self, host_id: str) -> None:
        """'Confirm host has been rebooted': the engine sets the host's VMs Down."""
        self._call(f"fence manual host {host_id}", lambda c: c.system_service()
                   .hosts_service().host_service(host_id).fence(fence_type="manual"))

    def remove_vm(self, vm_id: str) -> None:
        self._call(f"remove VM {vm_id}", lambda c: c.system_service().vms_service()
                   .vm_service(vm_id).remove())

    def set_custom_property(self, vm_id: str, name: str, value: str) -> VmInfo:
        """Set one custom property, sending the full list (the engine replaces the set)."""
        def update(c: sdk.Connection) -> types.Vm:
            svc = c.system_service().vms_service().vm_service(vm_id)
            props = {p.name: p.value for p in (svc.get().custom_properties or [])}
            props[name] = value
            return svc.update(types.Vm(custom_properties=[
                types.CustomProperty(name=k, value=v) for k, v in props.items()]))
        return _vm(self._call(f"update custom properties of VM {vm_id}", update))


def _quote(value: str) -> str:
    return '"' + value.replace('"', '\\"') + '"'


def _vm(v: types.Vm) -> VmInfo:
    topo = v.cpu.topology if v.cpu and v.cpu.topology else None
    vcpus = ((topo.sockets or 1) * (topo.cores or 1) * (topo.threads or 1)) if topo else 1
    return VmInfo(
        id=v.id, name=v.name or v.id, cluster_id=v.cluster.id if v.cluster else "",
        status=v.status.value if v.status else "unknown",
        host_id=v.host.id if v.host else None, memory=v.memory or 0, vcpus=vcpus,
        custom_properties=tuple((p.name, p.value or "") for p in (v.custom_properties or [])),
        ha_enabled=bool(v.high_availability and v.high_availability.enabled),
        has_lease=bool(v.lease and v.lease.storage_domain))


def _group(g: types.AffinityGroup, cluster_id: str) -> AffinityGroupInfo:
    vms_positive = g.vms_rule.positive if g.vms_rule and g.vms_rule.enabled is not False \
        else (g.positive if g.vms_rule is None and g.positive is not None else None)
    hosts_positive = g.hosts_rule.positive if g.hosts_rule and g.hosts_rule.enabled \
        is not False else None
    enforcing = bool(g.enforcing if g.enforcing is not None else
                     (g.vms_rule and g.vms_rule.enforcing))
    return AffinityGroupInfo(
        id=g.id, name=g.name or g.id, cluster_id=cluster_id, enforcing=enforcing,
        vms_positive=vms_positive, hosts_positive=hosts_positive,
        vm_ids=frozenset(v.id for v in (g.vms or [])),
        host_ids=frozenset(h.id for h in (g.hosts or [])))

