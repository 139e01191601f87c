"""Time to Protected versus disk size, and ours against the same sequence by hand.

What is timed: from the call that starts protection (the primary already running, the
secondary already started by libvirtd and waiting in `inmigrate`; both QMP sessions
connected) until both sides report their COLO modes (`query-colo-status` primary /
secondary).

- ours: `colo.protect` (through `ColoPair.protect`), which returns only once both
  modes, the quorum's NBD child and every step are verified;
- raw (64 MiB only): the minimal QMP sequence by hand over a bare socket
  (`colo_rawqmp`): export, mirror until BLOCK_JOB_READY, stop, cancel, attach, cont,
  chardevs, filters, colo-compare, migrate, then poll both modes every POLL_S.

The guest is the idle KVM guest (128 MiB RAM, one NIC). Before each VM starts, the
first half of its qcow2 disk is written with a pattern (`qemu-io write -P 0x5a`), so the
resync mirror copies real data blocks: 32 MiB of 64, 128 of 256, 512 of 1024. The
secondary's replica starts blank. Each run is a fresh pair; ours and raw alternate.
One warm-up run of each (64 MiB) is made first and not counted: in two of three
invocations here the first protection in a fresh lab took 2-3x longer than later ones.

    .venv/bin/python bench/colo_protect_time.py [--runs 6] [--runs-1g 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from colo_lab import MiB, BenchError, BenchLab
from colo_rawqmp import RawQmp
from colo_report import dump_json, fmt, machine, print_machine, summary

from ftlab.colopair import Member
from vdsm_ft.layout import Endpoints

SIZES_MIB = (64, 256, 1024)
CHECKPOINT_DELAY_MS = 2000
POLL_S = 0.005
RESYNC_TIMEOUT_S = 600.0
STEP_TIMEOUT_S = 30.0
TARGET_RATIO = 1.2


def _inet(host: str, port: int) -> dict[str, Any]:
    return {"type": "inet", "data": {"host": host, "port": str(port)}}


def _socket(raw: RawQmp, chardev: str, addr: dict[str, Any], server: bool) -> None:
    data: dict[str, Any] = {"addr": addr, "server": server}
    if server:
        data["wait"] = False
    raw.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": data}})


def raw_protect(pri: RawQmp, sec: RawQmp, primary: Member, secondary: Member,
                ep: Endpoints) -> None:
    """docs/colo-facts.md, "Start and resync sequences", by hand, in our layout's names,
    checking nothing but replies."""
    pdisk, sdisk, nic = primary.layout.disks[0], secondary.layout.disks[0], \
        primary.layout.nics[0]
    sec.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-colo", "state": True}]})
    sec.execute("migrate-set-parameters", {"x-checkpoint-delay": CHECKPOINT_DELAY_MS})
    sec.execute("nbd-server-start", {"addr": _inet(ep.secondary_host, ep.nbd_port)})
    sec.execute("block-export-add", {"type": "nbd", "id": sdisk.export,
                                     "node-name": sdisk.parent, "writable": True})
    sec.execute("migrate-incoming", {"uri": f"tcp:{ep.secondary_host}:{ep.migration_port}"})

    pri.execute("blockdev-add", {"driver": "nbd", "node-name": pdisk.nbd_node,
                                 "server": {"type": "inet", "host": ep.secondary_host,
                                            "port": str(ep.nbd_port)},
                                 "export": sdisk.export, "detect-zeroes": "on"})
    since = len(pri.events)
    pri.execute("blockdev-mirror", {"job-id": "resync", "device": pdisk.quorum,
                                    "target": pdisk.nbd_node, "sync": "full"})
    pri.wait_event("BLOCK_JOB_READY", RESYNC_TIMEOUT_S, since, {"device": "resync"})
    pri.execute("stop")
    since = len(pri.events)
    pri.execute("block-job-cancel", {"device": "resync"})
    pri.wait_event("BLOCK_JOB_COMPLETED", STEP_TIMEOUT_S, since, {"device": "resync"})
    pri.execute("x-blockdev-change", {"parent": pdisk.quorum, "node": pdisk.nbd_node})
    pri.execute("cont")
    _socket(pri, nic.mirror_chardev, _inet(ep.primary_host, ep.mirror_ports[0]), True)
    _socket(pri, nic.compare_sec_chardev, _inet(ep.primary_host, ep.compare_ports[0]), True)
    for server, client in (nic.compare_pri_chardevs, nic.compare_out_chardevs):
        addr = {"type": "unix", "data": {"path": primary.layout.unix_socket(server)}}
        _socket(pri, server, addr, True)
        _socket(pri, client, addr, False)
    pri.execute("object-add", {"qom-type": "filter-mirror", "id": nic.filter_mirror,
                               "netdev": nic.netdev, "queue": "tx",
                               "outdev": nic.mirror_chardev, "vnet_hdr_support": True})
    pri.execute("object-add", {"qom-type": "filter-redirector", "id": nic.filter_redirect_in,
                               "netdev": nic.netdev, "queue": "rx",
                               "indev": nic.compare_out_chardevs[0],
                               "vnet_hdr_support": True})
    pri.execute("object-add", {"qom-type": "filter-redirector",
                               "id": nic.filter_redirect_out, "netdev": nic.netdev,
                               "queue": "rx", "outdev": nic.compare_pri_chardevs[0],
                               "vnet_hdr_support": True})
    pri.execute("object-add", {"qom-type": "iothread", "id": nic.iothread})
    pri.execute("object-add", {"qom-type": "colo-compare", "id": nic.compare,
                               "primary_in": nic.compare_pri_chardevs[1],
                               "secondary_in": nic.compare_sec_chardev,
                               "outdev": nic.compare_out_chardevs[1],
                               "iothread": nic.iothread, "vnet_hdr_support": True})
    pri.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-colo", "state": True}]})
    pri.execute("migrate-set-parameters", {"x-checkpoint-delay": CHECKPOINT_DELAY_MS})
    pri.execute("migrate", {"uri": f"tcp:{ep.secondary_host}:{ep.migration_port}"})
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not (sec.execute("query-colo-status")["mode"] == "secondary"
               and pri.execute("query-colo-status")["mode"] == "primary"):
        if time.monotonic() > deadline:
            raise BenchError(f"raw protect: not in COLO after {STEP_TIMEOUT_S}s: "
                             f"{pri.execute('query-migrate')}")
        time.sleep(POLL_S)


def one_run(lab: BenchLab, generation: int, size_mib: int, driver: str) -> float:
    """A fresh pair on a half-filled disk of `size_mib`; returns the time to Protected."""
    pair = lab.new_pair(size_mib * MiB, fill=size_mib * MiB // 2)
    try:
        primary = pair.start_primary(lab.hosts[0])
        secondary, ep = pair.start_secondary(lab.hosts[1], primary, generation)
        if driver == "ours":
            t0 = time.monotonic()
            pair.protect(primary, secondary, ep, checkpoint_delay_ms=CHECKPOINT_DELAY_MS)
            return (time.monotonic() - t0) * 1000
        # QEMU's monitor socket takes one client at a time: hand both over to raw.
        primary.qmp.close()
        secondary.qmp.close()
        pri = RawQmp(primary.layout.qmp_socket).connect()
        sec = RawQmp(secondary.layout.qmp_socket).connect()
        try:
            t0 = time.monotonic()
            raw_protect(pri, sec, primary, secondary, ep)
            return (time.monotonic() - t0) * 1000
        finally:
            pri.close()
            sec.close()
    finally:
        lab.drop_pair(pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=6,
                        help="runs per disk size (and of raw at 64 MiB)")
    parser.add_argument("--runs-1g", type=int, default=3, help="runs at 1 GiB")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print("time to Protected: protect call -> both sides in their COLO modes; "
          "disk half filled with data; fresh pair each run")
    samples: dict[str, list[float]] = {f"ours-{s}": [] for s in SIZES_MIB}
    samples["raw-64"] = []
    generation = 0
    with BenchLab("bp") as lab:
        for driver in ("ours", "raw"):
            generation += 1
            ms = one_run(lab, generation, 64, driver)
            print(f"     64 MiB (32 MiB data)  {driver:4}  warm-up {ms:8.1f} ms (not counted)",
                  flush=True)
        for size in SIZES_MIB:
            runs = args.runs_1g if size >= 1024 else args.runs
            for i in range(runs):
                drivers = ("ours",) if size != 64 else (
                    ("ours", "raw") if i % 2 == 0 else ("raw", "ours"))
                for driver in drivers:
                    generation += 1
                    ms = one_run(lab, generation, size, driver)
                    samples[f"{driver}-{size}"].append(ms)
                    print(f"  {size:5} MiB ({size // 2} MiB data)  {driver:4}  run {i + 1}"
                          f"  {ms:8.1f} ms", flush=True)
    result: dict[str, Any] = {"machine": info, "samples_ms": samples, "summary": {}}
    print()
    for key, values in samples.items():
        result["summary"][key] = s = summary(values)
        driver, size = key.split("-")
        print(f"{driver:4} {int(size):5} MiB: {fmt(s, keys=('min', 'p50', 'max'))}")
    ours, raw = result["summary"]["ours-64"], result["summary"]["raw-64"]
    ratio = ours["p50"] / raw["p50"]
    result["ratio_64_p50"] = ratio
    result["ratio_64_min"] = ours["min"] / raw["min"]
    result["ratio_64_mean"] = ours["mean"] / raw["mean"]
    print(f"ours / raw at 64 MiB: p50 {ratio:.2f}x (target <= {TARGET_RATIO}x: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); min "
          f"{result['ratio_64_min']:.2f}x; mean {result['ratio_64_mean']:.2f}x")
    if args.json:
        dump_json(args.json, result)


if __name__ == "__main__":
    main()
