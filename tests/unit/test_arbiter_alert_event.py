"""engine_plugin.reconcile: a primary's arbiter ALERT becomes one engine event of
severity alert, posted once however often the poller sees it (issue 16)."""
from engine_plugin.agents import AgentView
from engine_plugin.events import ALERT, EventLog
from engine_plugin.inventory import HostInfo, Inventory, VmInfo
from engine_plugin.placement import Limits
from engine_plugin.reconcile import plan
from vdsm_ft.api import HostStatus, Role, VmState, VmStatus

VM = "0b6c1a43-8a47-4a53-9d6c-2c1fd1d4d9b1"
ALERT_TEXT = ("ALERT: the arbiter's live claim is corrupt: live claim is not valid: "
              "'junk' (generation 3)")


def _plan(alert: str, generation: int = 3):
    vm = VmInfo(id=VM, name="web", cluster_id="c", status="up", host_id="h1",
                memory=2**30, vcpus=2, custom_properties=(("ft", "true"),))
    host = HostInfo(id="h1", name="host1", cluster_id="c", status="up", address="10.0.0.1",
                    max_scheduling_memory=8 * 2**30, hook_installed=True)
    st = VmStatus(vm_id=VM, name="web", state=VmState.PROTECTED, role=Role.PRIMARY,
                  primary_host="h1", secondary_host="h2", generation=generation,
                  arbiter_alert=alert)
    view = AgentView(statuses={"h1": HostStatus(
        host_id="h1", replication_address="10.0.0.1", agent_version="t", vms=(st,))})
    return plan(Inventory(vms={VM: vm}, hosts={"h1": host}), view, Limits(),
                lambda _: [], now=0.0)


def test_an_alert_in_the_status_is_an_alert_event_once():
    [event] = [ev for ev in _plan(ALERT_TEXT).events if ev.kind == "arbiter-alert"]
    assert event.severity == ALERT == "alert" and event.vm_id == VM
    assert ALERT_TEXT in event.description and "host1" in event.description
    # Re-protection raises the generation; the ALERT is the same fact, the same event.
    [again] = [ev for ev in _plan(ALERT_TEXT, generation=4).events
               if ev.kind == "arbiter-alert"]
    assert again.custom_id == event.custom_id
    log = EventLog()
    assert log.due(event)
    log.posted(event)
    assert not log.due(again)


def test_no_alert_no_alert_event():
    assert not [ev for ev in _plan("").events if ev.severity == ALERT]
