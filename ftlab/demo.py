"""`vdsm-ft lab demo`: the whole story on a running lab, as a timestamped timeline.

1. a VM with ft=true is created and started through the real ovirtsdk4 (the fake
   engine's REST API -> VDSM stand-in -> real hooks -> the host's libvirtd);
2. the poller protects it, the agents report Protected;
3. a writer puts sequence-numbered 64 KiB blocks through the primary's quorum node
   (libvirt's monitor; the agent holds the private QMP socket) and notes which ones a
   completed checkpoint covers: two more completed checkpoints after the write, by the
   agent's own counter;
4. the primary's host crashes (every process SIGKILLed; the engine sees it stop
   answering); the failover time runs from the first SIGKILL until the survivor's agent
   reports it runs outside COLO (polled every POLL_S);
5. every covered block is read back on the survivor;
6. the poller re-protects onto the third host by itself;
7. the crashed host comes back repaired (one etcd member per host: a second crash with
   the first host still down would leave the arbiter without quorum, and rightly no
   failover);
8. again: writes, crash, failover, every covered block (both rounds) checked.
With `--guest linux` (tier 3) the VM is the Linux test guest: under KVM where KVM runs
it at speed (bench/tier3_probe.py says), else under TCG with the project's QEMU patches
(tier 3T, only on the project's COLO build: vdsmdriver.tcg_colo_refusal). The writer's
blocks sit past its boot and counter partitions, and a client on the guest segment (in
namespace ftlab-client) asks the guest's HTTP counter back to back throughout
(`ftlab.counterclient`) and keeps one TCP echo connection open (`ftlab.echoclient`):
after each failover the client must get replies again (the gap is printed), the counter
it saw must never fork (every value above the one before), and the echo connection must
still answer.
PASS only if every check held. Then, beyond the story, whether the poller re-protects
onto the host that came back is shown (not part of PASS), and the crashed host is
brought back.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import libvirt
import ovirtsdk4 as sdk
import ovirtsdk4.types as types

from ftlab import counterclient, echoclient, labcontrol, netns, vmlocate
from ftlab.counterclient import CounterClient
from ftlab.echoclient import EchoClient
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.guest import MIN_LINUX_DISK
from ftlab.hostagent import API_PORT
from ftlab.labstate import HostInfo, LabState
from ftlab.monitor import CHECKPOINT_STOPS, LibvirtMonitor
from ftlab.vdsmdriver import (GUEST_IP_PROPERTY, GUEST_PROPERTY, IDLE_TEMPLATE, LINUX_TEMPLATE,
                              REPO, tcg_colo_refusal)
from vdsm_ft import domxml
from vdsm_ft.api import (AgentClient, AgentError, Role, TlsFiles, VmState, VmStatus,
                         client_context)
from vdsm_ft.layout import Disk, VmLayout, secondary_uuid

MiB = 1 << 20
BLOCK = 64 * 1024
BLOCKS_PER_ROUND = 16
DISK_SIZE = 64 * MiB
POLL_S = 0.01
COVER_CHECKPOINTS = 2
START_TIMEOUT = 120.0
PROTECT_TIMEOUT = 120.0
FAILOVER_TIMEOUT = 30.0
CHECKPOINT_TIMEOUT = 30.0
LAST_REPROTECT_WAIT = 20.0
# VDSM adopts the survivor's new domain at its periodic external-VM lookup (every 60 s),
# then the engine's next poll (3 s) moves the VM (docs/engine-view.md).
ENGINE_MOVE_TIMEOUT = 90.0
STRAY_TIMEOUT = 30.0
POLL_ENGINE_S = 0.5
VDSM_RESTART_SETTLE_S = 10.0      # a few of the engine's 3 s polls
CLIENT_FIRST_REPLY_TIMEOUT = 60.0     # the Linux guest boots in seconds where KVM runs it
CLIENT_RESUME_TIMEOUT = 30.0
DEMO_GUEST_IP = f"{netns.GUEST_NET}.10"
DEMO_CLIENT_IP = f"{netns.GUEST_NET}.200"
CLIENT_LINK_INDEX = 200
KVM_PROBE_TIMEOUT_S = 30.0            # a Linux guest KVM runs at speed boots in seconds


@dataclass(frozen=True)
class DemoGuest:
    kind: str                # the lab's ftlab_guest property
    description: str
    memory: int
    data_offset: int         # the writer's blocks start here, clear of the guest's own data
    address: str = ""        # where the Linux guest serves its counter; "" for the idle one

    @property
    def template(self) -> str:
        """The lab template the VM is made from: the Linux guest needs its NIC."""
        return LINUX_TEMPLATE if self.address else IDLE_TEMPLATE

    def properties(self) -> list[types.CustomProperty]:
        props = {"ft": "true", GUEST_PROPERTY: self.kind}
        if self.address:
            props[GUEST_IP_PROPERTY] = self.address
        return [types.CustomProperty(name=k, value=v) for k, v in props.items()]


IDLE_GUEST = DemoGuest("idle", "idle KVM guest", 128 * MiB, 0)
LINUX_GUEST = DemoGuest("linux", "Linux test guest under KVM, HTTP counter", 256 * MiB,
                        -(-MIN_LINUX_DISK // MiB) * MiB, DEMO_GUEST_IP)
TCG_MODE = "TCG, with the project's QEMU patches"
LINUX_TCG_GUEST = DemoGuest("linux-tcg", f"Linux test guest under {TCG_MODE}, HTTP counter",
                            256 * MiB, LINUX_GUEST.data_offset, DEMO_GUEST_IP)


class DemoFailed(RuntimeError):
    """A step of the story could not be carried out (not: a check that failed)."""


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:7.2f}s] {text}",
              flush=True)


@dataclass
class Results:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    failovers_ms: list[float] = field(default_factory=list)
    agent_failovers_ms: list[float] = field(default_factory=list)
    to_protected_s: list[float] = field(default_factory=list)
    covered_lost: int = 0
    covered_checked: int = 0
    client_gaps_ms: list[float] = field(default_factory=list)
    engine_moved_s: list[float] = field(default_factory=list)
    client_replies: list[counterclient.Reply] = field(default_factory=list)
    echo_lines: list[echoclient.Echo] = field(default_factory=list)

    def check(self, tl: Timeline, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        tl.say(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        return ok


class Lab:
    """The running lab as the demo reaches it: engine SDK, agents, control socket."""

    def __init__(self, state: LabState):
        self.state = state
        self.tls = TlsFiles(cert=state.client_cert, key=state.client_key, ca=state.lab_ca)
        self._ctx = client_context(self.tls)
        with open(state.password_file) as f:
            password = f.read().strip()
        self.conn = sdk.Connection(url=state.engine_url, username=state.engine_user,
                                   password=password, ca_file=state.engine_ca, timeout=30)

    def agent(self, host: str, timeout: float = 5.0) -> AgentClient:
        return AgentClient(self.state.host(host).address, API_PORT, self._ctx, timeout=timeout)

    def vm_status(self, host: str, vm_id: str) -> VmStatus | None:
        client = self.agent(host)
        try:
            return client.vm_status(vm_id)
        except AgentError:
            return None
        finally:
            client.close()

    def checkpoints(self, host: str, vm_id: str) -> int:
        client = self.agent(host)
        try:
            text = client.metrics()
        finally:
            client.close()
        for line in text.splitlines():
            if line.startswith("vdsm_ft_checkpoints_total{") and f'vm="{vm_id}"' in line:
                return int(line.rsplit(" ", 1)[1])
        return 0

    def control(self, op: str, **args: object) -> object:
        return labcontrol.call(self.state.control_socket, op, **args)

    def monitor(self, host: str, vm_name: str) -> LibvirtMonitor:
        h = self.state.host(host)
        domain = vmlocate.vm_domain(h.uri, vm_name)
        if domain is None:
            raise DemoFailed(f"no running domain of {vm_name} on {host}")
        return LibvirtMonitor(h.uri, domain)

    def host_id(self, host: str) -> str:
        """The engine's id of lab host `host` (the agents report the engine's ids)."""
        return next(h.id for h in self.conn.system_service().hosts_service().list()
                    if h.name == host or h.id == host)

    def close(self) -> None:
        self.conn.close()


def wait_for(what: str, predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_up(svc: sdk.services.VmService, name: str, timeout: float) -> types.Vm:
    """The VM once the engine shows it Up; DemoFailed with the engine's reason if the
    start ended Down instead."""
    def started() -> types.Vm | None:
        v = svc.get()
        if v.status == types.VmStatus.DOWN and v.stop_reason:
            raise DemoFailed(f"the engine could not start {name}: {v.stop_reason}")
        return v if v.status == types.VmStatus.UP else None
    return wait_for(f"{name} Up in the engine", started, timeout)


def wait_protected(lab: Lab, host: str, vm_id: str, timeout: float) -> VmStatus:
    def protected() -> VmStatus | None:
        st = lab.vm_status(host, vm_id)
        if st is not None and st.state is VmState.PROTECTED and st.secondary_host:
            sec = lab.vm_status(st.secondary_host, vm_id)
            if sec is not None and sec.state is VmState.PROTECTED:
                return st
        return None
    return wait_for(f"{vm_id} Protected with {host} as primary", protected, timeout)


def copy_back(lab: Lab, tl, res, host: str, vm_id: str, name: str) -> None:
    """The survivor ran on its replica: say when the storage-domain image is current."""
    def current() -> VmStatus | None:
        st = lab.vm_status(host, vm_id)
        return st if st is not None and st.image_current_at is not None else None
    try:
        st = wait_for(f"{name}'s storage-domain image current", current, PROTECT_TIMEOUT)
    except DemoFailed as e:
        res.check(tl, "the storage-domain image is current again", False, str(e))
        return
    after = st.image_current_at - st.last_failover.at if st.last_failover else 0.0
    res.check(tl, "the storage-domain image is current again", True,
              f"COPY-BACK: {host} copied {name}'s disk back onto the engine's image and "
              f"runs on it, current again at "
              f"{time.strftime('%H:%M:%S UTC', time.gmtime(st.image_current_at))}, "
              f"{after:.1f}s after the failover")


def probe_layout(host: HostInfo, vm_id: str, vm_name: str) -> tuple[VmLayout, Disk]:
    disk = Disk(index=0, image="", size=DISK_SIZE)
    return VmLayout(vm_id, vm_name, f"{host.run_dir}/vms/{vm_id}", (disk,)), disk


def pattern(seq: int) -> int:
    return 1 + seq % 255


@dataclass
class DemoVm:
    id: str
    name: str
    guest: DemoGuest
    client: CounterClient | None = None
    echo: EchoClient | None = None


def write_round(lab: Lab, tl: Timeline, host: str, vm_id: str, vm_name: str,
                first: int, base: int = 0) -> list[int]:
    """Write BLOCKS_PER_ROUND blocks from offset `base`; returns the ones a completed
    checkpoint covers."""
    mon = lab.monitor(host, vm_name)
    layout, disk = probe_layout(lab.state.host(host), vm_id, vm_name)
    written: list[tuple[int, int]] = []           # (seq, checkpoint count after the write)
    for seq in range(first, first + BLOCKS_PER_ROUND):
        write_pattern(mon, layout, disk, base + seq * BLOCK, BLOCK, pattern(seq))
        written.append((seq, lab.checkpoints(host, vm_id)))
    tl.say(f"writer: blocks {first}..{first + BLOCKS_PER_ROUND - 1} (64 KiB each, "
           f"pattern = sequence number) written through {host}'s quorum node; "
           f"waiting for {COVER_CHECKPOINTS} checkpoints to cover them")
    last = written[-1][1]
    wait_for("checkpoints", lambda: lab.checkpoints(host, vm_id) >= last + COVER_CHECKPOINTS,
             CHECKPOINT_TIMEOUT)
    now = lab.checkpoints(host, vm_id)
    covered = [seq for seq, at in written if now >= at + COVER_CHECKPOINTS]
    tl.say(f"writer: checkpoint counter {now}; {len(covered)} blocks covered")
    return covered


class FailoverWatch(threading.Thread):
    """Polls the survivor's agent until it runs the VM as primary outside COLO (the time)
    and has moved it into the VM's own domain (the status)."""

    def __init__(self, lab: Lab, host: str, vm_id: str):
        super().__init__(daemon=True)
        self.lab, self.host, self.vm_id = lab, host, vm_id
        self.seen_at: float | None = None
        self.status: VmStatus | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        client = self.lab.agent(self.host, timeout=2.0)
        try:
            while not self.stop.is_set():
                try:
                    st = client.vm_status(self.vm_id)
                except AgentError:
                    st = None
                if st is not None and st.role is Role.PRIMARY and \
                        st.state in (VmState.TAKING_IDENTITY, VmState.NEED_SECONDARY,
                                     VmState.SYNCING, VmState.PROTECTED):
                    # Live outside COLO from here; the move into the VM's own domain
                    # follows, and the checks look at that domain.
                    self.seen_at = self.seen_at or time.monotonic()
                    if st.state is not VmState.TAKING_IDENTITY:
                        self.status = st
                        return
                time.sleep(POLL_S)
        finally:
            client.close()


def live_copies(lab: Lab, vm_name: str) -> list[tuple[str, str]]:
    """(host, COLO mode) of every running copy of the VM whose output could reach
    clients: a COLO secondary's output goes nowhere, so it is not counted."""
    copies = []
    for h in lab.state.hosts:
        try:
            mon = lab.monitor(h.name, vm_name)
            status = mon.execute("query-status")["status"]
            mode = mon.execute("query-colo-status")["mode"]
            # A primary stopped for a checkpoint resumes within milliseconds: it counts.
            if status != "running" and not (mode == "primary" and status in CHECKPOINT_STOPS):
                continue
        except (DemoFailed, RuntimeError, libvirt.libvirtError):
            continue                 # no copy there, or the host is down
        if mode != "secondary":
            copies.append((h.name, mode))
    return copies


def crash_and_fail_over(lab: Lab, tl: Timeline, res: Results, primary: str, survivor: str,
                        vm: DemoVm, covered: list[int]) -> bool:
    """False when no failover happened (the story cannot go on)."""
    vm_id, vm_name = vm.id, vm.name
    watch = FailoverWatch(lab, survivor, vm_id)
    watch.start()
    tl.say(f"CRASH {primary}: every process of the host SIGKILLed "
           "(libvirtd, QEMU, agent, etcd member)")
    crash = lab.control("host-crash", host=primary)
    assert isinstance(crash, dict)
    watch.join(FAILOVER_TIMEOUT)
    watch.stop.set()
    if watch.seen_at is None or watch.status is None:
        res.check(tl, f"failover to {survivor}", False,
                  f"its agent did not report it primary within {FAILOVER_TIMEOUT:.0f}s")
        return False
    ms = (watch.seen_at - crash["at"]) * 1000
    res.failovers_ms.append(ms)
    lf = watch.status.last_failover
    agent_ms = lf.duration_ms if lf is not None else None
    if agent_ms is not None:
        res.agent_failovers_ms.append(agent_ms)
    tl.say(f"FAILOVER: {survivor} runs {vm_name} outside COLO {ms:.0f} ms after the crash "
           f"(agent's own last_failover.duration_ms: "
           f"{f'{agent_ms:.0f} ms' if agent_ms is not None else 'not reported'}); "
           f"state {watch.status.state.value}")
    res.check(tl, f"failover to {survivor}", True, f"{ms:.0f} ms")
    host = lab.state.host(survivor)
    mon = lab.monitor(survivor, vm_name)
    colo = mon.execute("query-colo-status")["mode"]
    running = mon.execute("query-status")["status"]
    res.check(tl, f"survivor on {survivor} runs outside COLO", colo == "none" and
              running == "running", f"colo mode {colo}, {running}")
    copies = live_copies(lab, vm_name)
    res.check(tl, "exactly one live copy", len(copies) == 1,
              ", ".join(f"{h}: {mode}" for h, mode in copies))
    layout, disk = probe_layout(host, vm_id, vm_name)
    base = vm.guest.data_offset
    lost = [seq for seq in covered if not pattern_matches(
        mon, layout, disk, base + seq * BLOCK, BLOCK, pattern(seq))]
    res.covered_checked += len(covered)
    res.covered_lost += len(lost)
    res.check(tl, f"all {len(covered)} covered blocks intact on {survivor}", not lost,
              f"lost: {lost}" if lost else "")
    if vm.client is not None:
        check_client(tl, res, vm, crash["at"])
    check_engine_view(lab, tl, res, survivor, vm, crash["at"])
    check_disks(lab, tl, res, vm, f"after the failover to {survivor}")
    return True


def check_disks(lab: Lab, tl: Timeline, res: Results, vm: DemoVm, when: str) -> None:
    """The engine keeps every disk of the VM plugged (VmDevicesMonitoring unplugs a
    managed disk missing from Host.dumpxmls, docs/engine-view.md)."""
    svc = lab.conn.system_service().vms_service().vm_service(vm.id)
    atts = svc.disk_attachments_service().list()
    inactive = [a.id for a in atts if not a.active]
    res.check(tl, f"{vm.name}'s disk attachments are all active {when}",
              bool(atts) and not inactive,
              f"{len(atts)} attached" + (f", inactive: {inactive}" if inactive else ""))


def check_engine_view(lab: Lab, tl: Timeline, res: Results, survivor: str, vm: DemoVm,
                      crash_at: float) -> None:
    """What an admin's scripts see through the SDK after the failover: the VM itself,
    by its own id, Up on the survivor's host (VDSM adopts the survivor's new domain and
    the engine moves the VM there, docs/engine-view.md), one VM of that name, no record
    of the old secondary left, and an event that says what happened."""
    system = lab.conn.system_service()
    svc = system.vms_service().vm_service(vm.id)
    host_id = lab.host_id(survivor)

    def moved() -> types.Vm | None:
        v = svc.get()
        return v if v.status == types.VmStatus.UP and v.host and v.host.id == host_id \
            else None
    try:
        wait_for(f"{vm.name} Up on {survivor} in the engine", moved, ENGINE_MOVE_TIMEOUT,
                 POLL_ENGINE_S)
        seen = time.monotonic()
        res.engine_moved_s.append(seen - crash_at)
        res.check(tl, f"{vm.name} is Up by its own id on {survivor} in the engine", True,
                  f"{seen - crash_at:.1f} s after the crash")
    except DemoFailed as e:
        v = svc.get()
        res.check(tl, f"{vm.name} is Up by its own id on {survivor} in the engine", False,
                  f"{e}; the engine shows {v.status.value if v.status else '?'} on "
                  f"{v.host.id if v.host else 'no host'}")
    named = system.vms_service().list(search=f"name={vm.name}")
    res.check(tl, f"exactly one VM named {vm.name}", [v.name for v in named] == [vm.name],
              ", ".join(f"{v.name} ({v.id})" for v in named))

    def no_stray() -> bool:
        # Only a live secondary of the re-protection may have an external record now.
        st = lab.vm_status(survivor, vm.id)
        live = {secondary_uuid(vm.id, st.generation)} if st and st.secondary_host else set()
        return not [v for v in system.vms_service().list(search=f"name=external-{vm.name}*")
                    if v.id not in live]
    try:
        wait_for("the old secondary's external VM to go", no_stray, STRAY_TIMEOUT,
                 POLL_ENGINE_S)
        res.check(tl, "no external VM of the old secondary remains", True)
    except DemoFailed:
        left = system.vms_service().list(search=f"name=external-{vm.name}*")
        res.check(tl, "no external VM of the old secondary remains", False,
                  ", ".join(f"{v.name} {v.id} ({v.status.value})" for v in left))

    restarted = lab.control("vdsm-restart", host=survivor)
    tl.say(f"VDSM restart on {survivor}: {restarted}")
    try:
        state = lab.monitor(survivor, vm.name).execute("query-status")["status"]
    except (DemoFailed, RuntimeError, libvirt.libvirtError) as e:
        state = f"gone ({e})"
    try:
        wait_for(f"{vm.name} Up on {survivor} after the VDSM restart", moved,
                 VDSM_RESTART_SETTLE_S, POLL_ENGINE_S)
        engine_ok = True
    except DemoFailed:
        engine_ok = False
    res.check(tl, f"a VDSM restart on {survivor} leaves {vm.name} running",
              state == "running" and engine_ok and isinstance(restarted, str)
              and "killed 0 " in restarted + " ",
              f"QEMU {state}; engine {'Up there' if engine_ok else 'not Up there'}")

    def told() -> list[str]:
        return [e.description for e in system.events_service().list(
            search="origin=ovirt-ft", max=50) if "failed over from" in e.description
            and vm.name in e.description and survivor in e.description]
    try:
        said = wait_for("the poller's failover event", told, STRAY_TIMEOUT, POLL_ENGINE_S)
        res.check(tl, "an engine event says what happened and how long it took", True,
                  said[0])
    except DemoFailed as e:
        res.check(tl, "an engine event says what happened and how long it took", False,
                  str(e))


def start_client(tl: Timeline, vm: DemoVm) -> CounterClient:
    """The client on the guest segment, asking the guest's counter until the story ends
    and holding one echo connection open (`vm.echo`)."""
    if netns.exists(netns.CLIENT_NS):
        netns.delete(netns.CLIENT_NS)        # left by a demo that was killed
    netns.add_client(netns.CLIENT, DEMO_CLIENT_IP, CLIENT_LINK_INDEX)
    client = vm.client = CounterClient(netns.CLIENT_NS, vm.guest.address)
    first = wait_for(f"the guest's counter at {vm.guest.address} to answer the client",
                     lambda: client.values_after(0.0), CLIENT_FIRST_REPLY_TIMEOUT)
    tl.say(f"client ({DEMO_CLIENT_IP}, namespace {netns.CLIENT_NS}): the guest's counter "
           f"answers ({first[0]}); asking it back to back from now on")
    echo = vm.echo = EchoClient(netns.CLIENT_NS, vm.guest.address)
    wait_for("the guest's echo service to answer", lambda: echo.answered() or echo.broken(),
             CLIENT_RESUME_TIMEOUT)
    if echo.broken():
        raise DemoFailed(f"the echo connection to {vm.guest.address} failed: {echo.broken()}")
    tl.say("client: one TCP connection to the guest's echo service open, a line every "
           f"{echoclient.INTERVAL_S * 1000:.0f} ms, kept for the whole story")
    return client


def check_client(tl: Timeline, res: Results, vm: DemoVm, crash_at: float) -> None:
    """After a failover (or a lost secondary) at `crash_at`: the client's counter and
    echo connection go on."""
    client = vm.client
    assert client is not None
    if vm.echo is not None:
        echo = vm.echo
        try:
            wait_for("an echoed line after the crash", lambda: echo.broken() or any(
                e.seq is not None and e.t > crash_at for e in echo.snapshot()),
                CLIENT_RESUME_TIMEOUT, POLL_S)
        except DemoFailed:
            pass                            # the check below says what is missing
        after = [e for e in echo.snapshot() if e.seq is not None and e.t > crash_at]
        res.check(tl, "the open TCP echo connection survived", not echo.broken() and
                  bool(after), echo.broken() or
                  (f"{echo.answered()} lines echoed so far, the first after the crash "
                   f"{(after[0].t - crash_at) * 1000:.0f} ms after it" if after else
                   "no line echoed after the crash"))
    try:
        wait_for("the client's first reply after the crash",
                 lambda: client.values_after(crash_at), CLIENT_RESUME_TIMEOUT, POLL_S)
    except DemoFailed as e:
        res.check(tl, "the client gets replies after the failover", False, str(e))
        return
    replies = client.snapshot()
    gap = counterclient.gap_ms(replies, crash_at)
    if gap is not None:
        res.client_gaps_ms.append(gap)
    res.check(tl, "the client gets replies after the failover", gap is not None,
              f"client-visible gap {gap:.0f} ms" if gap is not None else
              "no reply before the crash to measure from")
    forked = counterclient.forks(replies)
    values = [r.value for r in replies if r.value is not None]
    res.check(tl, "the client's counter never forked", not forked,
              f"{len(values)} replies, {values[0]}..{values[-1]}" if not forked else
              f"went back at {forked[:5]}")


def stop_client(res: Results, vm: DemoVm | None) -> None:
    if vm is not None and vm.echo is not None:
        res.echo_lines = vm.echo.stop()
    if vm is not None and vm.client is not None:
        res.client_replies = vm.client.stop()
    if netns.exists(netns.CLIENT_NS):
        netns.delete(netns.CLIENT_NS)


def run(state: LabState, guest: DemoGuest = IDLE_GUEST) -> int:
    tl = Timeline()
    res = Results()
    lab = Lab(state)
    down: list[str] = []                  # hosts crashed and not back yet
    started: list[DemoVm] = []
    try:
        story(lab, tl, res, down, guest, started)
    except (DemoFailed, sdk.Error, labcontrol.ControlError, AgentError,
            netns.NetnsError) as e:
        res.check(tl, "the story ran to its end", False, str(e))
    finally:
        stop_client(res, started[0] if started else None)
        revive(lab, tl, down)
        lab.close()
    return summary(tl, res)


def story(lab: Lab, tl: Timeline, res: Results, down: list[str], guest: DemoGuest,
          started: list[DemoVm]) -> None:
    hosts = [h.name for h in lab.state.hosts]
    if len(hosts) < 3:
        raise DemoFailed("the demo needs 3 hosts (crash, re-protect onto a third host)")
    vms = lab.conn.system_service().vms_service()
    name = f"demo-{uuid.uuid4().hex[:6]}"
    tl.say(f"SDK: create VM {name} ({guest.memory // MiB} MiB, {guest.description}) with "
           "custom property ft=true")
    vm = vms.add(types.Vm(name=name, cluster=types.Cluster(name="Default"),
                          template=types.Template(name=guest.template), memory=guest.memory,
                          custom_properties=guest.properties()))
    dvm = DemoVm(vm.id, name, guest)
    started.append(dvm)
    svc = vms.vm_service(vm.id)
    t_start = time.monotonic()
    tl.say(f"SDK: start {name} (engine -> VDSM stand-in -> before_vm_start hook -> libvirt)")
    svc.start()
    up = wait_up(svc, name, START_TIMEOUT)
    primary = up.host.id
    tl.say(f"engine: {name} is Up on {primary}; waiting for the poller to protect it")
    if guest.address:
        start_client(tl, dvm)
    st = wait_protected(lab, primary, vm.id, PROTECT_TIMEOUT)
    res.to_protected_s.append(time.monotonic() - t_start)
    tl.say(f"PROTECTED: primary {primary}, secondary {st.secondary_host}, generation "
           f"{st.generation} ({res.to_protected_s[-1]:.1f}s after the start request)")
    check_disks(lab, tl, res, dvm, "while protected")
    covered: list[int] = []
    first = 0
    for round_no in (1, 2):
        secondary = st.secondary_host
        assert secondary is not None
        covered += write_round(lab, tl, primary, vm.id, name, first, guest.data_offset)
        first += BLOCKS_PER_ROUND
        down.append(primary)
        if not crash_and_fail_over(lab, tl, res, primary, secondary, dvm, covered):
            return
        old, primary = primary, secondary
        copy_back(lab, tl, res, primary, vm.id, name)
        spare = next(h for h in hosts if h not in down and h != primary)
        if round_no == 2:
            note_reprotect(lab, tl, primary, spare, vm.id, name)
            break
        t0 = time.monotonic()
        tl.say(f"waiting for the poller to re-protect {name} onto {spare}")
        st = wait_protected(lab, primary, vm.id, PROTECT_TIMEOUT)
        res.to_protected_s.append(time.monotonic() - t0)
        res.check(tl, f"re-protected automatically onto {spare}", st.secondary_host == spare,
                  f"secondary {st.secondary_host}, generation {st.generation}, "
                  f"{res.to_protected_s[-1]:.1f}s after the failover was seen")
        if round_no == 1:
            # One etcd member per host: with this host's member gone, a second crash would
            # leave 1 of 3 members, no quorum, and (rightly) no failover. So the crashed
            # host is repaired and comes back first, as an admin would bring it back.
            tl.say(f"{old} is repaired and comes back (the arbiter's etcd needs 2 of 3 "
                   "members to decide the next failover)")
            revive(lab, tl, [old])
            down.remove(old)
    final = lab.vm_status(primary, vm.id)
    tl.say(f"{name} lives on {primary}: {final.state.value if final else '?'}"
           + (f" ({final.reason})" if final and final.reason else ""))
    events = lab.conn.system_service().events_service().list(search="origin=ovirt-ft",
                                                             max=20)
    seen: set[str] = set()
    for ev in reversed(events):
        if ev.description not in seen:      # the poller repeats a retried step's event
            seen.add(ev.description)
            tl.say(f"engine event (poller): {ev.description}")


def note_reprotect(lab: Lab, tl: Timeline, primary: str, spare: str, vm_id: str,
                   name: str) -> None:
    """After the second failover the only spare is the host that crashed first and came
    back: shown, not part of PASS (the story ends with the second survival)."""
    tl.say(f"beyond the story: does the poller re-protect {name} onto {spare}, the host "
           f"that crashed first? (up to {LAST_REPROTECT_WAIT:.0f}s)")
    try:
        st = wait_protected(lab, primary, vm_id, LAST_REPROTECT_WAIT)
        tl.say(f"note: re-protected onto {st.secondary_host}, generation {st.generation}")
    except DemoFailed:
        st2 = lab.vm_status(primary, vm_id)
        tl.say(f"note: not re-protected onto {spare}: "
               + (f"{st2.state.value}: {st2.reason}" if st2 else "survivor's agent silent"))


def remove_ft_vm(lab: Lab, tl: Timeline, name: str, vm_id: str) -> None:
    """ft=false (the poller turns protection off, so stopping the copies is no failure),
    stop every engine record of the VM (its own, the external secondaries), remove them;
    libvirt destroys whatever copy is left on a live host."""
    vms = lab.conn.system_service().vms_service()

    def states() -> set[VmState]:
        return {st.state for h in lab.state.hosts
                if (st := lab.vm_status(h.name, vm_id)) is not None}
    try:
        vms.vm_service(vm_id).update(types.Vm(custom_properties=[
            types.CustomProperty(name="ft", value="false")]))
        wait_for(f"{name} unprotected", lambda: not states() & {
            VmState.PROTECTED, VmState.SYNCING, VmState.FAILING_OVER}, 30)
    except Exception as e:  # cleanup goes on; the caller's verdict is already made
        tl.say(f"cleanup: turning ft off for {name}: {e}")
    for v in vms.list(search=f"name={name} or name=external-{name}*"):
        svc = vms.vm_service(v.id)
        try:
            if v.status not in (types.VmStatus.DOWN, types.VmStatus.UNKNOWN):
                svc.stop()
            svc.remove()
        except Exception as e:
            tl.say(f"cleanup: {v.name} ({v.status}): {e}")
    for h in lab.state.hosts:
        for dom in (name, domxml.secondary_name(name)):
            try:
                conn = libvirt.open(h.uri)
            except libvirt.libvirtError:
                break                           # the host is down
            try:
                conn.lookupByName(dom).destroy()
                tl.say(f"cleanup: libvirt destroyed {dom} left on {h.name}")
            except libvirt.libvirtError:
                pass
            finally:
                conn.close()


def revive(lab: Lab, tl: Timeline, hosts: list[str]) -> None:
    for host in hosts:
        try:
            tl.say(f"bringing {host} back: {lab.control('host-revive', host=host)}")
        except labcontrol.ControlError as e:
            tl.say(f"could not bring {host} back ({e}); it stays down: "
                   f"`vdsm-ft lab fault host-crash {host} --revive` retries")


def summary(tl: Timeline, res: Results) -> int:
    ok = bool(res.checks) and all(c[1] for c in res.checks) and len(res.failovers_ms) == 2
    print()
    print("=== summary ===")
    print("failover times (crash -> survivor outside COLO, seen by polling its agent): "
          + (", ".join(f"{ms:.0f} ms" for ms in res.failovers_ms) or "none"))
    print("failover times as the agent measured them (last_failover.duration_ms): "
          + (", ".join(f"{ms:.0f} ms" for ms in res.agent_failovers_ms) or "none"))
    print("crash -> the engine shows the VM itself Up on the survivor's host: "
          + (", ".join(f"{sec:.1f} s" for sec in res.engine_moved_s) or "never"))
    print("time to Protected: " + (", ".join(f"{s:.1f} s" for s in res.to_protected_s)
                                   or "never") + " (first start, then re-protection)")
    print(f"covered blocks lost: {res.covered_lost} ({res.covered_checked} block checks on "
          "the survivors, each covered block checked after every later failover)")
    if res.client_replies:
        values = [r.value for r in res.client_replies if r.value is not None]
        print("client-visible gaps across the failovers: "
              + (", ".join(f"{ms:.0f} ms" for ms in res.client_gaps_ms) or "none measured")
              + f"; the client got {len(values)} replies"
              + (f", counter {values[0]}..{values[-1]}" if values else "")
              + f", forks: {len(counterclient.forks(res.client_replies))}")
    if res.echo_lines:
        print(f"echo connection: {echoclient.fate(res.echo_lines)}")
    failed = [c for c in res.checks if not c[1]]
    for name, _, detail in failed:
        print(f"FAILED: {name}{': ' + detail if detail else ''}")
    print(f"demo took {time.monotonic() - tl.t0:.1f} s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def linux_guest(state: LabState) -> int:
    """Tier 3: where KVM runs the Linux guest at speed, under KVM; elsewhere under TCG
    with the project's QEMU patches (tier 3T), if the lab's FT QEMU is that build. Says
    which, and never pretends (non-zero exit unless the story really ran)."""
    print("lab demo --guest linux (tier 3: a client's counter and an open TCP connection "
          "across failovers).")
    print(f"Probing with bench/tier3_probe.py whether KVM here runs a Linux guest at speed "
          f"(the Linux test guest under KVM on its own lab hosts, up to "
          f"{KVM_PROBE_TIMEOUT_S:.0f} s)...", flush=True)
    probe = os.path.join(REPO, "bench", "tier3_probe.py")
    if not os.path.exists(probe):
        print(f"FAIL: the tier 3 probe {probe} is missing; cannot tell whether KVM here "
              "runs a Linux guest at speed")
        return 2
    proc = subprocess.run([sys.executable, probe, "--probe-only", "--boot-timeout",
                           str(KVM_PROBE_TIMEOUT_S)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tier 3")]
    for ln in lines:
        print(ln)
    if proc.returncode != 0:
        print(proc.stderr.strip()[-2000:])
        print(f"FAIL: the tier 3 probe itself failed (exit {proc.returncode}), so whether "
              "KVM here runs a Linux guest at speed is unknown.")
        return 2
    if not any("not measurable here" in ln for ln in lines):
        print("The probe says KVM runs the Linux guest here: the story follows, with a "
              "client's counter.", flush=True)
        return run(state, LINUX_GUEST)
    refusal = tcg_colo_refusal()
    if refusal:
        print(f"FAIL: the Linux-guest demo cannot run on this machine: KVM cannot run the "
              f"guest (above), and {TCG_MODE} is not available: {refusal}. The default "
              "demo (`vdsm-ft lab demo`) shows the same failovers with the idle KVM guest "
              "and block-level data checks.")
        return 2
    print(f"Mode: {TCG_MODE} (tier 3T). KVM here cannot run the guest, so it runs under "
          "QEMU's TCG, on the project's COLO build (packaging/qemu/patches: without them "
          "COLO under TCG deadlocks or corrupts the secondary's guest). Slower than KVM; "
          "the continuity checks are the same.", flush=True)
    return run(state, LINUX_TCG_GUEST)
