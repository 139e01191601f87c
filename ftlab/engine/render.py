"""Records -> engine XML, produced by the SDK's own writer so the SDK's reader accepts it.

Serializing 10,000 VMs costs more than half a second, so every record's XML is cached on
the record (`Record.cache`) and a list is the concatenation of cached pieces. `follow=`
inlines linked entities and bypasses the cache for the records it touches.
"""
from __future__ import annotations

import datetime
from typing import Callable, Iterable, Optional, Sequence

from ovirtsdk4 import types
from ovirtsdk4.writer import Writer

from . import model
from .engine_state import EngineState

API = "/ovirt-engine/api"


def _link(cls, kind: str, ident: str):
    obj = cls(id=ident)
    obj.href = "%s/%s/%s" % (API, kind, ident)
    return obj


def _ts(t: Optional[float]) -> Optional[datetime.datetime]:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)


def _props(props: dict) -> Optional[list]:
    # VmBaseMapper writes <custom_properties> only when the property string is non-empty.
    if not props:
        return None
    return [types.CustomProperty(name=k, value=v) for k, v in props.items()]


def vm_type(st: EngineState, vm: model.Vm, follow: Sequence[str] = ()) -> types.Vm:
    host = None
    if vm.host_id and vm.status != "down":
        h = st.hosts.get(vm.host_id)
        host = (host_type(st, h) if ("host" in follow and h)
                else _link(types.Host, "hosts", vm.host_id))
    cluster = _link(types.Cluster, "clusters", vm.cluster_id)
    if "cluster" in follow and vm.cluster_id in st.clusters:
        cluster = cluster_type(st.clusters[vm.cluster_id])
    obj = types.Vm(
        id=vm.id, name=vm.name, description=vm.description or None,
        status=types.VmStatus(vm.status), memory=vm.memory,
        cpu=types.Cpu(topology=types.CpuTopology(sockets=vm.cpus, cores=1, threads=1)),
        cluster=cluster, host=host, custom_properties=_props(vm.custom_properties),
        high_availability=types.HighAvailability(enabled=vm.ha_enabled, priority=vm.ha_priority),
        lease=(types.StorageDomainLease(storage_domain=_link(types.StorageDomain, "storagedomains",
                                                             vm.lease_storage_domain))
               if vm.lease_storage_domain else None),
        placement_policy=types.VmPlacementPolicy(
            affinity=types.VmAffinity(vm.placement_affinity),
            hosts=[_link(types.Host, "hosts", h) for h in vm.placement_hosts] or None),
        origin=vm.origin, run_once=vm.run_once, start_time=_ts(vm.start_time),
        stop_reason=vm.stop_reason or None,
        template=_link(types.Template, "templates", vm.template_id),
    )
    if "tags" in follow:
        obj.tags = [tag_type(st.tags[t]) for t in sorted(vm.tags) if t in st.tags]
    obj.href = "%s/vms/%s" % (API, vm.id)
    return obj


def host_type(st: EngineState, h: model.Host, follow: Sequence[str] = ()) -> types.Host:
    running = h.running_vms
    obj = types.Host(
        id=h.id, name=h.name, address=h.address, status=types.HostStatus(h.status),
        memory=h.memory, max_scheduling_memory=h.max_scheduling_memory,
        cluster=(cluster_type(st.clusters[h.cluster_id]) if "cluster" in follow
                 else _link(types.Cluster, "clusters", h.cluster_id)),
        spm=types.Spm(status=types.SpmStatus.SPM if h.spm else types.SpmStatus.NONE),
        power_management=types.PowerManagement(enabled=h.power_management),
        summary=types.VmSummary(active=running, total=running),
    )
    if "hooks" in follow:
        obj.hooks = hooks_types(h)
    if "tags" in follow:
        obj.tags = [tag_type(st.tags[t]) for t in sorted(h.tags) if t in st.tags]
    obj.href = "%s/hosts/%s" % (API, h.id)
    return obj


def hooks_types(h: model.Host) -> list:
    out = []
    for i, k in enumerate(h.hooks):
        hook = types.Hook(id="%s-%d" % (h.id, i), event_name=k.event_name, name=k.name, md5=k.md5,
                          host=_link(types.Host, "hosts", h.id))
        hook.href = "%s/hosts/%s/hooks/%s" % (API, h.id, hook.id)
        out.append(hook)
    return out


def data_center_type() -> types.DataCenter:
    obj = types.DataCenter(id=model.DATA_CENTER_ID, name=model.DATA_CENTER_NAME, local=False,
                           status=types.DataCenterStatus.UP)
    obj.href = "%s/datacenters/%s" % (API, model.DATA_CENTER_ID)
    return obj


def cluster_type(c: model.Cluster) -> types.Cluster:
    obj = types.Cluster(id=c.id, name=c.name, description=c.description or None,
                        data_center=_link(types.DataCenter, "datacenters", model.DATA_CENTER_ID))
    obj.href = "%s/clusters/%s" % (API, c.id)
    return obj


def template_type(t: model.Template) -> types.Template:
    obj = types.Template(id=t.id, name=t.name, description=t.description or None,
                         memory=t.memory, status=types.TemplateStatus.OK,
                         version=types.TemplateVersion(version_number=1, version_name="base"),
                         cluster=_link(types.Cluster, "clusters", t.cluster_id)
                         if t.cluster_id else None)
    obj.href = "%s/templates/%s" % (API, t.id)
    return obj


def disk_attachment_type(vm: model.Vm, d: model.VmDisk) -> types.DiskAttachment:
    # The attachment's id is the disk's (BackendVmDiskAttachmentsResource).
    disk = types.Disk(id=d.id, name=d.name, alias=d.name, provisioned_size=d.size,
                      format=types.DiskFormat.COW, status=types.DiskStatus.OK)
    disk.href = "%s/disks/%s" % (API, d.id)
    obj = types.DiskAttachment(id=d.id, active=d.plugged, bootable=d.bootable,
                               interface=types.DiskInterface(d.interface), disk=disk,
                               vm=_link(types.Vm, "vms", vm.id))
    obj.href = "%s/vms/%s/diskattachments/%s" % (API, vm.id, d.id)
    return obj


def nic_type(vm: model.Vm, n: model.VmNic) -> types.Nic:
    obj = types.Nic(id=n.id, name=n.name, mac=types.Mac(address=n.mac), plugged=n.plugged,
                    linked=True, interface=types.NicInterface(n.interface),
                    vm=_link(types.Vm, "vms", vm.id))
    obj.href = "%s/vms/%s/nics/%s" % (API, vm.id, n.id)
    return obj


def tag_type(t: model.Tag) -> types.Tag:
    obj = types.Tag(id=t.id, name=t.name, description=t.description or None)
    obj.href = "%s/tags/%s" % (API, t.id)
    return obj


def event_type(e: model.Event) -> types.Event:
    obj = types.Event(
        id=str(e.index), index=e.index, code=e.code, description=e.description,
        severity=types.LogSeverity(e.severity), origin=e.origin, custom_id=e.custom_id,
        flood_rate=e.flood_rate, time=_ts(e.time), correlation_id=e.correlation_id,
        vm=_link(types.Vm, "vms", e.vm_id) if e.vm_id else None,
        host=_link(types.Host, "hosts", e.host_id) if e.host_id else None,
        cluster=_link(types.Cluster, "clusters", e.cluster_id) if e.cluster_id else None,
    )
    obj.href = "%s/events/%d" % (API, e.index)
    return obj


def _rule(r: Optional[model.AffinityRule]) -> Optional[types.AffinityRule]:
    if r is None:
        return None
    return types.AffinityRule(enabled=r.enabled, enforcing=r.enforcing, positive=r.positive)


def affinity_group_type(g: model.AffinityGroup) -> types.AffinityGroup:
    base = "%s/clusters/%s/affinitygroups/%s" % (API, g.cluster_id, g.id)
    obj = types.AffinityGroup(
        id=g.id, name=g.name, enforcing=g.enforcing, priority=g.priority,
        positive=(g.vms_rule.positive if g.vms_rule else None),
        vms_rule=_rule(g.vms_rule), hosts_rule=_rule(g.hosts_rule),
        vms=[_link(types.Vm, "vms", v) for v in g.vm_ids],
        hosts=[_link(types.Host, "hosts", h) for h in g.host_ids],
        cluster=_link(types.Cluster, "clusters", g.cluster_id))
    obj.href = base
    return obj


def affinity_label_type(lab: model.AffinityLabel) -> types.AffinityLabel:
    obj = types.AffinityLabel(id=lab.id, name=lab.name,
                              vms=[_link(types.Vm, "vms", v) for v in lab.vm_ids],
                              hosts=[_link(types.Host, "hosts", h) for h in lab.host_ids])
    obj.href = "%s/affinitylabels/%s" % (API, lab.id)
    return obj


def write(obj) -> bytes:
    return Writer.write(obj).encode()


def cached(record, make: Callable[[], object]) -> bytes:
    """The record's XML, serialized once per change."""
    if record.cache is None:
        record.cache = write(make())
    return record.cache


def collection(root: str, pieces: Iterable[bytes]) -> bytes:
    return b"".join([b"<", root.encode(), b">", *pieces, b"</", root.encode(), b">"])


def fault(reason: str, detail: str) -> bytes:
    return write(types.Fault(reason=reason, detail=detail))
