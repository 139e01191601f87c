"""The migration connection the agent opens and hands to QEMU (vdsm_ft/migsocket.py).

QEMU is stood in for by a recorder of `pass_fd`/`execute`; it dups each fd it is given,
as QEMU's SCM_RIGHTS copy does, so the test can read the socket's options after the
module closed its own copy. Real QEMU takes these sockets in the tier 1 tests
(tests/integration/test_tier1_colo.py).
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from vdsm_ft import migsocket


class FakeQemu:
    def __init__(self) -> None:
        self.fds: dict[str, socket.socket] = {}
        self.commands: list[tuple[str, dict | None]] = []
        self.closed = False
        self.handed = threading.Event()

    def pass_fd(self, name: str, fd: int) -> None:
        self.fds[name] = socket.socket(fileno=os.dup(fd))

    def execute(self, command: str, arguments: dict | None = None) -> None:
        self.commands.append((command, arguments))
        self.handed.set()


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_secondary_hands_its_first_connection_to_qemu_with_nagle_off():
    qemu, port = FakeQemu(), _free_port()
    incoming = migsocket.Incoming(qemu, "127.0.0.1", port, timeout=10.0)
    with socket.create_connection(("127.0.0.1", port), 5) as client:
        assert qemu.handed.wait(5.0)
        incoming.join(5.0)
        assert qemu.commands == [("migrate-incoming", {"uri": "fd:ft-migration"})]
        theirs = qemu.fds["ft-migration"]
        assert _nodelay(theirs) == 1
        assert theirs.getblocking()
        client.sendall(b"checkpoint")
        assert theirs.recv(16) == b"checkpoint"
    with pytest.raises(ConnectionRefusedError):      # one migration, then it is closed
        socket.create_connection(("127.0.0.1", port), 1)


def test_the_primary_dials_with_nagle_off_and_keeps_no_copy():
    qemu = FakeQemu()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        migsocket.dial(qemu, "127.0.0.1", port, timeout=5.0)
        peer, _ = server.accept()
        with peer:
            theirs = qemu.fds["ft-migration"]
            assert _nodelay(theirs) == 1
            assert theirs.getblocking()
            theirs.close()          # QEMU's copy was the last: the peer sees the end
            assert peer.recv(1) == b""


def test_a_listener_whose_qemu_session_closed_releases_its_port():
    qemu, port = FakeQemu(), _free_port()
    incoming = migsocket.Incoming(qemu, "127.0.0.1", port, timeout=600.0)
    qemu.closed = True
    incoming.join(2 * migsocket.ACCEPT_POLL + 1.0)
    with socket.create_server(("127.0.0.1", port)):
        pass
    assert qemu.commands == []


def test_a_port_already_bound_is_named_in_the_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(migsocket.MigSocketError,
                           match=rf"cannot listen for the migration on 127\.0\.0\.1:{port}"):
            migsocket.Incoming(FakeQemu(), "127.0.0.1", port, timeout=5.0)


def test_an_unreachable_secondary_is_named_in_the_error():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(migsocket.MigSocketError,
                       match=rf"secondary's migration port 127\.0\.0\.1:{port}"):
        migsocket.dial(FakeQemu(), "127.0.0.1", port, timeout=5.0)
    assert time.monotonic() - start < 5.0


def test_the_nbd_listener_qemu_gets_accepts_connections_with_nagle_off():
    qemu, port = FakeQemu(), _free_port()
    assert migsocket.listen_nbd(qemu, "127.0.0.1", port) == {
        "type": "fd", "data": {"str": "ft-nbd"}}
    listener = qemu.fds["ft-nbd"]          # QEMU's copy: it accepts on it
    with socket.create_connection(("127.0.0.1", port), 5):
        accepted, _ = listener.accept()
        with accepted:
            assert _nodelay(accepted) == 1
    listener.close()
