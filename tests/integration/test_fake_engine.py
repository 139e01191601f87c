"""The fake engine, driven only through the real ovirtsdk4 4.6.3 over HTTPS (plus the lab's
control API for what only VDSM or a dying host could cause)."""
from __future__ import annotations

import threading
import time
from typing import List

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pytest

from ftlab.engine import EngineTiming, FakeEngine, GiB, Hook, LabError, StartRequest, VmReport
from ftlab.engine.pki import make_server_pki

PASSWORD = "lab-secret-5f2c"
USER = "admin@internal"
FAST = EngineTiming(refresh=0.02, grace=0.3, lease_restart_delay=0.2)


class RecordingDriver:
    """The host side as the lab's VDSM stand-in would be, minus libvirt: records what the
    engine asked each host to do and can refuse starts on chosen hosts."""

    def __init__(self) -> None:
        self.starts: List[StartRequest] = []
        self.stops: List[tuple] = []
        self.destroys: List[tuple] = []
        self.refuse_on: set = set()
        self.lock = threading.Lock()

    def start_vm(self, request: StartRequest) -> None:
        with self.lock:
            self.starts.append(request)
        if request.host_id in self.refuse_on:
            raise RuntimeError("before_vm_start hook exited 2: FT peer is live")

    def stop_vm(self, host_id: str, vm_id: str, graceful: bool) -> None:
        with self.lock:
            self.stops.append((host_id, vm_id, graceful))

    def destroy_vm(self, host_id: str, vm_id: str) -> None:
        with self.lock:
            self.destroys.append((host_id, vm_id))


@pytest.fixture
def driver():
    return RecordingDriver()


@pytest.fixture
def engine(driver):
    eng = FakeEngine(users={USER: PASSWORD}, driver=driver, timing=FAST)
    eng.start()
    yield eng
    eng.stop()


def connect(engine: FakeEngine, **kw) -> sdk.Connection:
    info = engine.info
    kw.setdefault("timeout", 10)
    return sdk.Connection(url=info.url, username=info.username, password=PASSWORD,
                          ca_file=str(info.ca_file), **kw)


@pytest.fixture
def conn(engine):
    c = connect(engine)
    yield c
    c.close()


def props(vm: types.Vm) -> dict:
    return {p.name: p.value for p in vm.custom_properties or []}


def wait_until(pred, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


# ----- SSO and TLS --------------------------------------------------------------------------

def test_login_ok_and_bad_password_is_auth_error(engine):
    c = connect(engine)
    assert c.test(raise_exception=True)
    api = c.system_service().get()
    assert api.product_info.version.major == 4
    c.close()

    bad = sdk.Connection(url=engine.info.url, username=USER, password="wrong",
                         ca_file=str(engine.info.ca_file))
    with pytest.raises(sdk.AuthError) as e:
        bad.system_service().vms_service().list()
    assert "access_denied" in str(e.value) and "incorrect" in str(e.value)
    assert "wrong" not in str(e.value)


def test_api_call_without_valid_token_is_refused(engine):
    c = sdk.Connection(url=engine.info.url, token="not-a-token", ca_file=str(engine.info.ca_file))
    with pytest.raises(sdk.AuthError):
        c.system_service().vms_service().list()
    assert engine.api_calls().get("GET vms", 0) >= 1


def test_logout_revokes_the_token(engine):
    c = connect(engine)
    token = c.authenticate()
    c.system_service().vms_service().list()
    c.close(logout=True)
    reuse = sdk.Connection(url=engine.info.url, token=token, ca_file=str(engine.info.ca_file))
    with pytest.raises(sdk.AuthError):
        reuse.system_service().vms_service().list()


def test_tls_is_verified_against_the_lab_ca(engine, tmp_path):
    other_ca = make_server_pki(tmp_path / "other").ca_file
    c = sdk.Connection(url=engine.info.url, username=USER, password=PASSWORD,
                       ca_file=str(other_ca))
    with pytest.raises(sdk.Error) as e:
        c.system_service().vms_service().list()
    assert "SSL" in str(e.value) or "certificate" in str(e.value)


# ----- lists, search, follow, max -----------------------------------------------------------

def test_list_search_and_filters(engine, conn):
    engine.add_cluster("c2")
    h1 = engine.add_host("h1")
    engine.add_host("h2")
    h3 = engine.add_host("h3", cluster="c2")
    engine.add_tag("ft")
    engine.add_vm("app-1", host="h1", tags=["ft"])
    engine.add_vm("app-2", host="h2")
    engine.add_vm("db-1", cluster="c2", host="h3", tags=["ft"])
    engine.add_vm("idle", status="down")
    vms = conn.system_service().vms_service()

    def names(**kw):
        return sorted(v.name for v in vms.list(**kw))

    assert names() == ["app-1", "app-2", "db-1", "idle"]
    assert names(search="status=up") == ["app-1", "app-2", "db-1"]
    assert names(search="status=down") == ["idle"]
    assert names(search="name=app-*") == ["app-1", "app-2"]
    assert names(search="cluster=c2") == ["db-1"]
    assert names(search="host=h1") == ["app-1"]
    assert names(search="tag=ft") == ["app-1", "db-1"]
    assert names(search="tag=ft and cluster=Default") == ["app-1"]
    assert names(search="host=h1 or host=h3") == ["app-1", "db-1"]
    assert names(search="Vms: status=up and name=db*") == ["db-1"]
    assert len(vms.list(max=2)) == 2

    plain = vms.list(search="name=app-1")[0]
    assert plain.host.id == h1.id and plain.host.name is None
    followed = vms.list(search="name=app-1", follow="host")[0]
    assert followed.host.id == h1.id and followed.host.name == "h1"

    hosts = conn.system_service().hosts_service()
    assert sorted(h.name for h in hosts.list(search="cluster=c2")) == ["h3"]
    assert hosts.host_service(h3.id).get().cluster.id == engine.state.cluster("c2").id
    with pytest.raises(sdk.Error) as e:
        vms.list(search="colour=blue")
    assert e.value.code == 400


def test_unknown_vm_is_not_found(conn):
    with pytest.raises(sdk.NotFoundError) as e:
        conn.system_service().vms_service().vm_service("0d4c8f1e-0000-4000-8000-000000000000").get()
    assert e.value.code == 404
    assert e.value.fault is not None and "Entity not found" in e.value.fault.detail


def test_hosts_report_memory_status_and_hooks(engine, conn):
    h1 = engine.add_host("h1", memory=16 * GiB, reserved_memory=1 * GiB,
                         hooks=[Hook("before_vm_start", "50_ft", "0f1e")])
    engine.add_vm("big", host="h1", memory=4 * GiB)
    host = conn.system_service().hosts_service().host_service(h1.id)
    got = host.get()
    assert got.status == types.HostStatus.UP
    assert got.max_scheduling_memory == 11 * GiB
    hooks = host.hooks_service().list()
    assert [(k.event_name, k.name, k.md5) for k in hooks] == \
        [("before_vm_start", "50_ft", "0f1e")]
    engine.set_host_hooks("h1", [])
    assert host.hooks_service().list() == []


# ----- custom properties, start, stop -------------------------------------------------------

def test_custom_properties_round_trip_and_update_replaces_all(engine, conn):
    vm = engine.add_vm("vm1", custom_properties={"ft": "true", "ft_peer": "h2"})
    svc = conn.system_service().vms_service().vm_service(vm.id)
    assert props(svc.get()) == {"ft": "true", "ft_peer": "h2"}
    svc.update(types.Vm(custom_properties=[types.CustomProperty(name="ft", value="false")]))
    assert props(svc.get()) == {"ft": "false"}
    svc.update(types.Vm(description="no props touched"))
    assert props(svc.get()) == {"ft": "false"}
    with pytest.raises(sdk.Error) as e:
        svc.update(types.Vm(custom_properties=[types.CustomProperty(name="x", value="a;b")]))
    assert e.value.code == 400
    assert props(svc.get()) == {"ft": "false"}


def test_run_once_on_chosen_host_replaces_custom_properties(engine, conn, driver):
    engine.add_host("h1")
    h2 = engine.add_host("h2", address="192.0.2.2")
    engine.add_host("h3")
    vm = engine.add_vm("vm1", memory=2 * GiB, custom_properties={"ft": "true", "old": "x"})
    svc = conn.system_service().vms_service().vm_service(vm.id)
    svc.start(vm=types.Vm(
        placement_policy=types.VmPlacementPolicy(hosts=[types.Host(id=h2.id),
                                                        types.Host(name="h3")]),
        custom_properties=[types.CustomProperty(name="ft", value="true"),
                           types.CustomProperty(name="ft_role", value="primary")]))
    engine.wait_vm_status("vm1", "up")
    got = svc.get()
    assert got.status == types.VmStatus.UP and got.host.id == h2.id and got.run_once
    assert len(driver.starts) == 1
    req = driver.starts[0]
    assert (req.host_id, req.host_address, req.memory) == (h2.id, "192.0.2.2", 2 * GiB)
    assert req.custom_properties == {"ft": "true", "ft_role": "primary"} and req.run_once
    # Run-once changes the run, not the stored configuration.
    assert props(got) == {"ft": "true", "old": "x"}
    assert engine.host("h2").max_scheduling_memory == 64 * GiB - 1 * GiB - 2 * GiB

    with pytest.raises(sdk.Error) as e:
        svc.start()
    assert e.value.code == 409 and "VM is running" in e.value.fault.detail

    svc.stop()
    assert svc.get().status == types.VmStatus.DOWN and svc.get().host is None
    assert driver.stops == [(h2.id, vm.id, False)]
    with pytest.raises(sdk.Error) as e:
        svc.stop()
    assert e.value.code == 409

    # A plain start uses the stored properties.
    svc.start()
    engine.wait_vm_status("vm1", "up")
    assert driver.starts[-1].custom_properties == {"ft": "true", "old": "x"}
    assert not driver.starts[-1].run_once


def test_failed_start_on_host_leaves_vm_down_with_reason(engine, conn, driver):
    h1 = engine.add_host("h1")
    driver.refuse_on.add(h1.id)
    vm = engine.add_vm("vm1")
    svc = conn.system_service().vms_service().vm_service(vm.id)
    svc.start(vm=types.Vm(placement_policy=types.VmPlacementPolicy(hosts=[types.Host(id=h1.id)])))
    wait_until(lambda: engine.vm("vm1").stop_reason, what="start failure")
    got = svc.get()
    assert got.status == types.VmStatus.DOWN and "FT peer is live" in got.stop_reason
    evs = conn.system_service().events_service().list(search="type=54")
    assert evs and "FT peer is live" in evs[0].description


def test_start_refused_by_memory_and_negative_affinity(engine, conn):
    small = engine.add_host("small", memory=3 * GiB, reserved_memory=1 * GiB)
    big = engine.add_host("big")
    a = engine.add_vm("a", host="big")
    b = engine.add_vm("b", memory=4 * GiB)
    vms = conn.system_service().vms_service()
    with pytest.raises(sdk.Error) as e:
        vms.vm_service(b.id).start(vm=types.Vm(placement_policy=types.VmPlacementPolicy(
            hosts=[types.Host(id=small.id)])))
    assert e.value.code == 409 and "scheduling constraints" in e.value.fault.detail

    cluster = conn.system_service().clusters_service().list()[0]
    groups = conn.system_service().clusters_service().cluster_service(cluster.id) \
        .affinity_groups_service()
    groups.add(types.AffinityGroup(
        name="ft-pair-a", vms_rule=types.AffinityRule(enabled=True, enforcing=True,
                                                       positive=False),
        vms=[types.Vm(id=a.id), types.Vm(id=b.id)]))
    listed = groups.list()
    assert [g.name for g in listed] == ["ft-pair-a"]
    assert listed[0].vms_rule.positive is False and listed[0].vms_rule.enforcing
    assert sorted(v.id for v in listed[0].vms) == sorted([a.id, b.id])
    with pytest.raises(sdk.Error) as e:
        vms.vm_service(b.id).start(vm=types.Vm(placement_policy=types.VmPlacementPolicy(
            hosts=[types.Host(id=big.id)])))
    assert e.value.code == 409 and "negative VM affinity" in e.value.fault.detail


def test_hosts_list_can_inline_hooks_and_affinity_labels_work(engine, conn):
    h1 = engine.add_host("h1", hooks=[Hook("before_vm_start", "50_ft", "aa")])
    engine.add_host("h2")
    vm = engine.add_vm("vm1")
    hosts = conn.system_service().hosts_service().list(follow="hooks")
    by_name = {h.name: h for h in hosts}
    assert [k.name for k in by_name["h1"].hooks] == ["50_ft"]
    assert not by_name["h2"].hooks
    labels = conn.system_service().affinity_labels_service()
    label = labels.add(types.AffinityLabel(name="ft-capable"))
    label_svc = labels.label_service(label.id)
    label_svc.hosts_service().add(types.Host(id=h1.id))
    label_svc.vms_service().add(types.Vm(id=vm.id))
    assert [h.id for h in label_svc.hosts_service().list()] == [h1.id]
    assert [v.id for v in label_svc.vms_service().list()] == [vm.id]
    assert [lab.name for lab in labels.list()] == ["ft-capable"]


def test_tags_on_vms_and_hosts(engine, conn):
    vm = engine.add_vm("vm1", host=engine.add_host("h1").id)
    system = conn.system_service()
    system.tags_service().add(types.Tag(name="ft"))
    with pytest.raises(sdk.Error) as e:
        system.tags_service().add(types.Tag(name="ft"))
    assert e.value.code == 409
    vm_tags = system.vms_service().vm_service(vm.id).tags_service()
    vm_tags.add(tag=types.Tag(name="ft"))
    assert [t.name for t in vm_tags.list()] == ["ft"]
    assert [v.name for v in system.vms_service().list(search="tag=ft")] == ["vm1"]
    tag_id = vm_tags.list()[0].id
    vm_tags.tag_service(tag_id).remove()
    assert system.vms_service().list(search="tag=ft") == []


# ----- events -------------------------------------------------------------------------------

def test_event_custom_id_is_unique_per_origin(engine, conn):
    # The engine's flood key is the event type plus its entities (not origin or custom id),
    # so each event here names its own VM to stay clear of flood control.
    vms = [engine.add_vm("vm%d" % i) for i in range(6)]
    events = conn.system_service().events_service()

    def add(origin, custom_id, vm, **kw):
        return events.add(types.Event(description="d%d" % custom_id,
                                      severity=types.LogSeverity.NORMAL, origin=origin,
                                      custom_id=custom_id, vm=types.Vm(id=vm.id), **kw))

    first = add("vdsm-ft", 7, vms[0])
    assert first.code == 9801 and first.origin == "vdsm-ft" and first.custom_id == 7
    add("other-plugin", 7, vms[1])            # same id, other origin: accepted
    with pytest.raises(sdk.Error) as e:
        add("vdsm-ft", 7, vms[2])
    assert e.value.code == 400 and "custom id already exists" in e.value.fault.detail
    with pytest.raises(sdk.Error) as e:
        add("oVirt", 8, vms[2])
    assert e.value.code == 400
    with pytest.raises(sdk.Error) as e:
        events.add(types.Event(description="no id", severity=types.LogSeverity.NORMAL,
                               origin="vdsm-ft"))
    assert e.value.code == 400 and "customId" in e.value.fault.detail

    mine = events.list(search="origin=vdsm-ft")
    assert [ev.custom_id for ev in mine] == [7]
    newer = events.list(from_=int(first.id))
    assert [(ev.origin, ev.custom_id) for ev in newer] == [("other-plugin", 7)]
    assert events.event_service(first.id).get().description == "d7"
    assert events.list(search="event_vm=vm1")[0].origin == "other-plugin"


def test_event_flood_control(engine, conn):
    vm = engine.add_vm("vm1")
    events = conn.system_service().events_service()

    def add(custom_id, severity=types.LogSeverity.NORMAL, flood_rate=1):
        return events.add(types.Event(description="d", severity=severity, origin="vdsm-ft",
                                      custom_id=custom_id, vm=types.Vm(id=vm.id),
                                      flood_rate=flood_rate))

    add(1)
    with pytest.raises(sdk.Error) as e:
        add(2)                                  # same type and VM within 1 s: dropped
    assert e.value.code == 400
    add(3, severity=types.LogSeverity.WARNING)  # another type: its own flood key
    time.sleep(1.05)
    add(4)
    assert [ev.custom_id for ev in events.list(search="origin=vdsm-ft")] == [4, 3, 1]
    # A dropped event did not take its custom id.
    add(2, severity=types.LogSeverity.ERROR)


# ----- host loss, fencing, HA ---------------------------------------------------------------

def test_dead_host_goes_connecting_then_non_responsive_and_vms_unknown(engine, conn):
    h1 = engine.add_host("h1")
    engine.add_host("h2")
    vm = engine.add_vm("vm1", host="h1")
    hosts = conn.system_service().hosts_service()
    engine.kill_host("h1")
    assert wait_until(lambda: hosts.host_service(h1.id).get().status ==
                      types.HostStatus.CONNECTING, what="connecting")
    # Still within the grace period the VM keeps its status.
    assert conn.system_service().vms_service().vm_service(vm.id).get().status == types.VmStatus.UP
    wait_until(lambda: hosts.host_service(h1.id).get().status == types.HostStatus.NON_RESPONSIVE,
               what="non_responsive")
    got = conn.system_service().vms_service().vm_service(vm.id).get()
    assert got.status == types.VmStatus.UNKNOWN and got.host.id == h1.id
    codes = [e.code for e in conn.system_service().events_service().list()]
    assert {9008, 9027, 142} <= set(codes)
    # Without power management nothing else happens: no fence, the VM stays Unknown.
    time.sleep(0.3)
    assert engine.vm("vm1").status == "unknown"
    assert not [a for a in engine.actions() if a.kind == "fence"]


def test_manual_fence_downs_vms_and_restarts_ha_vm_elsewhere(engine, conn, driver):
    h1 = engine.add_host("h1")
    h2 = engine.add_host("h2")
    ha_vm = engine.add_vm("ha", host="h1", ha=True, ha_priority=50,
                          custom_properties={"ft": "true"})
    plain = engine.add_vm("plain", host="h1")
    host_svc = conn.system_service().hosts_service().host_service(h1.id)
    with pytest.raises(sdk.Error) as e:
        host_svc.fence(fence_type="manual")
    assert e.value.code == 409                # an Up host cannot be confirmed rebooted

    engine.kill_host("h1")
    engine.wait_host_status("h1", "non_responsive")
    host_svc.fence(fence_type="manual")
    vms = conn.system_service().vms_service()
    assert vms.vm_service(plain.id).get().status == types.VmStatus.DOWN
    engine.wait_vm_status("ha", "up")
    restarted = vms.vm_service(ha_vm.id).get()
    assert restarted.host.id == h2.id
    assert [(r.vm_name, r.host_id) for r in driver.starts] == [("ha", h2.id)]
    codes = [e.code for e in conn.system_service().events_service().list()]
    assert codes.count(143) == 2 and 9602 in codes
    with pytest.raises(sdk.Error) as e:
        host_svc.fence(fence_type="restart")   # no power management configured
    assert e.value.code == 409


def test_ha_vm_with_nowhere_to_go_logs_restart_failure(engine, conn):
    engine.add_host("h1")
    engine.add_vm("ha", host="h1", ha=True)
    engine.kill_host("h1")
    engine.wait_host_status("h1", "non_responsive")
    engine.state.fence("h1", "manual")
    assert engine.vm("ha").status == "down"
    assert 9603 in [e.code for e in conn.system_service().events_service().list()]


def test_vm_with_lease_is_restarted_without_fencing(engine, driver):
    engine.add_host("h1")
    h2 = engine.add_host("h2")
    engine.add_vm("leased", host="h1", ha=True, lease_storage_domain="sd-1")
    engine.kill_host("h1")
    engine.wait_vm_status("leased", "unknown", timeout=5)
    wait_until(lambda: engine.vm("leased").host_id == h2.id and engine.vm("leased").status == "up",
               what="leased VM up on h2")
    assert [r.host_id for r in driver.starts] == [h2.id]
    assert not [a for a in engine.actions() if a.kind == "fence"]


def test_power_management_fences_automatically(engine, driver):
    engine.add_host("h1", power_management=True)
    h2 = engine.add_host("h2")
    engine.add_vm("ha", host="h1", ha=True)
    engine.kill_host("h1")
    wait_until(lambda: engine.vm("ha").host_id == h2.id and engine.vm("ha").status == "up",
               what="HA VM up on h2")
    assert [a.detail for a in engine.actions() if a.kind == "fence"] == ["restart"]
    assert engine.host("h1").status == "non_responsive"   # the fenced host is still dead


# ----- VDSM reports ------------------------------------------------------------------------

def test_external_vm_is_imported_and_counts_against_host_memory(engine, conn):
    h2 = engine.add_host("h2", memory=32 * GiB, reserved_memory=1 * GiB)
    before = conn.system_service().hosts_service().host_service(h2.id).get().max_scheduling_memory
    secondary = "6b1d2c3e-1111-5222-8333-444455556666"
    engine.report_vms("h2", [{"uuid": secondary, "name": "vm1-ft-secondary", "status": "paused",
                              "has_ovirt_metadata": False, "memory": 4 * GiB}])
    vm = conn.system_service().vms_service().vm_service(secondary).get()
    assert vm.name == "external-vm1-ft-secondary" and vm.origin == "external"
    assert vm.host.id == h2.id and vm.status == types.VmStatus.PAUSED
    after = conn.system_service().hosts_service().host_service(h2.id).get().max_scheduling_memory
    assert before - after == 4 * GiB
    assert [v.name for v in conn.system_service().vms_service().list(search="host=h2")] == \
        ["external-vm1-ft-secondary"]
    # Gone from the next full report: the engine sets it Down and frees the memory.
    engine.report_vms("h2", [])
    assert engine.vm(secondary).status == "down"
    assert engine.host("h2").max_scheduling_memory == before


def test_uuid_reported_up_by_another_host_moves_the_vm(engine, conn):
    engine.add_host("h1")
    h2 = engine.add_host("h2")
    vm = engine.add_vm("vm1", host="h1", memory=2 * GiB)
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", status="up", memory=2 * GiB)])
    got = conn.system_service().vms_service().vm_service(vm.id).get()
    assert got.host.id == h2.id and got.status == types.VmStatus.UP
    assert engine.host("h1").max_scheduling_memory == 63 * GiB
    assert engine.host("h2").max_scheduling_memory == 61 * GiB


def test_paused_copy_on_another_host_is_destroyed(engine, driver):
    h1 = engine.add_host("h1")
    h2 = engine.add_host("h2")
    vm = engine.add_vm("vm1", host="h1")
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", status="paused")])
    assert engine.vm("vm1").host_id == h1.id
    assert driver.destroys == [(h2.id, vm.id)]
    assert [(a.kind, a.host_id, a.vm_id) for a in engine.actions()] == [("destroy", h2.id, vm.id)]


def test_paused_copy_of_an_unknown_vm_is_adopted(engine, driver):
    engine.add_host("h1")
    h2 = engine.add_host("h2")
    vm = engine.add_vm("vm1", host="h1")
    engine.kill_host("h1")
    engine.wait_vm_status("vm1", "unknown")
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", status="paused")])
    assert engine.vm("vm1").host_id == h2.id and driver.destroys == []


def test_report_from_a_dead_host_is_a_lab_error(engine):
    engine.add_host("h1")
    engine.kill_host("h1")
    with pytest.raises(LabError):
        engine.report_vms("h1", [])


# ----- outages, timeouts, counting ----------------------------------------------------------

def test_outage_gives_connection_error_then_recovers(engine, conn):
    engine.add_vm("vm1")
    vms = conn.system_service().vms_service()
    assert len(vms.list()) == 1
    engine.set_outage(True)
    with pytest.raises(sdk.Error) as e:
        vms.list()
    assert ", 7, " in str(e.value) and "onnect" in str(e.value)     # CURLE_COULDNT_CONNECT
    with pytest.raises(sdk.ConnectionError):
        connect(engine).authenticate()
    engine.set_outage(False)
    assert [v.name for v in vms.list()] == ["vm1"]


def test_slow_path_times_out_like_a_hung_engine(engine, conn):
    engine.add_vm("vm1")
    engine.set_delay(1.5, "vms")
    quick = connect(engine, timeout=1)
    with pytest.raises(sdk.Error) as e:
        quick.system_service().vms_service().list()
    assert ", 28, " in str(e.value) and "timed out" in str(e.value)  # CURLE_OPERATION_TIMEDOUT
    assert quick.system_service().hosts_service().list() == []
    engine.set_delay(0, "vms")
    assert len(quick.system_service().vms_service().list()) == 1


def test_api_calls_are_counted_per_collection(engine, conn):
    vm = engine.add_vm("vm1")
    engine.reset_api_calls()
    system = conn.system_service()
    system.vms_service().list()
    system.vms_service().list(search="status=up")
    system.vms_service().vm_service(vm.id).get()
    system.hosts_service().list()
    # The SDK logs in lazily, with the first call.
    assert engine.api_calls() == {"POST sso/oauth/token": 1, "GET vms": 2, "GET vms/{id}": 1,
                                  "GET hosts": 1}
    system.vms_service().list()
    assert engine.api_calls()["GET vms"] == 3


def test_ten_thousand_vms_list_fast(engine, conn):
    for i in range(50):
        engine.add_cluster("cl%02d" % i)
    for i in range(500):
        engine.add_host("host%03d" % i, cluster="cl%02d" % (i % 50), memory=512 * GiB)
    hosts = list(engine.state.hosts)
    for i in range(10000):
        engine.state.add_vm("vm%05d" % i, "cl%02d" % (i % 50),
                            custom_properties={"ft": "true"} if i % 2 else {},
                            host=hosts[(i * 7) % 500])
    system = conn.system_service()
    t0 = time.monotonic()
    first = system.vms_service().list()
    cold = time.monotonic() - t0
    engine.warm_cache()
    # Best of three: the machine is shared, and almost all of the time is the SDK parsing
    # 10,000 VMs in this same process (the fake answers in about 15 ms).
    warm = []
    for _ in range(3):
        t0 = time.monotonic()
        again = system.vms_service().list()
        warm.append(time.monotonic() - t0)
    t0 = time.monotonic()
    all_hosts = system.hosts_service().list()
    host_time = time.monotonic() - t0
    print("10k VMs: cold %.2fs warm %s; 500 hosts %.2fs"
          % (cold, " ".join("%.2fs" % w for w in warm), host_time))
    assert len(first) == len(again) == 10000 and len(all_hosts) == 500
    assert sum(1 for v in again if props(v).get("ft") == "true") == 5000
    assert min(warm) < 2.0 and host_time < 1.0


# ----- strict engine rules (docs/engine-view.md) --------------------------------------------

def _domxml(disk_ids=(), nic_ids=()) -> str:
    """A reported live domain XML with these `ua-` aliases (what Host.dumpxmls returns)."""
    disks = "".join("<disk type='file' device='disk'><target dev='vd%s'/><alias name='ua-%s'/>"
                    "</disk>" % (chr(97 + i), d) for i, d in enumerate(disk_ids))
    nics = "".join("<interface type='bridge'><alias name='ua-%s'/></interface>" % n
                   for n in nic_ids)
    return "<domain><devices>%s%s</devices></domain>" % (disks, nics)


@pytest.mark.parametrize("db_status,reported,migrating_here,outcome", [
    ("up", "migrating_to", False, "ignored"),           # the source still owns it
    ("up", "migrating_from", False, "ignored"),
    ("down", "migrating_from", False, "ignored"),
    ("down", "migrating_to", False, "moved"),           # MigratingTo only ignored with a host
    ("up", "paused", False, "destroyed"),
    ("unknown", "paused", False, "moved"),
    ("up", "paused", True, "moved"),                    # migrating to the reporter
    ("down", "paused", False, "moved"),                 # no run_on_vds: nothing to protect
    ("unknown", "wait_for_launch", False, "ignored"),
    ("up", "wait_for_launch", False, "moved"),
    ("up", "up", False, "moved"),
    ("unknown", "up", False, "moved"),
    ("down", "up", False, "moved"),                     # even a Down record is taken over
])
def test_vm_reported_on_other_host_follows_the_engine_table(engine, driver, db_status,
                                                            reported, migrating_here, outcome):
    h1 = engine.add_host("h1")
    h2 = engine.add_host("h2")
    vm = engine.add_vm("vm1", host=None if db_status == "down" else "h1")
    if db_status == "unknown":
        engine.kill_host("h1")
        engine.wait_vm_status("vm1", "unknown")
    if migrating_here:
        with engine.state.lock:
            engine.state.vm("vm1").migrating_to_host_id = h2.id
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", status=reported)], full=False)
    got = engine.vm("vm1")
    if outcome == "ignored":
        assert got.host_id == (None if db_status == "down" else h1.id)
        assert got.status == db_status and driver.destroys == []
    elif outcome == "destroyed":
        assert got.host_id == h1.id and got.status == db_status
        assert driver.destroys == [(h2.id, vm.id)]
    else:
        want = {"migrating_to": "migrating", "migrating_from": "migrating"}.get(reported, reported)
        assert (got.host_id, got.status) == (h2.id, want) and driver.destroys == []


def test_devices_follow_the_reported_domain_xml(engine, driver, conn):
    engine.add_host("h1")
    engine.add_template("tpl", disks=[("disk1", 64 << 20, "virtio", True),
                                      ("disk2", 32 << 20, "virtio_scsi", False)], nics=["nic1"])
    vms = conn.system_service().vms_service()
    vm = vms.add(types.Vm(name="vm1", cluster=types.Cluster(name="Default"),
                          template=types.Template(name="tpl")))
    svc = vms.vm_service(vm.id)
    atts = svc.disk_attachments_service().list()
    nics = svc.nics_service().list()
    assert [a.active for a in atts] == [True, True] and atts[0].bootable and not atts[1].bootable
    assert atts[1].interface == types.DiskInterface.VIRTIO_SCSI and atts[0].disk.id == atts[0].id
    assert [n.name for n in nics] == ["nic1"] and nics[0].plugged
    assert nics[0].mac.address.startswith("56:6f:")
    disk1, disk2 = atts[0].id, atts[1].id
    svc.start()
    wait_until(lambda: engine.vm("vm1").status == "up", what="vm1 up")
    assert [d.id for d in driver.starts[-1].disks] == [disk1, disk2]
    # The running domain no longer shows disk2 (VmDevicesMonitoring.handleRemovedDevices).
    engine.report_vms("h1", [VmReport(uuid=vm.id, name="vm1",
                                      domxml=_domxml([disk1], [nics[0].id]))])
    assert [a.active for a in svc.disk_attachments_service().list()] == [True, False]
    assert svc.disk_attachments_service().attachment_service(disk2).get().active is False
    assert svc.nics_service().list()[0].plugged
    # A report without XML (devices hash unchanged) changes no device.
    engine.report_vms("h1", [VmReport(uuid=vm.id, name="vm1")])
    assert [a.active for a in svc.disk_attachments_service().list()] == [True, False]
    # The next ordinary start boots without the unplugged disk.
    svc.stop()
    svc.start()
    wait_until(lambda: engine.vm("vm1").status == "up", what="vm1 up again")
    assert [d.id for d in driver.starts[-1].disks] == [disk1]
    # Back in the XML: plugged again.
    engine.report_vms("h1", [VmReport(uuid=vm.id, name="vm1",
                                      domxml=_domxml([disk1, disk2], [nics[0].id]))])
    assert [a.active for a in svc.disk_attachments_service().list()] == [True, True]


def test_devices_of_a_vm_taken_over_follow_the_new_hosts_xml(engine):
    engine.add_host("h1")
    engine.add_host("h2")
    engine.add_template("tpl", disks=[("disk1", 64 << 20, "virtio", True)])
    vm = engine.add_vm("vm1", host="h1", template="tpl")
    disk = vm.disks[0].id
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", domxml=_domxml())], full=False)
    assert engine.vm("vm1").host_id == engine.host("h2").id
    assert engine.vm("vm1").disks[0].plugged is False
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", domxml=_domxml([disk]))])
    assert engine.vm("vm1").disks[0].plugged is True


def test_host_status_comes_from_host_monitoring_and_a_non_responsive_host_is_not_polled():
    # Hand-driven monitoring rounds: tick() is one VdsManager.onTimer.
    eng = FakeEngine(users={USER: PASSWORD}, timing=EngineTiming(refresh=3600, grace=0.0))
    eng.start()
    try:
        eng.add_host("h1")
        vm = eng.add_vm("vm1", host="h1")
        eng.kill_host("h1")
        eng.state.tick()
        assert eng.host("h1").status == "connecting"
        eng.state.tick()
        assert eng.host("h1").status == "non_responsive" and eng.vm("vm1").status == "unknown"
        eng.revive_host("h1")
        # VDSM answers again, but until host monitoring sees it the host stays
        # NonResponsive, and its VM report is not taken.
        eng.report_vms("h1", [VmReport(uuid=vm.id, name="vm1", status="up")])
        assert eng.host("h1").status == "non_responsive" and eng.vm("vm1").status == "unknown"
        eng.state.tick()
        assert eng.host("h1").status == "up"
        eng.report_vms("h1", [VmReport(uuid=vm.id, name="vm1", status="up")])
        assert eng.vm("vm1").status == "up"
    finally:
        eng.stop()


def test_actions_on_an_unknown_vm_are_refused(engine, conn):
    engine.add_host("h1")
    engine.add_host("h2")
    vm = engine.add_vm("vm1", host="h1")
    engine.kill_host("h1")
    engine.wait_vm_status("vm1", "unknown")
    svc = conn.system_service().vms_service().vm_service(vm.id)
    for call in (svc.start, lambda: svc.start(vm=types.Vm()), svc.stop, svc.shutdown,
                 svc.migrate, lambda: svc.snapshots_service().add(types.Snapshot())):
        with pytest.raises(sdk.Error) as e:
            call()
        assert e.value.code == 409 and "Unknown status" in str(e.value)
    assert engine.vm("vm1").status == "unknown"


def test_committed_memory_follows_run_on_vds(engine):
    engine.add_host("h1", memory=32 * GiB, reserved_memory=0)
    engine.add_host("h2", memory=32 * GiB, reserved_memory=0)
    vm = engine.add_vm("vm1", host="h1", memory=4 * GiB)
    # A migration destination copy on h2 does not count there: run_on_vds is h1.
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", status="migrating_to",
                                      memory=4 * GiB)])
    assert engine.host("h1").max_scheduling_memory == 28 * GiB
    assert engine.host("h2").max_scheduling_memory == 32 * GiB
    # An external VM counts where it runs.
    engine.report_vms("h2", [VmReport(uuid="0b1d2c3e-1111-5222-8333-444455556666", name="x",
                                      has_ovirt_metadata=False, memory=2 * GiB)])
    assert engine.host("h2").max_scheduling_memory == 30 * GiB
    # Taken over by h2 (reported Up there): the memory moves with run_on_vds.
    engine.report_vms("h2", [VmReport(uuid=vm.id, name="vm1", memory=4 * GiB),
                             VmReport(uuid="0b1d2c3e-1111-5222-8333-444455556666", name="x",
                                      has_ovirt_metadata=False, memory=2 * GiB)])
    assert engine.host("h1").max_scheduling_memory == 32 * GiB
    assert engine.host("h2").max_scheduling_memory == 26 * GiB


def test_collections_real_clients_use(engine, conn):
    engine.add_host("h1")
    engine.add_template("tpl", disks=[("disk1", 64 << 20, "virtio", True)])
    system = conn.system_service()
    blank = system.templates_service().list(search="name=Blank and datacenter=Default")
    assert [t.id for t in blank] == ["00000000-0000-0000-0000-000000000000"]
    assert [t.name for t in system.templates_service().list()] == ["Blank", "tpl"]
    vm = system.vms_service().add(types.Vm(name="vm1", cluster=types.Cluster(name="Default"),
                                           template=types.Template(name="Blank")))
    svc = system.vms_service().vm_service(vm.id)
    assert svc.get().template.id == blank[0].id and svc.disk_attachments_service().list() == []
    nic = svc.nics_service().add(types.Nic(name="nic1"))
    assert nic.plugged and svc.nics_service().nic_service(nic.id).get().name == "nic1"
    assert svc.snapshots_service().list() == []
    assert [c.name for c in system.clusters_service().list()] == ["Default"]
    assert len(system.hosts_service().list()) == 1
    tag = system.tags_service().add(types.Tag(name="ft"))
    svc.tags_service().add(types.Tag(id=tag.id))
    assert [t.name for t in svc.tags_service().list()] == ["ft"]
    assert isinstance(system.events_service().list(max=1), list)
