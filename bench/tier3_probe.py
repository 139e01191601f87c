"""Tier 3 benchmark: the Linux test guest's service across COLO failovers, as a client
sees it. Under KVM where KVM runs the guest at speed; else under TCG with the project's
QEMU patches (tier 3T); else it says why it cannot measure.

Probe (skipped with --tcg): the Linux test guest (`ftlab.guest`: distribution kernel +
busybox initramfs, HTTP counter on its disk, TCP echo) is started under KVM by a lab
host's libvirtd from the generated primary XML. It passes when, within --boot-timeout,
the guest prints its READY line on the serial console AND its HTTP counter answers a
client on the guest segment. Otherwise, unless the lab's FT QEMU is the project's COLO
build (`ftlab.vdsmdriver.tcg_colo_refusal`), the script prints

    tier 3: not measurable here: <reason, with what was measured>

and exits 0. It never prints a number it did not measure. `--probe-only` stops after
the KVM probe (the demo uses it).

Measurement, in one run, with one client in its own network namespace that sends
back-to-back HTTP GETs to the counter (a new TCP connection each) and one TCP echo
connection held open throughout (`ftlab.echoclient`):
1. requests per second unprotected (WINDOW_S);
2. protected onto a second lab host (`vdsm_ft.colo`): requests per second at
   x-checkpoint-delay 20000, 2000 and 200 ms (WINDOW_S each, changed live);
3. at 2000 ms, the primary's QEMU is SIGKILLed and `colo.failover_secondary` runs right
   after the kill (detection excluded, as in colo_failover.py): the client-visible gap
   (last reply before the kill to the first after it);
4. the survivor is re-protected onto the first host, then the secondary's QEMU is
   SIGKILLed and `colo.failover_primary` runs: the gap again;
5. whether the echo connection survived both, and whether the counter the client saw
   was lost, repeated or unanswered.

    .venv/bin/python bench/tier3_probe.py [--tcg] [--json out.json]
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
    from ftlab.counterclient import CounterClient

GUEST_IP = "10.78.0.10"
CLIENT_IP = "10.78.0.200"
BOOT_TIMEOUT_S = 60.0
TCG_BOOT_TIMEOUT_S = 90.0
DELAYS_MS = (20000, 2000, 200)
FAILOVER_DELAY_MS = 2000
WINDOW_S = 20.0
SETTLE_S = 2.0
AFTER_FAILOVER_S = 5.0
RESUME_TIMEOUT_S = 30.0
TCG_MODE = "TCG, with the project's QEMU patches"


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


def probe_kvm(lab: "BenchLab", client_ns: str, kvm_kind: str, timeout: float
              ) -> tuple["ColoPair | None", "Member | None", float, str]:
    """Start the Linux guest under KVM: (pair, primary, seconds to serving, "") or
    (None, None, 0, why not)."""
    from colo_lab import wait_serving

    from ftlab import guest
    from ftlab.colopair import ColoPair

    vm_id = str(uuid.uuid4())
    disk = guest.install_disk(guest.build_linux_disk(guest.GuestNet(GUEST_IP)),
                              lab.hosts[0].path("images", f"{vm_id}.qcow2"))
    serial_log = lab.hosts[0].path("images", f"{vm_id}.serial")
    xml = guest.engine_domain_xml(guest.EngineVm(
        name=f"b3-{vm_id[:8]}", disk=disk, vm_id=vm_id, mac=guest.guest_mac(1),
        memory_mib=256, domain_type="kvm", serial_log=serial_log))
    pair = ColoPair(xml)
    primary = pair.start_primary(lab.hosts[0])
    served = wait_serving(serial_log, client_ns, GUEST_IP, timeout)
    if served is not None:
        return pair, primary, served, ""
    tail = _serial_tail(serial_log)
    ready = os.path.exists(serial_log) and guest.READY_LINE.encode() in open(
        serial_log, "rb").read()
    pair.destroy_all()
    if not ready:
        return None, None, 0.0, (
            f"the Linux test guest under KVM did not print {guest.READY_LINE} within "
            f"{timeout:.0f} s of domain start ({tail}); {kvm_kind} here does not run a "
            "Linux guest at speed")
    return None, None, 0.0, (f"the guest under KVM printed {guest.READY_LINE} but its "
                             f"HTTP counter did not answer the client by {timeout:.0f} s")


def start_tcg(lab: "BenchLab", client_ns: str) -> tuple["ColoPair", "Member", float]:
    from colo_lab import BenchError, wait_serving

    pair, serial_log = lab.new_linux_pair(GUEST_IP)
    primary = pair.start_primary(lab.hosts[0])
    served = wait_serving(serial_log, client_ns, GUEST_IP, TCG_BOOT_TIMEOUT_S)
    if served is None:
        raise BenchError(f"the Linux test guest under TCG did not serve within "
                         f"{TCG_BOOT_TIMEOUT_S:.0f} s ({_serial_tail(serial_log)})")
    return pair, primary, served


def _rate(client: "CounterClient", seconds: float) -> dict[str, float]:
    """Requests per second over the next `seconds`, and the p99 time between replies."""
    from colo_report import percentile

    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    times = [r.t for r in client.snapshot() if r.value is not None and t0 <= r.t < t1]
    between = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    return {"rps": len(times) / (t1 - t0),
            "p99_between_ms": percentile(between, 99) if between else 0.0}


def _gap(client: "CounterClient", t_kill: float) -> float | None:
    """The client-visible gap of the kill at `t_kill`; None if no reply came within
    RESUME_TIMEOUT_S after it (a finding to report, not a number)."""
    from ftlab import counterclient

    deadline = t_kill + RESUME_TIMEOUT_S
    while time.monotonic() < deadline and not client.values_after(t_kill):
        time.sleep(0.1)
    time.sleep(AFTER_FAILOVER_S)
    return counterclient.gap_ms(client.snapshot(), t_kill)


def _shown(gap: float | None) -> str:
    return f"{gap:.0f} ms" if gap is not None else \
        f"no reply within {RESUME_TIMEOUT_S:.0f} s after the kill"


def measure(lab: "BenchLab", pair: "ColoPair", primary: "Member",
            client_ns: str) -> dict[str, Any]:
    from ftlab import counterclient, echoclient
    from vdsm_ft import colo

    client = counterclient.CounterClient(client_ns, GUEST_IP)
    echo = echoclient.EchoClient(client_ns, GUEST_IP)
    out: dict[str, Any] = {}
    try:
        time.sleep(SETTLE_S)
        out["unprotected"] = _rate(client, WINDOW_S)
        print(f"unprotected: {out['unprotected']['rps']:.1f} req/s", flush=True)
        secondary, ep = pair.start_secondary(lab.hosts[1], primary, generation=1)
        pair.protect(primary, secondary, ep, checkpoint_delay_ms=DELAYS_MS[0])
        out["colo"] = {}
        for delay in DELAYS_MS:
            colo.set_checkpoint_delay(primary.qmp, delay)
            time.sleep(SETTLE_S)
            out["colo"][str(delay)] = _rate(client, WINDOW_S)
            print(f"COLO at x-checkpoint-delay {delay} ms: "
                  f"{out['colo'][str(delay)]['rps']:.1f} req/s", flush=True)
        colo.set_checkpoint_delay(primary.qmp, FAILOVER_DELAY_MS)
        time.sleep(SETTLE_S)
        primary.kill()
        t_kill = time.monotonic()
        colo.failover_secondary(secondary.qmp, secondary.layout)
        out["failover_call_primary_kill_ms"] = (time.monotonic() - t_kill) * 1000
        out["gap_primary_kill_ms"] = _gap(client, t_kill)
        print(f"primary killed: client gap {_shown(out['gap_primary_kill_ms'])}", flush=True)
        survivor = secondary
        secondary, ep = pair.start_secondary(lab.hosts[0], survivor, generation=2)
        pair.protect(survivor, secondary, ep, checkpoint_delay_ms=FAILOVER_DELAY_MS)
        time.sleep(AFTER_FAILOVER_S)
        secondary.kill()
        t_kill = time.monotonic()
        colo.failover_primary(survivor.qmp, survivor.layout)
        out["failover_call_secondary_kill_ms"] = (time.monotonic() - t_kill) * 1000
        out["gap_secondary_kill_ms"] = _gap(client, t_kill)
        print(f"secondary killed: client gap {_shown(out['gap_secondary_kill_ms'])}",
              flush=True)
    finally:
        replies = client.stop()
        echoes = echo.stop()
    ok = [r for r in replies if r.value is not None]
    values = [r.value for r in ok]
    out.update(requests_ok=len(ok), errors=len(replies) - len(ok),
               repeated=len(counterclient.forks(replies)),
               skipped=sum(b - a - 1 for a, b in zip(values, values[1:]) if b > a + 1),
               echo=echoclient.fate(echoes), echo_broken=any(e.error for e in echoes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--tcg", action="store_true",
                        help=f"skip the KVM probe and measure under {TCG_MODE}")
    parser.add_argument("--probe-only", action="store_true",
                        help="only say whether KVM runs the Linux guest at speed")
    parser.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT_S,
                        help="seconds the guest under KVM gets to serve (probe)")
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from colo_lab import BenchLab
    from colo_report import dump_json, machine, print_machine

    from ftlab import netns, qemubuild
    from ftlab.vdsmdriver import tcg_colo_refusal

    info = machine()
    print_machine(info)
    kvm_kind = "nested KVM" if info["virtualization"].startswith("virtualized") else "KVM"
    with BenchLab("b3") as lab:
        client_ns = netns.add_client("b3-client", CLIENT_IP, 1,
                                     wire=netns.netns_name(lab.wire))
        try:
            pair, why_not = None, "skipped (--tcg)"
            if not args.tcg:
                if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                    why_not = "/dev/kvm is missing or not usable"
                else:
                    pair, primary, boot_s, why_not = probe_kvm(lab, client_ns, kvm_kind,
                                                               args.boot_timeout)
            if pair is not None:
                mode = "KVM"
                print(f"tier 3 probe: Linux guest under KVM served its counter "
                      f"{boot_s:.1f} s after domain start")
            elif args.probe_only:
                not_measurable(why_not)
            else:
                refusal = tcg_colo_refusal()
                if refusal:
                    not_measurable(f"{why_not}; and {TCG_MODE} is not available: {refusal}")
                mode = TCG_MODE
                print(f"tier 3: KVM: {why_not}", flush=True)
                print(f"tier 3T: measuring under {TCG_MODE} ({qemubuild.describe()})",
                      flush=True)
                pair, primary, boot_s = start_tcg(lab, client_ns)
                print(f"Linux guest under TCG served its counter {boot_s:.1f} s after "
                      "domain start", flush=True)
            if args.probe_only:
                pair.destroy_all()
                return
            try:
                result = measure(lab, pair, primary, client_ns)
            finally:
                pair.destroy_all()
        finally:
            netns.delete(client_ns)
    print(f"=== tier 3 ({mode}) ===")
    print(f"requests/s: unprotected {result['unprotected']['rps']:.1f}; COLO "
          + ", ".join(f"{result['colo'][str(d)]['rps']:.1f} at {d} ms" for d in DELAYS_MS))
    print("p99 time between replies: unprotected "
          f"{result['unprotected']['p99_between_ms']:.0f} ms; COLO "
          + ", ".join(f"{result['colo'][str(d)]['p99_between_ms']:.0f} ms at {d} ms"
                      for d in DELAYS_MS))
    print(f"client-visible gap (detection excluded): primary kill "
          f"{_shown(result['gap_primary_kill_ms'])}, secondary kill "
          f"{_shown(result['gap_secondary_kill_ms'])} (failover calls "
          f"{result['failover_call_primary_kill_ms']:.0f} / "
          f"{result['failover_call_secondary_kill_ms']:.0f} ms)")
    print(f"counter seen by the client: {result['requests_ok']} replies, "
          f"{result['errors']} errors, {result['repeated']} repeated, "
          f"{result['skipped']} skipped values")
    print(f"echo connection: {result['echo']}")
    if args.json:
        dump_json(args.json, {"machine": info, "mode": mode, "boot_s": boot_s, **result})


if __name__ == "__main__":
    main()
