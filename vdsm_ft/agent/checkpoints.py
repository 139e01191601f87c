"""Checkpoint statistics from QMP events: rate, pause and lag.

Each checkpoint pauses the guest: QEMU emits STOP then RESUME on both sides
(docs/colo-facts.md, "Checkpoints: STOP, then RESUME"). Their QEMU timestamps give the
pause; completed checkpoints give the rate and the time since the last one (how much
unacknowledged work a failover would roll back).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from vdsm_ft.qmp import Event

WINDOW_S = 60.0
PAUSES_KEPT = 512


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class CheckpointStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop_at: float | None = None
        self._done: deque[float] = deque()          # monotonic end of each checkpoint
        self._pauses: deque[float] = deque(maxlen=PAUSES_KEPT)
        self.total = 0

    def on_event(self, event: Event) -> None:
        with self._lock:
            if event.name == "STOP":
                self._stop_at = event.qemu_time
            elif event.name == "RESUME" and self._stop_at is not None:
                self._pauses.append((event.qemu_time - self._stop_at) * 1000.0)
                self._stop_at = None
                self._done.append(event.received)
                self.total += 1

    def per_minute(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and now - self._done[0] > WINDOW_S:
                self._done.popleft()
            return len(self._done) * 60.0 / WINDOW_S

    def last_pause_ms(self) -> float | None:
        with self._lock:
            return self._pauses[-1] if self._pauses else None

    def pause_quantile_ms(self, q: float) -> float | None:
        with self._lock:
            return _quantile(list(self._pauses), q)

    def lag_seconds(self) -> float | None:
        with self._lock:
            return time.monotonic() - self._done[-1] if self._done else None
