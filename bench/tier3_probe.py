"""Tier 3 probe: can this machine run the Linux test guest under KVM at speed? If so,
measure the client-visible gap across a COLO failover; if not, say why.

Probe: the Linux test guest (`ftlab.guest`: distribution kernel + busybox initramfs,
HTTP counter on its disk) is started under KVM by a lab host's libvirtd from the
generated primary XML. It passes when, within BOOT_TIMEOUT_S, the guest prints its
READY line on the serial console AND its HTTP counter answers a client on the guest
segment. Otherwise the script prints

    tier 3: not measurable here: <reason, with what was measured>

and exits 0. It never prints a number it did not measure.

Measurement (only after a passing probe): the guest is protected onto a second lab
host (`vdsm_ft.colo`, x-checkpoint-delay CHECKPOINT_DELAY_MS). A client in its own
network namespace sends back-to-back HTTP GETs to the counter; the primary's QEMU is
SIGKILLed and `colo.failover_secondary` runs right after the kill (detection excluded,
as in colo_failover.py). Reported: the client-visible gap (last reply before the kill
to the first reply after it), the longest gap between replies while protected, and
whether the counter the client saw was lost or repeated.

    .venv/bin/python bench/tier3_probe.py [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colo_lab import BenchLab
    from ftlab.colopair import ColoPair, Member

GUEST_IP = "10.78.0.10"
CLIENT_IP = "10.78.0.200"
BOOT_TIMEOUT_S = 60.0
CHECKPOINT_DELAY_MS = 2000
PROTECTED_WINDOW_S = 10.0
AFTER_FAILOVER_S = 10.0


# -- the probe and the measurement ----------------------------------------------------

def not_measurable(reason: str) -> None:
    print(f"tier 3: not measurable here: {reason}")
    sys.exit(0)


def _serial_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no serial output file)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (f"{len(text)} bytes of serial output, last line {lines[-1][:120]!r}"
            if lines else "no serial output at all")


def probe_boot(lab: "BenchLab", xml: str, serial_log: str, client_ns: str,
               kvm_kind: str = "KVM") -> tuple["ColoPair", "Member", float]:
    """Start the Linux guest under KVM; (pair, primary, seconds to ready) or exit."""
    from ftlab import counterclient, guest
    from ftlab.colopair import ColoPair

    pair = ColoPair(xml)
    t0 = time.monotonic()
    primary = pair.start_primary(lab.hosts[0])
    ready_at = None
    while time.monotonic() - t0 < BOOT_TIMEOUT_S:
        if ready_at is None and os.path.exists(serial_log):
            with open(serial_log, "rb") as f:
                if guest.READY_LINE.encode() in f.read():
                    ready_at = time.monotonic() - t0
        if ready_at is not None:
            if counterclient.ask_once(client_ns, GUEST_IP).value is not None:
                return pair, primary, time.monotonic() - t0
        time.sleep(0.5)
    tail = _serial_tail(serial_log)
    pair.destroy_all()
    if ready_at is None:
        not_measurable(f"the Linux test guest under KVM did not print "
                       f"{guest.READY_LINE} within {BOOT_TIMEOUT_S:.0f} s of domain start "
                       f"({tail}); {kvm_kind} here does not run a Linux guest at speed")
    not_measurable(f"the guest printed {guest.READY_LINE} after {ready_at:.1f} s but its "
                   f"HTTP counter did not answer the client by {BOOT_TIMEOUT_S:.0f} s")


def measure_gap(lab: "BenchLab", pair: "ColoPair", primary: "Member",
                client_ns: str) -> dict[str, Any]:
    from ftlab import counterclient
    from vdsm_ft import colo

    secondary, ep = pair.start_secondary(lab.hosts[1], primary, generation=1)
    pair.protect(primary, secondary, ep, checkpoint_delay_ms=CHECKPOINT_DELAY_MS)
    client = counterclient.CounterClient(client_ns, GUEST_IP)
    try:
        time.sleep(PROTECTED_WINDOW_S)
        primary.kill()
        t_kill = time.monotonic()
        colo.failover_secondary(secondary.qmp, secondary.layout)
        t_failover = time.monotonic() - t_kill
        time.sleep(AFTER_FAILOVER_S)
    finally:
        replies = client.stop()
    gap = counterclient.gap_ms(replies, t_kill)
    if gap is None:
        raise RuntimeError("the client saw no reply before the kill or none after it: "
                           "no gap to measure")
    ok = [r for r in replies if r.value is not None]
    values = [r.value for r in ok]
    before = [r.t for r in ok if r.t < t_kill]
    protected = [b - a for a, b in zip(before, before[1:])]
    return {"gap_ms": gap, "failover_call_ms": t_failover * 1000,
            "max_gap_protected_ms": max(protected, default=0.0) * 1000,
            "requests_ok": len(ok), "errors": len(replies) - len(ok),
            "repeated": len(counterclient.forks(replies)),
            "skipped": sum(b - a - 1 for a, b in zip(values, values[1:]) if b > a + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        not_measurable("/dev/kvm is missing or not usable")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from colo_lab import BenchLab
    from colo_report import dump_json, machine, print_machine

    from ftlab import guest, netns

    info = machine()
    print_machine(info)
    with BenchLab("b3") as lab:
        client_ns = netns.add_client("b3-client", CLIENT_IP, 1,
                                     wire=netns.netns_name(lab.wire))
        try:
            vm_id = str(uuid.uuid4())
            disk = guest.install_disk(guest.build_linux_disk(guest.GuestNet(GUEST_IP)),
                                      lab.hosts[0].path("images", f"{vm_id}.qcow2"))
            serial_log = lab.hosts[0].path("images", f"{vm_id}.serial")
            xml = guest.engine_domain_xml(guest.EngineVm(
                name=f"b3-{vm_id[:8]}", disk=disk, vm_id=vm_id, mac=guest.guest_mac(1),
                memory_mib=256, domain_type="kvm", serial_log=serial_log))
            kvm_kind = ("nested KVM" if info["virtualization"].startswith("virtualized")
                        else "KVM")
            pair, primary, boot_s = probe_boot(lab, xml, serial_log, client_ns, kvm_kind)
            print(f"tier 3 probe: Linux guest under KVM served its counter {boot_s:.1f} s "
                  "after domain start")
            try:
                result = measure_gap(lab, pair, primary, client_ns)
            finally:
                pair.destroy_all()
        finally:
            netns.delete(client_ns)
    print(f"client-visible gap across failover (primary SIGKILL, detection excluded): "
          f"{result['gap_ms']:.0f} ms; failover call {result['failover_call_ms']:.0f} ms; "
          f"longest gap while protected {result['max_gap_protected_ms']:.0f} ms")
    print(f"counter seen by the client: {result['requests_ok']} replies, "
          f"{result['errors']} errors, {result['repeated']} repeated, "
          f"{result['skipped']} skipped values")
    if args.json:
        dump_json(args.json, {"machine": info, "boot_s": boot_s, **result})


if __name__ == "__main__":
    main()
