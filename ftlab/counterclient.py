"""A client of the Linux test guest's HTTP counter, the client-side view of tier 3.

The guest (`ftlab.guest`) answers `GET /cgi-bin/counter` with its on-disk counter, one
more on every request. A client in a lab client namespace sends requests back to back
and records each reply with the time it arrived (`time.monotonic()`, shared by every
process on the machine, so it compares with a fault's timestamp). From the replies:
- the counter must rise with every reply: a value not above the one before means the
  client saw output of a copy that was later rolled back, or two copies (a fork);
- the client-visible gap of a fault is the time from the last reply before it to the
  first reply after it.

    ip netns exec NS python -m ftlab.counterclient [--once] ADDRESS
prints one JSON line per request until its stdin closes (`--once`: one request).
"""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ftlab.guest import COUNTER_URL_PATH, HTTP_PORT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST_TIMEOUT_S = 5.0
ERROR_PAUSE_S = 0.01
T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    t: float                    # monotonic time the reply (or the error) arrived
    value: int | None           # the counter, None on error
    error: str = ""


def get_counter(address: str, timeout: float = REQUEST_TIMEOUT_S) -> int:
    """One request: the counter's new value; OSError or ValueError on failure."""
    with socket.create_connection((address, HTTP_PORT), timeout=timeout) as s:
        s.sendall(f"GET {COUNTER_URL_PATH} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise OSError(f"HTTP status {status!r}")
    return int(body.strip())


def _request(address: str) -> dict:
    try:
        value = get_counter(address)
        return {"t": time.monotonic(), "value": value}
    except (OSError, ValueError) as exc:
        return {"t": time.monotonic(), "error": str(exc) or type(exc).__name__}


def client_command(netns: str, *args: str, module: str = "ftlab.counterclient") -> list[str]:
    return ["ip", "netns", "exec", netns, sys.executable, "-m", module, *args]


def client_env() -> dict[str, str]:
    # The lab's checkout, whether or not it is installed in this interpreter.
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=REPO + (os.pathsep + path if path else ""))


def ask_once(netns: str, address: str, timeout: float = 2 * REQUEST_TIMEOUT_S) -> Reply:
    """One request from client namespace `netns`."""
    proc = subprocess.run(client_command(netns, "--once", address), capture_output=True,
                          text=True, timeout=timeout, env=client_env())
    if proc.returncode != 0:
        return Reply(time.monotonic(), None, proc.stderr.strip()[-300:])
    d = json.loads(proc.stdout)
    return Reply(d["t"], d.get("value"), d.get("error", ""))


class NsClient(Generic[T]):
    """A client module run in a lab client namespace (`client_command`), its JSON lines
    read by a thread here, each made a record by `parse`."""

    def __init__(self, argv: list[str], parse: Callable[[dict], T]):
        self._records: list[T] = []
        self._parse = parse
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=client_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            record = self._parse(json.loads(line))
            with self._lock:
                self._records.append(record)

    def snapshot(self) -> list[T]:
        with self._lock:
            return list(self._records)

    def _stop(self, timeout: float) -> list[T]:
        """Ends the client (closing its stdin) and returns every record."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=timeout)
        return self.snapshot()


class CounterClient(NsClient[Reply]):
    """The request loop in client namespace `netns`, read by a thread here."""

    def __init__(self, netns: str, address: str):
        super().__init__(client_command(netns, address),
                         lambda d: Reply(d["t"], d.get("value"), d.get("error", "")))

    def values_after(self, t: float) -> list[int]:
        return [r.value for r in self.snapshot() if r.t > t and r.value is not None]

    def stop(self, timeout: float = 2 * REQUEST_TIMEOUT_S) -> list[Reply]:
        """Ends the loop (closing its stdin) and returns every reply."""
        return self._stop(timeout)


def forks(replies: list[Reply]) -> list[tuple[int, int]]:
    """(previous, next) for every reply whose value is not above the one before."""
    values = [r.value for r in replies if r.value is not None]
    return [(a, b) for a, b in zip(values, values[1:]) if b <= a]


def gap_ms(replies: list[Reply], at: float) -> float | None:
    """From the last reply before `at` to the first after it; None if either is missing."""
    ok = [r.t for r in replies if r.value is not None]
    before = [t for t in ok if t < at]
    after = [t for t in ok if t >= at]
    if not before or not after:
        return None
    return (after[0] - before[-1]) * 1000


def main(argv: list[str]) -> int:
    once = argv[:1] == ["--once"]
    args = argv[1:] if once else argv
    if len(args) != 1:
        print("usage: python -m ftlab.counterclient [--once] ADDRESS  (without --once: "
              "until stdin closes)", file=sys.stderr)
        return 2
    while True:
        line = _request(args[0])
        print(json.dumps(line), flush=True)
        if once:
            return 0
        if "error" in line:
            time.sleep(ERROR_PAUSE_S)
        ready, _, _ = select.select([sys.stdin], [], [], 0)
        if ready and not sys.stdin.readline():
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
