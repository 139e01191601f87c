"""The per-host agent's HTTPS API: the one place that speaks it, client and server.

The poller, the `ovirt-ft` CLI, the peer agent and the agent server all import this
module, so both ends share one schema. The protocol is described for humans in
`docs/agent-api.md`.

- Transport: HTTPS with mutual TLS (docs/decisions.md, D7). Both sides present a
  certificate signed by the same CA (the engine CA on real hosts, the lab CA in the lab);
  the client checks the agent's host name or address against its certificate.
- Bodies are JSON. Every client call has an explicit timeout; failures are typed.
- The server is `http.server.ThreadingHTTPServer` wrapping a `Backend` that the real
  agent implements; it validates requests and maps backend exceptions to HTTP codes.
"""
from __future__ import annotations

import enum
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, cast

from vdsm_ft.agenterrors import (INTERNAL, INTERNAL_MESSAGE, METHOD_NOT_ALLOWED, NOT_FOUND,
                                 HTTP_ERROR, AgentError, AgentProtocolError, AgentRejected,
                                 AgentTimeout, AgentUnreachable, BadRequest, Conflict,
                                 Forbidden, NotFound, Unavailable, check_id, error_body,
                                 error_of, rejected)
from vdsm_ft.layout import Endpoints
from vdsm_ft.qemu_probe import QemuCapability

__all__ = [
    "API_PREFIX", "DEFAULT_PORT", "DEFAULT_TIMEOUT", "DEFAULT_POLLER_IDENTITY", "MAX_BODY",
    "SERVER_SOCKET_TIMEOUT",
    "JSON_TYPE", "METRICS_TYPE", "COPYING_BACK", "VmState", "Role", "Failover", "VmStatus",
    "HostStatus", "PeerSpec", "PrepareSecondary", "SecondaryReady", "TlsFiles",
    "client_context", "server_context", "Caller", "AgentClient", "Backend", "AgentServer",
    # What AgentClient raises and a Backend may raise, from vdsm_ft/agenterrors.py.
    "AgentError", "AgentUnreachable", "AgentTimeout", "AgentProtocolError", "AgentRejected",
    "BadRequest", "Forbidden", "NotFound", "Conflict", "Unavailable",
]

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
DEFAULT_PORT = 54329
DEFAULT_TIMEOUT = 5.0
# The Common Name of the poller's client certificate, as docs/install.md has it enrolled
# and the lab issues it (ftlab/supervisor.py, agentlab.py); `[agent] poller_identity`.
DEFAULT_POLLER_IDENTITY = "ovirt-ft-poller"
# Requests are small; anything bigger is a mistake or an attack.
MAX_BODY = 1 << 20
# A client that does not finish its TLS handshake or its request within this bound
# loses its server thread.
SERVER_SOCKET_TIMEOUT = 30.0
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ---------------------------------------------------------------- schema

# The reason of a Not Protected survivor while its storage-domain image is behind
# (vdsm_ft.copyback); the agent appends the progress, the poller keys one event on it.
COPYING_BACK = "copying back to the storage domain"


class VmState(str, enum.Enum):
    """Protection states, named as admins see them (CLI, engine events)."""

    STARTING = "Starting"
    SYNCING = "Syncing"
    PROTECTED = "Protected"
    NOT_PROTECTED = "Not Protected"      # reason says why; the poller does not retry
    NEED_SECONDARY = "Need Secondary"    # protectable, waiting for a peer from the poller
    FAILING_OVER = "Failing Over"
    # A survivor moves into a domain with the VM's own name, UUID and oVirt metadata.
    TAKING_IDENTITY = "Taking Identity"
    DISABLED = "Disabled"                # protection off (unprotect) or suspended
    DOWN = "Down"


class Role(str, enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    NONE = "none"


def _field(data: dict, key: str, kind: type | tuple[type, ...], what: str,
           default: Any = ..., nonneg: bool = False) -> Any:
    if key not in data:
        if default is ...:
            raise BadRequest(f"{what}: missing field {key!r}")
        return default
    value = data[key]
    if value is None and default is None:
        return None
    # bool is an int in Python; a JSON true must not pass as a count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRequest(f"{what}.{key} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"{what}.{key} must be {_kind_name(kind)}, got {value!r}")
    if nonneg and value < 0:
        raise BadRequest(f"{what}.{key} must be >= 0, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             dict: "an object", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _object(data: Any, what: str) -> dict:
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _port(data: dict, key: str, what: str) -> int:
    port = _field(data, key, int, what)
    if not 0 < port < 65536:
        raise BadRequest(f"{what}.{key} must be a TCP port (1-65535), got {port}")
    return port


def _address(data: dict, key: str, what: str) -> str:
    value = _field(data, key, str, what)
    if not value or len(value) > 255 or any(c.isspace() for c in value):
        raise BadRequest(f"{what}.{key} must be a host name or IP address, got {value!r}")
    return value


@dataclass(frozen=True)
class Failover:
    """The last failover of a pair, as the survivor saw it."""

    at: float                   # unix time when the survivor went live
    from_host: str              # engine host id of the lost primary
    to_host: str                # engine host id of the survivor
    duration_ms: float          # detection to survivor running outside COLO
    # Of that, detection to the arbiter's answer (the live claim won); the rest is
    # QEMU's failover. None from agents that did not report it.
    arbitration_ms: float | None = None
    # The arbiter's proof, an explicit input to `fence manual`: the survivor won this
    # generation's live claim and the old primary's claim can no longer be renewed, so
    # the old primary cannot run this VM any more.
    old_primary_cannot_run: bool = False
    # The survivor then moved into a domain with the VM's own identity (vdsm_ft/identity.py):
    # the domain it runs in now, and how long the workload paused for that local migration.
    # "" / None: not moved (it still runs as the secondary's domain).
    domain: str = ""
    identity_pause_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Failover:
        what = "last_failover"
        data = _object(data, what)
        return cls(
            at=float(_field(data, "at", (int, float), what, nonneg=True)),
            from_host=check_id(_field(data, "from_host", str, what), f"{what}.from_host"),
            to_host=check_id(_field(data, "to_host", str, what), f"{what}.to_host"),
            duration_ms=float(_field(data, "duration_ms", (int, float), what, nonneg=True)),
            arbitration_ms=_field(data, "arbitration_ms", (int, float), what, default=None,
                                  nonneg=True),
            old_primary_cannot_run=_field(data, "old_primary_cannot_run", bool, what,
                                          default=False),
            domain=_field(data, "domain", str, what, default=""),
            identity_pause_ms=_field(data, "identity_pause_ms", (int, float), what,
                                     default=None, nonneg=True))


@dataclass(frozen=True)
class VmStatus:
    """One VM's protection status as one agent sees it.

    `vm_id` is always the engine's VM id, on both roles and after failovers (the
    secondary's libvirt domain has another UUID, see docs/engine-view.md).
    """

    vm_id: str
    name: str
    state: VmState
    role: Role
    reason: str = ""            # required for Not Protected; free text otherwise
    primary_host: str | None = None
    secondary_host: str | None = None
    generation: int = 0         # the arbiter's pairing generation (0 = never paired)
    suspended: bool = False     # Disabled by an admin's suspend (the poller must wait)
    checkpoints_per_minute: float = 0.0
    last_checkpoint_pause_ms: float | None = None
    replication_bytes: int = 0
    replication_bytes_per_second: float = 0.0   # over the last minute
    lag_seconds: float | None = None   # time since the last completed checkpoint
    failovers: int = 0
    last_failover: Failover | None = None
    # After a failover onto a replica: when the copy-back made the storage-domain image
    # current again (wall clock), for the failover counted in `failovers`; None: not yet
    # or never needed.
    image_current_at: float | None = None
    # The last ALERT this agent process raised about the arbiter for this VM (a corrupt
    # live claim, docs/arbiter.md); "" for none. A field of its own so the poller's alert
    # event does not hang on the wording of `reason`, which later steps overwrite.
    arbiter_alert: str = ""

    def __post_init__(self) -> None:
        check_id(self.vm_id, "vm_id")
        if not isinstance(self.state, VmState):
            raise BadRequest(f"state must be a VmState, got {self.state!r}")
        if not isinstance(self.role, Role):
            raise BadRequest(f"role must be a Role, got {self.role!r}")
        if self.state is VmState.NOT_PROTECTED and not self.reason.strip():
            raise BadRequest(f"VM {self.vm_id}: state 'Not Protected' needs a reason")

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it deep-copies, and an agent serializes every VM of its
        # host on each poll.
        data = dict(self.__dict__)
        data["state"] = self.state.value
        data["role"] = self.role.value
        data["last_failover"] = self.last_failover.to_dict() if self.last_failover else None
        return data

    @classmethod
    def from_dict(cls, data: Any) -> VmStatus:
        what = "vm status"
        data = _object(data, what)
        state = _field(data, "state", str, what)
        role = _field(data, "role", str, what)
        try:
            state_v = VmState(state)
        except ValueError:
            raise BadRequest(f"{what}.state must be one of "
                             f"{[s.value for s in VmState]}, got {state!r}") from None
        try:
            role_v = Role(role)
        except ValueError:
            raise BadRequest(f"{what}.role must be one of {[r.value for r in Role]}, "
                             f"got {role!r}") from None
        last = data.get("last_failover")
        return cls(
            vm_id=_field(data, "vm_id", str, what),
            name=_field(data, "name", str, what),
            state=state_v,
            role=role_v,
            reason=_field(data, "reason", str, what, default=""),
            primary_host=_field(data, "primary_host", str, what, default=None),
            secondary_host=_field(data, "secondary_host", str, what, default=None),
            generation=_field(data, "generation", int, what, default=0, nonneg=True),
            suspended=_field(data, "suspended", bool, what, default=False),
            checkpoints_per_minute=float(_field(data, "checkpoints_per_minute",
                                                (int, float), what, default=0.0,
                                                nonneg=True)),
            last_checkpoint_pause_ms=_opt_float(data, "last_checkpoint_pause_ms", what),
            replication_bytes=_field(data, "replication_bytes", int, what, default=0,
                                     nonneg=True),
            replication_bytes_per_second=float(_field(
                data, "replication_bytes_per_second", (int, float), what, default=0.0,
                nonneg=True)),
            lag_seconds=_opt_float(data, "lag_seconds", what),
            failovers=_field(data, "failovers", int, what, default=0, nonneg=True),
            last_failover=Failover.from_dict(last) if last is not None else None,
            image_current_at=_opt_float(data, "image_current_at", what),
            arbiter_alert=_field(data, "arbiter_alert", str, what, default=""))


def _opt_float(data: dict, key: str, what: str) -> float | None:
    value = _field(data, key, (int, float), what, default=None, nonneg=True)
    return None if value is None else float(value)


@dataclass(frozen=True)
class HostStatus:
    """Everything one agent knows: its identity and all its VMs (both roles)."""

    host_id: str                  # the engine's id of this host (from the agent's config)
    replication_address: str      # where peers reach this host's QEMUs (replication net)
    agent_version: str
    vms: tuple[VmStatus, ...] = ()
    # Whether its QEMU can do COLO (vdsm_ft.qemu_probe); None: not probed yet, or an
    # agent older than the probe.
    qemu: QemuCapability | None = None

    def to_dict(self) -> dict:
        return {"host_id": self.host_id, "replication_address": self.replication_address,
                "agent_version": self.agent_version,
                "vms": [v.to_dict() for v in self.vms],
                "qemu": self.qemu.to_dict() if self.qemu else None}

    @classmethod
    def from_dict(cls, data: Any) -> HostStatus:
        what = "host status"
        data = _object(data, what)
        vms = _field(data, "vms", list, what)
        return cls(
            host_id=check_id(_field(data, "host_id", str, what), "host_id"),
            replication_address=_address(data, "replication_address", what),
            agent_version=_field(data, "agent_version", str, what),
            vms=tuple(VmStatus.from_dict(v) for v in vms),
            qemu=_qemu(data.get("qemu"), what))


def _qemu(data: Any, what: str) -> QemuCapability | None:
    if data is None:
        return None
    try:
        return QemuCapability.from_dict(data)
    except ValueError as e:
        raise BadRequest(f"{what}.qemu: {e}") from None


@dataclass(frozen=True)
class PeerSpec:
    """How to reach another host's agent and its replication endpoint."""

    host_id: str
    agent_address: str
    agent_port: int
    replication_address: str

    def __post_init__(self) -> None:
        check_id(self.host_id, "host_id")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "peer") -> PeerSpec:
        data = _object(data, what)
        return cls(host_id=check_id(_field(data, "host_id", str, what), f"{what}.host_id"),
                   agent_address=_address(data, "agent_address", what),
                   agent_port=_port(data, "agent_port", what),
                   replication_address=_address(data, "replication_address", what))


@dataclass(frozen=True)
class PrepareSecondary:
    """Primary agent -> peer agent: start the secondary of `vm_id` for `generation`.

    `domain_xml` is the primary's libvirt XML; the peer derives the secondary from it
    (docs/engine-view.md). `disks` are the guest disks' virtual sizes in bytes, by disk
    index; `nics` are (index, netdev, mac) as in `vdsm_ft.layout.Nic`; `primary_ports`
    are the primary's filter-mirror and colo-compare ports, one each per NIC.
    `colo_tls`: the primary runs COLO over TLS (`[agent] colo_tls_dir`); the peer
    refuses when its own setting differs, since either way the QEMUs could not talk.
    `qemu_build` is the identity of the primary's QEMU (`vdsm_ft.emulator.Emulator.
    identity`) and `machine` its machine type: the peer refuses a QEMU of another build
    before it starts anything, and starts the secondary with the same machine type.
    """

    vm_id: str
    name: str
    generation: int
    primary: PeerSpec
    domain_xml: str
    disks: tuple[tuple[int, int], ...]
    nics: tuple[tuple[int, str, str], ...] = ()
    mirror_ports: tuple[int, ...] = ()
    compare_ports: tuple[int, ...] = ()
    colo_tls: bool = False
    qemu_build: str = ""
    machine: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "generation": self.generation,
                "colo_tls": self.colo_tls, "qemu_build": self.qemu_build,
                "machine": self.machine,
                "primary": self.primary.to_dict(), "domain_xml": self.domain_xml,
                "disks": [{"index": i, "size": s} for i, s in self.disks],
                "nics": [{"index": i, "netdev": n, "mac": m} for i, n, m in self.nics],
                "mirror_ports": list(self.mirror_ports),
                "compare_ports": list(self.compare_ports)}

    @classmethod
    def from_dict(cls, vm_id: str, data: Any) -> PrepareSecondary:
        what = "prepare-secondary"
        data = _object(data, what)
        disks = []
        for d in _field(data, "disks", list, what):
            d = _object(d, f"{what}.disks[]")
            disks.append((_field(d, "index", int, "disk", nonneg=True),
                          _field(d, "size", int, "disk", nonneg=True)))
        nics = []
        for n in _field(data, "nics", list, what, default=[]):
            n = _object(n, f"{what}.nics[]")
            nics.append((_field(n, "index", int, "nic", nonneg=True),
                         _field(n, "netdev", str, "nic"), _field(n, "mac", str, "nic")))
        ports = {}
        for key in ("mirror_ports", "compare_ports"):
            values = _field(data, key, list, what, default=[])
            for p in values:
                _port({"p": p}, "p", f"{what}.{key}[]")
            ports[key] = tuple(values)
        xml = _field(data, "domain_xml", str, what)
        if not xml.strip():
            raise BadRequest(f"{what}.domain_xml is empty")
        return cls(vm_id=check_id(vm_id, "vm_id"), name=_field(data, "name", str, what),
                   generation=_field(data, "generation", int, what, nonneg=True),
                   primary=PeerSpec.from_dict(_field(data, "primary", dict, what),
                                              f"{what}.primary"),
                   domain_xml=xml, disks=tuple(disks), nics=tuple(nics),
                   # Absent from an agent that predates TLS: it runs plain TCP.
                   colo_tls=_field(data, "colo_tls", bool, what, default=False),
                   # Absent from an agent that predates [qemu] emulator: unknown.
                   qemu_build=_field(data, "qemu_build", str, what, default=""),
                   machine=_field(data, "machine", str, what, default=""),
                   **ports)


@dataclass(frozen=True)
class SecondaryReady:
    """Peer agent -> primary agent: where the prepared secondary listens."""

    vm_id: str
    generation: int
    migration_port: int
    nbd_port: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SecondaryReady:
        what = "secondary ready"
        data = _object(data, what)
        return cls(vm_id=check_id(_field(data, "vm_id", str, what), "vm_id"),
                   generation=_field(data, "generation", int, what, nonneg=True),
                   migration_port=_port(data, "migration_port", what),
                   nbd_port=_port(data, "nbd_port", what))

    def endpoints(self, primary_host: str, secondary_host: str,
                  mirror_ports: tuple[int, ...] = (),
                  compare_ports: tuple[int, ...] = ()) -> Endpoints:
        return Endpoints(primary_host=primary_host, secondary_host=secondary_host,
                         migration_port=self.migration_port, nbd_port=self.nbd_port,
                         mirror_ports=mirror_ports, compare_ports=compare_ports)


# ---------------------------------------------------------------- TLS

@dataclass(frozen=True)
class TlsFiles:
    """This side's certificate and key, and the CA that signs both sides."""

    cert: str
    key: str
    ca: str


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    """mTLS client: present our cert, verify the agent's cert and its host name."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """mTLS server: a client without a certificate from our CA gets no session."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a request, from its client certificate (mutual TLS
    verified it against the CA already): its subject's Common Name, and the DNS names
    and IP addresses of its subjectAltName, the names a client checks a server by."""

    common_name: str
    names: frozenset[str]

    @classmethod
    def from_cert(cls, cert: dict) -> Caller:
        """From `SSLSocket.getpeercert()`."""
        cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn
                   if k == "commonName"), "")
        names = frozenset(_name(v) for k, v in cert.get("subjectAltName", ())
                          if k in ("DNS", "IP Address"))
        return cls(common_name=cn, names=names)

    def holds(self, address: str) -> bool:
        """Whether the certificate names `address`, as a client dialling it would check."""
        return _name(address) in self.names

    def __str__(self) -> str:
        names = ", ".join(sorted(self.names)) or "none"
        return f"CN={self.common_name or '(none)'}, subjectAltName {names}"


def _name(value: str) -> str:
    """One spelling per name: the certificate may write an IPv6 address in full."""
    value = value.strip()
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        return value.lower()


# ---------------------------------------------------------------- client

class AgentClient:
    """Talks to one agent. Thread-safe; keeps one persistent connection.

    Every call is bounded by `timeout` seconds per socket operation (connect, TLS
    handshake, send, each read). Actions are idempotent on the agent side, so a call
    that finds a kept-alive connection closed by the server is retried once on a new
    connection.
    """

    def __init__(self, address: str, port: int, context: ssl.SSLContext,
                 timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.port = port
        self.timeout = timeout
        self._context = context
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AgentClient({self.address}:{self.port})"

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- endpoints

    def host_status(self) -> HostStatus:
        return HostStatus.from_dict(self._json("GET", "/status"))

    def vm_status(self, vm_id: str) -> VmStatus:
        return VmStatus.from_dict(self._json("GET", f"/vms/{check_id(vm_id, 'vm_id')}"))

    def protect(self, vm_id: str, peer: PeerSpec) -> VmStatus:
        return self._action(vm_id, "protect", {"peer": peer.to_dict()})

    def unprotect(self, vm_id: str) -> VmStatus:
        return self._action(vm_id, "unprotect")

    def suspend(self, vm_id: str) -> VmStatus:
        return self._action(vm_id, "suspend")

    def resume(self, vm_id: str) -> VmStatus:
        return self._action(vm_id, "resume")

    def test_failover(self, vm_id: str) -> VmStatus:
        return self._action(vm_id, "test-failover")

    def restart_secondary(self, vm_id: str) -> VmStatus:
        return self._action(vm_id, "restart-secondary")

    def migrate_secondary(self, vm_id: str, to: PeerSpec) -> VmStatus:
        return self._action(vm_id, "migrate-secondary", {"to": to.to_dict()})

    def prepare_secondary(self, request: PrepareSecondary) -> SecondaryReady:
        return SecondaryReady.from_dict(self._json(
            "POST", f"/vms/{request.vm_id}/prepare-secondary", request.to_dict()))

    def metrics(self) -> str:
        status, ctype, body = self._request("GET", "/metrics", None, versioned=False)
        return body.decode("utf-8", errors="replace")

    # -- plumbing

    def _action(self, vm_id: str, action: str, body: dict | None = None) -> VmStatus:
        path = f"/vms/{check_id(vm_id, 'vm_id')}/{action}"
        return VmStatus.from_dict(self._json("POST", path, body or {}))

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        status, ctype, raw = self._request(method, path, body)
        if not ctype.startswith(JSON_TYPE):
            raise AgentProtocolError(f"{self}: {method} {path}: expected JSON, "
                                     f"got {ctype or 'no content type'}")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise AgentProtocolError(f"{self}: {method} {path}: invalid JSON: {e}") from None
        return data

    def _request(self, method: str, path: str, body: dict | None,
                 versioned: bool = True) -> tuple[int, str, bytes]:
        url = (API_PREFIX + path) if versioned else path
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": JSON_TYPE}
        if payload is not None:
            headers["Content-Type"] = JSON_TYPE
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                conn = self._connection()
                try:
                    conn.request(method, url, body=payload, headers=headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                except (http.client.RemoteDisconnected, BrokenPipeError,
                        ConnectionResetError, ssl.SSLEOFError) as e:
                    # A kept-alive connection the server has closed in the meantime
                    # shows as any of these; an idempotent call is retried once.
                    self._drop()
                    if reused and attempt == 0:
                        continue
                    raise AgentUnreachable(f"{self}: connection lost: {e}") from None
                except (socket.timeout, TimeoutError):
                    self._drop()
                    raise AgentTimeout(f"{self}: no answer to {method} {url} within "
                                       f"{self.timeout:g} s") from None
                except ssl.SSLError as e:
                    self._drop()
                    raise AgentUnreachable(f"{self}: TLS failed: {e}") from None
                except (OSError, http.client.HTTPException) as e:
                    self._drop()
                    raise AgentUnreachable(f"{self}: {e}") from None
                if resp.will_close:
                    self._drop()
                break
        ctype = resp.getheader("Content-Type", "")
        if resp.status >= 400:
            raise self._rejection(resp.status, ctype, raw)
        return resp.status, ctype, raw

    def _rejection(self, status: int, ctype: str, raw: bytes) -> AgentRejected:
        found = None
        if ctype.startswith(JSON_TYPE):
            try:
                found = error_of(json.loads(raw))
            except ValueError:
                pass
        code, message = found or (HTTP_ERROR, raw.decode("utf-8", errors="replace")[:200])
        return rejected(status, code, message)

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(
                self.address, self.port, context=self._context, timeout=self.timeout)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------- server

class Backend(ABC):
    """What the agent implements. Raise `AgentRejected` subclasses for refusals
    (NotFound, Conflict, BadRequest, Unavailable); anything else becomes a 500 whose
    details go to the agent's log, not to the client.

    Actions return the VM's status right after accepting the action; long work
    (resync, failover) continues in the background and shows in later statuses.
    """

    @abstractmethod
    def host_status(self) -> HostStatus: ...

    @abstractmethod
    def vm_status(self, vm_id: str) -> VmStatus: ...

    @abstractmethod
    def protect(self, vm_id: str, peer: PeerSpec) -> VmStatus: ...

    @abstractmethod
    def unprotect(self, vm_id: str) -> VmStatus: ...

    @abstractmethod
    def suspend(self, vm_id: str) -> VmStatus: ...

    @abstractmethod
    def resume(self, vm_id: str) -> VmStatus: ...

    @abstractmethod
    def test_failover(self, vm_id: str) -> VmStatus: ...

    @abstractmethod
    def restart_secondary(self, vm_id: str) -> VmStatus: ...

    @abstractmethod
    def migrate_secondary(self, vm_id: str, to: PeerSpec) -> VmStatus: ...

    @abstractmethod
    def prepare_secondary(self, request: PrepareSecondary) -> SecondaryReady: ...

    @abstractmethod
    def metrics(self) -> str:
        """Prometheus text exposition format."""

    @abstractmethod
    def pairing(self, vm_id: str) -> tuple[Role, PeerSpec | None] | None:
        """This host's role for `vm_id` and the peer in its record; None when the VM is
        not known here. The server authorizes the pair protocol's calls by it."""


class _Gate:
    """Who may cross the agent API boundary (docs/security.md, "Who may call the agent").

    Every CA-signed client may read (statuses, metrics): they name ids and counters,
    nothing secret, and the CLI, the poller and a primary watching its secondary read
    them. Admin operations come from the poller (and the CLI, which runs with its
    certificate) alone. The pair protocol comes from the VM's primary alone: a host is
    known by the addresses its certificate names, the same check its peer makes when
    dialling it.
    """

    def __init__(self, caller: Caller, poller_identity: str):
        self.caller = caller
        self.poller_identity = poller_identity

    def _is_poller(self) -> bool:
        return self.caller.common_name == self.poller_identity

    def admin(self, what: str) -> None:
        if not self._is_poller():
            raise Forbidden(f"{what} is an admin operation: only the poller's certificate "
                            f"(CN={self.poller_identity}) may ask for it, not this client's "
                            f"({self.caller})")

    def unprotect(self, b: Backend, vm_id: str) -> None:
        """The poller, or the primary dropping its secondary here (controller.py)."""
        if self._is_poller():
            return
        pairing = b.pairing(vm_id)
        if pairing is not None:
            role, peer = pairing
            if role is Role.SECONDARY and peer is not None and \
                    self.caller.holds(peer.agent_address):
                return
        raise Forbidden(f"unprotect of VM {vm_id} comes from the poller, or from its "
                        f"primary when this host holds its secondary; this client "
                        f"({self.caller}) is neither")

    def prepare(self, b: Backend, request: PrepareSecondary) -> None:
        """The primary named in the request, and for a VM known here its peer on record."""
        named = request.primary
        if not self.caller.holds(named.agent_address):
            raise Forbidden(f"prepare-secondary of VM {request.vm_id} names primary "
                            f"{named.host_id} at {named.agent_address}, but this client's "
                            f"certificate ({self.caller}) does not name that address")
        pairing = b.pairing(request.vm_id)
        # A record without a peer (a primary that died here, never protected) names no
        # host to impersonate; the new pairing replaces it (secondary.py).
        peer = pairing[1] if pairing is not None else None
        if peer is not None and (peer.host_id != named.host_id or
                                 not self.caller.holds(peer.agent_address)):
            raise Forbidden(f"VM {request.vm_id} is paired with {peer.host_id} at "
                            f"{peer.agent_address} on this host; prepare-secondary comes "
                            f"from that host only, not from this client ({self.caller})")


# (method, regex) -> handler(backend, match, body, gate) -> (status, payload)
_Route = Callable[[Backend, "re.Match[str]", Any, _Gate], tuple[int, Any]]
_VM = r"/v1/vms/(?P<vm>[^/]+)"


def _vm(m: "re.Match[str]") -> str:
    return check_id(m.group("vm"), "vm_id")


def _no_body(body: Any) -> None:
    if body not in (None, {}):
        raise BadRequest("this action takes no parameters; send {} or no body")


def _open(read: Callable[[Backend, "re.Match[str]"], Any]) -> _Route:
    def route(b: Backend, m: "re.Match[str]", body: Any, gate: _Gate) -> tuple[int, Any]:
        return 200, read(b, m).to_dict()
    return route


def _simple(action: str) -> _Route:
    def route(b: Backend, m: "re.Match[str]", body: Any, gate: _Gate) -> tuple[int, Any]:
        gate.admin(action.replace("_", "-"))
        _no_body(body)
        return 202, getattr(b, action)(_vm(m)).to_dict()
    return route


def _unprotect(b: Backend, m: "re.Match[str]", body: Any, gate: _Gate) -> tuple[int, Any]:
    vm_id = _vm(m)
    gate.unprotect(b, vm_id)
    _no_body(body)
    return 202, b.unprotect(vm_id).to_dict()


def _protect(b: Backend, m: "re.Match[str]", body: Any, gate: _Gate) -> tuple[int, Any]:
    gate.admin("protect")
    body = _object(body, "protect request")
    peer = PeerSpec.from_dict(_field(body, "peer", dict, "protect request"))
    return 202, b.protect(_vm(m), peer).to_dict()


def _migrate(b: Backend, m: "re.Match[str]", body: Any, gate: _Gate) -> tuple[int, Any]:
    gate.admin("migrate-secondary")
    body = _object(body, "migrate-secondary request")
    to = PeerSpec.from_dict(_field(body, "to", dict, "migrate-secondary request"), "to")
    return 202, b.migrate_secondary(_vm(m), to).to_dict()


def _prepare(b: Backend, m: "re.Match[str]", body: Any, gate: _Gate) -> tuple[int, Any]:
    # Parsed first: the rule is about the primary the request names.
    request = PrepareSecondary.from_dict(_vm(m), body)
    gate.prepare(b, request)
    return 200, b.prepare_secondary(request).to_dict()


_ROUTES: list[tuple[str, re.Pattern[str], _Route]] = [
    ("GET", re.compile(r"/v1/status"), _open(lambda b, m: b.host_status())),
    ("GET", re.compile(_VM), _open(lambda b, m: b.vm_status(_vm(m)))),
    ("POST", re.compile(_VM + "/protect"), _protect),
    ("POST", re.compile(_VM + "/unprotect"), _unprotect),
    ("POST", re.compile(_VM + "/suspend"), _simple("suspend")),
    ("POST", re.compile(_VM + "/resume"), _simple("resume")),
    ("POST", re.compile(_VM + "/test-failover"), _simple("test_failover")),
    ("POST", re.compile(_VM + "/restart-secondary"), _simple("restart_secondary")),
    ("POST", re.compile(_VM + "/migrate-secondary"), _migrate),
    ("POST", re.compile(_VM + "/prepare-secondary"), _prepare),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive: the poller polls every host each cycle
    server: AgentServer
    timeout = SERVER_SOCKET_TIMEOUT

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], fmt % args)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/metrics":
            self._metrics()
        else:
            self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _metrics(self) -> None:
        try:
            text = self.server.backend.metrics()
        except Exception:
            log.exception("metrics failed")
            self._send_json(500, error_body(INTERNAL, "metrics failed; see the agent log"))
            return
        self._send(200, METRICS_TYPE, text.encode())

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_body()
            for route_method, pattern, route in _ROUTES:
                m = pattern.fullmatch(path)
                if m:
                    if route_method != method:
                        continue
                    gate = _Gate(self._caller(), self.server.poller_identity)
                    status, payload = route(self.server.backend, m, body, gate)
                    self._send_json(status, payload)
                    return
            if any(p.fullmatch(path) for _, p, _ in _ROUTES):
                self._send_json(405, error_body(METHOD_NOT_ALLOWED,
                                            f"{method} is not allowed on {path}"))
            else:
                self._send_json(404, error_body(NOT_FOUND, f"no such endpoint: {path}"))
        except AgentRejected as e:
            self._send_json(e.status, error_body(e.code, e.message))
        except Exception:
            log.exception("%s %s failed", method, path)
            self._send_json(500, error_body(INTERNAL, INTERNAL_MESSAGE))

    def _caller(self) -> Caller:
        # AgentServer wraps every connection in TLS with CERT_REQUIRED, so a certificate
        # the CA signed is there; without one the empty Caller matches no rule.
        return Caller.from_cert(cast(ssl.SSLSocket, self.connection).getpeercert() or {})

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked bodies are not accepted; send Content-Length")
        if length is None:
            return None
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"body of {n} bytes is outside 0..{MAX_BODY}")
        raw = self.rfile.read(n)
        if not raw:
            return None
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith(JSON_TYPE):
            raise BadRequest(f"Content-Type must be {JSON_TYPE}, got {ctype or 'none'}")
        try:
            return json.loads(raw)
        except ValueError as e:
            # The rest of a body longer than its Content-Length would be read as the next
            # request on this keep-alive connection: it ends here instead.
            self.close_connection = True
            raise BadRequest(f"body is not valid JSON: {e}; check that Content-Length "
                             f"({n}) counts the whole body, not more or less") from None

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, JSON_TYPE, json.dumps(payload).encode())

    def _send(self, status: int, ctype: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class AgentServer(ThreadingHTTPServer):
    """The agent's HTTPS endpoint. TLS handshakes run in the per-connection thread,
    with a bound, so a client that stalls its handshake blocks nobody else.

    `poller_identity` is the Common Name of the one certificate admin operations are
    taken from (`[agent] poller_identity`)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend, tls: TlsFiles,
                 poller_identity: str = DEFAULT_POLLER_IDENTITY):
        self.backend = backend
        self.poller_identity = poller_identity
        self._tls = server_context(tls)
        self._open: set[ssl.SSLSocket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(SERVER_SOCKET_TIMEOUT)
        try:
            tls_sock = self._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.warning("TLS handshake from %s refused: %s", client_address[0], e)
            return
        with self._open_lock:
            self._open.add(tls_sock)
        try:
            self.RequestHandlerClass(tls_sock, client_address, self)
        finally:
            with self._open_lock:
                self._open.discard(tls_sock)
            tls_sock.close()

    def server_close(self) -> None:
        """Stop listening and cut kept-alive connections, so a stopped agent is silent."""
        super().server_close()
        with self._open_lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; `shutdown()` + `server_close()` stop it."""
        thread = threading.Thread(target=self.serve_forever, args=(0.1,),
                                  name=f"agent-api:{self.port}", daemon=True)
        thread.start()
        return thread
