"""The fault-injection suite: every fault `vdsm-ft lab fault` can inject, on one lab
brought up with `vdsm-ft lab up` for the whole module, with block-level data checks.

For each fault a VM with ft=true is created and started through the real ovirtsdk4, the
poller protects it, and sequence-numbered 64 KiB blocks are written through the
primary's quorum node (the path guest writes take). A block counts as acknowledged
("covered") once the agent's checkpoint counter rose by two after it (ftlab.demo). After
the fault the suite checks, on the real QEMUs:
- every covered block is intact on the copy that runs on;
- at most one copy runs outside COLO (a COLO secondary's output goes nowhere), counted
  over every host's QEMUs, and how many of the pair's QEMUs run at all;
- the VM ends in a clear state, printed, and is re-protected where the fault allows.
Each test removes its VM through the SDK at its end.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass

import ovirtsdk4.types as types
import pytest

from ftlab import vmlocate
from ftlab.demo import (BLOCK, FailoverWatch, Lab, Timeline, pattern, probe_layout,
                        remove_ft_vm, wait_for, wait_protected, wait_up, write_round)
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.labstate import LabPaths, read_state
from ftlab.livecopies import Copy, copies, is_up, live_outside_colo
from ftlab.monitor import LibvirtMonitor
from ftlab.vdsmdriver import DATA_PATTERN, DATA_PROPERTY, IDLE_TEMPLATE
from vdsm_ft.api import Role, VmState, VmStatus

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

MiB = 1 << 20
START_TIMEOUT = 120.0
PROTECT_TIMEOUT = 120.0
FAILOVER_TIMEOUT = 30.0
# The poller backs off while the engine is away (1 s interval doubling per failed cycle).
REPROTECT_AFTER_ENGINE_TIMEOUT = 150.0
SYNC_DATA_MIB = 384              # real data for the resync mirror, so Syncing lasts
WRITER_AREA_MIB = 16             # the writer's blocks (sequence numbers < 256) live below


# ---------------------------------------------------------------- the lab as a test uses it

@dataclass
class FaultLab:
    cli: object                  # conftest.LabCli
    lab: Lab
    tl: Timeline

    @property
    def hosts(self) -> list[str]:
        return [h.name for h in self.lab.state.hosts]

    def fault(self, *args: str) -> str:
        """`vdsm-ft lab fault ...` as a user types it."""
        proc = self.cli.run("fault", *args, timeout=180)
        assert proc.returncode == 0, (f"lab fault {' '.join(args)} exited {proc.returncode}:"
                                      f"\n{proc.stdout}\n{proc.stderr}")
        self.tl.say(f"lab fault {' '.join(args)}: {proc.stdout.strip()}")
        return proc.stdout

    def status(self) -> dict:
        proc = self.cli.run("status", "--json", timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def show_status(self) -> str:
        proc = self.cli.run("status", timeout=60)
        self.tl.say("lab status:\n" + proc.stdout.rstrip())
        return proc.stdout

    def host_running(self, host: str) -> bool:
        return any(h["name"] == host and h["running"] for h in self.status()["hosts"])

    def poller_log(self) -> str:
        with open(os.path.join(LabPaths(self.lab.state.lab_dir).logs, "poller.log"),
                  errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def fl(lab_up):
    state = read_state(lab_up.lab_dir)
    assert state.state == "ready" and len(state.hosts) == 3, state
    lab = Lab(state)
    yield FaultLab(lab_up, lab, Timeline())
    lab.close()


@pytest.fixture
def revive_after(fl):
    """Hosts a test crashed come back at its end, so the next test has three hosts."""
    crashed: list[str] = []
    yield crashed
    for host in crashed:
        if not fl.host_running(host) or host in _dead_in_engine(fl):
            fl.fault("host-crash", host, "--revive")


def _dead_in_engine(fl: FaultLab) -> set[str]:
    return {h["name"] for h in fl.status()["hosts"] if h["agent"] == "host crashed"}


@dataclass
class FtVm:
    id: str
    name: str
    primary: str                  # the host the engine started it on


def start_ft_vm(fl: FaultLab, data_mib: int = 0) -> FtVm:
    vms = fl.lab.conn.system_service().vms_service()
    name = f"fault-{uuid.uuid4().hex[:6]}"
    custom = [types.CustomProperty(name="ft", value="true")]
    if data_mib:
        custom.append(types.CustomProperty(name=DATA_PROPERTY, value=str(data_mib)))
    vm = vms.add(types.Vm(name=name, cluster=types.Cluster(name="Default"),
                          template=types.Template(name=IDLE_TEMPLATE), memory=128 * MiB,
                          custom_properties=custom))
    svc = vms.vm_service(vm.id)
    svc.start()

    got = wait_up(svc, name, START_TIMEOUT)
    fl.tl.say(f"{name} ({vm.id}) is Up on {got.host.id}")
    return FtVm(vm.id, name, got.host.id)


def remove_vm(fl: FaultLab, vm: FtVm) -> None:
    remove_ft_vm(fl.lab, fl.tl, vm.name, vm.id)


@pytest.fixture
def vms(fl):
    made: list[FtVm] = []
    yield made
    for vm in made:
        remove_vm(fl, vm)


def _agent_states(fl: FaultLab, vm: FtVm) -> set[VmState]:
    return {st.state for h in fl.hosts if (st := fl.lab.vm_status(h, vm.id)) is not None}


# ---------------------------------------------------------------- observations

def assert_one_live_copy(fl: FaultLab, vm: FtVm, running: int | None = None) -> Copy:
    found = copies(fl.lab.state, vm.name)
    fl.tl.say(f"{vm.name} QEMUs: " + "; ".join(
        f"{c.host}/{c.domain} pid {c.pid} {c.status} colo={c.colo}" for c in found))
    live = live_outside_colo(found)
    assert len(live) == 1, f"{len(live)} copies run outside COLO: {found}"
    if running is not None:
        # A secondary the poller is already preparing waits in inmigrate: not running.
        up = [c for c in found if is_up(c)]
        assert len(up) == running, f"expected {running} running QEMUs of the pair: {found}"
    return live[0]


def survivor_holds(fl: FaultLab, host: str, vm: FtVm, covered: list[int]) -> None:
    """The copy on `host` is up and not a secondary (the poller may already have made it
    a primary again), and every covered block is intact there."""
    dom = vmlocate.vm_domain(fl.lab.state.host(host).uri, vm.name)
    assert dom is not None, f"no running copy of {vm.name} on {host}"
    mon = LibvirtMonitor(fl.lab.state.host(host).uri, dom)
    here = Copy(host, dom, 0, mon.execute("query-status")["status"],
                mon.execute("query-colo-status")["mode"])
    assert is_up(here) and here.colo != "secondary", here
    layout, disk = probe_layout(fl.lab.state.host(host), vm.id, vm.name)
    lost = [seq for seq in covered
            if not pattern_matches(mon, layout, disk, seq * BLOCK, BLOCK, pattern(seq))]
    fl.tl.say(f"{len(covered)} covered blocks checked on {host}: "
              + (f"LOST {lost}" if lost else "all intact"))
    assert not lost, f"covered blocks lost on {host}: {lost}"


def data_holds(fl: FaultLab, host: str, vm: FtVm, data_mib: int,
               first_mib: int = WRITER_AREA_MIB) -> None:
    """The prefilled data (ftlab_data_mib) is intact on `host`, from `first_mib` (the
    writer's blocks overwrite the start) to the middle and the last MiB."""
    dom = vmlocate.vm_domain(fl.lab.state.host(host).uri, vm.name)
    mon = LibvirtMonitor(fl.lab.state.host(host).uri, dom)
    layout, disk = probe_layout(fl.lab.state.host(host), vm.id, vm.name)
    for mib in (first_mib, data_mib // 2, data_mib - 1):
        assert pattern_matches(mon, layout, disk, mib * MiB, MiB, DATA_PATTERN), \
            f"prefilled data lost at {mib} MiB on {host}"


def protect_and_cover(fl: FaultLab, vm: FtVm, first: int = 0) -> tuple[VmStatus, list[int]]:
    st = wait_protected(fl.lab, vm.primary, vm.id, PROTECT_TIMEOUT)
    fl.tl.say(f"{vm.name} Protected: {vm.primary} -> {st.secondary_host}, "
              f"generation {st.generation}")
    return st, write_round(fl.lab, fl.tl, vm.primary, vm.id, vm.name, first)


def fail_over(fl: FaultLab, vm: FtVm, survivor: str, inject) -> VmStatus:
    """Run `inject()` and wait until `survivor`'s agent runs the VM as primary."""
    watch = FailoverWatch(fl.lab, survivor, vm.id)
    watch.start()
    t0 = time.monotonic()
    inject()
    watch.join(FAILOVER_TIMEOUT)
    watch.stop.set()
    assert watch.status is not None, \
        f"no failover to {survivor} within {FAILOVER_TIMEOUT:.0f}s"
    fl.tl.say(f"failover: {survivor} runs {vm.name} as primary "
              f"({(watch.seen_at - t0) * 1000:.0f} ms after the fault was injected; "
              f"state {watch.status.state.value})")
    return watch.status


def wait_reprotected(fl: FaultLab, primary: str, vm: FtVm, not_on: set[str],
                     timeout: float = PROTECT_TIMEOUT) -> VmStatus:
    st = wait_protected(fl.lab, primary, vm.id, timeout)
    fl.tl.say(f"{vm.name} re-protected: {primary} -> {st.secondary_host}, "
              f"generation {st.generation}")
    assert st.secondary_host not in not_on | {primary}, st
    return st


def wait_state(fl: FaultLab, host: str, vm: FtVm, states: set[VmState],
               timeout: float = 60.0) -> VmStatus:
    def reached() -> VmStatus | None:
        st = fl.lab.vm_status(host, vm.id)
        return st if st is not None and st.state in states else None
    return wait_for(f"{vm.name} on {host} in {sorted(s.value for s in states)}", reached,
                    timeout, interval=0.05)


def checkpoints(fl: FaultLab, host: str, vm: FtVm) -> int:
    return fl.lab.checkpoints(host, vm.id)


def final_state(fl: FaultLab, vm: FtVm) -> dict[str, str]:
    """Where the VM ends, as every live agent reports it (printed)."""
    seen = {}
    for h in fl.hosts:
        st = fl.lab.vm_status(h, vm.id)
        if st is not None:
            seen[h] = f"{st.role.value} {st.state.value}" + (f" ({st.reason})"
                                                            if st.reason else "")
    fl.tl.say(f"{vm.name} ends: " + "; ".join(f"{h}: {s}" for h, s in seen.items()))
    return seen


def no_stale_records(fl: FaultLab, vm: FtVm, pair: set[str], timeout: float = 30) -> None:
    """Only the pair's two hosts still know the VM: a host that crashed mid-sync and came
    back must drop its half-made secondary (it counts against that host's FT capacity)."""
    def clean() -> bool:
        return {h for h in fl.hosts if fl.lab.vm_status(h, vm.id) is not None} <= pair
    try:
        wait_for(f"only {sorted(pair)} to know {vm.name}", clean, timeout, interval=0.5)
    except Exception:
        pytest.fail(f"{timeout:.0f} s after re-protection, hosts outside the pair still "
                    f"report {vm.name}: {final_state(fl, vm)}")


def third(fl: FaultLab, *used: str) -> str:
    return next(h for h in fl.hosts if h not in used)


# ---------------------------------------------------------------- single faults

def test_host_crash_fails_over_keeps_covered_blocks_and_reprotects(fl, vms, revive_after):
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host
    spare = third(fl, vm.primary, secondary)

    revive_after.append(vm.primary)
    after = fail_over(fl, vm, secondary, lambda: fl.fault("host-crash", vm.primary))
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert after.last_failover is not None and after.last_failover.from_host == vm.primary
    assert assert_one_live_copy(fl, vm, running=1).host == secondary
    survivor_holds(fl, secondary, vm, covered)

    again = wait_reprotected(fl, secondary, vm, not_on={vm.primary})
    assert again.secondary_host == spare
    assert_one_live_copy(fl, vm, running=2)
    survivor_holds(fl, secondary, vm, covered)
    final_state(fl, vm)


def test_qemu_crash_fails_over_keeps_covered_blocks_and_reprotects(fl, vms):
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host

    after = fail_over(fl, vm, secondary, lambda: fl.fault("qemu-crash", vm.name))
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert assert_one_live_copy(fl, vm, running=1).host == secondary
    survivor_holds(fl, secondary, vm, covered)

    wait_reprotected(fl, secondary, vm, not_on=set())
    assert_one_live_copy(fl, vm, running=2)
    final_state(fl, vm)


def test_agent_crash_changes_nothing_and_protection_goes_on(fl, vms):
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host

    fl.fault("agent-crash", vm.primary)
    try:
        # The secondary's agent counts the checkpoints it takes part in.
        before = checkpoints(fl, secondary, vm)
        mon = fl.lab.monitor(vm.primary, vm.name)
        layout, disk = probe_layout(fl.lab.state.host(vm.primary), vm.id, vm.name)
        during = list(range(100, 104))
        for seq in during:
            write_pattern(mon, layout, disk, seq * BLOCK, BLOCK, pattern(seq))
        wait_for("checkpoints while the primary's agent is down",
                 lambda: checkpoints(fl, secondary, vm) >= before + 3, 30)
        sec = fl.lab.vm_status(secondary, vm.id)
        assert sec.state is VmState.PROTECTED and sec.role is Role.SECONDARY \
            and sec.failovers == 0, sec
        assert mon.execute("query-colo-status")["mode"] == "primary"
        assert_one_live_copy(fl, vm, running=2)
    finally:
        fl.fault("agent-crash", vm.primary, "--restart")

    back = wait_state(fl, vm.primary, vm, {VmState.PROTECTED}, timeout=30)
    assert back.failovers == 0 and back.secondary_host == secondary, back
    start = checkpoints(fl, vm.primary, vm)
    wait_for("checkpoints after the agent restarted",
             lambda: checkpoints(fl, vm.primary, vm) >= start + 2, 30)
    covered += during
    # Protection really went on: a failover now finds every block, those written while
    # the agent was down included, on the secondary.
    after = fail_over(fl, vm, secondary, lambda: fl.fault("qemu-crash", vm.name))
    assert after.failovers == 1
    survivor_holds(fl, secondary, vm, covered)
    assert_one_live_copy(fl, vm, running=1)
    final_state(fl, vm)


def test_etcd_member_lost_alone_then_its_host_crash_still_fails_over(fl, vms, revive_after):
    """The primary's etcd member dies alone: protection goes on, and a second member is
    refused (quorum). Then that host crashes too: the survivor wins its claim on the
    members left and keeps every covered block."""
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host

    revive_after.append(vm.primary)         # its revival restarts the member too
    fl.fault("etcd-crash", vm.primary)
    try:
        refused = fl.cli.run("fault", "etcd-crash", secondary, timeout=60)
        assert refused.returncode != 0 and "quorum" in refused.stdout + refused.stderr, \
            refused
        start = checkpoints(fl, vm.primary, vm)
        wait_for("checkpoints with one etcd member down",
                 lambda: checkpoints(fl, vm.primary, vm) >= start + 2, 30)
        assert fl.lab.vm_status(vm.primary, vm.id).state is VmState.PROTECTED
    except BaseException:
        fl.fault("etcd-crash", vm.primary, "--restart")    # the next tests need it
        raise

    after = fail_over(fl, vm, secondary, lambda: fl.fault("host-crash", vm.primary))
    assert after.role is Role.PRIMARY and after.failovers == 1
    assert assert_one_live_copy(fl, vm, running=1).host == secondary
    survivor_holds(fl, secondary, vm, covered)
    final_state(fl, vm)


def test_partition_between_primary_and_secondary_leaves_one_live_copy(fl, vms):
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host

    fl.fault("partition", vm.primary, secondary)
    try:
        def settled() -> list[Copy] | None:
            # Only the two cut-off hosts count: the winner may already be re-protecting
            # onto the third host, which it still reaches.
            found = [c for c in copies(fl.lab.state, vm.name) if c.host in (vm.primary, secondary)]
            return found if len(found) == 1 else None
        only = wait_for("one QEMU of the pair left", settled, 20, interval=0.1)[0]
        fl.tl.say(f"partition: {only.host} kept its copy ({only.domain})")
        winner = only.host
        won = wait_state(fl, winner, vm, {VmState.NEED_SECONDARY, VmState.SYNCING,
                                          VmState.PROTECTED}, timeout=15)
        assert won.role is Role.PRIMARY, won
        assert_one_live_copy(fl, vm, running=1 if won.state is VmState.NEED_SECONDARY
                             else None)
        survivor_holds(fl, winner, vm, covered)
    finally:
        fl.fault("partition", vm.primary, secondary, "--heal")
    loser = secondary if winner == vm.primary else vm.primary
    again = wait_reprotected(fl, winner, vm, not_on=set())
    fl.tl.say(f"after healing: {winner} protects onto {again.secondary_host} "
              f"(the partitioned peer was {loser})")
    assert_one_live_copy(fl, vm, running=2)
    survivor_holds(fl, winner, vm, covered)
    final_state(fl, vm)


def test_slow_link_loss_and_rate_keep_protection_and_data(fl, vms):
    """This kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set), so the lab's
    slow-link cannot add a *delay* here; it says so (checked below). What can run is run:
    3% packet loss (iptables' statistic match) and a 200 mbit rate cap (tbf) on the
    primary's replication link. Protection must carry on (no failover, checkpoints keep
    coming) and a failover under that link must keep every covered block."""
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host

    delay = fl.cli.run("fault", "slow-link", vm.primary, "--delay", "5ms", timeout=60)
    if delay.returncode == 0:
        fl.tl.say(f"netem works here: {delay.stdout.strip()}")
        fl.fault("slow-link", vm.primary, "--clear")
    else:
        assert "sch_netem" in delay.stderr and "--loss" in delay.stderr, delay.stderr
        fl.tl.say(f"no delay here: {delay.stderr.strip()}")

    fl.fault("slow-link", vm.primary, "--loss", "3%", "--rate", "200mbit")
    try:
        covered += write_round(fl.lab, fl.tl, vm.primary, vm.id, vm.name, 200)
        start = checkpoints(fl, vm.primary, vm)
        time.sleep(6)
        now = checkpoints(fl, vm.primary, vm)
        fl.tl.say(f"under loss: {now - start} checkpoints in 6 s")
        assert now >= start + 2
        for host in (vm.primary, secondary):
            s = fl.lab.vm_status(host, vm.id)
            assert s.state is VmState.PROTECTED and s.failovers == 0, (host, s)
        crashed = {c.pid for c in copies(fl.lab.state, vm.name) if c.host == vm.primary}
        assert crashed, copies(fl.lab.state, vm.name)
        after = fail_over(fl, vm, secondary, lambda: fl.fault("qemu-crash", vm.name))
        assert after.failovers == 1
        survivor_holds(fl, secondary, vm, covered)
        assert_one_live_copy(fl, vm)
        # The poller may already have re-protected, onto any healthy host, the crashed
        # primary's own included (only its QEMU died); that QEMU, though, must be gone,
        # and nothing there may run as primary.
        now = copies(fl.lab.state, vm.name)
        assert not crashed & {c.pid for c in now}, now
        assert all(c.colo != "primary" for c in now if c.host == vm.primary), now
    finally:
        fl.fault("slow-link", vm.primary, "--clear")
    final_state(fl, vm)


def test_engine_down_host_crash_still_fails_over_then_one_reprotection(fl, vms,
                                                                       revive_after):
    vm = start_ft_vm(fl)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    secondary = st.secondary_host
    spare = third(fl, vm.primary, secondary)

    fl.fault("engine-down")
    try:
        revive_after.append(vm.primary)
        after = fail_over(fl, vm, secondary, lambda: fl.fault("host-crash", vm.primary))
        assert after.failovers == 1
        assert assert_one_live_copy(fl, vm, running=1).host == secondary
        survivor_holds(fl, secondary, vm, covered)
        # Without the engine the poller cannot act: once its copy-back made the
        # storage-domain image current, the survivor waits for a peer.
        wait_state(fl, secondary, vm, {VmState.NEED_SECONDARY}, timeout=30)
        time.sleep(3)
        waiting = fl.lab.vm_status(secondary, vm.id)
        assert waiting.state is VmState.NEED_SECONDARY, waiting
        assert waiting.image_current_at is not None, waiting
        log_mark = len(fl.poller_log())
    finally:
        fl.fault("engine-down", "--up")
    again = wait_reprotected(fl, secondary, vm, not_on={vm.primary},
                             timeout=REPROTECT_AFTER_ENGINE_TIMEOUT)
    assert again.secondary_host == spare
    time.sleep(3)                         # a few more poller cycles: nothing more to do
    actions = [ln for ln in fl.poller_log()[log_mark:].splitlines()
               if re.search(rf"\bprotect {re.escape(vm.name)}:", ln)]
    fl.tl.say("poller actions since the engine came back: " + " | ".join(actions))
    assert len(actions) == 1, actions
    assert_one_live_copy(fl, vm, running=2)
    survivor_holds(fl, secondary, vm, covered)
    final_state(fl, vm)


def _fill_every_replica_dir(fl: FaultLab) -> list[str]:
    full = list(fl.hosts)               # the VM's host is not known before it starts
    for host in full:
        fl.fault("disk-full", host)
    return full


def _refusal(fl: FaultLab, vm: FtVm) -> VmStatus:
    def refused() -> VmStatus | None:
        st = fl.lab.vm_status(vm.primary, vm.id)
        # While the poller retries, Syncing comes and goes: wait for the refusal itself.
        return st if st is not None and "replica" in st.reason and st.state in (
            VmState.NEED_SECONDARY, VmState.NOT_PROTECTED) else None
    st = wait_for("a refusal that names the replica directory", refused, 60)
    fl.tl.say(f"refused: {st.state.value}: {st.reason}")
    assert st.state in (VmState.NEED_SECONDARY, VmState.NOT_PROTECTED), st
    assert "free" in st.reason, st.reason
    return st


def _nothing_half_protected(fl: FaultLab, vm: FtVm, peers: list[str]) -> None:
    seen = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen |= _agent_states(fl, vm)
        time.sleep(0.1)
    assert VmState.PROTECTED not in seen, seen
    assert [c.host for c in copies(fl.lab.state, vm.name)] == [vm.primary]
    assert fl.lab.monitor(vm.primary, vm.name).execute(
        "query-colo-status")["mode"] == "none"
    for peer in peers:                        # no overlays left behind on a peer
        overlay = os.path.join("/dev/shm", f"ftlab-{peer}", vm.id)
        assert not os.path.exists(overlay), overlay


def _covered_failover(fl: FaultLab, vm: FtVm, secondary: str) -> None:
    covered = write_round(fl.lab, fl.tl, vm.primary, vm.id, vm.name, 0)
    after = fail_over(fl, vm, secondary, lambda: fl.fault("qemu-crash", vm.name))
    assert after.failovers == 1
    survivor_holds(fl, secondary, vm, covered)
    assert_one_live_copy(fl, vm, running=1)


def test_disk_full_on_every_peer_is_a_clear_refusal_until_freed(fl, vms):
    full = _fill_every_replica_dir(fl)
    try:
        vm = start_ft_vm(fl)
        vms.append(vm)
        peers = [h for h in fl.hosts if h != vm.primary]
        _refusal(fl, vm)
        assert "replica" in fl.show_status()
        _nothing_half_protected(fl, vm, peers)
        for host in peers:
            fl.fault("disk-full", host, "--undo")
            full.remove(host)
        again = wait_protected(fl.lab, vm.primary, vm.id, PROTECT_TIMEOUT)
        fl.tl.say(f"disks freed: Protected onto {again.secondary_host}")
    finally:
        for host in full:
            fl.fault("disk-full", host, "--undo")
    _covered_failover(fl, vm, again.secondary_host)
    final_state(fl, vm)


def test_disk_full_on_the_chosen_peer_protection_lands_on_the_other(fl, vms):
    """Only the peer the poller picks is full: protection must land on the other peer,
    which has room (the poller must not insist on the refusing host)."""
    full = _fill_every_replica_dir(fl)
    try:
        vm = start_ft_vm(fl)
        vms.append(vm)
        st = _refusal(fl, vm)
        chosen = re.search(r"protection onto (\S+) failed", st.reason)
        assert chosen, st.reason
        refusing = chosen.group(1)
        other = third(fl, vm.primary, refusing)
        for host in (other, vm.primary):
            fl.fault("disk-full", host, "--undo")
            full.remove(host)
        try:
            again = wait_protected(fl.lab, vm.primary, vm.id, 60)
        except Exception:
            now = fl.lab.vm_status(vm.primary, vm.id)
            tried = [ln for ln in fl.poller_log().splitlines() if vm.name in ln][-6:]
            pytest.fail(f"{other} has room, {refusing} is full, but {vm.name} was not "
                        f"protected within 60 s: {now.state.value}: {now.reason}\n"
                        f"poller: " + "\n".join(tried))
        assert again.secondary_host == other, again
    finally:
        for host in full:
            fl.fault("disk-full", host, "--undo")
    _covered_failover(fl, vm, other)
    final_state(fl, vm)


# ---------------------------------------------------------------- double faults

def _crash_when_syncing(fl: FaultLab, vm: FtVm, primary: str, timeout: float) -> str:
    """Poll `primary`'s agent; the moment it reports Syncing, crash the chosen secondary's
    host (through the control socket: the CLI's start-up would lose the moment)."""
    deadline = time.monotonic() + timeout
    while True:
        st = fl.lab.vm_status(primary, vm.id)
        if st is not None and st.state is VmState.SYNCING and st.secondary_host:
            fl.lab.control("host-crash", host=st.secondary_host)
            fl.tl.say(f"CRASH {st.secondary_host} while {vm.name} is Syncing "
                      f"({primary} -> {st.secondary_host})")
            return st.secondary_host
        assert st is None or st.state is not VmState.PROTECTED, \
            f"Syncing was never seen (the resync finished too fast): {st}"
        assert time.monotonic() < deadline, f"never saw Syncing; last {st}"
        time.sleep(0.01)


def test_crash_of_the_secondary_host_during_syncing(fl, vms, revive_after):
    vm = start_ft_vm(fl, data_mib=SYNC_DATA_MIB)
    vms.append(vm)
    crashed = _crash_when_syncing(fl, vm, vm.primary, 60)
    revive_after.append(crashed)
    def moved_on() -> VmStatus | None:
        st = fl.lab.vm_status(vm.primary, vm.id)
        return st if st is not None and (st.state in (VmState.NEED_SECONDARY,
                                                      VmState.NOT_PROTECTED)
                                         or st.secondary_host != crashed) else None
    st = wait_for(f"{vm.primary} to give up the sync to {crashed}", moved_on, 60,
                  interval=0.05)
    fl.tl.say(f"after the crash: {st.state.value} {st.reason} "
              f"(secondary {st.secondary_host})")
    assert st.role is Role.PRIMARY and st.failovers == 0, st
    assert assert_one_live_copy(fl, vm).host == vm.primary
    data_holds(fl, vm.primary, vm, SYNC_DATA_MIB, first_mib=0)

    spare = third(fl, vm.primary, crashed)
    again = wait_reprotected(fl, vm.primary, vm, not_on={crashed})
    assert again.secondary_host == spare
    covered = write_round(fl.lab, fl.tl, vm.primary, vm.id, vm.name, 0)
    assert_one_live_copy(fl, vm, running=2)
    survivor_holds(fl, vm.primary, vm, covered)
    data_holds(fl, vm.primary, vm, SYNC_DATA_MIB)
    final_state(fl, vm)
    no_stale_records(fl, vm, {vm.primary, spare})


def test_crash_of_the_new_secondary_during_reprotection(fl, vms, revive_after):
    vm = start_ft_vm(fl, data_mib=SYNC_DATA_MIB)
    vms.append(vm)
    st, covered = protect_and_cover(fl, vm)
    survivor = st.secondary_host

    revive_after.append(vm.primary)
    after = fail_over(fl, vm, survivor, lambda: fl.lab.control("host-crash",
                                                                 host=vm.primary))
    fl.tl.say(f"CRASH {vm.primary}: failover to {survivor} ({after.state.value})")
    new_secondary = _crash_when_syncing(fl, vm, survivor, 60)
    revive_after.append(new_secondary)
    # Two of three hosts are down now, and with them two of the three etcd members.
    end = wait_state(fl, survivor, vm, {VmState.NEED_SECONDARY, VmState.NOT_PROTECTED},
                     timeout=60)
    fl.tl.say(f"after both crashes: {survivor}: {end.state.value} {end.reason}")
    assert end.role is Role.PRIMARY, end
    assert assert_one_live_copy(fl, vm, running=1).host == survivor
    survivor_holds(fl, survivor, vm, covered)
    data_holds(fl, survivor, vm, SYNC_DATA_MIB)
    fl.show_status()

    for host in (vm.primary, new_secondary):
        fl.fault("host-crash", host, "--revive")
    revive_after.clear()
    again = wait_reprotected(fl, survivor, vm, not_on=set())
    fl.tl.say(f"both hosts back: protected again onto {again.secondary_host}")
    assert_one_live_copy(fl, vm, running=2)
    survivor_holds(fl, survivor, vm, covered)
    data_holds(fl, survivor, vm, SYNC_DATA_MIB)
    final_state(fl, vm)
    no_stale_records(fl, vm, {survivor, again.secondary_host})
