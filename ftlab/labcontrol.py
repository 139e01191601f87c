"""The supervisor's control socket: one JSON request per connection, one JSON answer.

A unix socket in the lab dir, mode 0600 (root only). Request `{"op": "...", "args": {...}}`;
answer `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. The CLI's
`lab status` and `lab fault`, and the demo, use it to reach what only the supervisor
holds: the fake engine, the VDSM stand-ins, the etcd cluster and the agents' processes.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

MAX_MESSAGE = 1 << 20
DEFAULT_TIMEOUT = 120.0


class ControlError(RuntimeError):
    """The supervisor refused the request, or could not be reached."""


def call(path: str, op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> Any:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if len(data) > MAX_MESSAGE:
                    raise ControlError("the supervisor's answer is too long")
    except FileNotFoundError:
        raise ControlError(f"no lab supervisor socket at {path}; is the lab up? "
                           "(`vdsm-ft lab status`)") from None
    except ConnectionRefusedError:
        raise ControlError("the lab supervisor is not running (it crashed?); "
                           "run `vdsm-ft lab down`, then `vdsm-ft lab up`") from None
    except socket.timeout:
        raise ControlError(f"the lab supervisor did not answer {op} within {timeout:.0f}s") \
            from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"the lab supervisor gave no valid answer to {op}") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error") or f"{op} failed")
    return answer.get("result")


class ControlServer:
    """Serves `handlers[op](**args)` on a unix socket, one thread per connection."""

    def __init__(self, path: str, handlers: dict[str, Callable[..., Any]]):
        self.path = path
        self.handlers = handlers
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)

    def serve(self, stop: threading.Event) -> None:
        self.sock.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self.sock.close()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                    if len(data) > MAX_MESSAGE:
                        raise ControlError("request too long")
                req = json.loads(data)
                handler = self.handlers.get(req.get("op"))
                if handler is None:
                    raise ControlError(f"unknown operation {req.get('op')!r}")
                answer = {"ok": True, "result": handler(**req.get("args", {}))}
            except Exception as e:  # every failure goes back to the caller, in words
                answer = {"ok": False, "error": f"{e}" or type(e).__name__}
            try:
                conn.sendall(json.dumps(answer).encode())
            except OSError:
                pass
