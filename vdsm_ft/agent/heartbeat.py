"""Heartbeats between the agents of a pair, on the replication network.

Each agent sends every peer host one UDP datagram per interval, listing the VMs they
share and whether this side's QEMU for each is alive. Silence alone does not mean the
peer host is gone: an agent restart is silent too. `probe` tells them apart: a host whose
kernel answers a TCP connect to the agent port (accepted or refused) is alive.
"""
from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65000


@dataclass(frozen=True)
class PeerVm:
    generation: int
    qemu_alive: bool
    received: float          # time.monotonic() of the last datagram that named it


class Heartbeat:
    def __init__(self, host_id: str, address: str, port: int):
        self.host_id = host_id
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((address, port))
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._last_seen: dict[str, float] = {}
        self._vms: dict[tuple[str, str], PeerVm] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="heartbeat-rx",
                                        daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=1.0)
        self._sock.close()

    def send(self, address: str, port: int, vms: dict[str, tuple[int, bool]]) -> None:
        body = json.dumps({"host": self.host_id,
                           "vms": {v: [g, a] for v, (g, a) in vms.items()}}).encode()
        try:
            self._sock.sendto(body, (address, port))
        except OSError as exc:
            # An unreachable peer is exactly what the receiver's silence will show.
            log.debug("heartbeat to %s:%s failed: %s", address, port, exc)

    def silent_for(self, host_id: str) -> float:
        with self._lock:
            seen = self._last_seen.get(host_id)
        return float("inf") if seen is None else time.monotonic() - seen

    def peer_vm(self, host_id: str, vm_id: str) -> PeerVm | None:
        with self._lock:
            return self._vms.get((host_id, vm_id))

    def _receive(self) -> None:
        while not self._stopped.is_set():
            try:
                data, _ = self._sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            try:
                msg = json.loads(data)
                host = str(msg["host"])
                vms = {str(v): (int(g), bool(a)) for v, (g, a) in msg["vms"].items()}
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed heartbeat datagram")
                continue
            with self._lock:
                self._last_seen[host] = now
                for vm_id, (gen, alive) in vms.items():
                    self._vms[(host, vm_id)] = PeerVm(gen, alive, now)


def probe(address: str, port: int, timeout: float) -> bool:
    """True if the host's kernel answers at all (connect accepted or refused)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((address, port))
        except ConnectionRefusedError:
            return True
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                return True
            return False
    return True
