"""Cost per getAllVmStats call of the after_get_all_vm_stats hook, through the VDSM stand-in's
JSON hook runner (ftlab/vdsm.py after_get_all_vm_stats): no hook installed, the shipped
hook's fast path (no entry Paused: its sh filter ends it), and side by side the same call
through a Python hook script with the same logic (the hook before the filter, whose fast
path was vmstats.run's own check). Prints milliseconds per call."""
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


PYTHON_HOOK = """#!/usr/bin/python3
import sys
from vdsm_ft import vmstats
sys.exit(vmstats.run())
"""


def python_hook_dir() -> str:
    root = tempfile.mkdtemp(prefix="bench-pyhook-")
    os.makedirs(os.path.join(root, "after_get_all_vm_stats"))
    script = os.path.join(root, "after_get_all_vm_stats", "50_ft")
    with open(script, "w", encoding="utf-8") as f:
        f.write(PYTHON_HOOK)
    os.chmod(script, 0o755)
    return root


def main() -> None:
    reports = [{"uuid": f"{i:08d}-0000-0000-0000-000000000000", "status": "up"}
               for i in range(VMS)]
    none = Vdsm(tempfile.mkdtemp(prefix="bench-nohooks-"), "qemu:///system")
    hooked = Vdsm(os.path.join(REPO, "hooks"), "qemu:///system", pythonpath=(REPO,))
    python = Vdsm(python_hook_dir(), "qemu:///system", pythonpath=(REPO,))
    for label, vdsm in (("no hook installed", none), ("hook, fast path", hooked),
                        ("python hook, before", python)):
        ms = per_call_ms(vdsm, reports)
        print(f"{label:20s} {VMS} VMs, {CALLS} calls: median {statistics.median(ms):.3f} ms,"
              f" p95 {sorted(ms)[int(CALLS * 0.95)]:.3f} ms")


if __name__ == "__main__":
    main()
