"""engine_plugin.reconcile.loads_from: what counts toward a host's FT caps (issue 16:
starts that never ran filled the cap, "host1: already has 11 FT VMs (cap 4)" at 6)."""
from engine_plugin.agents import AgentView
from engine_plugin.inventory import Inventory, VmInfo
from engine_plugin.reconcile import loads_from
from vdsm_ft.api import HostStatus, Role, VmState, VmStatus


def _vm(vm_id: str, status: str, host_id: str | None) -> VmInfo:
    return VmInfo(id=vm_id, name=vm_id, cluster_id="c", status=status, host_id=host_id,
                  memory=2**30, vcpus=2, custom_properties=(("ft", "true"),))


def test_only_primaries_the_engine_runs_on_that_host_count():
    vms = {"up": _vm("up", "up", "h1"), "launching": _vm("launching", "wait_for_launch", "h1"),
           "failed": _vm("failed", "down", None), "elsewhere": _vm("elsewhere", "up", "h2"),
           "prot": _vm("prot", "up", "h1")}
    statuses = [VmStatus(vm_id=v, name=v, state=VmState.STARTING, role=Role.PRIMARY)
                for v in ("up", "launching", "failed", "elsewhere", "gone")]
    statuses.append(VmStatus(vm_id="prot", name="prot", state=VmState.PROTECTED,
                             role=Role.PRIMARY))
    view = AgentView(statuses={"h1": HostStatus(
        host_id="h1", replication_address="10.0.0.1", agent_version="t", vms=tuple(statuses))})
    load = loads_from(Inventory(vms=vms), view)["h1"]
    assert (load.ft_vms, load.ft_vcpus) == (3, 6)     # up, launching, prot
