"""Placement of the COLO secondary: table-driven over the rules of engine_plugin.placement."""
from __future__ import annotations

import pytest

from engine_plugin.inventory import AffinityGroupInfo, HostInfo, VmInfo
from engine_plugin.placement import (GiB, AffinityRules, HostLoad, Limits, affinity_rules,
                                     choose_peer)

VM = VmInfo(id="vm1", name="web", cluster_id="c1", status="up", host_id="a",
            memory=4 * GiB, vcpus=2)


def host(hid: str, *, cluster: str = "c1", status: str = "up", mem_gib: float = 64,
         hook: bool = True) -> HostInfo:
    return HostInfo(id=hid, name=f"host-{hid}", cluster_id=cluster, status=status,
                    address=f"10.0.0.{ord(hid[0])}", max_scheduling_memory=int(mem_gib * GiB),
                    hook_installed=hook)


# name, hosts, loads, agent problems, limits, expected host id (None: refused),
# words expected in the reason of each rejected host (host name -> words)
CASES = [
    ("spread: fewest FT VMs wins",
     [host("a"), host("b"), host("c")], {"b": HostLoad(ft_vms=2, ft_vcpus=2)}, {}, Limits(),
     "c", {"host-a": "runs the primary"}),
    ("spread ties broken by free memory",
     [host("a"), host("b", mem_gib=20), host("c", mem_gib=30)], {}, {}, Limits(),
     "c", {}),
    ("capacity: 2x VM memory needed",
     [host("a"), host("b", mem_gib=7.9), host("c", mem_gib=8)], {}, {}, Limits(),
     "c", {"host-b": "needs 8.0 GiB schedulable memory (2x VM memory), has 7.9 GiB"}),
    ("capacity counts what this cycle reserved",
     [host("a"), host("b", mem_gib=16)], {"b": HostLoad(ft_vms=1, ft_vcpus=1,
                                                       reserved_memory=10 * GiB)}, {},
     Limits(), None, {"host-b": "has 6.0 GiB"}),
    ("cap on FT VMs",
     [host("a"), host("b")], {"b": HostLoad(ft_vms=4, ft_vcpus=4)}, {}, Limits(),
     None, {"host-b": "already has 4 FT VMs (cap 4, [placement] max_vms_per_host)"}),
    ("cap on FT vCPUs",
     [host("a"), host("b")], {"b": HostLoad(ft_vms=1, ft_vcpus=7)}, {}, Limits(),
     None, {"host-b": "FT vCPUs would be 9 (cap 8, [placement] max_vcpus_per_host)"}),
    ("caps are configurable",
     [host("a"), host("b")], {"b": HostLoad(ft_vms=4, ft_vcpus=7)}, {},
     Limits(max_vms_per_host=5, max_vcpus_per_host=9), "b", {}),
    ("other clusters are never candidates",
     [host("a"), host("b", cluster="c2"), host("c")], {}, {}, Limits(), "c", {}),
    ("only other clusters: refused",
     [host("a"), host("b", cluster="c2")], {}, {}, Limits(), None, {"host-a": "primary"}),
    ("non-Up hosts",
     [host("a"), host("b", status="non_responsive"), host("c", status="maintenance"),
      host("d", status="connecting"), host("e")], {}, {}, Limits(), "e",
     {"host-b": "not Up (non_responsive)", "host-c": "not Up (maintenance)",
      "host-d": "not Up (connecting)"}),
    ("hook missing",
     [host("a"), host("b", hook=False), host("c")], {}, {}, Limits(), "c",
     {"host-b": "FT hook not installed"}),
    ("agent unreachable",
     [host("a"), host("b"), host("c")], {}, {"b": "connection refused"}, Limits(), "c",
     {"host-b": "agent not usable: connection refused"}),
    ("every host excluded",
     [host("a"), host("b", status="non_responsive"), host("c", hook=False),
      host("d", mem_gib=1), host("e")], {"e": HostLoad(ft_vms=4)}, {}, Limits(), None,
     {"host-a": "runs the primary", "host-b": "not Up", "host-c": "hook",
      "host-d": "schedulable memory", "host-e": "cap 4"}),
    ("single host cluster", [host("a")], {}, {}, Limits(), None, {"host-a": "primary"}),
]


@pytest.mark.parametrize("name, hosts, loads, problems, limits, expected, reasons", CASES,
                         ids=[c[0] for c in CASES])
def test_choose_peer(name, hosts, loads, problems, limits, expected, reasons):
    choice = choose_peer(VM, "a", hosts, loads, limits, problems)
    assert (choice.host.id if choice.host else None) == expected, choice.rejected
    for host_name, words in reasons.items():
        assert words in choice.rejected[host_name], choice.rejected
    if expected is None:
        assert choice.refusal.startswith("no host qualifies: ")
        for host_name in reasons:
            assert host_name in choice.refusal
    else:
        assert choice.refusal == ""
        assert expected not in {h.id for h in hosts if h.name in choice.rejected}


def test_a_vm_wider_than_the_vcpu_cap_is_refused_everywhere_naming_the_setting():
    wide = VmInfo(id="vm2", name="wide", cluster_id="c1", status="up", host_id="a",
                  memory=1 * GiB, vcpus=12)
    choice = choose_peer(wide, "a", [host("a"), host("b")], {}, Limits(), {})
    assert choice.host is None
    assert choice.rejected["host-b"] == (
        "the VM's 12 vCPUs exceed the per-host FT vCPU cap on every host (cap 8, "
        "[placement] max_vcpus_per_host): raise it or give the VM fewer vCPUs")


def test_empty_cluster_refusal_is_explicit():
    assert choose_peer(VM, "a", [], {}, Limits(), {}).refusal == \
        "no host qualifies: the cluster has no other host"


def test_refusal_names_at_most_eight_hosts():
    hosts = [host("a")] + [host(f"x{i}", status="down") for i in range(20)]
    refusal = choose_peer(VM, "a", hosts, {}, Limits(), {}).refusal
    assert refusal.endswith("; and 13 more")


def test_successive_choices_spread_when_the_caller_records_them():
    hosts = [host("a"), host("b"), host("c")]
    loads: dict[str, HostLoad] = {}
    picked = []
    for i in range(4):
        vm = VmInfo(id=f"v{i}", name=f"v{i}", cluster_id="c1", status="up", host_id="a",
                    memory=GiB, vcpus=1)
        choice = choose_peer(vm, "a", hosts, loads, Limits(), {})
        picked.append(choice.host.id)
        loads.setdefault(choice.host.id, HostLoad()).add_secondary(vm)
    assert sorted(picked) == ["b", "b", "c", "c"]


@pytest.mark.parametrize("group, expect_excluded, expect_required", [
    (AffinityGroupInfo("g", "apart", "c1", True, None, False, frozenset({"vm1"}),
                       frozenset({"b"})), {"b"}, None),
    (AffinityGroupInfo("g", "pinned", "c1", True, None, True, frozenset({"vm1"}),
                       frozenset({"a", "c"})), set(), {"a", "c"}),
    (AffinityGroupInfo("g", "anti", "c1", True, False, None, frozenset({"vm1", "db"})),
     {"d"}, None),
    (AffinityGroupInfo("g", "soft", "c1", False, False, False, frozenset({"vm1", "db"}),
                       frozenset({"b"})), set(), None),
    (AffinityGroupInfo("g", "not mine", "c1", True, False, False, frozenset({"db"}),
                       frozenset({"b"})), set(), None),
])
def test_affinity_rules(group, expect_excluded, expect_required):
    rules = affinity_rules(VM, [group], {"db": "d", "vm1": "a"})
    assert set(rules.excluded) == expect_excluded
    assert (None if rules.required is None else set(rules.required)) == expect_required


def test_affinity_applies_in_choice():
    hosts = [host("a"), host("b"), host("c"), host("d")]
    rules = AffinityRules(excluded=frozenset({"b"}), required=frozenset({"b", "c"}),
                          why={"b": "negative VM affinity with a VM there (group anti)"})
    choice = choose_peer(VM, "a", hosts, {}, Limits(), {}, rules)
    assert choice.host.id == "c"
    assert "group anti" in choice.rejected["host-b"]
    assert choice.rejected["host-d"] == "outside the VM's positive host affinity"


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="at least 1"):
        Limits(max_vms_per_host=0)


def test_a_peer_that_just_refused_the_vm_is_passed_over():
    hosts = [host("a"), host("b"), host("c")]
    why = "refused this VM recently: replica directory full"
    choice = choose_peer(VM, "a", hosts, {}, Limits(), {}, avoid={"b": why})
    assert choice.host.id == "c"
    assert choice.rejected["host-b"] == why
    only = choose_peer(VM, "a", hosts[:2], {}, Limits(), {}, avoid={"b": why})
    assert only.host is None and why in only.refusal


def test_hosts_whose_qemu_cannot_hold_the_secondary_are_passed_over():
    hosts = [host("a"), host("b"), host("c")]
    problems = {"b": "its QEMU cannot do COLO (x-colo, quorum; see the host's event)"}
    choice = choose_peer(VM, "a", hosts, {}, Limits(), {}, qemu_problems=problems)
    assert choice.host.id == "c"
    assert choice.rejected["host-b"] == problems["b"]
    refused = choose_peer(VM, "a", hosts[:2], {}, Limits(), {}, qemu_problems=problems)
    assert refused.host is None and "host-b: its QEMU cannot do COLO" in refused.refusal
