"""The hook <-> agent protocol: the real `serve_hooks` server on a real unix socket with a
small recording backend, and the real `HookClient`."""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from vdsm_ft import admission, hooks
from vdsm_ft.agenterrors import AgentError, BadRequest, check_id
from vdsm_ft.hookapi import AgentRefused, AgentUnreachable, HookBackend, HookClient, serve_hooks

VM = "6a1f0c2e-4b7d-4e51-9a3c-2f8d7e6b5a41"


class Recorder(HookBackend):
    """Records every call it accepts; can refuse, crash or stall on demand. `prepare` does
    the agent's real work (`admission.prepare_primary`) when given `parts`, as the agent does
    with its own, else answers a stand-in primary XML."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.refuse: str | None = None
        self.crash = False
        self.stall = threading.Event()
        self.stalling = False
        self.parts: hooks.HookContext | None = None
        self.stale: str | None = None

    def _check(self) -> None:
        if self.stalling:
            self.stall.wait(10)
        if self.crash:
            raise RuntimeError("backend bug")
        if self.refuse:
            raise AgentRefused(self.refuse)

    def _do(self, *call: object) -> None:
        self._check()
        self.calls.append(call)

    def prepare(self, vm_id: str, engine_xml: str) -> str:
        self._check()
        if self.parts is None:
            primary_xml = f"<domain>primary of {vm_id}</domain>"
        else:
            try:
                primary_xml = admission.prepare_primary(
                    self.parts.config, self.parts.arbiter, self.parts.emulator, vm_id,
                    engine_xml)
            except admission.StartRefused as e:
                raise AgentRefused(str(e)) from None
        self.calls.append(("prepare", vm_id, engine_xml, primary_xml))
        return primary_xml

    def started(self, vm_id: str, live_xml: str | None) -> None:
        self._do("started", vm_id, live_xml)

    def stopping(self, vm_id: str) -> None:
        self._do("stopping", vm_id)

    def image(self, vm_id: str, ft: str | None) -> str:
        """A normal start: refused while `stale` names a reason (`refuse` refuses too)."""
        self._do("image", vm_id, ft)
        if self.stale:
            raise AgentRefused(self.stale)
        return ""

    def destroyed(self, vm_id: str) -> None:
        self._do("destroyed", vm_id)


def _raw(path: str, request: bytes) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                     .split(b":")[1])
        while len(body) < length:
            body += s.recv(65536)
    return int(head.split()[1]), json.loads(body)


def test_every_call_reaches_the_backend(agent):
    backend, path = agent
    client = HookClient(path)
    assert client.prepare(VM, "<domain/>") == f"<domain>primary of {VM}</domain>"
    client.started(VM, "<domain>live</domain>")
    client.started(VM)
    client.stopping(VM)
    client.destroyed(VM)
    assert backend.calls == [("prepare", VM, "<domain/>", f"<domain>primary of {VM}</domain>"),
                             ("started", VM, "<domain>live</domain>"), ("started", VM, None),
                             ("stopping", VM), ("destroyed", VM)]


def test_socket_is_0660_with_the_given_group(agent):
    _, path = agent
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()


def test_refusal_carries_the_agents_message(agent):
    backend, path = agent
    backend.refuse = "VM is the secondary of a live pair here"
    with pytest.raises(AgentRefused) as e:
        HookClient(path).prepare(VM, "<domain/>")
    assert e.value.message == "VM is the secondary of a live pair here"
    assert e.value.status == 409


def test_backend_bug_is_unreachable_not_refused(agent):
    backend, path = agent
    backend.crash = True
    with pytest.raises(AgentUnreachable, match="internal error"):
        HookClient(path).stopping(VM)


def test_no_agent_is_unreachable_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(AgentUnreachable, match="not reachable"):
        HookClient(str(tmp_path / "none.sock")).prepare(VM, "<d/>")
    assert time.monotonic() - start < 0.5


def test_stuck_agent_costs_at_most_the_bound(agent):
    backend, path = agent
    backend.stalling = True
    start = time.monotonic()
    with pytest.raises(AgentUnreachable, match="did not answer"):
        HookClient(path, timeout=0.3).prepare(VM, "<d/>")
    assert 0.3 <= time.monotonic() - start < 0.6


def test_listening_but_never_accepting_costs_at_most_the_bound(tmp_path):
    # A backlog-full or frozen agent: connect may succeed, nothing ever answers.
    path = str(tmp_path / "frozen.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)
    try:
        start = time.monotonic()
        with pytest.raises(AgentUnreachable):
            HookClient(path, timeout=0.3).destroyed(VM)
        assert time.monotonic() - start < 0.6
    finally:
        srv.close()


def test_client_refuses_a_bad_vm_id_before_sending(agent):
    backend, path = agent
    with pytest.raises(BadRequest, match="not a UUID"):
        HookClient(path).stopping("../../etc")
    assert backend.calls == []


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"POST /v1/hooks/vms/not-a-uuid/stopping HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
     400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/explode HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode(),
     404, "not_found"),
    (f"POST /v1/hooks/vms/{VM}/prepare HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
     400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/prepare HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{x".encode(),
     400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/prepare HTTP/1.1\r\nContent-Length: 42\r\n\r\n"
     '{"engine_xml": " ", "primary_xml": "<d/>"}'.encode(), 400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/started HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]".encode(),
     400, "bad_request"),
    (f"GET /v1/hooks/vms/{VM}/started HTTP/1.1\r\n\r\n".encode(), 405, "method_not_allowed"),
    (f"POST /v1/hooks/vms/{VM}/register HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode(),
     404, "not_found"),
    (b"HELLO\r\n\r\n", 400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/stopping HTTP/1.1\r\n".encode() + b"X-A: b\r\n" * 40 + b"\r\n",
     400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/stopping HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     .encode(), 400, "bad_request"),
    (f"POST /v1/hooks/vms/{VM}/stopping HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n".encode(),
     400, "bad_request"),
])
def test_server_validates_input(agent, request_bytes, status, code):
    backend, path = agent
    got_status, body = _raw(path, request_bytes)
    assert (got_status, body["error"]["code"]) == (status, code)
    assert body["error"]["message"]
    assert backend.calls == []


def _answer_once(path: str, answer: bytes) -> threading.Thread:
    """A one-shot agent that reads a request and sends `answer` verbatim, then closes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(answer)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("answer, match", [
    (b"SSH-2.0-OpenSSH\r\n", "no valid answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{\"primary_xml\": ", "no valid answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "without a primary_xml"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 2\r\n\r\nno", "no valid answer"),
    # An agent from before `prepare` existed, not yet restarted after an upgrade.
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 79\r\n\r\n"
     b'{"error": {"code": "not_found", "message": "no such endpoint: /vms/x/prepare"}}',
     "older than this hook; restart vdsm-ft-agent"),
])
def test_an_answer_that_is_not_the_protocol_is_unreachable(tmp_path, answer, match):
    # Unreachable, not refused: the start hook then does the work itself.
    path = str(tmp_path / "odd.sock")
    thread = _answer_once(path, answer)
    with pytest.raises(AgentUnreachable, match=match):
        HookClient(path, timeout=2).prepare(VM, "<domain/>")
    thread.join(5)


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / "agent.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                      # a socket file nobody listens on
    server = serve_hooks(path, Recorder(), owner_gid=os.getgid())
    try:
        HookClient(path).destroyed(VM)
        with pytest.raises(AgentError, match="already serves"):
            serve_hooks(path, Recorder(), owner_gid=os.getgid())
    finally:
        server.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(AgentError, match="not a socket"):
        serve_hooks(str(tmp_path / "file"), Recorder(), owner_gid=os.getgid())


def test_uppercase_uuid_is_normalised():
    assert check_id(VM.upper(), "VM id", uuid=True) == VM
