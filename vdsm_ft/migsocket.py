"""COLO's migration connection and NBD listener, opened here with TCP_NODELAY and handed
to QEMU.

A checkpoint is a chain of small messages, each waiting for the peer's answer; QEMU 7.2
leaves Nagle on on its own `tcp:` migration sockets, so each message stalls on the
peer's 40 ms delayed ACK (docs/benchmarks.md, "Nagle off without a patch"). Opening the
socket ourselves and passing it over QMP (`getfd`, then an `fd:` URI) turns Nagle off
with any QEMU, the distribution's included, not only with the project's patch 0003
(docs/qemu.md). QEMU registers the passed socket for `yank` like its own
(migration/channel.c), so failover still cuts it.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vdsm_ft.qmp import Qmp, QmpError

log = logging.getLogger(__name__)

FD_NAME = "ft-migration"
URI = f"fd:{FD_NAME}"
ACCEPT_POLL = 0.5

# Runs a socket factory where the host's network is: the agent runs in it already; the
# lab's in-process pairs make each member's socket inside its host's namespace.
Opener = Callable[[Callable[[], socket.socket]], socket.socket]


class MigSocketError(OSError):
    """The migration connection could not be opened; the message says where."""


def here(make: Callable[[], socket.socket]) -> socket.socket:
    return make()


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def dial(q: Qmp, host: str, port: int, timeout: float, opener: Opener = here) -> None:
    """Connect to the secondary's migration port and give the socket to `q`'s QEMU."""
    try:
        sock = opener(lambda: socket.create_connection((host, port), timeout))
    except OSError as exc:
        raise MigSocketError(f"cannot connect to the secondary's migration port "
                             f"{host}:{port}: {exc}") from None
    with sock:
        sock.settimeout(None)     # blocking: the file description is shared with QEMU
        _nodelay(sock)
        q.pass_fd(FD_NAME, sock.fileno())


NBD_FD_NAME = "ft-nbd"


def listen_nbd(q: Qmp, host: str, port: int, opener: Opener = here) -> dict[str, Any]:
    """A listener for the secondary's NBD server, with Nagle off, handed to `q`'s QEMU;
    returns the address `nbd-server-start` takes for it. QEMU 7.2's NBD server leaves
    Nagle on on what it accepts, and every guest write waits for its reply; Linux gives
    an accepted socket the listener's TCP_NODELAY."""
    sock = _listen(host, port, "the NBD server", opener)
    with sock:
        _nodelay(sock)
        q.pass_fd(NBD_FD_NAME, sock.fileno())
    return {"type": "fd", "data": {"str": NBD_FD_NAME}}


def _listen(host: str, port: int, what: str, opener: Opener) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return opener(lambda: socket.create_server((host, port), family=family, backlog=1))
    except OSError as exc:
        raise MigSocketError(f"cannot listen for {what} on {host}:{port}: {exc}") from None


class Incoming:
    """The secondary's migration listener: its first connection goes to QEMU as the
    incoming migration (`migrate-incoming fd:`), then the listener closes.

    It waits at most `timeout` (the primary resyncs every disk before it connects) and
    stops early once `q` is closed, which is how a forgotten secondary releases its port.
    """

    def __init__(self, q: Qmp, host: str, port: int, timeout: float,
                 opener: Opener = here):
        self._listener = _listen(host, port, "the migration", opener)
        self._listener.settimeout(ACCEPT_POLL)
        self._q = q
        self._where = f"{host}:{port}"
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"migration-in-{port}")
        self._thread.start()

    def _run(self) -> None:
        with self._listener:
            conn = self._accept()
            if conn is None:
                return
            with conn:
                conn.settimeout(None)
                _nodelay(conn)
                try:
                    self._q.pass_fd(FD_NAME, conn.fileno())
                    self._q.execute("migrate-incoming", {"uri": URI})
                except QmpError as exc:
                    log.warning("the migration on %s could not be handed to QEMU: %s",
                                self._where, exc)

    def _accept(self) -> socket.socket | None:
        while time.monotonic() < self._deadline and not self._q.closed:
            try:
                conn, peer = self._listener.accept()
            except socket.timeout:
                continue
            log.info("incoming migration on %s from %s", self._where, peer[0])
            return conn
        log.info("no migration came to %s; its listener is closed", self._where)
        return None

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
