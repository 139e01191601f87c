"""Heartbeats between the agents of a pair, on the replication network.

Each agent sends every peer host one UDP datagram per interval, listing the VMs they
share and whether this side's QEMU for each is alive. Silence alone does not mean the
peer host is gone: an agent restart is silent too. `probe` tells them apart: a host whose
kernel answers a TCP connect to the agent port (accepted or refused) is alive.

With a key (`[agent] heartbeat_key_file`, the same on every host), each datagram carries
an HMAC-SHA256 of its body, and a receiver drops what is unsigned, wrongly signed, older
than REPLAY_WINDOW_S by the sender's clock, or not newer than the last datagram seen
from the same sender process: a forged or replayed "QEMU exited" can then no longer
force a failover, nor a forged "alive" delay one.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from vdsm_ft.hostconfig import LooseModeError, read_private

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65000
MIN_KEY_BYTES = 32
# Hosts keep their clocks in step (oVirt needs NTP anyway); this much skew is tolerated.
REPLAY_WINDOW_S = 30.0
# At most one warning per sender and reason in this many seconds.
WARN_EVERY_S = 60.0


class HeartbeatKeyError(Exception):
    """The heartbeat key file is missing, too short or readable by others."""


def read_key(path: str) -> bytes:
    """The shared heartbeat key: at least MIN_KEY_BYTES bytes, in a root-only file."""
    try:
        key = read_private(path).strip()
    except LooseModeError:
        raise HeartbeatKeyError(f"the heartbeat key {path} is readable by group or "
                                f"others; chmod 600 {path}") from None
    except OSError as exc:
        raise HeartbeatKeyError(f"cannot read the heartbeat key {path}: {exc.strerror}; "
                                "create it on every host with the same content, e.g. "
                                "`head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`"
                                ) from None
    if len(key) < MIN_KEY_BYTES:
        raise HeartbeatKeyError(f"the heartbeat key {path} has {len(key)} bytes; it needs "
                                f"at least {MIN_KEY_BYTES}")
    return key


@dataclass(frozen=True)
class PeerVm:
    generation: int
    qemu_alive: bool
    received: float          # time.monotonic() of the last datagram that named it


class Heartbeat:
    def __init__(self, host_id: str, address: str, port: int, key: bytes | None = None):
        self.host_id = host_id
        self._key = key
        # Which process of this host sent a datagram, and its order among them.
        self._boot = os.urandom(8).hex()
        self._seq = 0
        self._newest: dict[str, tuple[str, int]] = {}
        self._warned: dict[tuple[str, str], float] = {}
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
        with self._lock:
            self._seq += 1
            seq = self._seq
        body = json.dumps({"host": self.host_id, "boot": self._boot, "seq": seq,
                           "ts": time.time(),
                           "vms": {v: [g, a] for v, (g, a) in vms.items()}})
        data = (json.dumps({"body": body, "mac": self._mac(body)}) if self._key
                else body).encode()
        try:
            self._sock.sendto(data, (address, port))
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

    def _mac(self, body: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def _receive(self) -> None:
        while not self._stopped.is_set():
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                return
            self.accept(data, sender[0])

    def accept(self, data: bytes, sender: str) -> bool:
        """Record one datagram from `sender` (an address, for the logs); False if dropped."""
        now = time.monotonic()
        try:
            msg = json.loads(data)
            if self._key is not None:
                body = msg["body"]
                if not hmac.compare_digest(str(msg["mac"]), self._mac(body)):
                    return self._drop(sender, "a wrong signature (another key?)")
                msg = json.loads(body)
            host = str(msg["host"])
            vms = {str(v): (int(g), bool(a)) for v, (g, a) in msg["vms"].items()}
            if self._key is not None:
                boot, seq, sent = str(msg["boot"]), int(msg["seq"]), float(msg["ts"])
        except (ValueError, KeyError, TypeError):
            return self._drop(sender, "a malformed or unsigned datagram")
        if self._key is not None:
            if abs(time.time() - sent) > REPLAY_WINDOW_S:
                return self._drop(sender, f"a datagram {time.time() - sent:+.0f} s old "
                                          "by its sender's clock (replayed, or clocks "
                                          "apart: check NTP)")
            newest = self._newest.get(host)
            if newest is not None and newest[0] == boot and seq <= newest[1]:
                return self._drop(sender, "a datagram not newer than the last (replayed)")
            self._newest[host] = (boot, seq)
        with self._lock:
            self._last_seen[host] = now
            for vm_id, (gen, alive) in vms.items():
                self._vms[(host, vm_id)] = PeerVm(gen, alive, now)
        return True

    def _drop(self, sender: str, why: str) -> bool:
        now = time.monotonic()
        if now - self._warned.get((sender, why), -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[(sender, why)] = now
            log.warning("ignoring heartbeats from %s: %s", sender, why)
        return False


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
