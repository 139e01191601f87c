"""Cost per getAllVmStats call of the after_get_all_vm_stats hook, through the VDSM stand-in's
JSON hook runner (ftlab/vdsm.py after_get_all_vm_stats): no hook installed, and the
installed hook's fast path (no entry Paused). Prints milliseconds per call."""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ftlab.vdsm import Vdsm  # noqa: E402

VMS = 20
CALLS = 200


def per_call_ms(vdsm: Vdsm, reports: list[dict]) -> list[float]:
    out = []
    for _ in range(CALLS):
        t = time.perf_counter()
        vdsm.after_get_all_vm_stats(reports)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    reports = [{"uuid": f"{i:08d}-0000-0000-0000-000000000000", "status": "up"}
               for i in range(VMS)]
    none = Vdsm(tempfile.mkdtemp(prefix="bench-nohooks-"), "qemu:///system")
    hooked = Vdsm(os.path.join(REPO, "hooks"), "qemu:///system", pythonpath=(REPO,))
    for label, vdsm in (("no hook installed", none), ("hook, fast path", hooked)):
        ms = per_call_ms(vdsm, reports)
        print(f"{label:20s} {VMS} VMs, {CALLS} calls: median {statistics.median(ms):.3f} ms,"
              f" p95 {sorted(ms)[int(CALLS * 0.95)]:.3f} ms")


if __name__ == "__main__":
    main()
