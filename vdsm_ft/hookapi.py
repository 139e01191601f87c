"""The hook <-> agent protocol on the agent's unix socket: the one place that speaks it.

HTTP/1.1 with JSON bodies over AF_UNIX. There is no TLS: the socket is local, mode 0660,
group `kvm`, so the hooks (which VDSM runs as vdsm:kvm) and root reach it and nobody
else does. Endpoints, all under /v1/hooks/vms/<vm id>/:

| request | from hook point | body |
|---|---|---|
| POST register  | before_vm_start, after the XML is rewritten | {"engine_xml": str, "primary_xml": str} |
| POST started   | after_vm_start   | {"live_xml": str or null} |
| POST stopping  | before_vm_destroy: an intentional stop; tear the pair down | none |
| POST destroyed | after_vm_destroy: stopped, or QEMU died (the agent decides) | none |

Answers: 200 `{}` when done; 4xx/5xx `{"error": {"code", "message"}}`.

VDSM gives hooks no timeout and a stuck hook freezes the VM start, so every client call
has a total bound (connect + send + read), 2 s by default.
"""
from __future__ import annotations

import grp
import http.client
import json
import logging
import os
import re
import socket
import socketserver
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "/v1/hooks/vms/"
DEFAULT_TIMEOUT = 2.0
# An engine domain XML is tens of KiB; two of them fit easily.
MAX_BODY = 8 << 20
# A client that stalls its request loses its server thread after this.
SERVER_SOCKET_TIMEOUT = 10.0
JSON_TYPE = "application/json"
SOCKET_MODE = 0o660
ACTIONS = ("register", "started", "stopping", "destroyed")

_PATH_RE = re.compile(re.escape(PREFIX) + r"([^/]+)/([a-z]+)")


# ---------------------------------------------------------------------------- errors

class HookApiError(Exception):
    """Base of every hook <-> agent failure."""


class AgentUnreachable(HookApiError):
    """No answer from the agent within the bound (not running, socket missing, stuck,
    crashed mid-request, or an internal error on its side)."""


class AgentRefused(HookApiError):
    """The agent answered and refused the request; `message` is its reason."""

    def __init__(self, message: str, status: int = 409, code: str = "refused"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class BadHookRequest(AgentRefused):
    """Raised by the server (or a backend) for a request that breaks the schema."""

    def __init__(self, message: str):
        super().__init__(message, status=400, code="bad_request")


def check_vm_id(vm_id: Any) -> str:
    """VDSM's vmId is the engine's VM UUID; anything else is refused."""
    try:
        if isinstance(vm_id, str) and str(uuid.UUID(vm_id)) == vm_id.lower():
            return vm_id.lower()
    except ValueError:
        pass
    raise BadHookRequest(f"VM id {vm_id!r} is not a UUID")


# ---------------------------------------------------------------------------- client

class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class HookClient:
    """What the hooks call. One short connection per call, each bounded by `timeout` in total."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.socket_path = socket_path
        self.timeout = timeout

    def register(self, vm_id: str, engine_xml: str, primary_xml: str) -> None:
        self._post(vm_id, "register", {"engine_xml": engine_xml, "primary_xml": primary_xml})

    def started(self, vm_id: str, live_xml: str | None = None) -> None:
        self._post(vm_id, "started", {"live_xml": live_xml})

    def stopping(self, vm_id: str) -> None:
        self._post(vm_id, "stopping", None)

    def destroyed(self, vm_id: str) -> None:
        self._post(vm_id, "destroyed", None)

    def _post(self, vm_id: str, action: str, body: dict | None) -> None:
        vm_id = check_vm_id(vm_id)
        data = b"" if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + self.timeout
        conn = _UnixConnection(self.socket_path, self.timeout)
        what = f"the vdsm-ft agent at {self.socket_path}"
        try:
            conn.connect()
            headers = {"Content-Length": str(len(data))}
            if body is not None:
                headers["Content-Type"] = JSON_TYPE
            conn.request("POST", f"{PREFIX}{vm_id}/{action}", body=data, headers=headers)
            # The socket timeout bounds each read; the deadline bounds them all.
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY + 1)
            status = resp.status
        except (socket.timeout, TimeoutError):
            raise AgentUnreachable(f"{what} did not answer {action} for VM {vm_id} within "
                                   f"{self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnreachable(f"{what} is not reachable ({action} for VM {vm_id}): "
                                   f"{e}") from None
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise AgentUnreachable(f"{what} answered {action} for VM {vm_id} only after "
                                   f"{self.timeout:g} s")
        if status == 200:
            return
        try:
            err = json.loads(raw)["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "internal", raw[:200].decode("utf-8", "replace")
        if status >= 500:
            raise AgentUnreachable(f"{what} failed {action} for VM {vm_id}: {message}")
        raise AgentRefused(message, status=status, code=code)


# ---------------------------------------------------------------------------- server

class HookBackend(ABC):
    """What the agent implements for the hooks. Raise `AgentRefused` (or `BadHookRequest`)
    to refuse with a message the hook shows; anything else becomes a 500 and the hook treats
    the agent as unreachable. Each call must return quickly: the hook waits at most 2 s."""

    @abstractmethod
    def register(self, vm_id: str, engine_xml: str, primary_xml: str) -> None:
        """before_vm_start prepared `primary_xml` from `engine_xml`; the VM is about to start."""

    @abstractmethod
    def started(self, vm_id: str, live_xml: str | None) -> None:
        """after_vm_start: the domain runs; `live_xml` is libvirt's live XML."""

    @abstractmethod
    def stopping(self, vm_id: str) -> None:
        """before_vm_destroy: an intentional stop. Tear the pair down; never a failover."""

    @abstractmethod
    def destroyed(self, vm_id: str) -> None:
        """after_vm_destroy: the domain is gone, after a stop or because QEMU died."""


def _text_field(body: dict, key: str, nullable: bool = False) -> str | None:
    value = body.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadHookRequest(f"{key} must be a non-empty string")
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HookServer"
    timeout = SERVER_SOCKET_TIMEOUT

    def address_string(self) -> str:       # unix peers have no address
        return "hook"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("hook socket: " + fmt, *args)

    def do_POST(self) -> None:
        try:
            self._send(200, self._dispatch())
        except AgentRefused as e:
            self._send(e.status, {"error": {"code": e.code, "message": e.message}})
        except Exception:
            log.exception("hook request %s failed", self.path)
            self._send(500, {"error": {"code": "internal",
                                       "message": "internal error; see the agent log"}})

    def do_GET(self) -> None:
        self.close_connection = True
        self._send(405, {"error": {"code": "method_not_allowed", "message": "use POST"}})

    def _dispatch(self) -> dict:
        m = _PATH_RE.fullmatch(self.path)
        if not m or m.group(2) not in ACTIONS:
            self.close_connection = True
            raise AgentRefused(f"no such endpoint: {self.path}", status=404, code="not_found")
        vm_id, action = check_vm_id(m.group(1)), m.group(2)
        body = self._body()
        backend = self.server.backend
        if action == "register":
            backend.register(vm_id, _text_field(body, "engine_xml"),
                             _text_field(body, "primary_xml"))
        elif action == "started":
            backend.started(vm_id, _text_field(body, "live_xml", nullable=True))
        elif action == "stopping":
            backend.stopping(vm_id)
        else:
            backend.destroyed(vm_id)
        return {}

    def _body(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadHookRequest("chunked bodies are not accepted; send Content-Length")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            self.close_connection = True
            raise BadHookRequest(f"Content-Length must be 0..{MAX_BODY}")
        raw = self.rfile.read(n)
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise BadHookRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadHookRequest("body must be a JSON object")
        return body

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HookServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: str, backend: HookBackend):
        self.backend = backend
        self.socket_path = socket_path
        super().__init__(socket_path, _Handler)

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; `close()` stops it."""
        thread = threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True,
                                  name=f"hook-api:{self.socket_path}")
        thread.start()
        return thread

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HookApiError(f"{path} exists and is not a socket; remove it or choose another "
                           "hook_socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)          # nobody listens: left over from a crashed agent
        return
    finally:
        probe.close()
    raise HookApiError(f"another process already serves {path}")


def kvm_gid() -> int:
    """The group VDSM runs hooks under (vdsm:kvm)."""
    return grp.getgrnam("kvm").gr_gid


def serve_hooks(socket_path: str, backend: HookBackend, owner_gid: int | None = None
                ) -> HookServer:
    """Bind the hook socket (mode 0660, group `owner_gid`, default kvm) and serve it in a
    daemon thread. A stale socket from a dead agent is replaced; a live one is an error."""
    os.makedirs(os.path.dirname(socket_path), mode=0o755, exist_ok=True)
    _remove_stale_socket(socket_path)
    old = os.umask(0o117)          # the socket is never world-reachable, not even briefly
    try:
        server = HookServer(socket_path, backend)
    finally:
        os.umask(old)
    os.chown(socket_path, -1, kvm_gid() if owner_gid is None else owner_gid)
    os.chmod(socket_path, SOCKET_MODE)
    server.start()
    return server
