"""Nemesis soak: random, seeded faults on the full lab, with the FT invariants checked
throughout (issue 13).

    PYTHONPATH=. python bench/nemesis.py --minutes 3 --seed 7 --vms 2

It brings up its own lab (`vdsm-ft lab up --hosts 4`: agents, 4-member etcd, fake
engine, poller), starts `--vms` ft=true VMs through the SDK, waits until the poller has
protected them, then for `--minutes` draws faults from the lab's list and heals them:
- host-crash (every process of a host, its etcd member included) and revive;
- qemu-crash of a VM's primary or secondary (the agents and the poller heal it);
- agent-crash and restart;
- etcd-crash of a host's member alone (its host and agent go on) and restart;
- partition between two hosts and heal;
- slow-link (3% loss, 200 mbit: this kernel has no sch_netem for delays) and clear;
- engine-down and up;
- disk-full on a host's replica directory and undo.
At most MAX_ACTIVE faults are active at once, a host carries one fault at a time, and
at most one etcd member is down at a time, alone or with its crashed host: each host
runs a member, and 4 members keep quorum with one down. A host or QEMU crash that would
kill the only copy of a VM that is not Protected does not fire: FT promises to survive
one failure of a Protected VM, and the VM would be lost by design.

The lab cannot yet do: a slow link with a delay (no sch_netem), a fault on the engine's
own network.

Load: a writer per VM writes numbered 64 KiB blocks (pattern = sequence number) through
the current primary's quorum node while the VM is Protected. A block counts as covered
once the primary's checkpoint counter rose by COVER_CHECKPOINTS after it; a block whose
round did not get covered is forgotten until written again.

Invariants, checked every CHECK_INTERVAL_S and at the end:
- one live copy: at most one QEMU of a VM runs outside a COLO secondary, from every
  host's processes and monitors; two are tolerated only below colo-compare's hold time
  (a cut-off old primary's output is held until it fences itself);
- covered blocks: after every failover (a new primary) a sample of the covered blocks,
  and at the end all of them, read back intact on the primary;
- every VM Protected again within SETTLE_S after the last fault is healed;
- the poller runs throughout, and every agent the nemesis did not kill answers;
- at the end the primary agent's (generation, primary, secondary) equals the arbiter's
  pair record.

What a seed replays exactly: the sequence of fault kinds, their gaps and hold times,
and which role (primary, secondary, spare of VM k) each targets. What it cannot:
which host holds a role when the fault fires (placement by the poller and the race of
each failover), how many checkpoints a write waits for, and timing jitter from the
shared machine, so two runs of a seed diverge after the first failover.

Exit status 0 when every invariant held, 1 otherwise; the seed is printed either way.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

import ovirtsdk4.types as types

from colo_report import dump_json, fmt, summary

from ftlab.demo import (BLOCK, COVER_CHECKPOINTS, FailoverWatch, Lab, Timeline, pattern,
                        probe_layout, remove_ft_vm, wait_up)
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.labstate import read_state
from ftlab.livecopies import copies, live_outside_colo
from ftlab.vdsmdriver import IDLE_TEMPLATE, REPO
from vdsm_ft import colo, hostconfig
from vdsm_ft.arbiter import host_arbiter
from vdsm_ft.api import Role, VmState, VmStatus

MiB = 1 << 20
HOSTS = 4
MAX_ACTIVE = 2
GAP_S = (3.0, 12.0)                # between two fault injections
HOLD_S = (4.0, 25.0)               # how long a fault stays before it is healed
CHECK_INTERVAL_S = 1.0
HOLD_GRACE_S = colo.COMPARE_TIMEOUT_MS / 1000
SETTLE_S = 300.0                   # the poller backs off up to ~150 s after an outage
START_TIMEOUT_S = 180.0
WRITES_PER_ROUND = 4
WRITER_BLOCKS = 1024               # 64 MiB disk / 64 KiB
COVER_TIMEOUT_S = 30.0
SAMPLE_AFTER_FAILOVER = 32
AGENT_DOWN_TICKS = 5               # an agent must answer within this many checks
FAULT_KINDS = ("host-crash", "qemu-crash", "agent-crash", "etcd-crash", "partition",
               "slow-link", "engine-down", "disk-full")
ROLES = ("primary", "secondary", "spare")


@dataclass
class SoakVm:
    id: str
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    expected: dict[int, int] = field(default_factory=dict)    # block -> covered seq
    next_seq: int = 0
    primary: str | None = None
    failed_over_at: float | None = None


@dataclass
class Fault:
    kind: str
    hosts: tuple[str, ...]
    heal_at: float
    detail: str = ""


class Soak:
    def __init__(self, lab: Lab, vms: list[SoakVm], rng: random.Random, tl: Timeline,
                 arbiter):
        self.lab, self.vms, self.rng, self.tl, self.arbiter = lab, vms, rng, tl, arbiter
        self.hosts = [h.name for h in lab.state.hosts]
        self.active: list[Fault] = []
        self.crashed_agents: set[str] = set()
        self.crashed_hosts: set[str] = set()
        self.crashed_etcd: set[str] = set()
        self.broken: list[str] = []
        self.failovers_ms: list[float] = []
        self.failovers_seen = 0
        self.reprotect_s: list[float] = []
        self.faults_drawn: dict[str, int] = {k: 0 for k in FAULT_KINDS}
        self.writes = self.covered = 0
        self.stop = threading.Event()
        self.state_lock = threading.Lock()
        self._double_since: dict[str, float] = {}
        self._agent_down: dict[str, int] = {}

    # ---------------------------------------------------------------- observations

    def break_(self, text: str) -> None:
        self.broken.append(text)
        self.tl.say(f"INVARIANT BROKEN: {text}")

    def primary_status(self, vm: SoakVm) -> tuple[str, VmStatus] | None:
        """The host whose agent runs the VM as primary in the newest generation."""
        best = None
        for h in self.hosts:
            st = self.lab.vm_status(h, vm.id)
            if st is not None and st.role is Role.PRIMARY and st.state is not VmState.DOWN \
                    and (best is None or st.generation > best[1].generation):
                best = (h, st)
        return best

    def protected(self, vm: SoakVm) -> tuple[str, VmStatus] | None:
        found = self.primary_status(vm)
        if found is None or found[1].state is not VmState.PROTECTED \
                or not found[1].secondary_host:
            return None
        sec = self.lab.vm_status(found[1].secondary_host, vm.id)
        return found if sec is not None and sec.state is VmState.PROTECTED else None

    # ---------------------------------------------------------------- load

    def writer(self, vm: SoakVm) -> None:
        while not self.stop.is_set():
            found = self.protected(vm)
            if found is None:
                time.sleep(0.5)
                continue
            with vm.lock:
                self._write_round(vm, found[0])

    def _write_round(self, vm: SoakVm, host: str) -> None:
        written: list[tuple[int, int]] = []            # (seq, checkpoints after it)
        try:
            mon = self.lab.monitor(host, vm.name)
            layout, disk = probe_layout(self.lab.state.host(host), vm.id, vm.name)
            for _ in range(WRITES_PER_ROUND):
                seq = vm.next_seq
                vm.next_seq += 1
                # Written but not yet covered: what the block holds is unknown now.
                vm.expected.pop(seq % WRITER_BLOCKS, None)
                write_pattern(mon, layout, disk, (seq % WRITER_BLOCKS) * BLOCK, BLOCK,
                              pattern(seq))
                self.writes += 1
                written.append((seq, self.lab.checkpoints(host, vm.id)))
            deadline = time.monotonic() + COVER_TIMEOUT_S
            while self.lab.checkpoints(host, vm.id) < written[-1][1] + COVER_CHECKPOINTS:
                # Give up as soon as this host is no longer the Protected primary: the
                # checker waits for this round (vm.lock) to read the blocks after a
                # failover, and must read them before the next fault.
                found = self.protected(vm)
                if time.monotonic() > deadline or self.stop.is_set() or \
                        found is None or found[0] != host:
                    return
                time.sleep(0.2)
        except Exception:  # the primary went away mid-round: these blocks are unknown
            return
        for seq, _ in written:
            vm.expected[seq % WRITER_BLOCKS] = seq
            self.covered += 1

    def check_blocks(self, vm: SoakVm, host: str, sample: int | None) -> None:
        with vm.lock:
            blocks = sorted(vm.expected.items())
            if sample is not None and len(blocks) > sample:
                blocks = random.Random(vm.next_seq).sample(blocks, sample)
            try:
                mon = self.lab.monitor(host, vm.name)
                layout, disk = probe_layout(self.lab.state.host(host), vm.id, vm.name)
                lost = [seq for block, seq in blocks if not pattern_matches(
                    mon, layout, disk, block * BLOCK, BLOCK, pattern(seq))]
            except Exception as e:
                # After a failover the primary may be gone again; the final check must read.
                (self.tl.say if sample is not None else self.break_)(
                    f"{vm.name}: blocks not checked on {host}: {e}")
                return
        if lost:
            self.break_(f"{vm.name}: covered blocks {lost[:10]} lost on {host} "
                        f"({len(lost)} of {len(blocks)} checked)")
        else:
            self.tl.say(f"{vm.name}: {len(blocks)} covered blocks intact on {host}")

    # ---------------------------------------------------------------- invariants

    def checker(self) -> None:
        while not self.stop.is_set():
            self.check_once()
            self.stop.wait(CHECK_INTERVAL_S)

    def check_once(self) -> None:
        now = time.monotonic()
        for vm in self.vms:
            live = live_outside_colo(copies(self.lab.state, vm.name))
            if len(live) > 1:
                since = self._double_since.setdefault(vm.name, now)
                if now - since > HOLD_GRACE_S:
                    self.break_(f"{vm.name}: {len(live)} live copies for "
                                f"{now - since:.1f}s: {live}")
                    self._double_since[vm.name] = now
            else:
                self._double_since.pop(vm.name, None)
            found = self.primary_status(vm)
            if found is None:
                continue
            host, st = found
            if vm.primary is not None and host != vm.primary \
                    and st.state is not VmState.TAKING_IDENTITY:
                self.tl.say(f"REACTION {vm.name}: primary {vm.primary} -> {host} "
                            f"({st.state.value}, generation {st.generation})")
                vm.primary, vm.failed_over_at = host, now
                self.failovers_seen += 1
                self.check_blocks(vm, host, SAMPLE_AFTER_FAILOVER)
            elif vm.primary is None:
                vm.primary = host
            if vm.failed_over_at is not None and self.protected(vm) is not None:
                took = time.monotonic() - vm.failed_over_at
                self.reprotect_s.append(took)
                self.tl.say(f"REACTION {vm.name}: Protected again {host} -> "
                            f"{st.secondary_host} {took:.1f}s after the failover was seen")
                vm.failed_over_at = None
        self.check_processes()

    def check_processes(self) -> None:
        try:
            st = self.lab.control("status")
        except Exception as e:
            self.break_(f"the lab supervisor did not answer: {e}")
            return
        if st["poller"] != "running":
            self.break_("the poller exited")
        with self.state_lock:
            expected_down = self.crashed_agents | self.crashed_hosts
        for h in st["hosts"]:
            if h["name"] in expected_down or h["agent"] == "up":
                self._agent_down.pop(h["name"], None)
                continue
            ticks = self._agent_down[h["name"]] = self._agent_down.get(h["name"], 0) + 1
            if ticks == AGENT_DOWN_TICKS:
                self.break_(f"agent on {h['name']} is {h['agent']!r} and nobody killed it")

    def check_arbiter(self) -> None:
        for vm in self.vms:
            found = self.primary_status(vm)
            record = self.arbiter.get_pair(vm.id)
            if found is None or record is None:
                self.break_(f"{vm.name}: agent primary {found}, arbiter record {record}")
                continue
            st = found[1]
            agent = (st.generation, st.primary_host, st.secondary_host)
            arbiter = (record.generation, record.primary, record.secondary)
            if agent != arbiter:
                self.break_(f"{vm.name}: agent says (generation, primary, secondary) "
                            f"{agent}, the arbiter {arbiter}")

    # ---------------------------------------------------------------- the nemesis

    def role_host(self, vm: SoakVm, role: str) -> str | None:
        found = self.primary_status(vm)
        if found is None:
            return None
        primary, secondary = found[0], found[1].secondary_host
        if role == "primary":
            return primary
        if role == "secondary" and secondary:
            return secondary
        spares = [h for h in self.hosts if h not in (primary, secondary)]
        return spares[self.rng.randrange(len(spares))] if spares else None

    def lone_copies(self, host: str, among: list[SoakVm]) -> list[str]:
        """The VMs among `among` whose primary runs on `host` and are not Protected."""
        lone = []
        for vm in among:
            found = self.primary_status(vm)
            if found is not None and found[0] == host and self.protected(vm) is None:
                lone.append(vm.name)
        return lone

    def busy(self) -> set[str]:
        return {h for f in self.active for h in f.hosts}

    def inject(self) -> None:
        """Draw one fault and inject it. Every draw consumes the same random numbers
        whether or not the fault can fire, so the sequence stays the seed's."""
        kind = self.rng.choice(FAULT_KINDS)
        vm = self.vms[self.rng.randrange(len(self.vms))]
        roles = (self.rng.choice(ROLES), self.rng.choice(ROLES))
        hold = self.rng.uniform(*HOLD_S)
        heal_at = time.monotonic() + hold
        busy = self.busy()
        targets: list[str] = []
        if kind == "qemu-crash":
            h = self.role_host(vm, roles[0] if roles[0] != "spare" else "primary")
            targets = [h] if h is not None else []
        else:
            for role in roles:
                h = self.role_host(vm, role)
                if h is not None and h not in busy and h not in targets:
                    targets.append(h)
        engine_out = any(f.kind == "engine-down" for f in self.active)
        # One etcd member down at most, whether alone or with its host (4 keep quorum).
        member_down = self.crashed_hosts or self.crashed_etcd
        # FT survives one failure of a Protected VM: killing the only copy of a VM that
        # is not Protected (yet, or any more) loses it by design, so that never fires.
        lone: list[str] = []
        if kind in ("host-crash", "qemu-crash") and targets:
            lone = self.lone_copies(targets[0], [vm] if kind == "qemu-crash" else self.vms)
        if kind == "engine-down" and engine_out or kind in ("host-crash", "etcd-crash") \
                and member_down or kind == "partition" and len(targets) < 2 or \
                kind != "engine-down" and not targets or lone:
            why = f" (would kill the only copy of {', '.join(lone)})" if lone else ""
            self.tl.say(f"nemesis: drew {kind} on {vm.name} {roles}: cannot fire now{why}")
            return
        self.faults_drawn[kind] += 1
        try:
            fault = self._fire(kind, vm, roles, targets, heal_at)
        except Exception as e:
            self.tl.say(f"nemesis: {kind} on {vm.name} failed to inject: {e}")
            return
        if fault is not None:
            self.active.append(fault)

    def _fire(self, kind: str, vm: SoakVm, roles: tuple[str, str], targets: list[str],
              heal_at: float) -> Fault | None:
        ctl = self.lab.control
        if kind == "qemu-crash":
            host = targets[0]
            self._timed_failover([vm], host,
                                 lambda: ctl("qemu-crash", vm=vm.name, host=host))
            self.tl.say(f"FAULT qemu-crash {vm.name} on {host} ({roles[0]})")
            return None
        if kind == "engine-down":
            ctl("engine-down")
            self.tl.say("FAULT engine-down")
            return Fault(kind, (), heal_at)
        host = targets[0]
        if kind == "host-crash":
            with self.state_lock:
                self.crashed_hosts.add(host)
            self._timed_failover(self.vms, host, lambda: ctl("host-crash", host=host))
        elif kind == "agent-crash":
            with self.state_lock:
                self.crashed_agents.add(host)
            ctl("agent-crash", host=host)
        elif kind == "etcd-crash":
            self.crashed_etcd.add(host)
            ctl("etcd-crash", host=host)
        elif kind == "partition":
            ctl("partition", a=targets[0], b=targets[1])
            self.tl.say(f"FAULT partition {targets[0]} <-> {targets[1]} "
                        f"({vm.name} {roles})")
            return Fault(kind, (targets[0], targets[1]), heal_at)
        elif kind == "slow-link":
            ctl("slow-link", host=host, loss="3%", rate="200mbit")
        else:
            ctl("disk-full", host=host)
        self.tl.say(f"FAULT {kind} {host} ({vm.name} {roles[0]}), held "
                    f"{heal_at - time.monotonic():.0f}s")
        return Fault(kind, (host,), heal_at)

    def _timed_failover(self, victims: list[SoakVm], host: str | None, inject) -> None:
        """Inject; for every Protected VM among `victims` whose primary is on `host`,
        time the failover on its secondary's agent (FailoverWatch, as the fault suite
        does)."""
        watches = []
        for vm in victims:
            found = self.protected(vm)
            if found is not None and found[0] == host:
                to = found[1].secondary_host
                watch = FailoverWatch(self.lab, to, vm.id)
                watch.start()
                watches.append((vm, to, watch))
        t0 = time.monotonic()
        inject()

        def timed(vm: SoakVm, to: str, watch: FailoverWatch) -> None:
            watch.join(30)
            watch.stop.set()
            if watch.seen_at is not None:
                self.failovers_ms.append((watch.seen_at - t0) * 1000)
                self.tl.say(f"REACTION {vm.name}: failover to {to} "
                            f"{(watch.seen_at - t0) * 1000:.0f} ms after the fault")
        for args in watches:
            threading.Thread(target=timed, args=args, daemon=True).start()

    def heal(self, fault: Fault) -> None:
        ctl = self.lab.control
        try:
            if fault.kind == "engine-down":
                ctl("engine-down", up=True)
            elif fault.kind == "host-crash":
                ctl("host-revive", host=fault.hosts[0])
                with self.state_lock:
                    self.crashed_hosts.discard(fault.hosts[0])
            elif fault.kind == "agent-crash":
                ctl("agent-crash", host=fault.hosts[0], restart=True)
                with self.state_lock:
                    self.crashed_agents.discard(fault.hosts[0])
            elif fault.kind == "etcd-crash":
                ctl("etcd-crash", host=fault.hosts[0], restart=True)
                self.crashed_etcd.discard(fault.hosts[0])
            elif fault.kind == "partition":
                ctl("partition", a=fault.hosts[0], b=fault.hosts[1], heal=True)
            elif fault.kind == "slow-link":
                ctl("slow-link", host=fault.hosts[0], clear=True)
            else:
                ctl("disk-full", host=fault.hosts[0], undo=True)
        except Exception as e:
            self.break_(f"healing {fault.kind} {fault.hosts} failed: {e}")
        self.tl.say(f"HEAL {fault.kind} {' '.join(fault.hosts)}")

    def run(self, minutes: float) -> None:
        end = time.monotonic() + minutes * 60
        next_at = time.monotonic() + self.rng.uniform(*GAP_S)
        while time.monotonic() < end and not self.stop.is_set():
            now = time.monotonic()
            for fault in [f for f in self.active if f.heal_at <= now]:
                self.active.remove(fault)
                self.heal(fault)
            if now >= next_at:
                if len(self.active) < MAX_ACTIVE:
                    self.inject()
                next_at = now + self.rng.uniform(*GAP_S)
            time.sleep(0.2)
        for fault in list(self.active):
            self.active.remove(fault)
            self.heal(fault)


# ---------------------------------------------------------------- the lab

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_cli(lab_dir: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftlab.cli", "lab", "--lab-dir", lab_dir,
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def keep_logs(lab_dir: str, dest: str) -> int:
    """Copy every log of the lab (supervisor, poller, agents, libvirtd, QEMU domains, etcd)
    to dest, keeping their paths; `lab down` deletes them with the lab."""
    kept = 0
    for root, _, files in os.walk(lab_dir):
        for name in files:
            if not name.endswith(".log"):
                continue
            src = os.path.join(root, name)
            to = os.path.join(dest, os.path.relpath(src, lab_dir))
            os.makedirs(os.path.dirname(to), exist_ok=True)
            shutil.copyfile(src, to)
            kept += 1
    return kept


def start_vm(lab: Lab, tl: Timeline, index: int) -> SoakVm:
    vms = lab.conn.system_service().vms_service()
    name = f"nemesis{index}-{uuid.uuid4().hex[:4]}"
    vm = vms.add(types.Vm(name=name, cluster=types.Cluster(name="Default"),
                          template=types.Template(name=IDLE_TEMPLATE), memory=128 * MiB,
                          custom_properties=[types.CustomProperty(name="ft", value="true")]))
    svc = vms.vm_service(vm.id)
    svc.start()
    got = wait_up(svc, name, START_TIMEOUT_S)
    tl.say(f"{name} ({vm.id}) Up on {got.host.id}")
    return SoakVm(vm.id, name)


def wait_all_protected(soak: Soak, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(soak.vms)
    while pending and time.monotonic() < deadline:
        pending = [vm for vm in pending if soak.protected(vm) is None]
        time.sleep(1.0)
    for vm in pending:
        found = soak.primary_status(vm)
        soak.break_(f"{vm.name} not Protected within {timeout:.0f}s: "
                    f"{found[1].state.value + ' ' + found[1].reason if found else 'no primary'}")
    return not pending


def soak_on(lab: Lab, args: argparse.Namespace, tl: Timeline) -> Soak:
    # Pair records are the agents' keys: read them as an agent does (vdsm_ft/etcdroles.py).
    arbiter = host_arbiter(hostconfig.load(lab.state.hosts[0].agent_config))
    vms = [start_vm(lab, tl, i) for i in range(args.vms)]
    soak = Soak(lab, vms, random.Random(args.seed), tl, arbiter)
    if not wait_all_protected(soak, START_TIMEOUT_S):
        return soak
    threads = [threading.Thread(target=soak.checker, daemon=True)]
    threads += [threading.Thread(target=soak.writer, args=(vm,), daemon=True) for vm in vms]
    for t in threads:
        t.start()
    try:
        soak.run(args.minutes)
        tl.say(f"faults over; waiting up to {SETTLE_S:.0f}s for every VM to be Protected")
        settled = wait_all_protected(soak, SETTLE_S)
    finally:
        soak.stop.set()
        for t in threads:
            t.join(COVER_TIMEOUT_S + 10)
    if settled:
        soak.check_once()
        for vm in vms:
            live = live_outside_colo(copies(lab.state, vm.name))
            if len(live) != 1:
                soak.break_(f"{vm.name} ends with {len(live)} live copies: {live}")
            found = soak.primary_status(vm)
            if found is not None:
                soak.check_blocks(vm, found[0], None)
        soak.check_arbiter()
    for vm in vms:
        remove_ft_vm(lab, tl, vm.name, vm.id)
    return soak


def report(soak: Soak, args: argparse.Namespace) -> dict:
    result = {"seed": args.seed, "minutes": args.minutes, "vms": args.vms,
              "faults": soak.faults_drawn, "writes": soak.writes, "covered": soak.covered,
              "broken": soak.broken, "failovers": soak.failovers_seen,
              "failover_ms": soak.failovers_ms,
              "reprotect_s": soak.reprotect_s}
    print(f"\nnemesis seed {args.seed}, {args.minutes} min, {args.vms} VMs on {HOSTS} hosts")
    print("faults fired: " + ", ".join(f"{k} {n}" for k, n in soak.faults_drawn.items()))
    print(f"writes {soak.writes}, covered {soak.covered}, failovers seen "
          f"{soak.failovers_seen} ({len(soak.failovers_ms)} timed)")
    if soak.failovers_ms:
        print(f"failover (fault -> survivor primary): {fmt(summary(soak.failovers_ms))}")
    if soak.reprotect_s:
        print(f"re-protection (failover seen -> Protected): "
              f"{fmt(summary(soak.reprotect_s), unit='s')}")
    if soak.broken:
        print(f"INVARIANTS BROKEN ({len(soak.broken)}), replay with --seed {args.seed}:")
        for b in soak.broken:
            print(f"  {b}")
    else:
        print(f"every invariant held (seed {args.seed})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--vms", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--logs", help="keep the lab's logs here (by default only when an "
                                       "invariant broke, under /var/tmp)")
    args = parser.parse_args()
    tl = Timeline()
    tl.say(f"nemesis: seed {args.seed}, {args.minutes} min, {args.vms} VMs")
    parent = tempfile.mkdtemp(prefix="ftn-", dir="/var/tmp")
    os.chmod(parent, 0o755)                # QEMU (libvirt-qemu) traverses into the lab dir
    lab_dir = os.path.join(parent, "lab")
    try:
        up = lab_cli(lab_dir, "up", "--hosts", str(HOSTS), "--engine-port",
                     str(_free_port()), timeout=700)
        if up.returncode != 0:
            print(f"lab up failed:\n{up.stdout}\n{up.stderr}", file=sys.stderr)
            return 2
        tl.say("lab up, 4 hosts")
        lab = Lab(read_state(lab_dir))
        soak = None
        try:
            soak = soak_on(lab, args, tl)
        finally:
            lab.close()
            logs = args.logs or (None if soak is not None and not soak.broken else
                                 f"/var/tmp/nemesis-seed{args.seed}-{int(time.time())}")
            if logs:
                tl.say(f"{keep_logs(lab_dir, logs)} lab logs kept in {logs}")
    finally:
        down = lab_cli(lab_dir, "down", timeout=180)
        tl.say(f"lab down: exit {down.returncode}")
        os.rmdir(parent)
    result = report(soak, args)
    if args.json:
        dump_json(args.json, result)
    return 1 if soak.broken else 0


if __name__ == "__main__":
    sys.exit(main())
