"""Summaries and the machine context printed with every COLO benchmark's numbers."""
from __future__ import annotations

import json
import math
import os
import platform
import argparse
import subprocess
from typing import Any


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): a value that was actually measured."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float | int]:
    return {"n": len(values), "min": min(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values), "mean": sum(values) / len(values)}


def fmt(s: dict[str, float | int], unit: str = "ms", keys: tuple[str, ...] = (
        "p50", "p90", "max")) -> str:
    return f"n={s['n']:<3} " + "  ".join(f"{k} {s[k]:8.1f} {unit}" for k in keys)


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    cpu, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    # This machine is itself a VM ("hypervisor" flag), so its /dev/kvm is nested KVM.
    virt = "virtualized (nested KVM)" if "hypervisor" in flags else "bare metal"
    virt += "; CPU flags: " + (" ".join(sorted(flags & {"svm", "vmx"})) or "no svm/vmx")
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_mib": mem_kib // 1024,
            "kernel": platform.release(), "qemu": _cmd(["qemu-system-x86_64", "--version"]),
            "libvirt": _cmd(["libvirtd", "--version"]), "kvm": os.path.exists("/dev/kvm"),
            "virtualization": virt, "loadavg": os.getloadavg()}


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_mib']} MiB, "
          f"kernel {info['kernel']}")
    print(f"         {info['qemu']}; {info['libvirt']}; /dev/kvm={info['kvm']}; "
          f"{info['virtualization']}")
    print("         load average at start: " + " ".join(f"{x:.2f}" for x in info['loadavg']))


def dump_json(path: str, result: dict[str, Any]) -> None:
    result = dict(result, loadavg_end=os.getloadavg())
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"json written to {path}")


def subset(parser: argparse.ArgumentParser, value: str, allowed: tuple[str, ...],
           flag: str) -> list[str]:
    """A comma-separated option's items, each one of `allowed` (else a usage error)."""
    chosen = [item for item in value.split(",") if item]
    if any(item not in allowed for item in chosen):
        parser.error(f"{flag}: choose among {', '.join(allowed)}")
    return chosen
