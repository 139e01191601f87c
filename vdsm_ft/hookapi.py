"""The hook <-> agent protocol on the agent's unix socket: the one place that speaks it.

HTTP/1.1 with JSON bodies over AF_UNIX, one request per connection (the agent closes it
after answering). There is no TLS: the socket is local, mode 0660, group `kvm`, so the
hooks (which VDSM runs as vdsm:kvm) and root reach it and nobody else does. Endpoints,
all under /v1/hooks/vms/<vm id>/:

| request | from hook point | body | 200 answer |
|---|---|---|---|
| POST prepare   | before_vm_start, ft=true | {"engine_xml": str} | {"primary_xml": str} |
| POST started   | after_vm_start   | {"live_xml": str or null} | {} |
| POST stopping  | before_vm_destroy: an intentional stop; tear the pair down | none | {} |
| POST destroyed | after_vm_destroy: stopped, or QEMU died (the agent decides) | none | {} |
| POST image     | before_vm_start, ft unset or false: may a normal start read the VM's storage-domain image? | {"ft": "false" or null} | {"log": str}; 409 while it is behind |

`prepare` is the whole of before_vm_start's work, done by the agent, which has lxml, the
etcd client and QEMU's version warm (docs/hooks.md). Errors: 4xx/5xx
`{"error": {"code", "message"}}`, codes and exceptions from vdsm_ft/agenterrors.py.

The HTTP framing is written here, not with http.client and http.server: the hooks import
this module at every VM start, and those two (with email and ssl) cost ~30 ms there.
VDSM gives hooks no timeout and a stuck hook freezes the VM start, so every client call
has a total bound (connect + send + read), 2 s by default.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import socket
import socketserver
import stat
import struct
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from vdsm_ft.agenterrors import (INTERNAL, INTERNAL_MESSAGE, METHOD_NOT_ALLOWED, NOT_FOUND,
                                 AgentError, AgentRefused, AgentRejected, AgentUnreachable,
                                 BadRequest, Forbidden, check_id, error_body, error_of)

PREFIX = "/v1/hooks/vms/"
DEFAULT_TIMEOUT = 2.0
# An engine domain XML is tens of KiB; two of them fit easily.
MAX_BODY = 8 << 20
# The request line and each header line; the hooks' requests have five short headers.
MAX_LINE = 8192
MAX_HEADERS = 32
# A client that stalls its request loses its server thread after this.
SERVER_SOCKET_TIMEOUT = 10.0
JSON_TYPE = "application/json"
SOCKET_MODE = 0o660
# VDSM runs hooks as vdsm (group kvm); every QEMU's user is in kvm too, so the socket's
# owner is vdsm, its group root, and each connection's uid is checked (SO_PEERCRED).
HOOK_USER = "vdsm"
ACTIONS = ("prepare", "started", "stopping", "destroyed", "image")
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 500: "Internal Server Error"}

_PATH_RE = re.compile(re.escape(PREFIX) + r"([^/]+)/([a-z]+)")


# ---------------------------------------------------------------------------- client

class HookClient:
    """What the hooks call. One short connection per call, each bounded by `timeout` in total."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.socket_path = socket_path
        self.timeout = timeout

    def prepare(self, vm_id: str, engine_xml: str) -> str:
        """before_vm_start, ft=true: the agent checks the VM, prepares it as the COLO
        primary, takes it on, and returns the primary XML for VDSM to start."""
        answer = self._post(vm_id, "prepare", {"engine_xml": engine_xml})
        primary_xml = answer.get("primary_xml")
        if not isinstance(primary_xml, str) or not primary_xml.strip():
            raise AgentUnreachable(f"{self._what} answered prepare for VM {vm_id} without "
                                   "a primary_xml")
        return primary_xml

    def started(self, vm_id: str, live_xml: str | None = None) -> None:
        self._post(vm_id, "started", {"live_xml": live_xml})

    def image(self, vm_id: str, ft: str | None) -> str:
        """before_vm_start without FT: AgentRefused while the VM's storage-domain image is
        behind (vdsm_ft.imagestate); else what vdsm.log should say ("" if current)."""
        answer = self._post(vm_id, "image", {"ft": ft})
        log = answer.get("log")
        if not isinstance(log, str):
            raise AgentUnreachable(f"{self._what} answered image for VM {vm_id} without "
                                   "a log line")
        return log

    def stopping(self, vm_id: str) -> None:
        self._post(vm_id, "stopping", None)

    def destroyed(self, vm_id: str) -> None:
        self._post(vm_id, "destroyed", None)

    @property
    def _what(self) -> str:
        return f"the vdsm-ft agent at {self.socket_path}"

    def _post(self, vm_id: str, action: str, body: dict | None) -> dict:
        vm_id = check_id(vm_id, "VM id", uuid=True)
        data = b"" if body is None else json.dumps(body).encode()
        request = (f"POST {PREFIX}{vm_id}/{action} HTTP/1.1\r\nHost: localhost\r\n"
                   f"Content-Type: {JSON_TYPE}\r\nContent-Length: {len(data)}\r\n"
                   "Connection: close\r\n\r\n").encode() + data
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                sock.sendall(request)
                raw = _read_to_end(sock, deadline)
        except TimeoutError:
            raise AgentUnreachable(f"{self._what} did not answer {action} for VM {vm_id} "
                                   f"within {self.timeout:g} s") from None
        except OSError as e:
            raise AgentUnreachable(f"{self._what} is not reachable ({action} for VM "
                                   f"{vm_id}): {e}") from None
        status, payload = _parse_answer(raw)
        if status is None:
            raise AgentUnreachable(f"{self._what} gave no valid answer to {action} for VM "
                                   f"{vm_id}: {raw[:100]!r}")
        if status == 200 and isinstance(payload, dict):
            return payload
        code, message = error_of(payload) or (INTERNAL, repr(payload)[:200])
        if status == 200 or status >= 500:
            raise AgentUnreachable(f"{self._what} failed {action} for VM {vm_id}: {message}")
        if status == 404 and code == NOT_FOUND:
            # An agent older than this hook (an upgrade not yet followed by a restart):
            # the hook does the work itself, as when no agent answers.
            raise AgentUnreachable(f"{self._what} does not know '{action}' ({message}): it "
                                   "is older than this hook; restart vdsm-ft-agent")
        raise AgentRefused(message, status=status, code=code)


def _read_to_end(sock: socket.socket, deadline: float) -> bytes:
    """Everything the agent sends before it closes; the deadline bounds all reads."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY + MAX_LINE * MAX_HEADERS:
            raise OSError("answer too large")
        chunks.append(chunk)


def _parse_answer(raw: bytes) -> tuple[int | None, Any]:
    """(status, JSON body) of a whole answer, or (None, None) if it is not this protocol."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    headers = {name.strip().lower(): value for name, _, value in
               (line.partition(":") for line in lines[1:])}
    try:
        if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            return None, None
        if int(headers.get("content-length", -1)) != len(body):
            return None, None       # cut short: the agent died mid-answer
        return int(parts[1]), json.loads(body)
    except ValueError:
        return None, None


# ---------------------------------------------------------------------------- server

class HookBackend(ABC):
    """What the agent implements for the hooks. Raise `AgentRefused` (or `BadRequest`)
    to refuse with a message the hook shows; anything else becomes a 500 and the hook treats
    the agent as unreachable. Each call must return quickly: the hook waits at most
    `[hooks] agent_timeout` (2 s)."""

    @abstractmethod
    def prepare(self, vm_id: str, engine_xml: str) -> str:
        """before_vm_start, ft=true: check the VM, prepare it as the COLO primary, take it
        on, and return the primary XML. The VM is about to start."""

    @abstractmethod
    def image(self, vm_id: str, ft: str | None) -> str:
        """before_vm_start, ft unset or false: raise AgentRefused while the VM's
        storage-domain image is behind (vdsm_ft.imagestate.decide), else return the log
        line. Quick: one bounded etcd read."""

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
        raise BadRequest(f"{key} must be a non-empty string")
    return value


class _Handler(socketserver.StreamRequestHandler):
    server: "HookServer"
    timeout = SERVER_SOCKET_TIMEOUT

    def handle(self) -> None:
        try:
            vm_id, action, body = self._read_request()
            # After the (bounded) read: a refusal closed with the request unread would
            # reset the connection, and the caller would not see why.
            self._check_peer()
        except AgentRejected as e:
            self._send(e.status, error_body(e.code, e.message))
            return
        except OSError:             # the client stalled past the timeout or went away
            return
        try:
            status, payload = 200, self._dispatch(vm_id, action, body)
        except (AgentRefused, BadRequest) as e:
            # The hook protocol's refusals. The agent's other AgentRejected (NotFound for
            # a VM it forgot, ...) are its HTTPS API's and stay internal errors here.
            status, payload = e.status, error_body(e.code, e.message)
        except Exception:
            # Imported here: the hooks load this module at every VM start, and logging is
            # a third of its import time there; only the agent ever logs from it.
            import logging
            logging.getLogger(__name__).exception("hook request %s for VM %s failed",
                                                  action, vm_id)
            status, payload = 500, error_body(INTERNAL, INTERNAL_MESSAGE)
        self._send(status, payload)

    def _dispatch(self, vm_id: str, action: str, body: dict) -> dict:
        backend = self.server.backend
        if action == "prepare":
            return {"primary_xml": backend.prepare(vm_id, _text_field(body, "engine_xml"))}
        if action == "image":
            ft = body.get("ft")
            if ft not in (None, "false"):
                raise BadRequest("ft must be \"false\" or null")
            return {"log": backend.image(vm_id, ft)}
        if action == "started":
            backend.started(vm_id, _text_field(body, "live_xml", nullable=True))
        elif action == "stopping":
            backend.stopping(vm_id)
        else:
            backend.destroyed(vm_id)
        return {}

    def _check_peer(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid not in self.server.allowed_uids:
            raise Forbidden(f"uid {uid} (pid {pid}) may not use the hook socket: only "
                            f"root and {HOOK_USER}, which VDSM runs hooks as, may")

    def _read_request(self) -> tuple[str, str, dict]:
        line = self.rfile.readline(MAX_LINE + 1)
        parts = line.decode("latin-1").split()
        if len(line) > MAX_LINE or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest("malformed request line")
        method, path, _ = parts
        headers = self._headers()
        if method != "POST":
            raise AgentRejected("use POST", status=405, code=METHOD_NOT_ALLOWED)
        m = _PATH_RE.fullmatch(path)
        if not m or m.group(2) not in ACTIONS:
            raise AgentRejected(f"no such endpoint: {path}", status=404, code=NOT_FOUND)
        return check_id(m.group(1), "VM id", uuid=True), m.group(2), self._body(headers)

    def _headers(self) -> dict[str, str]:
        headers = {}
        for _ in range(MAX_HEADERS):
            line = self.rfile.readline(MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                return headers
            name, sep, value = line.decode("latin-1").partition(":")
            if len(line) > MAX_LINE or not sep:
                raise BadRequest("malformed header line")
            headers[name.strip().lower()] = value.strip()
        raise BadRequest(f"more than {MAX_HEADERS} header lines")

    def _body(self, headers: dict[str, str]) -> dict:
        if "transfer-encoding" in headers:
            raise BadRequest("chunked bodies are not accepted; send Content-Length")
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            raise BadRequest(f"Content-Length must be 0..{MAX_BODY}")
        raw = self.rfile.read(n)
        if len(raw) < n:
            raise OSError("the client closed its request early")
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {JSON_TYPE}"
                f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        try:
            self.wfile.write(head.encode() + data)
        except OSError:
            pass                    # the hook gave up waiting and counts the agent unreachable


class HookServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: str, backend: HookBackend, allowed_uids: frozenset[int]):
        self.backend = backend
        self.allowed_uids = allowed_uids
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
        raise AgentError(f"{path} exists and is not a socket; remove it or choose another "
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
    raise AgentError(f"another process already serves {path}")


def hook_uid() -> int | None:
    """The uid VDSM runs hooks as (user vdsm), or None on a host without it (the lab)."""
    try:
        return pwd.getpwnam(HOOK_USER).pw_uid
    except KeyError:
        return None


def serve_hooks(socket_path: str, backend: HookBackend, owner_gid: int = 0) -> HookServer:
    """Bind the hook socket (mode 0660, owner vdsm where it exists, group `owner_gid`) and
    serve it in a daemon thread, to root and vdsm only. A stale socket from a dead agent
    is replaced; a live one is an error."""
    os.makedirs(os.path.dirname(socket_path), mode=0o755, exist_ok=True)
    _remove_stale_socket(socket_path)
    old = os.umask(0o117)          # the socket is never world-reachable, not even briefly
    uid = hook_uid()
    try:
        server = HookServer(socket_path, backend, frozenset({0} if uid is None else {0, uid}))
    finally:
        os.umask(old)
    os.chown(socket_path, -1 if uid is None else uid, owner_gid)
    os.chmod(socket_path, SOCKET_MODE)
    server.start()
    return server
