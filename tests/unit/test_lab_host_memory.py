"""The lab hosts advertise the memory this machine has (issue 16 item 6: each claimed
64 GiB on a 24 GiB machine, so placement's memory rule never met a real limit)."""
from __future__ import annotations

import types

from engine_plugin.inventory import HostInfo, VmInfo
from engine_plugin.placement import HostLoad, Limits, choose_peer
from ftlab import supervisor
from ftlab.demo import IDLE_GUEST, LINUX_GUEST, LINUX_TCG_GUEST
from ftlab.labstate import DEFAULT_HOSTS, HOST_RESERVED_MEMORY, host_memory
from ftlab.preflight import MIN_FREE_MEMORY

GiB = 1 << 30


def _meminfo(tmp_path, total: int) -> str:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {total // 1024} kB\nMemFree:        1024 kB\n")
    return str(path)


def test_each_host_advertises_its_share_of_the_machine(tmp_path):
    assert host_memory(3, _meminfo(tmp_path, 24 * GiB)) == 8 * GiB


class _Engine:
    """FakeEngine as far as Supervisor._start_engine uses it."""

    def __init__(self, **_kw):
        self.hosts: list[dict] = []
        self.default_cluster = "Default"
        self.state = types.SimpleNamespace(add_host=lambda name, cluster, **kw:
                                           self.hosts.append(kw))

    def start(self):
        return types.SimpleNamespace(url="https://127.0.0.1:1/ovirt-engine/api",
                                     ca_file="ca.pem")

    def add_template(self, *_a, **_kw) -> None:
        pass


def test_the_supervisor_gives_the_engine_hosts_that_share(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "FakeEngine", _Engine)
    monkeypatch.setattr(supervisor, "HostVdsm", lambda *a: None)
    monkeypatch.setattr(supervisor, "VdsmFleet", lambda *a: types.SimpleNamespace(
        start_reporting=lambda: None))
    monkeypatch.setattr(supervisor, "host_memory",
                        lambda n, meminfo="/proc/meminfo": host_memory(
                            n, _meminfo(tmp_path, 24 * GiB)))
    sup = supervisor.Supervisor(str(tmp_path), DEFAULT_HOSTS, 0)
    sup.hosts = [types.SimpleNamespace(name=f"host{i}", address=f"10.0.0.{i}")
                 for i in range(1, DEFAULT_HOSTS + 1)]
    sup.agents = [types.SimpleNamespace(config_path="agent.conf") for _ in sup.hosts]
    sup._start_engine()
    assert [h["memory"] for h in sup.engine.hosts] == [8 * GiB] * DEFAULT_HOSTS
    assert all(h["reserved_memory"] == HOST_RESERVED_MEMORY for h in sup.engine.hosts)


def test_the_demo_guests_fit_on_the_smallest_machine_the_lab_accepts(tmp_path):
    """Preflight lets a lab start with MIN_FREE_MEMORY: the demo's VM (one at a time)
    must still find a peer, on a third host after a crash too."""
    share = host_memory(DEFAULT_HOSTS, _meminfo(tmp_path, MIN_FREE_MEMORY))
    for guest in (IDLE_GUEST, LINUX_GUEST, LINUX_TCG_GUEST):
        vm = VmInfo(id="v", name="demo", cluster_id="c", status="up", host_id="host1",
                    memory=guest.memory, vcpus=1, custom_properties=(("ft", "true"),))
        # The peer runs nothing of its own; the engine counts the VM on host1 only.
        hosts = [HostInfo(id=f"host{i}", name=f"host{i}", cluster_id="c", status="up",
                          address=f"10.0.0.{i}", hook_installed=True,
                          max_scheduling_memory=share - HOST_RESERVED_MEMORY -
                          (guest.memory if i == 1 else 0))
                 for i in (1, 2)]
        choice = choose_peer(vm, "host1", hosts, {h.id: HostLoad() for h in hosts},
                             Limits(), {})
        assert choice.host is not None and choice.host.id == "host2", choice.refusal
