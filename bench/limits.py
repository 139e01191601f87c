"""Limits per protected VM: the idle guest protected by the real agents across VM shapes.

Shapes vary one dimension at a time from a base of 1 vCPU, 128 MiB, 1 disk, 1 NIC:
vCPUs 1, 2, 4, 8; RAM 128 MiB, 1, 4, 8 GiB; disks 1, 4, 16; NICs 1, 4. Each shape gets
a fresh VM on lab host a (real hooks, `AgentLab.start_vm`), and:

- **protect**: a -> b as the poller asks; timed from the request until both agents
  report Protected;
- **first checkpoint**: COLO's first checkpoint is the full migration of the guest's
  RAM. A thread polls the primary's `query-migrate` through libvirt's monitor every
  POLL_S: from the first `active` reply to the first `colo` reply is its time (within a
  poll step each end), and the last `ram.transferred` seen while `active` its size (a
  lower bound: the last poll step is missing);
- **pauses**: the primary agent's `last_checkpoint_pause_ms` as protection is reached
  (the first checkpoint's pause: the migration's final stop), after the next checkpoint
  (the first COLO checkpoint, which took 370-660 ms where later ones took tens: kept
  apart), then after each of STEADY_CHECKPOINTS more (the steady pause; median, max);
- **memory**: VmRSS of the primary's and the secondary's QEMU, then;
- **primary failover**: a pattern written through every disk, two checkpoints, the
  primary's QEMU SIGKILLed; b must run the VM outside COLO with every disk's pattern
  and no pattern where none was written;
- **secondary failover**: b protects onto host c, a second pattern on every disk, two
  checkpoints, c's secondary QEMU SIGKILLed; b must carry on with both patterns and take
  a third write on every disk.

A shape passes only if every step does; a failure gives the step and the reason.
Before a shape starts, the machine's MemAvailable must hold what placement counts for
it (the guest's RAM on the primary, twice on the secondary, docs/decisions.md D2) plus
MEMORY_MARGIN_MIB for QEMU and the lab; otherwise the shape is refused, with the numbers.

    .venv/bin/python bench/limits.py [--dimensions vcpus,memory,disks,nics]
        [--shapes 1x128x1x1,...] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback
from typing import Any

import libvirt
import libvirt_qemu

from colo_report import dump_json, machine, print_machine, subset, summary

from ftlab.agentlab import MiB, AgentLab, LabVm, VmShape
from ftlab.diskprobe import pattern_matches, write_pattern
from ftlab.monitor import LibvirtMonitor
from vdsm_ft.api import Role, VmState
from vdsm_ft.layout import Disk, VmLayout

A, B, C = "lm-a", "lm-b", "lm-c"
BASE = VmShape()
DIMENSIONS: dict[str, tuple[VmShape, ...]] = {
    "vcpus": tuple(VmShape(vcpus=n) for n in (1, 2, 4, 8)),
    "memory": tuple(VmShape(memory_mib=m) for m in (128, 1024, 4096, 8192)),
    "disks": tuple(VmShape(disks=n) for n in (1, 4, 16)),
    "nics": tuple(VmShape(nics=n) for n in (1, 4)),
}
POLL_S = 0.01
STEADY_CHECKPOINTS = 5
MEMORY_MARGIN_MIB = 1024
BLOCK = 64 * 1024
DISK_SIZE = 64 * MiB
PROTECT_TIMEOUT_S = 300.0
FAILOVER_TIMEOUT_S = 15.0
CHECKPOINT_TIMEOUT_S = 60.0


class ShapeFailed(Exception):
    """A step of a shape failed; the message names the step."""


def parse_shape(text: str) -> VmShape:
    """`VCPUSxMIBxDISKSxNICS`, e.g. 4x128x4x2."""
    vcpus, mib, disks, nics = (int(x) for x in text.split("x"))
    return VmShape(vcpus=vcpus, memory_mib=mib, disks=disks, nics=nics)


def mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def memory_refusal(shape: VmShape, available_mib: int) -> str | None:
    """Why this machine cannot hold the shape's pair, or None."""
    needed = 3 * shape.memory_mib + MEMORY_MARGIN_MIB
    if needed <= available_mib:
        return None
    return (f"refused before start: the pair needs {shape.memory_mib} MiB on the primary "
            f"and {2 * shape.memory_mib} MiB on the secondary (2x: guest RAM plus COLO's "
            f"RAM cache), + {MEMORY_MARGIN_MIB} MiB margin = {needed} MiB, but this "
            f"machine has {available_mib} MiB available (both hosts share it here)")


class MigratePoller:
    """Polls the primary's `query-migrate` through libvirt until COLO begins."""

    def __init__(self, uri: str, domain: str):
        self.uri, self.domain = uri, domain
        self.active_at: float | None = None
        self.colo_at: float | None = None
        self.transferred = 0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = libvirt.open(self.uri)
        try:
            dom = None
            while not self._stop.is_set():
                try:
                    dom = dom or conn.lookupByName(self.domain)
                    reply = json.loads(libvirt_qemu.qemuMonitorCommand(
                        dom, '{"execute": "query-migrate"}', 0))["return"]
                except libvirt.libvirtError:
                    dom = None      # not started yet, or going
                    reply = {}
                now = time.monotonic()
                status = reply.get("status")
                if status == "active":
                    self.active_at = self.active_at or now
                    self.transferred = reply.get("ram", {}).get("transferred",
                                                                self.transferred)
                elif status == "colo":
                    self.colo_at = now
                    return
                time.sleep(POLL_S)
        except Exception as exc:   # reported with the shape's result
            self.error = exc
        finally:
            conn.close()

    def __enter__(self) -> "MigratePoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _layout(lab: AgentLab, host: str, vm: LabVm, index: int) -> tuple[VmLayout, Disk]:
    run_dir = os.path.join(lab.agent(host).run_dir, "vms", vm.vm_id)
    disk = Disk(index=index, image="", size=DISK_SIZE)
    return VmLayout(vm.vm_id, vm.name, run_dir, (disk,)), disk


def write_all(lab: AgentLab, host: str, vm: LabVm, disks: int, offset: int,
              pattern: int) -> None:
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    for i in range(disks):
        layout, disk = _layout(lab, host, vm, i)
        write_pattern(mon, layout, disk, offset, BLOCK, pattern)


def missing(lab: AgentLab, host: str, vm: LabVm, disks: int, offset: int,
            pattern: int, present: bool = True) -> list[int]:
    """The disks on which the pattern is not as expected (present, or absent)."""
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    out = []
    for i in range(disks):
        layout, disk = _layout(lab, host, vm, i)
        if pattern_matches(mon, layout, disk, offset, BLOCK, pattern) != present:
            out.append(i)
    return out


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def step(name: str, check: bool, detail: str) -> None:
    if not check:
        raise ShapeFailed(f"{name}: {detail}")


def shape_check(lab: AgentLab, host: str, vm: LabVm, shape: VmShape) -> None:
    """The primary QEMU really has the shape: vCPUs and quorum disks as QEMU counts
    them, NICs as libvirt does."""
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    cpus = len(mon.execute("query-cpus-fast"))
    quorums = sum(1 for n in mon.execute("query-named-block-nodes", {"flat": True})
                  if n["node-name"].startswith("ft-quorum"))
    conn = lab.host(host).connect()
    try:
        nics = conn.lookupByName(vm.name).XMLDesc(0).count("<interface ")
    finally:
        conn.close()
    step("shape", (cpus, quorums, nics) == (shape.vcpus, shape.disks, shape.nics),
         f"the primary has {cpus} vCPUs, {quorums} quorum disks, {nics} NICs")
    balloon = mon.execute("query-balloon")["actual"] // MiB
    step("shape", balloon == shape.memory_mib, f"the primary has {balloon} MiB")


def failover_check(lab: AgentLab, host: str, vm: LabVm, name: str) -> float:
    """The survivor on `host` runs the VM alone after one more failover; its time (ms,
    the agent's own clock from detection)."""
    after = lab.wait_status(host, vm.vm_id, VmState.NEED_SECONDARY,
                            timeout=FAILOVER_TIMEOUT_S, poll=0.05)
    last = after.last_failover
    step(name, after.role is Role.PRIMARY and last is not None and last.to_host == host,
         f"unexpected survivor status {after}")
    mon = LibvirtMonitor(lab.host(host).uri, vm.name)
    mode = mon.execute("query-colo-status")["mode"]
    state = mon.execute("query-status")["status"]
    step(name, mode == "none" and state == "running",
         f"survivor in COLO mode {mode!r}, {state}")
    assert last is not None
    return last.duration_ms


def run_shape(lab: AgentLab, shape: VmShape, r: dict[str, Any]) -> None:
    """Every measure of one shape, into `r` as they come; raises ShapeFailed with the
    step that failed."""
    try:
        vm = lab.start_vm(A, shape=shape)
    except Exception as exc:
        raise ShapeFailed(f"start: {exc}") from None
    try:
        lab.wait_status(A, vm.vm_id, VmState.NEED_SECONDARY, timeout=60)
        shape_check(lab, A, vm, shape)
        with MigratePoller(lab.host(A).uri, vm.name) as first:
            t0 = time.monotonic()
            try:
                lab.protect(vm, A, B, timeout=PROTECT_TIMEOUT_S)
            except Exception as exc:
                raise ShapeFailed(f"protect: {str(exc).splitlines()[0]}") from None
            r["protect_s"] = time.monotonic() - t0
        if first.active_at is not None and first.colo_at is not None:
            r["first_checkpoint_ms"] = (first.colo_at - first.active_at) * 1000
            r["first_checkpoint_mib"] = first.transferred / MiB
        r["first_pause_ms"] = lab.status(A, vm.vm_id).last_checkpoint_pause_ms
        r["steady_pause_ms"] = steady = []
        for _ in range(1 + STEADY_CHECKPOINTS):
            try:
                lab.wait_checkpoints(A, vm.vm_id, count=1, timeout=CHECKPOINT_TIMEOUT_S)
            except Exception as exc:
                raise ShapeFailed(f"steady checkpoints: {exc}; agent says "
                                  f"{lab.status(A, vm.vm_id)}") from None
            steady.append(lab.status(A, vm.vm_id).last_checkpoint_pause_ms)
        r["first_colo_pause_ms"] = steady.pop(0)
        r["rss_primary_mib"] = rss_mib(lab.qemu_pid(A, vm.name))
        r["rss_secondary_mib"] = rss_mib(lab.qemu_pid(B, vm.secondary_name))

        write_all(lab, A, vm, shape.disks, 0, 0x51)
        lab.wait_checkpoints(A, vm.vm_id, timeout=2 * CHECKPOINT_TIMEOUT_S)
        os.kill(lab.qemu_pid(A, vm.name) or 0, 9)
        r["primary_failover_ms"] = failover_check(lab, B, vm, "primary failover")
        lost = missing(lab, B, vm, shape.disks, 0, 0x51)
        step("primary failover", not lost, f"written data missing on disk(s) {lost}")
        extra = missing(lab, B, vm, shape.disks, 1 * MiB, 0x51, present=False)
        step("primary failover", not extra, f"data where none was written: {extra}")

        try:
            lab.protect(vm, B, C, timeout=PROTECT_TIMEOUT_S)
        except Exception as exc:
            raise ShapeFailed(f"re-protect: {str(exc).splitlines()[0]}") from None
        write_all(lab, B, vm, shape.disks, 2 * MiB, 0x52)
        lab.wait_checkpoints(B, vm.vm_id, timeout=2 * CHECKPOINT_TIMEOUT_S)
        os.kill(lab.qemu_pid(C, vm.secondary_name) or 0, 9)
        r["secondary_failover_ms"] = failover_check(lab, B, vm, "secondary failover")
        write_all(lab, B, vm, shape.disks, 3 * MiB, 0x53)
        for offset, pattern in ((0, 0x51), (2 * MiB, 0x52), (3 * MiB, 0x53)):
            lost = missing(lab, B, vm, shape.disks, offset, pattern)
            step("secondary failover", not lost,
                 f"pattern {pattern:#x} missing on disk(s) {lost}")
    finally:
        lab.remove_vm(vm)


def row(shape: VmShape, r: dict[str, Any]) -> str:
    def num(key: str, f: str = ".0f") -> str:
        v = r.get(key)
        return "-" if v is None else format(v, f)
    steady = [p for p in r.get("steady_pause_ms", []) if p is not None]
    pause = (f"{sorted(steady)[len(steady) // 2]:.1f}/{max(steady):.1f}" if steady
             else "-")
    return (f"  {shape.vcpus:>2} vCPU {shape.memory_mib:>5} MiB {shape.disks:>2} disk "
            f"{shape.nics} NIC | protect {num('protect_s', '.1f')} s | first ckpt "
            f"{num('first_checkpoint_ms')} ms {num('first_checkpoint_mib', '.1f')} MiB | "
            f"first pause {num('first_pause_ms', '.1f')} ms, first COLO "
            f"{num('first_colo_pause_ms', '.1f')} ms | steady pause p50/max {pause} ms"
            f" | RSS {num('rss_primary_mib')}/{num('rss_secondary_mib')} MiB | "
            f"failover pri {num('primary_failover_ms', '.1f')} sec "
            f"{num('secondary_failover_ms', '.1f')} ms | {r['result']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dimensions", default=",".join(DIMENSIONS),
                        help="comma-separated subset of " + ",".join(DIMENSIONS))
    parser.add_argument("--shapes", default="",
                        help="comma-separated VCPUSxMIBxDISKSxNICS shapes instead")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.shapes:
        try:
            shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
        except ValueError:
            parser.error("--shapes: VCPUSxMIBxDISKSxNICS, e.g. 4x128x4x2")
    else:
        shapes = []
        for dim in subset(parser, args.dimensions, tuple(DIMENSIONS), "--dimensions"):
            shapes += [s for s in DIMENSIONS[dim] if s not in shapes]
    info = machine()
    print_machine(info)
    results: list[dict[str, Any]] = []
    with AgentLab("lm") as lab:
        for shape in shapes:
            refusal = memory_refusal(shape, mem_available_mib())
            r: dict[str, Any] = {"shape": vars(shape).copy()}
            if refusal:
                r["result"] = refusal
            else:
                try:
                    run_shape(lab, shape, r)
                    r["result"] = "pass"
                except ShapeFailed as exc:
                    r["result"] = f"FAIL at {exc}"
                    print(lab.agent_logs(30), flush=True)
                except Exception as exc:   # the matrix goes on; the reason is kept
                    r["result"] = f"FAIL: {exc!r}"
                    traceback.print_exc()
            results.append(r)
            print(row(shape, r), flush=True)
    passed = [r for r in results if r["result"] == "pass"]
    if passed:
        print("protect time over passing shapes: "
              f"{summary([r['protect_s'] for r in passed])}")
    if args.json:
        dump_json(args.json, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
