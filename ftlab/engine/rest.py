"""The REST API under /ovirt-engine/api: routing, request bodies, query parameters.

Bodies are read with the SDK's reader, answers written by `render`. Only the paths vdsm-ft
and its tests use exist; any other path is a 404 like an unknown entity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ovirtsdk4 import types
from ovirtsdk4.reader import Reader

from . import model, render, search
from .engine_state import SEVERITIES, EngineState
from .errors import BadRequest, EngineFault, IncompleteParameters, NotFound
from .model import AffinityRule

log = logging.getLogger(__name__)
XML = "application/xml"
_CALLS_HOSTS = frozenset({"POST vms/{id}/start", "POST vms/{id}/stop", "POST vms/{id}/shutdown",
                          "POST hosts/{id}/fence"})


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = XML


def collection_key(method: str, parts: Sequence[str]) -> str:
    """`GET vms/{id}/start` style key: every id position (odd index) becomes {id}."""
    return "%s %s" % (method, "/".join("{id}" if i % 2 else p for i, p in enumerate(parts)))


def _read(body: bytes, expected: type):
    if not body.strip():
        raise BadRequest("Request syntactically incorrect: empty body, expected <%s>"
                         % expected.__name__.lower())
    try:
        obj = Reader.read(body)
    except Exception as e:  # the SDK's reader raises plain Errors on bad XML
        raise BadRequest("Request syntactically incorrect: %s" % e) from e
    if not isinstance(obj, expected):
        raise BadRequest("Request syntactically incorrect: expected <%s>, got %s"
                         % (expected.__name__.lower(), type(obj).__name__))
    return obj


def _props(items) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for p in items or []:
        if not p.name:
            raise BadRequest("custom property without a name")
        if ";" in (p.value or ""):
            raise BadRequest("Custom property value of %s must not contain ';'" % p.name)
        out[p.name] = p.value or ""
    return out


def _enum(value) -> Optional[str]:
    return None if value is None else getattr(value, "value", value)


def _rule(r: Optional[types.AffinityRule]) -> Optional[AffinityRule]:
    if r is None:
        return None
    return AffinityRule(enabled=r.enabled if r.enabled is not None else True,
                        enforcing=bool(r.enforcing), positive=bool(r.positive))


def _ref(obj) -> str:
    key = obj.id or obj.name
    if not key:
        raise BadRequest("the referenced entity needs an id or a name")
    return key


class RestApi:
    def __init__(self, state: EngineState) -> None:
        self.st = state
        self._routes = self._build_routes()

    # ----- dispatch ------------------------------------------------------------------------

    def handle(self, method: str, parts: List[str], query: Dict[str, str], body: bytes
               ) -> Response:
        try:
            key = collection_key(method, parts)
            route = self._routes.get(key)
            if route is None:
                raise NotFound("/".join(parts))
            if key in _CALLS_HOSTS:
                # These reach a host through the HostDriver: the state takes its lock itself
                # and lets go of it around the host call.
                return route(parts, query, body)
            with self.st.lock:
                return route(parts, query, body)
        except EngineFault as e:
            return Response(e.status, render.fault(e.reason, e.detail))
        except search.SearchError as e:
            return Response(400, render.fault("Operation Failed", "[Invalid search query: %s]" % e))
        except Exception as e:  # a fake-engine bug: answer like the engine does, and say so
            log.exception("fake engine failed on %s /%s", method, "/".join(parts))
            return Response(500, render.fault("Operation Failed", "%s: %s" % (type(e).__name__, e)))

    def _build_routes(self) -> Dict[str, Callable]:
        return {
            "GET ": self._api,
            "GET vms": self._vms_list, "POST vms": self._vms_add,
            "GET vms/{id}": self._vm_get, "PUT vms/{id}": self._vm_update,
            "DELETE vms/{id}": self._vm_remove,
            "POST vms/{id}/start": self._vm_start, "POST vms/{id}/stop": self._vm_stop,
            "POST vms/{id}/shutdown": self._vm_shutdown,
            "GET vms/{id}/diskattachments": self._disk_attachments,
            "GET vms/{id}/diskattachments/{id}": self._disk_attachment,
            "GET vms/{id}/nics": self._nics, "POST vms/{id}/nics": self._nic_add,
            "GET vms/{id}/nics/{id}": self._nic,
            "POST vms/{id}/migrate": self._vm_migrate,
            "GET vms/{id}/snapshots": self._snapshots,
            "POST vms/{id}/snapshots": self._snapshot_add,
            # Devices the lab's VMs never have: listed as empty, as the engine lists a VM
            # without them (ovirt_vm reads these after every create or update).
            **{"GET vms/{id}/%s" % sub: self._no_devices(root)
               for sub, root in (("numanodes", "vm_numa_nodes"), ("watchdogs", "watchdogs"),
                                 ("graphicsconsoles", "graphics_consoles"),
                                 ("hostdevices", "host_devices"), ("cdroms", "cdroms"))},
            "GET templates": self._templates_list, "GET templates/{id}": self._template_get,
            "GET datacenters": self._data_centers, "GET datacenters/{id}": self._data_center,
            "GET vms/{id}/tags": self._tags_of, "POST vms/{id}/tags": self._tag_assign,
            "DELETE vms/{id}/tags/{id}": self._tag_unassign,
            "GET hosts": self._hosts_list, "GET hosts/{id}": self._host_get,
            "POST hosts/{id}/fence": self._host_fence, "GET hosts/{id}/hooks": self._host_hooks,
            "GET hosts/{id}/tags": self._tags_of, "POST hosts/{id}/tags": self._tag_assign,
            "DELETE hosts/{id}/tags/{id}": self._tag_unassign,
            "GET clusters": self._clusters_list, "GET clusters/{id}": self._cluster_get,
            "GET clusters/{id}/affinitygroups": self._ag_list,
            "POST clusters/{id}/affinitygroups": self._ag_add,
            "GET clusters/{id}/affinitygroups/{id}": self._ag_get,
            "DELETE clusters/{id}/affinitygroups/{id}": self._ag_remove,
            "GET clusters/{id}/affinitygroups/{id}/vms": self._ag_members,
            "POST clusters/{id}/affinitygroups/{id}/vms": self._ag_member_add,
            "DELETE clusters/{id}/affinitygroups/{id}/vms/{id}": self._ag_member_remove,
            "GET clusters/{id}/affinitygroups/{id}/hosts": self._ag_members,
            "POST clusters/{id}/affinitygroups/{id}/hosts": self._ag_member_add,
            "DELETE clusters/{id}/affinitygroups/{id}/hosts/{id}": self._ag_member_remove,
            "GET events": self._events_list, "POST events": self._events_add,
            "GET events/{id}": self._event_get,
            "GET tags": self._tags_list, "POST tags": self._tags_add,
            "GET tags/{id}": self._tag_get, "DELETE tags/{id}": self._tag_remove,
            "GET affinitylabels": self._labels_list, "POST affinitylabels": self._labels_add,
            "GET affinitylabels/{id}": self._label_get,
            "DELETE affinitylabels/{id}": self._label_remove,
            "GET affinitylabels/{id}/vms": self._label_members,
            "POST affinitylabels/{id}/vms": self._label_member_add,
            "DELETE affinitylabels/{id}/vms/{id}": self._label_member_remove,
            "GET affinitylabels/{id}/hosts": self._label_members,
            "POST affinitylabels/{id}/hosts": self._label_member_add,
            "DELETE affinitylabels/{id}/hosts/{id}": self._label_member_remove,
        }

    # ----- helpers -------------------------------------------------------------------------

    @staticmethod
    def _ok(obj, status: int = 200) -> Response:
        return Response(status, render.write(obj))

    @staticmethod
    def _action(**fields) -> Response:
        return Response(200, render.write(types.Action(status="complete", **fields)))

    @staticmethod
    def _max(query: Dict[str, str]) -> Optional[int]:
        if "max" not in query:
            return None
        try:
            n = int(query["max"])
        except ValueError as e:
            raise BadRequest("Value '%s' of parameter 'max' is not a valid integer"
                             % query["max"]) from e
        return None if n < 0 else n

    @staticmethod
    def _follow(query: Dict[str, str]) -> Tuple[str, ...]:
        return tuple(f.strip() for f in query.get("follow", "").split(",") if f.strip())

    @staticmethod
    def _case(query: Dict[str, str]) -> bool:
        return query.get("case_sensitive", "true").lower() != "false"

    def _names(self, table: Dict[str, model.Record], ids) -> List[str]:
        return [table[i].name for i in ids if i in table]

    def _api(self, parts, query, body) -> Response:
        api = types.Api(product_info=types.ProductInfo(
            name="oVirt Engine (vdsm-ft lab)", vendor="vdsm-ft",
            version=types.Version(major=4, minor=5, build=0, revision=0, full_version="4.5.0-lab")),
            summary=types.ApiSummary(
                vms=types.ApiSummaryItem(total=len(self.st.vms)),
                hosts=types.ApiSummaryItem(total=len(self.st.hosts))))
        return self._ok(api)

    # ----- VMs -----------------------------------------------------------------------------

    def _vm_fields(self) -> dict:
        st = self.st
        return {
            "name": (lambda v: [v.name], "text"),
            "id": (lambda v: [v.id], "text"),
            "status": (lambda v: [v.status], "enum"),
            "cluster": (lambda v: [st.clusters[v.cluster_id].name] if v.cluster_id in st.clusters
                        else [], "text"),
            "host": (lambda v: [st.hosts[v.host_id].name]
                     if v.host_id in st.hosts and v.status != "down" else [], "text"),
            "tag": (lambda v: self._names(st.tags, v.tags), "text"),
            "origin": (lambda v: [v.origin], "enum"),
            "memory": (lambda v: [v.memory // (1 << 20)], "number"),
        }

    def _vms_list(self, parts, query, body) -> Response:
        st = self.st
        pred = search.matcher(search.parse(query.get("search", "")), self._vm_fields(),
                              self._case(query))
        limit, follow = self._max(query), self._follow(query)
        pieces = []
        for vm in st.vms.values():
            if limit is not None and len(pieces) >= limit:
                break
            if pred(vm):
                pieces.append(render.write(render.vm_type(st, vm, follow)) if follow
                              else render.cached(vm, lambda vm=vm: render.vm_type(st, vm)))
        return Response(200, render.collection("vms", pieces))

    def _vm_get(self, parts, query, body) -> Response:
        vm = self.st.vms.get(parts[1])
        if vm is None:
            raise NotFound(parts[1])
        follow = self._follow(query)
        if follow:
            return self._ok(render.vm_type(self.st, vm, follow))
        return Response(200, render.cached(vm, lambda: render.vm_type(self.st, vm)))

    def _vms_add(self, parts, query, body) -> Response:
        v: types.Vm = _read(body, types.Vm)
        if not v.name or v.cluster is None:
            raise_incomplete("Vm", ["name", "cluster"], v)
        ha = v.high_availability
        template = _ref(v.template) if v.template is not None else None
        vm = self.st.add_vm(
            v.name, _ref(v.cluster), memory=v.memory or model.GiB,
            cpus=(v.cpu.topology.sockets or 1) if v.cpu and v.cpu.topology else 1,
            custom_properties=_props(v.custom_properties),
            ha=bool(ha and ha.enabled), ha_priority=(ha.priority or 1) if ha else 1,
            lease_storage_domain=(v.lease.storage_domain.id
                                  if v.lease and v.lease.storage_domain else None),
            template=template)
        if v.description:
            self.st.update_vm(vm.id, {"description": v.description})
        return Response(201, render.cached(vm, lambda: render.vm_type(self.st, vm)))

    def _vm_update(self, parts, query, body) -> Response:
        v: types.Vm = _read(body, types.Vm)
        changes: Dict[str, object] = {}
        if v.name is not None:
            changes["name"] = v.name
        if v.description is not None:
            changes["description"] = v.description
        if v.memory is not None:
            changes["memory"] = v.memory
        if v.cpu is not None and v.cpu.topology is not None and v.cpu.topology.sockets:
            changes["cpus"] = v.cpu.topology.sockets
        if v.custom_properties is not None:
            changes["custom_properties"] = _props(v.custom_properties)
        if v.high_availability is not None:
            if v.high_availability.enabled is not None:
                changes["ha_enabled"] = v.high_availability.enabled
            if v.high_availability.priority is not None:
                changes["ha_priority"] = v.high_availability.priority
        if v.lease is not None:
            changes["lease_storage_domain"] = (v.lease.storage_domain.id
                                               if v.lease.storage_domain else None)
        if v.placement_policy is not None:
            if v.placement_policy.hosts is not None:
                changes["placement_hosts"] = [_ref(h) for h in v.placement_policy.hosts]
            if v.placement_policy.affinity is not None:
                changes["placement_affinity"] = _enum(v.placement_policy.affinity)
        vm = self.st.update_vm(parts[1], changes)
        return Response(200, render.cached(vm, lambda: render.vm_type(self.st, vm)))

    def _vm_remove(self, parts, query, body) -> Response:
        self.st.remove_vm(parts[1])
        return Response(200, b"")

    def _vm_start(self, parts, query, body) -> Response:
        action: types.Action = _read(body, types.Action) if body.strip() else types.Action()
        hosts: List[str] = []
        props = None
        run_once = action.vm is not None
        if action.vm is not None:
            pp = action.vm.placement_policy
            if pp is not None and pp.hosts:
                hosts = [_ref(h) for h in pp.hosts]
            if action.vm.custom_properties is not None:
                props = _props(action.vm.custom_properties)
        # The lock is released by the state before it calls the host (see start_vm).
        self.st.start_vm(parts[1], hosts, props, run_once)
        return self._action()

    def _vm_stop(self, parts, query, body) -> Response:
        self.st.stop_vm(parts[1], graceful=False)
        return self._action()

    def _vm_shutdown(self, parts, query, body) -> Response:
        self.st.stop_vm(parts[1], graceful=True)
        return self._action()

    def _no_devices(self, root: str) -> Callable:
        def handler(parts, query, body) -> Response:
            self._vm_of(parts)
            return Response(200, render.collection(root, []))
        return handler

    def _vm_migrate(self, parts, query, body) -> Response:
        self.st.migrate_vm(parts[1])
        return self._action()

    def _snapshots(self, parts, query, body) -> Response:
        self.st.vm(parts[1])
        return Response(200, render.collection("snapshots", []))

    def _snapshot_add(self, parts, query, body) -> Response:
        self.st.create_snapshot(parts[1])
        return self._action()

    # ----- VM devices ----------------------------------------------------------------------

    def _vm_of(self, parts) -> model.Vm:
        vm = self.st.vms.get(parts[1])
        if vm is None:
            raise NotFound(parts[1])
        return vm

    def _disk_attachments(self, parts, query, body) -> Response:
        vm = self._vm_of(parts)
        return Response(200, render.collection("disk_attachments", [
            render.write(render.disk_attachment_type(vm, d)) for d in vm.disks]))

    def _disk_attachment(self, parts, query, body) -> Response:
        vm = self._vm_of(parts)
        for d in vm.disks:
            if d.id == parts[3]:
                return self._ok(render.disk_attachment_type(vm, d))
        raise NotFound(parts[3])

    def _nics(self, parts, query, body) -> Response:
        vm = self._vm_of(parts)
        return Response(200, render.collection("nics", [
            render.write(render.nic_type(vm, n)) for n in vm.nics]))

    def _nic(self, parts, query, body) -> Response:
        vm = self._vm_of(parts)
        for n in vm.nics:
            if n.id == parts[3]:
                return self._ok(render.nic_type(vm, n))
        raise NotFound(parts[3])

    def _nic_add(self, parts, query, body) -> Response:
        n: types.Nic = _read(body, types.Nic)
        if not n.name:
            raise_incomplete("Nic", ["name"], n)
        vm = self._vm_of(parts)
        nic = self.st.add_nic(vm.id, n.name, mac=n.mac.address if n.mac else None,
                              interface=_enum(n.interface) or "virtio")
        return self._ok(render.nic_type(vm, nic), 201)

    # ----- templates -----------------------------------------------------------------------

    def _template_fields(self) -> dict:
        st = self.st
        return {"name": (lambda t: [t.name], "text"), "id": (lambda t: [t.id], "text"),
                # One data center in the lab: every template is in it.
                "datacenter": (lambda t: [model.DATA_CENTER_NAME], "text"),
                # The template a VM was made from (ovirt_vm asks for `vm.name=`).
                "vm.name": (lambda t: [v.name for v in st.vms.values()
                                       if v.template_id == t.id], "text")}

    def _data_centers(self, parts, query, body) -> Response:
        return Response(200, render.collection("data_centers",
                                               [render.write(render.data_center_type())]))

    def _data_center(self, parts, query, body) -> Response:
        if parts[1] != model.DATA_CENTER_ID:
            raise NotFound(parts[1])
        return self._ok(render.data_center_type())

    def _templates_list(self, parts, query, body) -> Response:
        pred = search.matcher(search.parse(query.get("search", "")), self._template_fields(),
                              self._case(query))
        return Response(200, render.collection("templates", [
            render.write(render.template_type(t)) for t in self.st.templates.values()
            if pred(t)]))

    def _template_get(self, parts, query, body) -> Response:
        t = self.st.templates.get(parts[1])
        if t is None:
            raise NotFound(parts[1])
        return self._ok(render.template_type(t))

    # ----- hosts ---------------------------------------------------------------------------

    def _host_fields(self) -> dict:
        st = self.st
        return {
            "name": (lambda h: [h.name], "text"),
            "id": (lambda h: [h.id], "text"),
            "address": (lambda h: [h.address], "text"),
            "status": (lambda h: [h.status], "enum"),
            "cluster": (lambda h: [st.clusters[h.cluster_id].name] if h.cluster_id in st.clusters
                        else [], "text"),
            "tag": (lambda h: self._names(st.tags, h.tags), "text"),
        }

    def _hosts_list(self, parts, query, body) -> Response:
        st = self.st
        st.refresh_memory()
        pred = search.matcher(search.parse(query.get("search", "")), self._host_fields(),
                              self._case(query))
        limit, follow = self._max(query), self._follow(query)
        pieces = []
        for h in st.hosts.values():
            if limit is not None and len(pieces) >= limit:
                break
            if pred(h):
                pieces.append(render.write(render.host_type(st, h, follow)) if follow
                              else render.cached(h, lambda h=h: render.host_type(st, h)))
        return Response(200, render.collection("hosts", pieces))

    def _host(self, ident: str) -> model.Host:
        self.st.refresh_memory()
        h = self.st.hosts.get(ident)
        if h is None:
            raise NotFound(ident)
        return h

    def _host_get(self, parts, query, body) -> Response:
        h = self._host(parts[1])
        follow = self._follow(query)
        if follow:
            return self._ok(render.host_type(self.st, h, follow))
        return Response(200, render.cached(h, lambda: render.host_type(self.st, h)))

    def _host_fence(self, parts, query, body) -> Response:
        action: types.Action = _read(body, types.Action)
        if not action.fence_type:
            raise_incomplete("Action", ["fenceType"], action)
        power = self.st.fence(parts[1], action.fence_type)
        if power:
            return self._action(power_management=types.PowerManagement(
                status=types.PowerManagementStatus(power)))
        return self._action()

    def _host_hooks(self, parts, query, body) -> Response:
        h = self._host(parts[1])
        return Response(200, render.collection("hooks", [render.write(k)
                                                         for k in render.hooks_types(h)]))

    # ----- tags ----------------------------------------------------------------------------

    def _owner(self, parts) -> model.Record:
        table = self.st.vms if parts[0] == "vms" else self.st.hosts
        rec = table.get(parts[1])
        if rec is None:
            raise NotFound(parts[1])
        return rec

    def _tags_of(self, parts, query, body) -> Response:
        owner = self._owner(parts)
        tags = [self.st.tags[t] for t in sorted(owner.tags) if t in self.st.tags]  # type: ignore
        return Response(200, render.collection("tags", [render.write(render.tag_type(t))
                                                        for t in tags]))

    def _tag_assign(self, parts, query, body) -> Response:
        t: types.Tag = _read(body, types.Tag)
        tag = self.st.assign_tag(self._owner(parts), _ref(t))
        return self._ok(render.tag_type(tag), 201)

    def _tag_unassign(self, parts, query, body) -> Response:
        self.st.unassign_tag(self._owner(parts), parts[3])
        return Response(200, b"")

    def _tags_list(self, parts, query, body) -> Response:
        return Response(200, render.collection("tags", [render.write(render.tag_type(t))
                                                        for t in self.st.tags.values()]))

    def _tags_add(self, parts, query, body) -> Response:
        t: types.Tag = _read(body, types.Tag)
        if not t.name:
            raise_incomplete("Tag", ["name"], t)
        return self._ok(render.tag_type(self.st.add_tag(t.name, t.description or "")), 201)

    def _tag_get(self, parts, query, body) -> Response:
        t = self.st.tags.get(parts[1])
        if t is None:
            raise NotFound(parts[1])
        return self._ok(render.tag_type(t))

    def _tag_remove(self, parts, query, body) -> Response:
        t = self.st.tags.pop(parts[1], None)
        if t is None:
            raise NotFound(parts[1])
        for rec in list(self.st.vms.values()) + list(self.st.hosts.values()):
            if t.id in rec.tags:
                rec.tags.discard(t.id)
                rec.touch()
        return Response(200, b"")

    # ----- clusters, affinity groups -------------------------------------------------------

    def _clusters_list(self, parts, query, body) -> Response:
        return Response(200, render.collection("clusters", [
            render.cached(c, lambda c=c: render.cluster_type(c))
            for c in self.st.clusters.values()]))

    def _cluster_get(self, parts, query, body) -> Response:
        c = self.st.clusters.get(parts[1])
        if c is None:
            raise NotFound(parts[1])
        return self._ok(render.cluster_type(c))

    def _ag_list(self, parts, query, body) -> Response:
        c = self.st.clusters.get(parts[1])
        if c is None:
            raise NotFound(parts[1])
        groups = [g for g in self.st.affinity_groups.values() if g.cluster_id == c.id]
        return Response(200, render.collection("affinity_groups", [
            render.write(render.affinity_group_type(g)) for g in groups]))

    def _ag_add(self, parts, query, body) -> Response:
        g: types.AffinityGroup = _read(body, types.AffinityGroup)
        if not g.name:
            raise_incomplete("AffinityGroup", ["name"], g)
        vms_rule = _rule(g.vms_rule)
        if vms_rule is None and g.positive is not None:
            # The pre-4.1 form: <positive> and <enforcing> on the group describe the VM rule.
            vms_rule = AffinityRule(enabled=True, enforcing=bool(g.enforcing),
                                    positive=bool(g.positive))
        group = self.st.add_affinity_group(
            parts[1], g.name, vms_rule, _rule(g.hosts_rule),
            vms=[_ref(v) for v in g.vms or []], hosts=[_ref(h) for h in g.hosts or []],
            enforcing=bool(g.enforcing) if g.enforcing is not None else True,
            priority=g.priority if g.priority is not None else 1.0)
        return self._ok(render.affinity_group_type(group), 201)

    def _ag_get(self, parts, query, body) -> Response:
        return self._ok(render.affinity_group_type(self.st.affinity_group(parts[1], parts[3])))

    def _ag_remove(self, parts, query, body) -> Response:
        g = self.st.affinity_group(parts[1], parts[3])
        del self.st.affinity_groups[g.id]
        return Response(200, b"")

    def _ag_members(self, parts, query, body) -> Response:
        self.st.refresh_memory()
        g = self.st.affinity_group(parts[1], parts[3])
        if parts[4] == "vms":
            return Response(200, render.collection("vms", [
                render.cached(self.st.vms[v], lambda v=v: render.vm_type(self.st, self.st.vms[v]))
                for v in g.vm_ids if v in self.st.vms]))
        return Response(200, render.collection("hosts", [
            render.cached(self.st.hosts[h], lambda h=h: render.host_type(self.st, self.st.hosts[h]))
            for h in g.host_ids if h in self.st.hosts]))

    def _ag_member_add(self, parts, query, body) -> Response:
        g = self.st.affinity_group(parts[1], parts[3])
        if parts[4] == "vms":
            ref = _ref(_read(body, types.Vm))
            vm = self.st.vm(ref)
            if vm.id not in g.vm_ids:
                g.vm_ids.append(vm.id)
            obj = render.vm_type(self.st, vm)
        else:
            ref = _ref(_read(body, types.Host))
            h = self.st.host(ref)
            if h.id not in g.host_ids:
                g.host_ids.append(h.id)
            obj = render.host_type(self.st, h)
        self.st.generation += 1
        return self._ok(obj, 201)

    def _ag_member_remove(self, parts, query, body) -> Response:
        g = self.st.affinity_group(parts[1], parts[3])
        ids = g.vm_ids if parts[4] == "vms" else g.host_ids
        if parts[5] not in ids:
            raise NotFound(parts[5])
        ids.remove(parts[5])
        return Response(200, b"")

    # ----- affinity labels -----------------------------------------------------------------

    def _label(self, ident: str) -> model.AffinityLabel:
        lab = self.st.affinity_labels.get(ident)
        if lab is None:
            raise NotFound(ident)
        return lab

    def _labels_list(self, parts, query, body) -> Response:
        return Response(200, render.collection("affinity_labels", [
            render.write(render.affinity_label_type(lab))
            for lab in self.st.affinity_labels.values()]))

    def _labels_add(self, parts, query, body) -> Response:
        lab: types.AffinityLabel = _read(body, types.AffinityLabel)
        if not lab.name:
            raise_incomplete("AffinityLabel", ["name"], lab)
        return self._ok(render.affinity_label_type(self.st.add_affinity_label(lab.name)), 201)

    def _label_get(self, parts, query, body) -> Response:
        return self._ok(render.affinity_label_type(self._label(parts[1])))

    def _label_remove(self, parts, query, body) -> Response:
        self._label(parts[1])
        del self.st.affinity_labels[parts[1]]
        return Response(200, b"")

    def _label_members(self, parts, query, body) -> Response:
        lab = self._label(parts[1])
        if parts[2] == "vms":
            return Response(200, render.collection("vms", [
                render.write(render._link(types.Vm, "vms", v)) for v in lab.vm_ids]))
        return Response(200, render.collection("hosts", [
            render.write(render._link(types.Host, "hosts", h)) for h in lab.host_ids]))

    def _label_member_add(self, parts, query, body) -> Response:
        lab = self._label(parts[1])
        if parts[2] == "vms":
            vm = self.st.vm(_ref(_read(body, types.Vm)))
            if vm.id not in lab.vm_ids:
                lab.vm_ids.append(vm.id)
            obj = render._link(types.Vm, "vms", vm.id)
        else:
            h = self.st.host(_ref(_read(body, types.Host)))
            if h.id not in lab.host_ids:
                lab.host_ids.append(h.id)
            obj = render._link(types.Host, "hosts", h.id)
        return self._ok(obj, 201)

    def _label_member_remove(self, parts, query, body) -> Response:
        lab = self._label(parts[1])
        ids = lab.vm_ids if parts[2] == "vms" else lab.host_ids
        if parts[3] not in ids:
            raise NotFound(parts[3])
        ids.remove(parts[3])
        return Response(200, b"")

    # ----- events --------------------------------------------------------------------------

    def _event_fields(self) -> dict:
        st = self.st
        return {
            "severity": (lambda e: [e.severity], SEVERITIES),
            "origin": (lambda e: [e.origin], "text"),
            "custom_event_id": (lambda e: [e.custom_id], "number"),
            "type": (lambda e: [e.code], "number"),
            "message": (lambda e: [e.description], "text"),
            "event_vm": (lambda e: [st.vms[e.vm_id].name] if e.vm_id in st.vms else [], "text"),
            "event_host": (lambda e: [st.hosts[e.host_id].name] if e.host_id in st.hosts
                           else [], "text"),
            "correlation_id": (lambda e: [e.correlation_id] if e.correlation_id else [], "text"),
        }

    def _events_list(self, parts, query, body) -> Response:
        pred = search.matcher(search.parse(query.get("search", "")), self._event_fields(),
                              self._case(query))
        since = -1
        if "from" in query:
            try:
                since = int(query["from"])
            except ValueError as e:
                raise BadRequest("Value '%s' of parameter 'from' is not a valid integer"
                                 % query["from"]) from e
        limit = self._max(query)
        pieces = []
        # Without sortby the engine returns the newest first.
        for e in reversed(self.st.events):
            if e.index <= since:
                break
            if limit is not None and len(pieces) >= limit:
                break
            if pred(e):
                pieces.append(render.cached(e, lambda e=e: render.event_type(e)))
        return Response(200, render.collection("events", pieces))

    def _event_get(self, parts, query, body) -> Response:
        for e in self.st.events:
            if str(e.index) == parts[1]:
                return Response(200, render.cached(e, lambda: render.event_type(e)))
        raise NotFound(parts[1])

    def _events_add(self, parts, query, body) -> Response:
        e: types.Event = _read(body, types.Event)
        ev = self.st.add_external_event(
            e.origin, _enum(e.severity), e.custom_id, e.description, flood_rate=e.flood_rate,
            vm_id=e.vm.id if e.vm else None, host_id=e.host.id if e.host else None,
            cluster_id=e.cluster.id if e.cluster else None, correlation_id=e.correlation_id)
        return Response(201, render.cached(ev, lambda: render.event_type(ev)))


def raise_incomplete(kind: str, fields: List[str], obj) -> None:
    missing = [f for f in fields if getattr(obj, _snake(f), None) in (None, "")]
    raise IncompleteParameters("%s [%s] required for %s" % (kind, ", ".join(missing or fields),
                                                            "add"))


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)
