"""One open TCP connection to the Linux test guest's echo service, kept across failovers.

The guest (`ftlab.guest`) echoes every line on port ECHO_PORT. A client in a lab client
namespace opens ONE connection and keeps it: every INTERVAL_S it sends a numbered line
and waits for that same line back. With COLO the connection's state is in the guest's
RAM, so after a failover the survivor must keep answering on it; a reset, a close, a
wrong line or no answer within LINE_TIMEOUT_S ends the client with an error. That the
connection survived is the tier 3 claim; the longest wait for a line is its gap.

    ip netns exec NS python -m ftlab.echoclient ADDRESS
prints one JSON line per answered line ({"t", "seq", "wait_ms"}) or a final
{"t", "error"}, until its stdin closes.
"""
from __future__ import annotations

import json
import select
import socket
import sys
import time
from dataclasses import dataclass

from ftlab.counterclient import NsClient, client_command
from ftlab.guest import ECHO_PORT

INTERVAL_S = 0.1
LINE_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Echo:
    t: float                 # monotonic time the line came back (or the error)
    seq: int | None          # the line's number, None on error
    wait_ms: float = 0.0     # from sending the line to its echo
    error: str = ""


class EchoClient(NsClient[Echo]):
    """The connection in client namespace `netns`, read by a thread here."""

    def __init__(self, netns: str, address: str):
        super().__init__(client_command(netns, address, module="ftlab.echoclient"),
                         lambda d: Echo(d["t"], d.get("seq"), d.get("wait_ms", 0.0),
                                        d.get("error", "")))

    def answered(self) -> int:
        return sum(1 for e in self.snapshot() if e.seq is not None)

    def broken(self) -> str:
        """The error that ended the connection, "" while it lives."""
        return next((e.error for e in self.snapshot() if e.error), "")

    def stop(self, timeout: float = LINE_TIMEOUT_S + 5) -> list[Echo]:
        """Ends the client (closing its stdin) and returns every line."""
        return self._stop(timeout)


def fate(lines: list[Echo]) -> str:
    """One sentence for a report: survived with N lines, or how it ended."""
    answered = [e for e in lines if e.seq is not None]
    longest = max((e.wait_ms for e in answered), default=0.0)
    errors = [e.error for e in lines if e.error]
    if errors:
        return (f"broken after {len(answered)} answered lines: {errors[0]}")
    return (f"survived: one connection, {len(answered)} lines, each echoed in order, "
            f"longest wait {longest:.0f} ms")


def _recv_line(s: socket.socket, buf: bytearray, deadline: float) -> bytes:
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no echo within {LINE_TIMEOUT_S:.0f} s")
        s.settimeout(left)
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("the guest closed the connection")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ftlab.echoclient ADDRESS  (until stdin closes)",
              file=sys.stderr)
        return 2
    try:
        s = socket.create_connection((argv[0], ECHO_PORT), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        print(json.dumps({"t": time.monotonic(), "error": f"connect: {exc}"}), flush=True)
        return 1
    buf = bytearray()
    seq = 0
    with s:
        while True:
            seq += 1
            sent = time.monotonic()
            try:
                s.sendall(f"ftlab echo {seq}\n".encode())
                line = _recv_line(s, buf, sent + LINE_TIMEOUT_S)
                if line != f"ftlab echo {seq}".encode():
                    raise ValueError(f"line {seq} came back as {line[:80]!r}")
            except (OSError, ValueError) as exc:
                print(json.dumps({"t": time.monotonic(),
                                  "error": str(exc) or type(exc).__name__}), flush=True)
                return 1
            now = time.monotonic()
            print(json.dumps({"t": now, "seq": seq, "wait_ms": (now - sent) * 1000}),
                  flush=True)
            ready, _, _ = select.select([sys.stdin], [], [], INTERVAL_S)
            if ready and not sys.stdin.readline():
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
