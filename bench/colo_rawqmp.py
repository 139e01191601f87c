"""A minimal raw-socket QMP client: the "by hand" baseline of the COLO benchmarks.

It deliberately shares nothing with `vdsm_ft.qmp` (no qemu.qmp, no event thread, no
retries): one blocking unix socket, one JSON object per line. Events that arrive while
waiting for a reply are kept, with the monotonic time they were read, so hand-driven
sequences can wait for them too.
"""
from __future__ import annotations

import json
import socket
import time
from typing import Any


class RawQmpError(RuntimeError):
    """QEMU answered with an error, or the socket failed or timed out."""


class RawQmpTimeout(RawQmpError):
    """Nothing arrived within the bound."""


class RawQmp:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, timeout: float = 10.0) -> "RawQmp":
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise RawQmpError(f"cannot connect to {self.path}: {exc}") from None
                time.sleep(0.05)
        self._sock = sock
        greeting = self._read()
        if "QMP" not in greeting:
            raise RawQmpError(f"{self.path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise RawQmpTimeout(f"{self.path}: no data within "
                                    f"{self._sock.gettimeout()}s") from None
            if not chunk:
                raise RawQmpError(f"{self.path}: QEMU closed the socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self._sock is not None, "not connected"
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append((time.monotonic(), reply))
            elif "error" in reply:
                raise RawQmpError(f"{command}: {reply['error'].get('class')}: "
                                  f"{reply['error'].get('desc')}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float, since: int = 0,
                   match: dict[str, Any] | None = None) -> dict[str, Any]:
        """The first event `name` at or after position `since` whose data has `match`."""
        deadline = time.monotonic() + timeout
        index = since
        while True:
            for _, event in self.events[index:]:
                data = event.get("data", {})
                if event["event"] == name and all(data.get(k) == v
                                                  for k, v in (match or {}).items()):
                    return event
            index = len(self.events)
            if time.monotonic() > deadline:
                raise RawQmpTimeout(f"{self.path}: no {name} {match or ''} within {timeout}s")
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                event = self._read()
            except RawQmpTimeout:
                continue
            finally:
                self._sock.settimeout(self.timeout)
            if "event" in event:
                self.events.append((time.monotonic(), event))
