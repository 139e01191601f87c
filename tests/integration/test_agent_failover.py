"""The host agents fail over by themselves: real agents in lab hosts (own netns, own
libvirtd), a real 3-member etcd cluster with one member per host, mutual TLS, and real
COLO under KVM with the idle guest. Data is checked at the block layer through
libvirt's own monitor (the agent holds the VM's private QMP socket).
"""
from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from ftlab.agentlab import MiB, AgentLab, LabVm
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.host import LabHost
from ftlab.hostagent import API_PORT
from ftlab.monitor import LibvirtMonitor
from ftlab.colopair import QEMU_USER
from ftlab.pki import issue, make_ca, qemu_creds_dir
from ftlab.vdsm import recover_status
from vdsm_ft import domxml
from vdsm_ft.api import PeerSpec, Role, TlsFiles, VmState, client_context
from vdsm_ft.hookapi import HookClient
from vdsm_ft.layout import Disk, VmLayout

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def lab(kvm):
    with AgentLab("ag") as lab:
        yield lab


def monitor(lab: AgentLab, host_name: str, vm: LabVm, secondary: bool) -> LibvirtMonitor:
    name = domxml.secondary_name(vm.name) if secondary else vm.name
    return LibvirtMonitor(lab.agent(host_name).host.uri, name)


def probe_layout(lab: AgentLab, host_name: str, vm: LabVm) -> tuple[VmLayout, Disk]:
    run_dir = os.path.join(lab.agent(host_name).run_dir, "vms", vm.vm_id)
    disk = Disk(index=0, image="", size=64 * MiB)
    return VmLayout(vm.vm_id, vm.name, run_dir, (disk,)), disk


def write(lab: AgentLab, host_name: str, vm: LabVm, offset: int, pattern: int) -> None:
    layout, disk = probe_layout(lab, host_name, vm)
    write_pattern(monitor(lab, host_name, vm, False), layout, disk, offset, BLOCK, pattern)


def holds(lab: AgentLab, host_name: str, vm: LabVm, mon: LibvirtMonitor, offset: int,
          pattern: int) -> bool:
    layout, disk = probe_layout(lab, host_name, vm)
    return pattern_matches(mon, layout, disk, offset, BLOCK, pattern)


def test_primary_qemu_killed_secondary_takes_over_by_itself(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x5A)
    lab.wait_checkpoints("ag-a", vm.vm_id)

    pid = lab.qemu_pid("ag-a", vm.name)
    os.kill(pid, 9)

    after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert after.last_failover is not None
    survivor = monitor(lab, "ag-b", vm, False)
    assert survivor.execute("query-colo-status")["mode"] == "none"
    assert survivor.execute("query-status")["status"] == "running"
    assert holds(lab, "ag-b", vm, survivor, 0, 0x5A)
    assert not holds(lab, "ag-b", vm, survivor, 1 * MiB, 0x5A)
    holder = lab.net.call(lab.arbiter().live_holder, vm.vm_id,
                          after.generation)
    assert holder == "ag-b"


def test_test_failover_request_hands_the_vm_to_the_secondary(lab):
    """vSphere's test failover through the API: the request only records it, and the
    primary's loop kills its QEMU; the secondary takes over as after a crash."""
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x5B)
    lab.wait_checkpoints("ag-a", vm.vm_id)

    asked = lab.call("ag-a", "test_failover", vm.vm_id)
    assert asked.state is VmState.PROTECTED

    after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=30)
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert lab.qemu_pid("ag-a", vm.name) is None
    lab.wait_status("ag-a", vm.vm_id, VmState.DOWN, timeout=10)
    survivor = monitor(lab, "ag-b", vm, False)
    assert holds(lab, "ag-b", vm, survivor, 0, 0x5B)


class DomainStates:
    """Samples, every few ms from its own thread, the libvirt state of the domain with a
    given UUID on one lab host: what VDSM's lookup would read whenever it ran."""

    def __init__(self, host: LabHost, vm_id: str):
        self.host, self.vm_id = host, vm_id
        self.seen: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "DomainStates":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = self.host.connect()
        try:
            while not self._stop.wait(0.002):
                try:
                    state = tuple(conn.lookupByUUIDString(self.vm_id).state(0))
                except libvirt.libvirtError:
                    continue                    # not there (yet, or any more)
                if not self.seen or self.seen[-1] != state:
                    self.seen.append(state)
        finally:
            conn.close()


def test_survivor_becomes_the_vm_itself_and_fails_over_again_from_it(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x3A)
    lab.wait_checkpoints("ag-a", vm.vm_id)
    sec_name = domxml.secondary_name(vm.name)

    with DomainStates(lab.host("ag-b"), vm.vm_id) as states:
        os.kill(lab.qemu_pid("ag-a", vm.name), 9)
        deadline = time.monotonic() + 30
        while (lf := lab.status("ag-b", vm.vm_id).last_failover) is None or \
                lf.domain != vm.name:
            assert time.monotonic() < deadline, lf
            time.sleep(0.05)
        after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=30)
    # Whenever VDSM's lookup had adopted the new domain during the move or the copy-back
    # after it, Vm._recover_status would have made it Up, never Paused (which the engine
    # destroys from another host): apart from libvirt's own start-up, before the start
    # event that tells VDSM of it, the domain with the VM's UUID is never paused
    # (vdsm_ft/identity.py; the copy-back's cut-over runs the guest, vdsm_ft/copyback.py).
    started = [s for s in states.seen if s != (libvirt.VIR_DOMAIN_PAUSED,
                                               libvirt.VIR_DOMAIN_PAUSED_STARTING_UP)]
    assert started and {recover_status(st, why, False) for st, why in started} == {"up"}, \
        states.seen
    lf = after.last_failover
    assert after.role is Role.PRIMARY and lf.domain == vm.name, after.reason
    assert lf.identity_pause_ms is not None and lf.identity_pause_ms < 1000, lf
    assert lab.qemu_pid("ag-b", sec_name) is None, "the secondary's domain is still there"
    conn = lab.host("ag-b").connect()
    try:
        dom = conn.lookupByName(vm.name)
        assert dom.UUIDString() == vm.vm_id
        assert domxml.OVIRT_VM_NS in dom.XMLDesc(0)      # VDSM adopts it as the VM
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert sec_name not in {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()
    survivor = monitor(lab, "ag-b", vm, False)
    assert survivor.execute("query-status")["status"] == "running"
    assert survivor.execute("query-colo-status")["mode"] == "none"
    caps = {c["capability"]: c["state"]
            for c in survivor.execute("query-migrate-capabilities")}
    assert not caps["x-colo"]
    objects = {o["name"] for o in survivor.execute("qom-list", {"path": "/objects"})}
    assert not {n for n in objects if n.startswith(("ft-rew", "ft-f"))}, objects
    assert holds(lab, "ag-b", vm, survivor, 0, 0x3A)
    assert not os.path.exists(os.path.join(lab.agent("ag-b").overlay_dir, vm.vm_id))

    # Protected again from the renamed domain, and a second failover works the same way.
    write(lab, "ag-b", vm, 1 * MiB, 0x3B)
    lab.protect(vm, "ag-b", "ag-c")
    lab.wait_checkpoints("ag-b", vm.vm_id)
    os.kill(lab.qemu_pid("ag-b", vm.name), 9)
    again = lab.wait_status("ag-c", vm.vm_id, VmState.NEED_SECONDARY, timeout=30)
    assert again.role is Role.PRIMARY and again.last_failover.domain == vm.name, again
    assert lab.qemu_pid("ag-c", sec_name) is None
    second = monitor(lab, "ag-c", vm, False)
    assert second.execute("query-status")["status"] == "running"
    assert holds(lab, "ag-c", vm, second, 0, 0x3A)
    assert holds(lab, "ag-c", vm, second, 1 * MiB, 0x3B)
    lab.remove_vm(vm)


def partition(lab: AgentLab, a: str, b: str, cut: bool) -> None:
    """Cut (or heal) the replication link between two hosts, both hosts alive."""
    ha, hb = lab.agent(a).host, lab.agent(b).host
    verb = "add" if cut else "del"
    ha.run(["ip", "route", verb, "blackhole", f"{hb.address}/32"])
    hb.run(["ip", "route", verb, "blackhole", f"{ha.address}/32"])


def test_whole_primary_host_lost(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x61)
    lab.wait_checkpoints("ag-a", vm.vm_id)

    lab.agent("ag-a").host.crash()
    try:
        after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
        assert after.role is Role.PRIMARY and after.last_failover.to_host == "ag-b"
        survivor = monitor(lab, "ag-b", vm, False)
        assert survivor.execute("query-colo-status")["mode"] == "none"
        assert holds(lab, "ag-b", vm, survivor, 0, 0x61)
        assert not holds(lab, "ag-b", vm, survivor, 2 * MiB, 0x61)
    finally:
        lab.revive("ag-a")
    # The revived host remembers a dead primary; it must say so, and take the VM back
    # as a secondary when asked.
    assert lab.status("ag-a", vm.vm_id).state is not VmState.PROTECTED
    lab.protect(vm, "ag-b", "ag-a")


def test_secondary_lost_primary_carries_on_and_writes_land(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    primary = monitor(lab, "ag-a", vm, False)
    write(lab, "ag-a", vm, 0, 0x71)
    lab.wait_checkpoints("ag-a", vm.vm_id)

    os.kill(lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)), 9)

    after = lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert primary.execute("query-colo-status")["mode"] == "none"
    write(lab, "ag-a", vm, 3 * MiB, 0x72)
    assert holds(lab, "ag-a", vm, primary, 0, 0x71)
    assert holds(lab, "ag-a", vm, primary, 3 * MiB, 0x72)
    assert lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)) is None


def test_the_labs_etcd_wants_a_certificate_and_a_user(lab):
    """Issue 16: the lab's arbiter is authenticated by default; the agents log in as
    their own etcd users and are held to their roles."""
    from vdsm_ft import etcdroles
    from vdsm_ft.arbiter import Arbiter, ArbiterAuthError, ArbiterTlsError, HostRecord
    assert all(e.startswith("https://") for e in lab.etcd.endpoints)
    login = lab.etcd_auth.agent("ag-a")
    anonymous = Arbiter(lab.etcd.endpoints, ca_cert=login.tls.ca)
    with pytest.raises(ArbiterTlsError, match="requires a client certificate"):
        lab.net.call(anonymous.get_pair, "vm-x")
    no_user = Arbiter(lab.etcd.endpoints, ca_cert=login.tls.ca, cert=login.tls.cert,
                      key=login.tls.key)
    with pytest.raises(ArbiterAuthError, match="requires authentication"):
        lab.net.call(no_user.get_pair, "vm-x")
    host_a = lab.arbiter(etcdroles.agent_user("ag-a"))
    with pytest.raises(ArbiterAuthError, match="no permission"):
        lab.net.call(host_a.put_host, HostRecord("ag-b", "0", None))
    for agent in lab.agents:
        assert os.stat(agent.config_path).st_mode & 0o077 == 0
        text = Path(agent.config_path).read_text()
        assert "allow_plain_http" not in text
        assert f"username = {etcdroles.agent_user(agent.host_id)}" in text


def test_a_planted_claim_never_fences_the_healthy_primary(lab):
    """Issue 16: someone with etcd write access claims the pair's generation for a host
    outside it, then the secondary crashes as an ordinary fault. The primary raises an
    alert and carries on with its data instead of fencing itself. The writer is the
    third host's etcd user: claims are keyed by VM, so etcd lets every agent write them
    (vdsm_ft.etcdroles)."""
    from vdsm_ft import etcd, etcdroles
    from vdsm_ft.arbiter import claim_key
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    primary = monitor(lab, "ag-a", vm, False)
    write(lab, "ag-a", vm, 0, 0x73)
    lab.wait_checkpoints("ag-a", vm.vm_id)
    arbiter = lab.arbiter(etcdroles.agent_user("ag-c"))
    generation = lab.net.call(arbiter.get_pair, vm.vm_id).generation
    planted = etcd.put(claim_key(vm.vm_id, generation), b'{"host": "evil", "claimed_at": 1}')
    lab.net.call(arbiter.transport.txn, "planted claim", [], [planted], [], 2.0)

    os.kill(lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)), 9)

    after = lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    assert after.role is Role.PRIMARY and "ALERT: the arbiter's live claim is corrupt" in \
        after.reason, after.reason
    assert primary.execute("query-status")["status"] == "running"
    write(lab, "ag-a", vm, 3 * MiB, 0x74)
    assert holds(lab, "ag-a", vm, primary, 0, 0x73)
    assert holds(lab, "ag-a", vm, primary, 3 * MiB, 0x74)


@pytest.mark.parametrize("run", range(10))
def test_partition_leaves_exactly_one_live_copy(lab, run):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x80 + run)
    lab.wait_checkpoints("ag-a", vm.vm_id)
    sec_name = domxml.secondary_name(vm.name)

    partition(lab, "ag-a", "ag-b", cut=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            # A winning secondary moves into a domain named like the VM.
            alive = {"ag-a": lab.qemu_pid("ag-a", vm.name),
                     "ag-b": lab.qemu_pid("ag-b", sec_name) or
                     lab.qemu_pid("ag-b", vm.name)}
            if sum(p is not None for p in alive.values()) == 1:
                break
            time.sleep(0.1)
        assert sum(p is not None for p in alive.values()) == 1, alive
    finally:
        partition(lab, "ag-a", "ag-b", cut=False)
    winner = next(h for h, p in alive.items() if p is not None)
    won = lab.wait_status(winner, vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    assert won.role is Role.PRIMARY
    survivor = monitor(lab, winner, vm, False)
    assert survivor.execute("query-colo-status")["mode"] == "none"
    assert holds(lab, winner, vm, survivor, 0, 0x80 + run)
    holder = lab.net.call(lab.arbiter().live_holder, vm.vm_id,
                          won.generation)
    assert holder == winner


def test_stale_secondary_is_never_promoted(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x91)
    lab.wait_checkpoints("ag-a", vm.vm_id)
    sec_name = domxml.secondary_name(vm.name)
    os.kill(lab.qemu_pid("ag-b", sec_name), 9)
    lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    write(lab, "ag-a", vm, 1 * MiB, 0x92)            # only the primary has this now

    os.kill(lab.qemu_pid("ag-a", vm.name), 9)

    down = lab.wait_status("ag-a", vm.vm_id, VmState.DOWN, timeout=10)
    assert "ag-a" in down.reason and "last copy" in down.reason
    time.sleep(1.0)
    assert lab.qemu_pid("ag-b", sec_name) is None, "the stale secondary came up"
    record = lab.net.call(lab.arbiter().get_pair, vm.vm_id)
    assert record.state == "Down" and "ag-a" in record.reason
    image = lab.agent("ag-a").host.path("images", f"{vm.vm_id}.qcow2")
    for offset, pattern in ((0, 0x91), (1 * MiB, 0x92)):
        proc = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c",
                               f"read -P {pattern:#x} {offset} {BLOCK}", image],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout


def test_losing_one_etcd_member_changes_nothing(lab):
    lab.etcd.stop_member(2)
    try:
        vm = lab.start_vm("ag-a")
        lab.protect(vm, "ag-a", "ag-b")
        write(lab, "ag-a", vm, 0, 0xA1)
        lab.wait_checkpoints("ag-a", vm.vm_id)
        os.kill(lab.qemu_pid("ag-a", vm.name), 9)
        after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
        assert holds(lab, "ag-b", vm, monitor(lab, "ag-b", vm, False), 0, 0xA1)
        assert after.failovers == 1
    finally:
        lab.etcd.start_member(2)


def test_etcd_unreachable_while_healthy_means_no_failover(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    for i in range(3):
        lab.etcd.stop_member(i)
    try:
        time.sleep(3.0)
        lab.wait_checkpoints("ag-a", vm.vm_id)
        for host in ("ag-a", "ag-b"):
            now = lab.status(host, vm.vm_id)
            assert now.state is VmState.PROTECTED and now.failovers == 0
    finally:
        lab.etcd.start_members([0, 1, 2])


def test_secondary_outwaits_an_etcd_outage_then_takes_over_with_the_data(lab):
    """The primary dies while etcd cannot answer (as when the lost host held the etcd
    leader and the election drags on): the secondary must neither go live unconfirmed
    nor throw its copy away; it asks again and takes over once etcd answers."""
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    write(lab, "ag-a", vm, 0, 0x6E)
    lab.wait_checkpoints("ag-a", vm.vm_id)
    for i in range(3):
        lab.etcd.stop_member(i)
    try:
        os.kill(lab.qemu_pid("ag-a", vm.name), 9)
        waiting = lab.wait_status("ag-b", vm.vm_id, VmState.FAILING_OVER, timeout=10)
        time.sleep(4.0)                       # past the 1500 ms bound, twice over
        now = lab.status("ag-b", vm.vm_id)
        assert now.state is VmState.FAILING_OVER, now
        assert "waiting for the arbiter" in now.reason, now.reason
        survivor = monitor(lab, "ag-b", vm, True)
        assert survivor.execute("query-colo-status")["mode"] == "secondary"
        assert waiting.role is Role.SECONDARY
    finally:
        lab.etcd.start_members([0, 1, 2])
    after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=30)
    assert after.role is Role.PRIMARY and after.failovers == 1
    survivor = monitor(lab, "ag-b", vm, False)
    assert survivor.execute("query-colo-status")["mode"] == "none"
    assert survivor.execute("query-status")["status"] == "running"
    assert holds(lab, "ag-b", vm, survivor, 0, 0x6E)
    holder = lab.net.call(lab.arbiter().live_holder, vm.vm_id,
                          after.generation)
    assert holder == "ag-b"
    lab.remove_vm(vm)


def test_agent_restart_while_protected_keeps_protection(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    for name in ("ag-a", "ag-b"):
        lab.agent(name).stop()
        time.sleep(1.0)
        lab.agent(name).start()
        lab.wait_checkpoints("ag-a", vm.vm_id)
    for host in ("ag-a", "ag-b"):
        now = lab.status(host, vm.vm_id)
        assert now.state is VmState.PROTECTED and now.failovers == 0
    assert monitor(lab, "ag-a", vm, False).execute("query-colo-status")["mode"] == "primary"
    assert monitor(lab, "ag-b", vm, True).execute("query-colo-status")["mode"] == "secondary"


def test_overlays_past_the_cap_drop_the_secondary_and_refuse_new_ones(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    b = lab.agent("ag-b")
    overlays = os.path.join(b.overlay_dir, vm.vm_id)
    assert os.path.isdir(overlays)
    # Empty overlays take ~200 KiB each: restarted with a 64 KiB cap, b is over it.
    b.stop()
    b.overlay_size_cap = "64K"
    try:
        b.start()
        # The primary learns it at its next checkpoint, when COLO breaks.
        lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY, 30)
        assert lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)) is None
        with open(b.log_path) as f:
            assert "over [storage] overlay_size_cap (0.1 MiB)" in f.read()
        deadline = time.monotonic() + 10
        while os.path.exists(overlays):
            assert time.monotonic() < deadline, os.listdir(overlays)
            time.sleep(0.1)
        assert monitor(lab, "ag-a", vm, False).execute("query-status")["status"] == "running"

        lab.call("ag-a", "protect", vm.vm_id, lab.peer("ag-b"))
        now = lab.wait_reason("ag-a", vm.vm_id, "overlay_size_cap")
        assert now.state is VmState.NEED_SECONDARY
        assert not os.path.exists(overlays)
    finally:
        b.stop()
        b.overlay_size_cap = ""
        b.start()
    lab.protect(vm, "ag-a", "ag-c")


def test_lab_agents_sign_their_heartbeats_and_accept_each_other(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-c")
    lab.wait_checkpoints("ag-a", vm.vm_id)
    for name in ("ag-a", "ag-c"):
        with open(lab.agent(name).log_path) as f:
            log = f.read()
        assert "heartbeats are unsigned" not in log
        assert "ignoring heartbeats" not in log
    lab.remove_vm(vm)


def test_stop_hooks_for_a_vm_the_agent_forgot_are_no_error(lab):
    # VDSM runs before/after_vm_destroy for a VM whose QEMU died and was forgotten.
    vm_id = str(uuid.uuid4())
    client = HookClient(lab.agent("ag-c").hook_socket, timeout=5)
    client.stopping(vm_id)
    client.destroyed(vm_id)
    with open(lab.agent("ag-c").log_path) as f:
        assert vm_id not in f.read()


def test_protect_onto_an_unreachable_peer_is_a_clear_refusal(lab):
    vm = lab.start_vm("ag-a")
    lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY)
    ghost = PeerSpec(host_id="ag-ghost", agent_address="10.77.0.99", agent_port=API_PORT,
                     replication_address="10.77.0.99")
    lab.call("ag-a", "protect", vm.vm_id, ghost)
    now = lab.wait_reason("ag-a", vm.vm_id, "ag-ghost")
    assert now.state is VmState.NEED_SECONDARY
    assert monitor(lab, "ag-a", vm, False).execute("query-colo-status")["mode"] == "none"


def test_full_secondary_disk_directory_is_refused_without_leftovers(lab):
    vm = lab.start_vm("ag-a")
    host_b = lab.agent("ag-b").host
    replicas = host_b.path("ft", "replicas")
    os.makedirs(replicas, exist_ok=True)
    host_b.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", replicas])
    try:
        lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY)
        lab.call("ag-a", "protect", vm.vm_id, lab.peer("ag-b"))
        now = lab.wait_reason("ag-a", vm.vm_id, "free")
        assert now.state is VmState.NEED_SECONDARY and "replica" in now.reason
        assert lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)) is None
        listing = host_b.run(["ls", "-A", replicas]).stdout.split()
        assert listing == []
        assert not os.path.exists(os.path.join(lab.agent("ag-b").overlay_dir, vm.vm_id))
        with pytest.raises(Exception):
            lab.status("ag-b", vm.vm_id)
    finally:
        host_b.run(["umount", replicas])


def syncing(lab: AgentLab, primary: str, secondary: str) -> LabVm:
    """A VM whose protection is in its resync: 512 MiB of data, so that it lasts."""
    vm = lab.start_vm(primary, data_mib=512)
    lab.wait_status(primary, vm.vm_id, VmState.NEED_SECONDARY)
    lab.call(primary, "protect", vm.vm_id, lab.peer(secondary))
    deadline = time.monotonic() + 10
    while lab.status(primary, vm.vm_id).state is not VmState.SYNCING:
        assert time.monotonic() < deadline, "never saw Syncing"
        time.sleep(0.02)
    return vm


def test_agent_restart_during_syncing_starts_over_and_never_claims_protected(lab):
    vm = syncing(lab, "ag-a", "ag-b")
    lab.agent("ag-a").crash()
    primary = monitor(lab, "ag-a", vm, False)
    assert primary.execute("query-colo-status")["mode"] == "none"

    lab.agent("ag-a").start()
    seen = []
    deadline = time.monotonic() + 30
    while not seen or seen[-1] is not VmState.NEED_SECONDARY:
        assert time.monotonic() < deadline, seen
        seen.append(lab.status("ag-a", vm.vm_id).state)
        time.sleep(0.05)
    assert VmState.PROTECTED not in seen, seen
    graph = primary.execute("x-debug-query-block-graph")
    assert "ft-nbd0" not in {n["name"] for n in graph["nodes"]}, "NBD child left behind"
    secondary_goes(lab, "ag-b", vm)

    lab.protect(vm, "ag-a", "ag-b")           # and it protects cleanly afterwards
    assert primary.execute("query-colo-status")["mode"] == "primary"


def test_turning_ft_off_during_syncing_cancels_the_resync_at_once(lab):
    """The admin turns FT off while the resync still copies the disk: protect stops
    within a poll (colo.Cancelled) instead of finishing first, never reaches Protected,
    and leaves the primary alone with no NBD child and no secondary."""
    vm = syncing(lab, "ag-a", "ag-b")
    asked = time.monotonic()
    lab.call("ag-a", "unprotect", vm.vm_id)
    seen = [lab.status("ag-a", vm.vm_id)]
    while seen[-1].state is not VmState.DISABLED:
        assert time.monotonic() < asked + 10, [s.state for s in seen]
        time.sleep(0.02)
        seen.append(lab.status("ag-a", vm.vm_id))
    took = time.monotonic() - asked
    states = [s.state for s in seen]
    assert VmState.PROTECTED not in states, states
    assert "cancelled" in seen[-1].reason and "turned off" in seen[-1].reason, seen[-1]
    assert took < 3.0, f"the resync ran on for {took:.1f} s after FT was turned off"
    primary = monitor(lab, "ag-a", vm, False)
    assert primary.execute("query-colo-status")["mode"] == "none"
    graph = primary.execute("x-debug-query-block-graph")
    assert "ft-nbd0" not in {n["name"] for n in graph["nodes"]}, "NBD child left behind"
    secondary_goes(lab, "ag-b", vm)


def secondary_goes(lab: AgentLab, host_name: str, vm: LabVm, timeout: float = 15.0) -> None:
    """The secondary's QEMU on `host_name` ends: a primary that drops it asks its agent,
    whose loop tears it down (row "dropped by its primary"), so not at once."""
    deadline = time.monotonic() + timeout
    while lab.qemu_pid(host_name, domxml.secondary_name(vm.name)) is not None:
        assert time.monotonic() < deadline, "the dropped secondary was left running"
        time.sleep(0.1)


def test_vm_started_while_agent_down_is_protected_when_it_returns(lab):
    lab.agent("ag-c").stop()
    try:
        vm = lab.start_vm("ag-c")              # default policy: starts unprotected
    finally:
        lab.agent("ag-c").start()
    lab.protect(vm, "ag-c", "ag-a")
    assert monitor(lab, "ag-c", vm, False).execute("query-colo-status")["mode"] == "primary"


def test_real_agent_rejects_malformed_requests_and_foreign_certificates(lab, tmp_path):
    host = lab.agent("ag-a").host
    good = lab.agent("ag-a").client_tls

    def post(tls, body: bytes) -> tuple[int, bytes]:
        ctx = client_context(tls)
        conn = http.client.HTTPSConnection(host.address, API_PORT, context=ctx, timeout=5)
        try:
            conn.request("POST", f"/v1/vms/{uuid.uuid4()}/protect", body=body,
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    status_code, body = lab.net.call(post, good, b"{not json")
    assert status_code == 400 and b"JSON" in body
    status_code, body = lab.net.call(post, good, b'{"peer": {"host_id": 7}}')
    assert status_code == 400 and b"host_id" in body

    other_ca = make_ca(tmp_path / "other")
    stranger = issue(tmp_path / "other", other_ca, "stranger")
    stranger = TlsFiles(cert=stranger.cert, key=stranger.key, ca=good.ca)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        lab.net.call(post, stranger, b"{}")
    assert lab.call("ag-a", "host_status").host_id == "ag-a"   # still serving


def test_status_reports_replication_traffic_while_protected(lab):
    vm = lab.start_vm("ag-a", data_mib=16)
    lab.protect(vm, "ag-a", "ag-b")
    lab.wait_checkpoints("ag-a", vm.vm_id)
    now = lab.status("ag-a", vm.vm_id)
    # The resync alone carried the 16 MiB written before protection.
    assert now.replication_bytes >= 16 * MiB, now
    assert now.checkpoints_per_minute > 0 and now.last_checkpoint_pause_ms is not None


def test_admin_stop_tears_the_pair_down_and_is_never_a_failover(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    generation = lab.status("ag-a", vm.vm_id).generation

    lab.vdsm["ag-a"].destroy_vm(vm.vm_id)   # before_vm_destroy, destroy, after_vm_destroy

    deadline = time.monotonic() + 15
    while lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)) is not None:
        assert time.monotonic() < deadline, "the secondary outlived an admin stop\n" + \
            lab.agent_logs()
        time.sleep(0.1)
    arbiter = lab.arbiter()
    assert lab.net.call(arbiter.live_holder, vm.vm_id, generation) == "ag-a", \
        "the stopping primary holds its generation, so the secondary cannot take over"
    # The primary records the pair Down after it has torn the secondary down
    # (controller._do_teardown), so the record may trail the secondary's exit.
    while True:
        record = lab.net.call(arbiter.get_pair, vm.vm_id)
        known = [host for host in ("ag-a", "ag-b")
                 if vm.vm_id in {v.vm_id for v in lab.call(host, "host_status").vms}]
        if record.state == "Down" and not known:
            break
        assert time.monotonic() < deadline, \
            f"after an admin stop the pair is {record.state} ({record.reason}) and " \
            f"{known} still know the VM\n" + lab.agent_logs()
        time.sleep(0.1)
    assert "stopped" in record.reason


def test_admin_operations_suspend_resume_migrate_secondary_and_test_failover(lab):
    vm = lab.start_vm("ag-a")
    lab.protect(vm, "ag-a", "ag-b")
    sec_name = domxml.secondary_name(vm.name)

    lab.call("ag-a", "suspend", vm.vm_id)
    off = lab.wait_status("ag-a", vm.vm_id, VmState.DISABLED)
    assert off.suspended and off.failovers == 0
    assert lab.qemu_pid("ag-b", sec_name) is None
    assert monitor(lab, "ag-a", vm, False).execute("query-status")["status"] == "running"

    lab.call("ag-a", "resume", vm.vm_id)
    lab.protect(vm, "ag-a", "ag-b")

    lab.call("ag-a", "migrate_secondary", vm.vm_id, lab.peer("ag-c"))
    lab.wait_status("ag-c", vm.vm_id, VmState.PROTECTED)
    moved = lab.wait_status("ag-a", vm.vm_id, VmState.PROTECTED)
    assert moved.secondary_host == "ag-c" and moved.failovers == 0
    assert lab.qemu_pid("ag-b", sec_name) is None

    write(lab, "ag-a", vm, 0, 0xE1)
    lab.wait_checkpoints("ag-a", vm.vm_id)
    lab.call("ag-a", "test_failover", vm.vm_id)
    after = lab.wait_status("ag-c", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert holds(lab, "ag-c", vm, monitor(lab, "ag-c", vm, False), 0, 0xE1)


def test_colo_over_tls_through_the_agents_and_a_mismatch_is_refused(lab):
    pkidir = Path(lab.base) / "colo-pki"
    ca = make_ca(pkidir / "ca")
    a, b = lab.agent("ag-a"), lab.agent("ag-b")
    creds = {agent: qemu_creds_dir(pkidir / agent.host.name,
                                   issue(pkidir / "ca", ca, agent.host.name,
                                         addresses=[agent.host.address]), QEMU_USER)
             for agent in (a, b)}
    vm = lab.start_vm("ag-a")
    lab.wait_status("ag-a", vm.vm_id, VmState.NEED_SECONDARY)
    try:
        # Only the secondary has TLS: it refuses before it starts anything.
        b.stop()
        b.colo_tls_dir = creds[b]
        b.start()
        lab.call("ag-a", "protect", vm.vm_id, lab.peer("ag-b"))
        now = lab.wait_reason("ag-a", vm.vm_id, "COLO transport mismatch")
        assert now.state is VmState.NEED_SECONDARY
        assert lab.qemu_pid("ag-b", domxml.secondary_name(vm.name)) is None

        a.stop()
        a.colo_tls_dir = creds[a]
        a.start()
        lab.protect(vm, "ag-a", "ag-b")
        primary = monitor(lab, "ag-a", vm, False)
        assert primary.execute("query-migrate-parameters")["tls-creds"] == "ft-tls-client"
        write(lab, "ag-a", vm, 0, 0x7C)
        lab.wait_checkpoints("ag-a", vm.vm_id)
        os.kill(lab.qemu_pid("ag-a", vm.name), 9)
        after = lab.wait_status("ag-b", vm.vm_id, VmState.NEED_SECONDARY, timeout=10)
        assert after.role is Role.PRIMARY
        survivor = monitor(lab, "ag-b", vm, False)
        assert holds(lab, "ag-b", vm, survivor, 0, 0x7C)
        assert survivor.execute("query-migrate-parameters")["tls-creds"] == ""
    finally:
        for agent in (a, b):
            agent.stop()
            agent.colo_tls_dir = ""
            agent.start()
