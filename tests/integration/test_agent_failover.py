"""The host agents fail over by themselves: real agents in lab hosts (own netns, own
libvirtd), a real 3-member etcd cluster with one member per host, mutual TLS, and real
COLO under KVM with the idle guest. Data is checked at the block layer through
libvirt's own monitor (the agent holds the VM's private QMP socket).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftlab import guest, netns
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.etcd import EtcdCluster, MemberSpec
from ftlab.host import LabHost
from ftlab.hostagent import API_PORT, LabAgent
from ftlab.monitor import LibvirtMonitor
from tests.mtls_pki import issue, make_ca
from vdsm_ft import domains, domxml
from vdsm_ft.api import PeerSpec, Role, VmState, VmStatus
from vdsm_ft.arbiter import Arbiter
from vdsm_ft.hookapi import HookClient
from vdsm_ft.layout import Disk, VmLayout

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

WIRE = "ag-wire"
MiB = 1 << 20
BLOCK = 64 * 1024


CLIENT_INDEX = 90       # the test's own namespace on the wire, as the poller would be


@dataclass
class Lab:
    hosts: list[LabHost]
    agents: list[LabAgent]
    etcd: EtcdCluster
    net: netns.NetnsWorker  # the wire is not reachable from the root namespace

    def call(self, host_name: str, method: str, *args: object) -> object:
        def run() -> object:
            client = self.agent(host_name).client()
            try:
                return getattr(client, method)(*args)
            finally:
                client.close()
        return self.net.call(run)

    def agent(self, name: str) -> LabAgent:
        return next(a for a in self.agents if a.host.name == name)

    def peer(self, name: str) -> PeerSpec:
        host = self.agent(name).host
        return PeerSpec(host_id=host.name, agent_address=host.address,
                        agent_port=API_PORT, replication_address=host.address)


@pytest.fixture(scope="module")
def lab(kvm):
    base = tempfile.mkdtemp(prefix="ftlab-ag-", dir="/tmp")
    os.chmod(base, 0o755)
    hosts = [LabHost(f"ag-{n}", i + 1, base, wire=WIRE).up() for i, n in enumerate("abc")]
    etcd = EtcdCluster([MemberSpec(host=h.address, netns=h.netns) for h in hosts],
                       base_dir=os.path.join(base, "etcd")).start()
    pki = Path(base) / "pki"
    ca = make_ca(pki)
    client_tls = issue(pki, ca, "poller")
    client_ns = netns.netns_name("ag-client")
    netns.create(client_ns)
    netns.join_rep(client_ns, CLIENT_INDEX, netns.netns_name(WIRE))
    net = netns.NetnsWorker(client_ns)
    agents = [LabAgent(h, etcd.endpoints, issue(pki, ca, h.name, addresses=[h.address]),
                       client_tls, reach=net.call) for h in hosts]
    for a in agents:
        a.start()
    yield Lab(hosts, agents, etcd, net)
    net.close()
    for a in agents:
        a.crash()
    netns.delete(client_ns)
    etcd.stop()
    for h in hosts:
        h.down()
    netns.delete(netns.netns_name(WIRE))
    shutil.rmtree(base, ignore_errors=True)
    for a in agents:
        shutil.rmtree(a.overlay_dir, ignore_errors=True)


@dataclass
class Vm:
    vm_id: str
    name: str
    engine_xml: str


def start_vm(lab: Lab, host_name: str) -> Vm:
    """What VDSM does on a start: before_vm_start hook, libvirt, after_vm_start hook."""
    agent = lab.agent(host_name)
    host = agent.host
    vm_id = str(uuid.uuid4())
    name = f"ag-{vm_id[:8]}"
    disk = guest.install_disk(guest.build_idle_disk(64 * MiB),
                              host.path("images", f"{vm_id}.qcow2"))
    xml = guest.idle_guest_xml(name, disk, mac=guest.guest_mac(2),
                               serial_log=host.path("images", f"{vm_id}.serial"),
                               vm_id=vm_id)
    run_dir = os.path.join(agent.run_dir, "vms", vm_id)
    os.makedirs(run_dir, exist_ok=True)
    shutil.chown(run_dir, "libvirt-qemu", "kvm")
    primary = domxml.primary_xml(xml, run_dir, (7, 2, 0))
    hooks = HookClient(agent.hook_socket)
    hooks.register(vm_id, xml, primary)
    conn = host.connect()
    try:
        domains.start(conn, primary)
    finally:
        conn.close()
    hooks.started(vm_id)
    return Vm(vm_id, name, xml)


def status(lab: Lab, host_name: str, vm_id: str) -> VmStatus:
    return lab.call(host_name, "vm_status", vm_id)


def wait_status(lab: Lab, host_name: str, vm_id: str, state: VmState,
                timeout: float = 60.0) -> VmStatus:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = status(lab, host_name, vm_id)
        except Exception as exc:  # the VM may not be known there yet
            last = exc
        if isinstance(last, VmStatus) and last.state is state:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{vm_id} on {host_name} never reached {state.value}; last: {last}"
                         f"\n{agent_logs(lab)}")


def agent_logs(lab: Lab, lines: int = 40) -> str:
    """The agents' last log lines, so a failure in CI says what the agents saw."""
    out = []
    for agent in lab.agents:
        with open(agent.log_path, errors="replace") as f:
            tail = f.readlines()[-lines:]
        out.append(f"--- {agent.host.name} agent log ---\n" + "".join(tail))
    return "\n".join(out)


def protect(lab: Lab, vm: Vm, primary: str, secondary: str) -> None:
    wait_status(lab, primary, vm.vm_id, VmState.NEED_SECONDARY)
    lab.call(primary, "protect", vm.vm_id, lab.peer(secondary))
    wait_status(lab, primary, vm.vm_id, VmState.PROTECTED)
    wait_status(lab, secondary, vm.vm_id, VmState.PROTECTED)


def monitor(lab: Lab, host_name: str, vm: Vm, secondary: bool) -> LibvirtMonitor:
    name = domxml.secondary_name(vm.name) if secondary else vm.name
    return LibvirtMonitor(lab.agent(host_name).host.uri, name)


def probe_layout(lab: Lab, host_name: str, vm: Vm) -> tuple[VmLayout, Disk]:
    run_dir = os.path.join(lab.agent(host_name).run_dir, "vms", vm.vm_id)
    disk = Disk(index=0, image="", size=64 * MiB)
    return VmLayout(vm.vm_id, vm.name, run_dir, (disk,)), disk


def write(mon: LibvirtMonitor, offset: int, pattern: int) -> None:
    write_pattern(mon, Disk(index=0, image="", size=0), offset, BLOCK, pattern)


def holds(lab: Lab, host_name: str, vm: Vm, mon: LibvirtMonitor, offset: int,
          pattern: int) -> bool:
    layout, disk = probe_layout(lab, host_name, vm)
    return pattern_matches(mon, layout, disk, offset, BLOCK, pattern)


def wait_checkpoints(lab: Lab, host_name: str, vm_id: str, count: int = 2,
                     timeout: float = 15.0) -> None:
    """Wait for `count` more completed checkpoints as the agent counts them."""
    start = _checkpoints(lab, host_name, vm_id)
    deadline = time.monotonic() + timeout
    while _checkpoints(lab, host_name, vm_id) < start + count:
        assert time.monotonic() < deadline, "checkpoints stopped"
        time.sleep(0.1)


def _checkpoints(lab: Lab, host_name: str, vm_id: str) -> int:
    text = lab.call(host_name, "metrics")
    for line in text.splitlines():
        if line.startswith("vdsm_ft_checkpoints_total{") and f'vm="{vm_id}"' in line:
            return int(line.rsplit(" ", 1)[1])
    return 0


def test_primary_qemu_killed_secondary_takes_over_by_itself(lab):
    vm = start_vm(lab, "ag-a")
    protect(lab, vm, "ag-a", "ag-b")
    write(monitor(lab, "ag-a", vm, False), 0, 0x5A)
    wait_checkpoints(lab, "ag-a", vm.vm_id)

    pid = domains.qemu_pid(vm.name, among=lab.agent("ag-a").host.pids())
    os.kill(pid, 9)

    after = wait_status(lab, "ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert after.last_failover is not None
    survivor = monitor(lab, "ag-b", vm, True)
    assert survivor.execute("query-colo-status")["mode"] == "none"
    assert survivor.execute("query-status")["status"] == "running"
    assert holds(lab, "ag-b", vm, survivor, 0, 0x5A)
    assert not holds(lab, "ag-b", vm, survivor, 1 * MiB, 0x5A)
    holder = lab.net.call(Arbiter(lab.etcd.endpoints).live_holder, vm.vm_id,
                          after.generation)
    assert holder == "ag-b"
