"""The one place that speaks QMP: a blocking client over QEMU's own `qemu.qmp`.

`qemu.qmp` is asyncio; the agent and the tests are threads. Each `Qmp` owns a private
event loop in a daemon thread, so events are read continuously (even while the caller
blocks) and an out-of-band `yank` can overtake a command that a hung peer has stuck in
QEMU's main loop (docs/decisions.md, D5; docs/colo-facts.md, "Yank first").
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
# OOB commands are answered by QEMU's monitor I/O thread; they either come back at
# once or the monitor is gone.
OOB_TIMEOUT = 1.0


class QmpError(Exception):
    """Base of every QMP failure."""


class QmpConnectError(QmpError):
    """The QMP socket could not be reached or the session not negotiated."""


class QmpTimeout(QmpError):
    """QEMU did not answer within the caller's bound."""


class QmpDisconnected(QmpError):
    """The connection dropped (QEMU exited or closed the socket)."""


class QmpCommandError(QmpError):
    """QEMU answered with an error."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    qemu_time: float      # QEMU's own timestamp (wall clock, seconds)
    received: float       # time.monotonic() when this client read it
    seq: int              # position in this client's event log (see `cursor`)


EventCallback = Callable[[Event], None]


class Qmp:
    """A blocking QMP session with explicit timeouts, OOB and an event log."""

    def __init__(self, socket_path: str, name: str = "qmp"):
        self.socket_path = socket_path
        self.name = name
        self._loop = asyncio.new_event_loop()
        # qemu.qmp's reader tasks end with EOFError when QEMU dies; that is reported to
        # callers as QmpDisconnected, not as asyncio noise on stderr.
        self._loop.set_exception_handler(
            lambda _loop, ctx: log.debug("%s: %s", name, ctx.get("exception", ctx)))
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"qmp-{name}", daemon=True)
        self._client: QMPClient | None = None
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._callbacks: list[EventCallback] = []
        self._reader: concurrent.futures.Future | None = None
        self._closed = False
        self._thread.start()

    # -- session -------------------------------------------------------------------

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> "Qmp":
        """Connect, retrying until the socket appears or `timeout` passes."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = QMPClient(self.name)
            listener = EventListener()
            client.register_listener(listener)
            try:
                self._run(client.connect(self.socket_path),
                          max(0.05, deadline - time.monotonic()))
            except Exception as exc:  # OSError, qemu.qmp's ConnectError, our timeout
                last = exc
                self._run_quiet(client.disconnect())
                time.sleep(0.05)
                continue
            self._client = client
            self._reader = asyncio.run_coroutine_threadsafe(self._read_events(listener),
                                                            self._loop)
            return self
        raise QmpConnectError(f"cannot connect to QMP at {self.socket_path} within "
                              f"{timeout:.1f}s: {last}")

    @property
    def has_oob(self) -> bool:
        greeting = self._client.greeting if self._client else None
        return bool(greeting and "oob" in greeting.QMP.capabilities)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._run_quiet(self._client.disconnect())
        if self._reader is not None:
            self._reader.cancel()
            self._run_quiet(asyncio.sleep(0))  # let the reader see its cancellation
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=2.0)

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = COMMAND_TIMEOUT) -> Any:
        return self._execute(command, arguments, timeout, oob=False)

    def execute_oob(self, command: str, arguments: dict[str, Any] | None = None,
                    timeout: float = OOB_TIMEOUT) -> Any:
        if not self.has_oob:
            raise QmpError(f"{self.name}: QEMU did not offer OOB; cannot run {command} "
                           "out of band")
        return self._execute(command, arguments, timeout, oob=True)

    def yank(self, instances: list[dict[str, Any]], timeout: float = OOB_TIMEOUT) -> None:
        """Cut every connection to a dead peer, even if the main loop is stuck.

        Instances QEMU does not know (already gone) are dropped first, because QEMU
        refuses the whole yank if one is unknown.
        """
        known = self._execute("query-yank", None, timeout, oob=True)
        wanted = [i for i in instances if i in known]
        if wanted:
            self._execute("yank", {"instances": wanted}, timeout, oob=True)

    def pass_fd(self, name: str, fd: int, timeout: float = COMMAND_TIMEOUT) -> None:
        """Give QEMU a copy of `fd` under `name` (SCM_RIGHTS, then `getfd`); the caller
        keeps and closes its own copy."""
        if self._client is None:
            raise QmpDisconnected(f"{self.name}: not connected")
        client = self._client

        async def send() -> None:
            # One coroutine on the loop: no other command is written between the fd and
            # the getfd that takes it.
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": name})

        self._call("getfd", send(), timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def hmp(self, command_line: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return self.execute("human-monitor-command", {"command-line": command_line},
                            timeout)

    def _execute(self, command: str, arguments: dict[str, Any] | None, timeout: float,
                 oob: bool) -> Any:
        if self._client is None:
            raise QmpDisconnected(f"{self.name}: not connected")
        return self._call(command, self._client.execute(command, arguments, oob=oob),
                          timeout)

    def _call(self, command: str, coro: Any, timeout: float) -> Any:
        try:
            return self._run(coro, timeout)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, exc.error.error.desc) from None
        except QmpTimeout:
            raise QmpTimeout(f"{self.name}: {command} got no answer within "
                             f"{timeout:.3f}s") from None
        except (EOFError, ConnectionError, OSError) as exc:
            raise QmpDisconnected(f"{self.name}: {command}: connection lost: {exc}") \
                from None
        except QmpError:
            raise
        except Exception as exc:  # qemu.qmp StateError etc. after QEMU went away
            raise QmpDisconnected(f"{self.name}: {command}: {exc}") from None

    def _run(self, coro: Any, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise QmpTimeout(f"{self.name}: no answer within {timeout:.3f}s") from None

    def _run_quiet(self, coro: Any) -> None:
        try:
            self._run(coro, 2.0)
        except Exception as exc:  # closing a broken session must not mask the cause
            log.debug("%s: ignoring error while disconnecting: %s", self.name, exc)

    # -- events --------------------------------------------------------------------

    async def _read_events(self, listener: EventListener) -> None:
        async for msg in listener:
            ts = msg.get("timestamp", {})
            with self._cond:
                event = Event(name=msg["event"], data=dict(msg.get("data", {})),
                              qemu_time=ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6,
                              received=time.monotonic(), seq=len(self._events))
                self._events.append(event)
                callbacks = list(self._callbacks)
                self._cond.notify_all()
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:  # a broken subscriber must not stop the reader
                    log.exception("%s: event callback failed", self.name)

    def subscribe(self, callback: EventCallback) -> None:
        with self._cond:
            self._callbacks.append(callback)

    def cursor(self) -> int:
        """A position in the event log; pass it to `events` or `wait_event`."""
        with self._cond:
            return len(self._events)

    def events(self, since: int = 0, name: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self._events[since:] if name is None or e.name == name]

    def wait_event(self, name: str, timeout: float, since: int | None = None,
                   match: Callable[[dict[str, Any]], bool] | None = None) -> Event:
        """Wait for event `name` (after `since`) whose data satisfies `match`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = len(self._events) if since is None else since
            while True:
                for event in self._events[index:]:
                    if event.name == name and (match is None or match(event.data)):
                        return event
                index = len(self._events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QmpTimeout(f"{self.name}: no {name} event within {timeout:.1f}s")
                self._cond.wait(remaining)
