"""Replication traffic of a pair, read from the kernel's TCP counters.

QEMU 7.2 shows no RAM statistics while in COLO (docs/colo-facts.md, "What reports the
state"), so the bytes the primary sent to its secondary (COLO migration stream and NBD
writes) come from `ss`: the `bytes_acked` of this host's established connections to the
secondary's ports.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterable

SS_TIMEOUT = 2.0
_ACKED = re.compile(r"\bbytes_acked:(\d+)")


def acked_bytes(peer_address: str, ports: Iterable[int]) -> int:
    wanted = {f"{peer_address}:{p}" for p in ports}
    try:
        proc = subprocess.run(["ss", "-Hnti", "state", "established"], capture_output=True,
                              text=True, timeout=SS_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    total = 0
    current_matches = False
    for line in proc.stdout.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            current_matches = len(fields) >= 4 and fields[3] in wanted
            continue
        if current_matches:
            match = _ACKED.search(line)
            if match:
                total += int(match.group(1))
    return total


class TrafficMeter:
    """Bytes and a rate between two readings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def read(self, peer_address: str, ports: Iterable[int]) -> int:
        total = acked_bytes(peer_address, ports)
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now > self._last[0] and total >= self._last[1]:
                self.rate = (total - self._last[1]) / (now - self._last[0])
            self._last = (now, total)
        return total
