"""The arbiter client: pair records, generations and the per-generation live claim in etcd v3.

Talks to etcd's v3 JSON gateway through ``etcd3gw`` (etcd 3.4 serves it at ``/v3/``; the
older ``/v3beta/`` path is gone from 3.5). Every call has an explicit total bound and tries
each endpoint of the cluster in turn; reads are linearizable, so a member cut off from the
quorum never answers with stale data. Key layout, rules and the timing rule:
docs/arbiter.md.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from vdsm_ft.qemu_probe import QemuCapability

log = logging.getLogger(__name__)

# THE TIMING RULE (docs/arbiter.md). A side that has not won the claim within
# ARBITER_BOUND_MS kills its own QEMU. Detection + this bound + the kill must end before
# colo-compare's compare_timeout (vdsm_ft.colo.COMPARE_TIMEOUT_MS, 3000 ms), so that a
# partitioned old primary is dead before any held packet could be released.
ARBITER_BOUND_MS = 1500
ARBITER_BOUND_S = ARBITER_BOUND_MS / 1000
# Time allowed between "lost" (or no answer) and the QEMU process being gone.
KILL_MARGIN_MS = 500

API_PATH = "/v3/"
PREFIX = "/vdsm-ft"
PAIR_STATES = ("Starting", "Syncing", "Protected", "Not Protected", "Need Secondary",
               "Failing Over", "Taking Identity", "Disabled", "Down")
# A pair in this state has no live copy anywhere (stopped on purpose, or lost).
DOWN = "Down"
MAX_REASON = 1024

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_RETRY_PAUSE = 0.02
# A member on a powered-off host sends nothing back, not even a reset: in the first round
# each endpoint gets at most this long, so a silent member does not hold a claim for a
# third of the bound. Later rounds share the rest, for a cluster that is merely slow.
FIRST_ROUND_ATTEMPT_S = 0.2
_KEEP: Any = object()  # "leave this field as it is"
T = TypeVar("T")


class ArbiterError(Exception):
    """Base of every arbiter failure."""


class InvalidArgument(ArbiterError, ValueError):
    """A caller passed a value the arbiter cannot store (the message says which)."""


class ArbiterUnavailable(ArbiterError):
    """No etcd endpoint answered within the bound. Fencing rule: kill your own QEMU."""


class ArbiterRejected(ArbiterError):
    """etcd answered but refused the request (a client bug or an unknown lease)."""


class ArbiterAuthError(ArbiterRejected):
    """etcd refused this client's credentials or permissions (the message says which to fix)."""


class ArbiterTlsError(ArbiterUnavailable):
    """No endpoint could be reached because every TLS handshake failed (certificates or CA).
    Still "unavailable" for the fencing rule: nobody can win a claim through it."""


class StaleGeneration(ArbiterError):
    """The generation named is not the VM's current one: the caller lost that pairing."""

    def __init__(self, vm_id: str, generation: int, current: int) -> None:
        super().__init__(f"VM {vm_id}: generation {generation} is not current "
                         f"(current is {current}); this side must not act as live")
        self.vm_id, self.generation, self.current = vm_id, generation, current


class NoSuchPair(ArbiterError):
    """The VM has no pair record: it was never paired, or the pair was deleted."""


class NotAPairMember(ArbiterError):
    """The host is neither primary nor secondary of the VM's current generation."""


class PairConflict(ArbiterError):
    """The pair record changed since it was read (compare-and-swap on mod_revision failed)."""

    def __init__(self, vm_id: str, current: "PairRecord | None") -> None:
        super().__init__(f"VM {vm_id}: pair record changed concurrently "
                         f"(now at mod_revision {current.mod_revision if current else 0})")
        self.current = current


class CorruptRecord(ArbiterError):
    """A value read from etcd is not what this module writes."""


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{what} must be 1-128 characters of letters, digits and "
                              f"'._:@-', starting with a letter or digit; got {value!r}")
    return value


def _check_generation(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"generation must be an integer >= 1; got {value!r}")
    return value


def _check_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds; got {value!r}")
    return float(value)


class TimingRuleViolation(ArbiterError, ValueError):
    """The configured timeouts break the fencing rule of docs/arbiter.md."""


def check_fencing_budget(detection_ms: int, compare_timeout_ms: int,
                         bound_ms: int = ARBITER_BOUND_MS) -> None:
    """Raise TimingRuleViolation unless detection + arbiter bound + kill < compare_timeout."""
    total = detection_ms + bound_ms + KILL_MARGIN_MS
    if total >= compare_timeout_ms:
        raise TimingRuleViolation(
            f"failure detection {detection_ms} ms + arbiter bound {bound_ms} ms + kill margin "
            f"{KILL_MARGIN_MS} ms = {total} ms is not below colo-compare compare_timeout "
            f"{compare_timeout_ms} ms: a partitioned primary could release output; shorten "
            "detection or raise compare_timeout")


def _check_fields(state: str = _KEEP, reason: str = _KEEP, primary: str = _KEEP,
                  secondary: str | None = _KEEP) -> None:
    if state is not _KEEP and state not in PAIR_STATES:
        raise InvalidArgument(f"state must be one of {', '.join(PAIR_STATES)}; got {state!r}")
    if reason is not _KEEP and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise InvalidArgument(f"reason must be a string of at most {MAX_REASON} characters")
    if primary is not _KEEP:
        _check_name("primary host", primary)
    if secondary is not _KEEP and secondary is not None:
        _check_name("secondary host", secondary)


@dataclass(frozen=True)
class PairRecord:
    """What etcd holds for one FT VM. ``mod_revision`` is etcd's, never encoded."""

    vm_id: str
    generation: int
    primary: str
    secondary: str | None
    state: str
    reason: str = ""
    updated_at: float = 0.0
    mod_revision: int = 0

    def __post_init__(self) -> None:
        _check_name("vm id", self.vm_id)
        _check_generation(self.generation)
        _check_name("primary host", self.primary)
        if self.secondary is not None:
            _check_name("secondary host", self.secondary)
            if self.secondary == self.primary:
                raise InvalidArgument(f"VM {self.vm_id}: primary and secondary are both "
                                      f"{self.primary!r}; a pair needs two hosts")
        _check_fields(state=self.state, reason=self.reason)

    @property
    def members(self) -> tuple[str, ...]:
        return (self.primary,) if self.secondary is None else (self.primary, self.secondary)

    def encode(self) -> bytes:
        body = dataclasses.asdict(self)
        del body["mod_revision"]
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, mod_revision: int = 0) -> "PairRecord":
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise TypeError("not an object")
            return cls(mod_revision=mod_revision, **body)
        except (ValueError, TypeError) as e:
            raise CorruptRecord(f"pair record is not valid: {e}: {data[:200]!r}") from e


# --- keys -------------------------------------------------------------------------------

def pair_key(vm_id: str) -> str:
    return f"{PREFIX}/pairs/{_check_name('vm id', vm_id)}"


def generation_key(vm_id: str) -> str:
    return f"{PREFIX}/generations/{_check_name('vm id', vm_id)}"


def claims_prefix(vm_id: str) -> str:
    return f"{PREFIX}/claims/{_check_name('vm id', vm_id)}/"


def claim_key(vm_id: str, generation: int) -> str:
    # Zero-padded so that key order is generation order (used to prune old claims).
    return f"{claims_prefix(vm_id)}{_check_generation(generation):012d}"


def host_key(host_id: str) -> str:
    return f"{PREFIX}/hosts/{_check_name('host id', host_id)}"


HOSTS_PREFIX = f"{PREFIX}/hosts/"


def stale_image_key(vm_id: str) -> str:
    # Not under pairs/ or claims/: delete_pair must not forget that the image is behind.
    return f"{PREFIX}/stale-images/{_check_name('vm id', vm_id)}"


@dataclass(frozen=True)
class StaleImage:
    """The VM's storage-domain image is behind (docs/decisions.md, D2): ``host`` won
    ``generation`` as its secondary at ``since`` (wall clock) and runs, or ran, the VM on
    its replica; the copy-back onto the image has not finished. Written in the claim's own
    transaction, so no write can reach the replica alone before the arbiter knows
    (vdsm_ft.imagestate)."""

    vm_id: str
    generation: int
    host: str
    since: float

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "StaleImage":
        try:
            body = json.loads(data)
            mark = cls(vm_id=_check_name("vm id", body["vm_id"]),
                       generation=_check_generation(body["generation"]),
                       host=_check_name("host", body["host"]), since=float(body["since"]))
        except (ValueError, TypeError, KeyError, InvalidArgument) as e:
            raise CorruptRecord(f"stale-image mark is not valid: {e}: {data[:200]!r}") from e
        return mark


@dataclass(frozen=True)
class HostRecord:
    """What a host's agent publishes about the host; only that agent writes it."""

    host_id: str
    agent_version: str
    qemu: QemuCapability | None       # can its QEMU do COLO (vdsm_ft.qemu_probe)
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        _check_name("host id", self.host_id)

    def encode(self) -> bytes:
        return json.dumps({"host_id": self.host_id, "agent_version": self.agent_version,
                           "qemu": self.qemu.to_dict() if self.qemu else None,
                           "updated_at": self.updated_at}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "HostRecord":
        try:
            body = json.loads(data)
            qemu = body.get("qemu")
            return cls(host_id=body["host_id"], agent_version=str(body["agent_version"]),
                       qemu=QemuCapability.from_dict(qemu) if qemu is not None else None,
                       updated_at=float(body.get("updated_at", 0.0)))
        except (ValueError, TypeError, KeyError, AttributeError, InvalidArgument) as e:
            raise CorruptRecord(f"host record is not valid: {e}: {data[:200]!r}") from e


def leader_key(name: str) -> str:
    return f"{PREFIX}/leaders/{_check_name('leader name', name)}"


# --- etcd v3 JSON helpers ---------------------------------------------------------------

def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


def _cmp_create(key: str, revision: int) -> dict:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": revision}


def _cmp_mod(key: str, revision: int) -> dict:
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def _cmp_value(key: str, value: str | bytes) -> dict:
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def _cmp_unchanged(key: str, mod_revision: int) -> dict:
    return _cmp_mod(key, mod_revision) if mod_revision else _cmp_create(key, 0)


def _put(key: str, value: str | bytes, lease: int | None = None) -> dict:
    req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def _get(key: str, prefix: bool = False, last: bool = False) -> dict:
    req: dict[str, Any] = {"key": _b64(key)}
    if prefix:
        req["range_end"] = _range_end(key)
    if last:
        req.update(limit=1, sort_order="DESCEND", sort_target="KEY")
    return {"request_range": req}


def _delete(key: str, range_end: str | None = None) -> dict:
    req = {"key": _b64(key)}
    if range_end:
        req["range_end"] = range_end
    return {"request_delete_range": req}


@dataclass(frozen=True)
class _Kv:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def _ranges(result: dict) -> list[_Kv | None]:
    """The first key-value of each range response of a txn result (None if absent)."""
    out: list[_Kv | None] = []
    for resp in result.get("responses", []):
        if "response_range" not in resp:
            continue
        kvs = resp["response_range"].get("kvs") or []
        if not kvs:
            out.append(None)
            continue
        kv = kvs[0]
        out.append(_Kv(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")),
                       int(kv.get("mod_revision", 0)), int(kv.get("lease", 0))))
    return out


def _int_value(kv: _Kv | None, what: str) -> int:
    if kv is None:
        return 0
    try:
        return int(kv.value)
    except ValueError as e:
        raise CorruptRecord(f"{what} holds {kv.value[:50]!r}, not a number") from e


def _claim_holder(kv: _Kv | None) -> str | None:
    if kv is None:
        return None
    try:
        return _check_name("claim holder", json.loads(kv.value)["host"])
    except (ValueError, TypeError, KeyError, InvalidArgument) as e:
        raise CorruptRecord(f"live claim is not valid: {kv.value[:200]!r}") from e


# --- transport --------------------------------------------------------------------------

class _Client(Etcd3Client):
    """Etcd3Client whose request timeout and auth token are set per call (and per thread)
    by _Transport."""

    _local = threading.local()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Only what is configured counts: requests would otherwise let REQUESTS_CA_BUNDLE or
        # CURL_CA_BUNDLE replace the configured CA, and send etcd traffic to an *_proxy.
        self.session.trust_env = False

    @property  # type: ignore[override]
    def timeout(self) -> float | None:
        return getattr(self._local, "timeout", None)

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._local.timeout = value

    @property
    def token(self) -> str | None:
        return getattr(self._local, "token", None)

    @token.setter
    def token(self, value: str | None) -> None:
        self._local.token = value

    def post(self, url: str, *args: Any, json: Any = None, **kwargs: Any) -> Any:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": self.token}
        return super().post(url, *args, json=json, **kwargs)


# Failures of one endpoint: try the next one. etcd3gw maps 503 (no leader, member
# unavailable), 504/408 (request timed out in etcd) and 500 to these.
_ENDPOINT_FAILURES = (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError,
                      etcd_exc.InternalServerError, requests.RequestException, ValueError)

# etcd's own error texts (rpctypes, the same in 3.4 and 3.5), as the v3 gateway returns
# them in {"error": ...}. The first three mean "(re)authenticate and ask again".
_NO_USER = "etcdserver: user name is empty"                    # 400: no token sent
_BAD_TOKEN = "etcdserver: invalid auth token"                   # 401: expired or revoked
_OLD_AUTH = "etcdserver: revision of auth store is old"         # 400: users/roles changed
_TOKEN_ERRORS = (_NO_USER, _BAD_TOKEN, _OLD_AUTH)
_AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
_AUTH_OFF = "etcdserver: authentication is not enabled"        # 412, from authenticate
_DENIED = "etcdserver: permission denied"                       # 403
# etcd 3.4+ refuses, on its JSON gateway only, a client certificate that has a Common
# Name when --client-cert-auth and auth are both on (embed/serve.go): plain text, 400.
_GATEWAY_CN = "CommonName of client sending a request against gateway"


def _etcd_error(e: Exception) -> str | None:
    """etcd's error text of a refusal (HTTP 4xx) answered by a member, else None."""
    if type(e) not in (etcd_exc.Etcd3Exception, etcd_exc.PreconditionFailedError):
        return None
    text = str(getattr(e, "detail_text", None) or "").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text
    return str(body.get("error") or text) if isinstance(body, dict) else text


def _tls_failure(e: Exception) -> ssl.SSLError | None:
    """The TLS error under an endpoint failure (etcd3gw keeps requests' one as context)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        todo += [cur.__cause__, cur.__context__, *(a for a in getattr(cur, "args", ())
                                                     if isinstance(a, BaseException))]
        reason = getattr(cur, "reason", None)  # urllib3's MaxRetryError
        if isinstance(reason, BaseException):
            todo.append(reason)
    return None


class _Transport:
    def __init__(self, endpoints: Sequence[str], ca_cert: str | None, cert: str | None,
                 key: str | None, username: str | None = None,
                 password: str | None = None) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise InvalidArgument("endpoints must be a non-empty list of URLs such as "
                                  "http://127.0.0.1:2379")
        if bool(cert) != bool(key):
            raise InvalidArgument("an etcd client certificate needs both cert and key")
        if bool(username) != bool(password):
            raise InvalidArgument("etcd authentication needs both a username and a password")
        self.clients: list[_Client] = []
        for url in endpoints:
            parts = urlsplit(url) if isinstance(url, str) else None
            if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                    or parts.path not in ("", "/")):
                raise InvalidArgument(f"bad etcd endpoint {url!r}: expected "
                                      "http(s)://HOST:PORT")
            try:
                port = parts.port or 2379
            except ValueError as e:
                raise InvalidArgument(f"bad etcd endpoint {url!r}: {e}") from e
            self.clients.append(_Client(host=parts.hostname, port=port,
                                        protocol=parts.scheme, ca_cert=ca_cert,
                                        cert_cert=cert, cert_key=key, api_path=API_PATH))
        self.ca_cert, self.cert = ca_cert, cert
        self.username = username or None
        self._password = password
        self._token: str | None = None
        if password and any(c.protocol == "http" for c in self.clients):
            log.warning("the etcd password for user %s goes in clear text to the http:// "
                        "endpoints; use https:// endpoints", username)
        self.preferred = 0
        self._lock = threading.Lock()

    def call(self, what: str, op: Callable[[_Client], T], timeout: float) -> T:
        """Run op on the first endpoint that answers; give up when ``timeout`` is spent."""
        deadline = time.monotonic() + _check_timeout(timeout)
        n = len(self.clients)
        failures: dict[str, str] = {}
        tls_failures: dict[str, str] = {}
        first_round = True
        while True:
            start = self.preferred
            for k in range(n):
                remaining = deadline - time.monotonic()
                if remaining <= 0.001:
                    break
                i = (start + k) % n
                client = self.clients[i]
                # Share what is left among the endpoints not yet tried this round, so a
                # black-holed member cannot eat the whole bound.
                share = remaining / (n - k)
                client.timeout = share
                if first_round and k < n - 1:
                    client.timeout = min(share, FIRST_ROUND_ATTEMPT_S)
                try:
                    result = self._attempt(client, op, time.monotonic() + share)
                except _ENDPOINT_FAILURES as e:
                    tls = _tls_failure(e)
                    failures[client.base_url] = (self._describe_tls(tls) if tls
                                                 else _describe(e))
                    if tls:
                        tls_failures[client.base_url] = failures[client.base_url]
                    else:
                        tls_failures.pop(client.base_url, None)
                    continue
                except etcd_exc.Etcd3Exception as e:
                    raise self._rejection(client, what, e) from e
                if i != self.preferred:
                    with self._lock:
                        self.preferred = i
                return result
            first_round = False
            # A handshake that failed on every member will not succeed by retrying.
            if len(tls_failures) == n:
                by_cause: dict[str, list[str]] = {}
                for url, message in tls_failures.items():
                    by_cause.setdefault(message, []).append(url)
                detail = "; ".join(f"{m} (at {', '.join(u)})" for m, u in by_cause.items())
                raise ArbiterTlsError(f"no etcd endpoint accepted a TLS connection for "
                                      f"{what}: {detail}")
            if deadline - time.monotonic() <= 0.001:
                detail = "; ".join(f"{u}: {m}" for u, m in failures.items()) or "no attempt"
                raise ArbiterUnavailable(f"no etcd endpoint answered {what} within "
                                         f"{timeout * 1000:.0f} ms ({detail})")
            time.sleep(min(_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    def _attempt(self, client: _Client, op: Callable[[_Client], T], share_end: float) -> T:
        """op on one endpoint, authenticating first if etcd asks for a (new) token."""
        used = client.token = self._token
        try:
            return op(client)
        except etcd_exc.Etcd3Exception as e:
            if _etcd_error(e) not in _TOKEN_ERRORS:
                raise
            if self.username is None:
                raise ArbiterAuthError(
                    f"etcd at {client.base_url} requires authentication, but no etcd username "
                    "and password are configured for this client") from None
        # The member just answered, so it is not the silent one the first-round cap is
        # for: authenticating (a bcrypt check in etcd) may use this endpoint's whole share.
        client.timeout = max(0.001, share_end - time.monotonic())
        client.token = self._authenticate(client, used)
        client.timeout = max(0.001, share_end - time.monotonic())
        try:
            return op(client)
        except etcd_exc.Etcd3Exception as e:
            if _etcd_error(e) in _TOKEN_ERRORS:
                raise ArbiterAuthError(f"etcd at {client.base_url} still refused user "
                                       f"{self.username} right after authenticating: "
                                       f"{_etcd_error(e)}") from None
            raise

    def _authenticate(self, client: _Client, stale: str | None) -> str | None:
        """A fresh token for this client's user (None: etcd has authentication off)."""
        with self._lock:
            if self._token != stale:  # another thread renewed it meanwhile
                return self._token
        client.token = None
        try:
            answer = client.post(client.get_url("/auth/authenticate"),
                                 json={"name": self.username, "password": self._password})
        except etcd_exc.Etcd3Exception as e:
            reason = _etcd_error(e)
            if reason == _AUTH_FAILED:
                raise ArbiterAuthError(
                    f"etcd at {client.base_url} refused user {self.username}: wrong user name "
                    "or password; check the etcd username and password configured for this "
                    "client against the etcd users (etcdctl user list)") from None
            if reason != _AUTH_OFF:
                raise
            token = None
        else:
            token = answer.get("token") if isinstance(answer, dict) else None
            if not token:
                raise ArbiterRejected(f"etcd at {client.base_url} answered authenticate "
                                      "without a token")
        with self._lock:
            self._token = token
        log.info("etcd user %s: authenticated at %s", self.username, client.base_url)
        return token

    def _rejection(self, client: _Client, what: str, e: Exception) -> ArbiterError:
        """The typed error for a refusal, with what to fix where there is something."""
        reason = _etcd_error(e) or ""
        where = f"etcd at {client.base_url}"
        if reason == _DENIED:
            return ArbiterAuthError(
                f"{where} refused {what}: etcd user {self.username} has no permission on "
                f"{PREFIX}/; grant it a role with readwrite on the prefix {PREFIX}/ "
                "(docs/install.md)")
        if reason.startswith(_GATEWAY_CN):
            return ArbiterAuthError(
                f"{where} refused {what}: with --client-cert-auth and etcd authentication both "
                "on, etcd's JSON gateway refuses a client certificate that has a Common Name; "
                f"use a client certificate with an empty subject CN ({self.cert})")
        return ArbiterRejected(f"{where} refused {what}: {_describe(e)}")

    def _describe_tls(self, e: ssl.SSLError) -> str:
        if isinstance(e, ssl.SSLCertVerificationError):
            trusted = self.ca_cert or "the system CA bundle"
            return (f"etcd's certificate is not trusted ({e.verify_message}); the CA file "
                    f"must be the CA that signed etcd's server certificate (now: {trusted})")
        if isinstance(e, ssl.SSLEOFError):
            reason = "etcd closed the connection during the handshake"
        else:
            reason = getattr(e, "reason", None) or type(e).__name__
        if reason == "WRONG_VERSION_NUMBER":
            return "TLS handshake failed (WRONG_VERSION_NUMBER): is this endpoint http://?"
        if self.cert is None:
            hint = ("etcd probably requires a client certificate (--client-cert-auth): "
                    "configure this client's cert and key")
        else:
            hint = (f"etcd probably refused the client certificate {self.cert}: it must be "
                    "signed by a CA in etcd's --trusted-ca-file and allow client auth")
        return f"TLS handshake failed ({reason}); {hint}"

    def txn(self, what: str, compare: list, success: list, failure: list,
            timeout: float) -> tuple[bool, dict]:
        payload = {"compare": compare, "success": success, "failure": failure}
        result = self.call(what, lambda c: c.transaction(payload), timeout)
        # proto3 JSON leaves out false booleans.
        return bool(result.get("succeeded", False)), result

    def lease_call(self, what: str, path: str, body: dict, timeout: float) -> dict:
        return self.call(what, lambda c: c.post(c.get_url(path), json=body), timeout)


def _describe(e: Exception) -> str:
    detail = getattr(e, "detail_text", None)
    text = str(detail or e).strip() or type(e).__name__
    # requests' connection errors bury the cause in a long repr.
    for cause in ("Connection refused", "timed out", "No route to host",
                  "Network is unreachable", "Name or service not known"):
        if cause in text:
            return cause.lower()
    return text[:300]


# --- the arbiter ------------------------------------------------------------------------


class Arbiter:
    """Pair records, generations and live claims for FT VMs, kept in an etcd cluster.

    ``bound`` (seconds) is the default total time of every call, across all endpoints.
    ``ca_cert``/``cert``/``key``: TLS to https:// endpoints (CA file; client certificate).
    ``username``/``password``: etcd authentication; a token is fetched when etcd asks for
    one and fetched again, once per attempt, when etcd says it expired.
    """

    def __init__(self, endpoints: Sequence[str], bound: float = ARBITER_BOUND_S, *,
                 ca_cert: str | None = None, cert: str | None = None,
                 key: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.bound = _check_timeout(bound)
        self._t = _Transport(endpoints, ca_cert, cert, key, username, password)

    def _timeout(self, timeout: float | None) -> float:
        return self.bound if timeout is None else _check_timeout(timeout)

    # pair records

    def get_pair(self, vm_id: str, timeout: float | None = None) -> PairRecord | None:
        key = pair_key(vm_id)
        _, result = self._t.txn(f"read of {key}", [], [_get(key)], [], self._timeout(timeout))
        kv = _ranges(result)[0]
        return None if kv is None else PairRecord.decode(kv.value, kv.mod_revision)

    def current_generation(self, vm_id: str, timeout: float | None = None) -> int:
        """The VM's current generation; 0 if it was never paired."""
        key = generation_key(vm_id)
        _, result = self._t.txn(f"read of {key}", [], [_get(key)], [], self._timeout(timeout))
        return _int_value(_ranges(result)[0], key)

    def put_pair(self, record: PairRecord, timeout: float | None = None) -> PairRecord:
        """Store ``record`` if the stored one still has ``record.mod_revision`` (0: absent).

        The record's generation must be the current one. Returns the record as stored, with
        its new mod_revision. Raises PairConflict or StaleGeneration.
        """
        key, gkey = pair_key(record.vm_id), generation_key(record.vm_id)
        stored = dataclasses.replace(record, updated_at=time.time(), mod_revision=0)
        data = stored.encode()
        ok, result = self._t.txn(
            f"write of {key}",
            [_cmp_unchanged(key, record.mod_revision),
             _cmp_value(gkey, str(record.generation))],
            [_put(key, data)], [_get(key), _get(gkey)], self._timeout(timeout))
        if ok:
            return dataclasses.replace(stored, mod_revision=int(result["header"]["revision"]))
        kv, gkv = _ranges(result)
        # A retry on another endpoint after a lost answer finds its own write: success.
        if kv is not None and kv.value == data:
            return dataclasses.replace(stored, mod_revision=kv.mod_revision)
        current = _int_value(gkv, gkey)
        if current != record.generation:
            raise StaleGeneration(record.vm_id, record.generation, current)
        raise PairConflict(record.vm_id, None if kv is None
                           else PairRecord.decode(kv.value, kv.mod_revision))

    def update_pair(self, vm_id: str, generation: int, *, state: str = _KEEP,
                    reason: str = _KEEP, primary: str = _KEEP, secondary: str | None = _KEEP,
                    timeout: float | None = None) -> PairRecord:
        """Change fields of the pair record of ``generation``, retrying on concurrent writes.

        Raises StaleGeneration if the record belongs to another generation, NoSuchPair if
        there is none.
        """
        _check_generation(generation)
        changes = {k: v for k, v in (("state", state), ("reason", reason),
                                     ("primary", primary), ("secondary", secondary))
                   if v is not _KEEP}
        _check_name("vm id", vm_id)
        _check_fields(**changes)  # before any I/O
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            left = max(0.001, deadline - time.monotonic())
            record = self.get_pair(vm_id, timeout=left)
            if record is None:
                raise NoSuchPair(f"VM {vm_id} has no pair record")
            if record.generation != generation:
                raise StaleGeneration(vm_id, generation, record.generation)
            new = dataclasses.replace(record, **changes)
            try:
                return self.put_pair(new, timeout=max(0.001, deadline - time.monotonic()))
            except PairConflict:
                if time.monotonic() >= deadline:
                    raise

    def delete_pair(self, vm_id: str, timeout: float | None = None) -> None:
        """Forget the pair and its claims. The generation counter stays, so a later
        pairing never reuses a generation."""
        prefix = claims_prefix(vm_id)
        self._t.txn(f"delete of pair {vm_id}", [],
                    [_delete(pair_key(vm_id)), _delete(prefix, _range_end(prefix))], [],
                    self._timeout(timeout))

    # host records

    def put_host(self, record: HostRecord, timeout: float | None = None) -> HostRecord:
        """Publish the host's record (its own agent is the only writer: no compare)."""
        stored = dataclasses.replace(record, updated_at=time.time())
        key = host_key(record.host_id)
        self._t.txn(f"write of {key}", [], [_put(key, stored.encode())], [],
                    self._timeout(timeout))
        return stored

    def get_host(self, host_id: str, timeout: float | None = None) -> HostRecord | None:
        key = host_key(host_id)
        _, result = self._t.txn(f"read of {key}", [], [_get(key)], [], self._timeout(timeout))
        kv = _ranges(result)[0]
        return None if kv is None else HostRecord.decode(kv.value)

    def hosts(self, timeout: float | None = None) -> list[HostRecord]:
        """Every published host record, by host id."""
        _, result = self._t.txn(f"read of {HOSTS_PREFIX}", [], [_get(HOSTS_PREFIX, prefix=True)],
                                [], self._timeout(timeout))
        kvs = result.get("responses", [{}])[0].get("response_range", {}).get("kvs") or []
        return sorted((HostRecord.decode(base64.b64decode(kv.get("value", ""))) for kv in kvs),
                      key=lambda r: r.host_id)

    # generations

    def begin_generation(self, vm_id: str, primary: str, secondary: str | None,
                         state: str | None = None, timeout: float | None = None) -> int:
        """Start a new pairing: bump the VM's generation and write its pair record, atomically.

        Returns the new generation (strictly greater than every earlier one of this VM).
        """
        gkey, key, prefix = generation_key(vm_id), pair_key(vm_id), claims_prefix(vm_id)
        if state is None:
            state = "Syncing" if secondary is not None else "Need Secondary"
        PairRecord(vm_id, 1, primary, secondary, state)  # validate before any I/O
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            left = max(0.001, deadline - time.monotonic())
            _, result = self._t.txn(f"read of {gkey}", [], [_get(gkey)], [], left)
            gkv = _ranges(result)[0]
            generation = _int_value(gkv, gkey) + 1
            record = PairRecord(vm_id, generation, primary, secondary, state,
                                updated_at=time.time())
            success = [_put(gkey, str(generation)), _put(key, record.encode())]
            if generation > 2:
                # Keep the previous generation's claim for the record; older ones go.
                success.append(_delete(prefix, _b64(claim_key(vm_id, generation - 1))))
            ok, _ = self._t.txn(f"new generation of {vm_id}",
                                [_cmp_unchanged(gkey, gkv.mod_revision if gkv else 0)],
                                success, [], max(0.001, deadline - time.monotonic()))
            if ok:
                log.info("VM %s: generation %d, primary %s, secondary %s", vm_id, generation,
                         primary, secondary)
                return generation
            if time.monotonic() >= deadline:
                raise ArbiterUnavailable(f"VM {vm_id}: generation kept changing under "
                                         f"concurrent writers for {self._timeout(timeout)} s")

    # the live claim

    def claim_live(self, vm_id: str, generation: int, host: str,
                   timeout: float | None = None) -> bool:
        """Atomically claim "``host`` is live in ``generation``". True only for the one winner.

        The first claim of a generation wins forever; asking again answers the same. Raises
        StaleGeneration if ``generation`` is not current, NotAPairMember if ``host`` is not
        in the pair, ArbiterUnavailable when etcd does not answer within the bound (the
        timing rule: the caller must then kill its own QEMU).
        """
        _check_generation(generation)
        _check_name("host", host)
        key, gkey, ckey = pair_key(vm_id), generation_key(vm_id), claim_key(vm_id, generation)
        claimed_at = time.time()
        claim = json.dumps({"host": host, "claimed_at": claimed_at}).encode()
        deadline = time.monotonic() + self._timeout(timeout)
        reads = [_get(key), _get(gkey), _get(ckey)]
        _, result = self._t.txn(f"read of claim {ckey}", [], reads, [],
                                max(0.001, deadline - time.monotonic()))
        while True:
            kv, gkv, ckv = _ranges(result)
            current = _int_value(gkv, gkey)
            if current != generation:
                raise StaleGeneration(vm_id, generation, current)
            holder = _claim_holder(ckv)
            if holder is not None:
                return holder == host
            if kv is None:
                raise NoSuchPair(f"VM {vm_id} has no pair record for generation {generation}")
            record = PairRecord.decode(kv.value, kv.mod_revision)
            if host not in record.members:
                raise NotAPairMember(f"host {host} is not a member of VM {vm_id}'s pair in "
                                     f"generation {generation} ({', '.join(record.members)})")
            # Succeeds only if nobody claimed this generation, the generation is still
            # current and the membership just checked still holds.
            success = [_put(ckey, claim)]
            if host == record.secondary:
                # A secondary that wins runs on its replica from now on
                # (docs/decisions.md, D2).
                success.append(_put(stale_image_key(vm_id), StaleImage(
                    vm_id, generation, host, claimed_at).encode()))
            ok, result = self._t.txn(
                f"claim {ckey}",
                [_cmp_value(gkey, str(generation)), _cmp_create(ckey, 0),
                 _cmp_mod(key, kv.mod_revision)],
                success, reads, max(0.001, deadline - time.monotonic()))
            if ok:
                log.info("VM %s: %s won generation %d", vm_id, host, generation)
                return True
            if time.monotonic() >= deadline:
                raise ArbiterUnavailable(f"VM {vm_id}: claim of generation {generation} kept "
                                         "conflicting with concurrent writers")

    # the storage-domain image

    def stale_image(self, vm_id: str, timeout: float | None = None) -> StaleImage | None:
        """The mark saying the VM's storage-domain image is behind, or None if it is
        current (a linearizable read: None is an answer, not a guess)."""
        key = stale_image_key(vm_id)
        _, result = self._t.txn(f"read of {key}", [], [_get(key)], [], self._timeout(timeout))
        kv = _ranges(result)[0]
        return None if kv is None else StaleImage.decode(kv.value)

    def image_current(self, vm_id: str, generation: int, host: str,
                      timeout: float | None = None) -> None:
        """``host``'s copy-back made the image current in ``generation``: drop its mark of
        that generation or an earlier one (a later pairing began from a current image).
        Another host's mark, or one of a later failover, stays (compare-and-delete on the
        mark's revision)."""
        _check_generation(generation)
        _check_name("host", host)
        key = stale_image_key(vm_id)
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            _, result = self._t.txn(f"read of {key}", [], [_get(key)], [],
                                    max(0.001, deadline - time.monotonic()))
            kv = _ranges(result)[0]
            mark = None if kv is None else StaleImage.decode(kv.value)
            if mark is None or mark.host != host or mark.generation > generation:
                return
            ok, _ = self._t.txn(f"delete of {key}", [_cmp_mod(key, kv.mod_revision)],
                                [_delete(key)], [], max(0.001, deadline - time.monotonic()))
            if ok:
                log.info("VM %s: storage-domain image current (generation %d)", vm_id,
                         generation)
                return
            if time.monotonic() >= deadline:
                raise ArbiterUnavailable(f"VM {vm_id}: stale-image mark kept changing")

    def discard_stale_image(self, vm_id: str, timeout: float | None = None
                            ) -> StaleImage | None:
        """The admin's override (`ovirt-ft accept-stale-image`): forget the mark, so the
        image as it is may start. Returns the mark that was dropped, or None."""
        key = stale_image_key(vm_id)
        _, result = self._t.txn(f"discard of {key}", [], [_get(key), _delete(key)], [],
                                self._timeout(timeout))
        kv = _ranges(result)[0]
        mark = None if kv is None else StaleImage.decode(kv.value)
        if mark is not None:
            log.warning("VM %s: stale-image mark of generation %d (replica on %s) "
                        "discarded by an admin", vm_id, mark.generation, mark.host)
        return mark

    def live_holder(self, vm_id: str, generation: int,
                    timeout: float | None = None) -> str | None:
        """The host that won ``generation``, or None if nobody claimed it (or it was pruned)."""
        ckey = claim_key(vm_id, generation)
        _, result = self._t.txn(f"read of {ckey}", [], [_get(ckey)], [],
                                self._timeout(timeout))
        return _claim_holder(_ranges(result)[0])

    def live_claim(self, vm_id: str, generation: int,
                   timeout: float | None = None) -> tuple[str, float] | None:
        """(winner, claimed_at wall-clock seconds) of ``generation``, or None if unclaimed.

        `claimed_at` is the winner's own clock, so only the winner may compare it with now
        (the copy-back's fencing proof, vdsm_ft.copyback).
        """
        ckey = claim_key(vm_id, generation)
        _, result = self._t.txn(f"read of {ckey}", [], [_get(ckey)], [],
                                self._timeout(timeout))
        kv = _ranges(result)[0]
        holder = _claim_holder(kv)
        if holder is None:
            return None
        try:
            return holder, float(json.loads(kv.value)["claimed_at"])
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptRecord(f"live claim has no claimed_at: {kv.value[:200]!r}") from e

    def other_member_live(self, vm_id: str, host: str,
                          timeout: float | None = None) -> str | None:
        """The host other than ``host`` that runs this VM's live copy, if the arbiter knows one.

        Live is the winner of the current generation's claim, or else the primary of the
        current generation; a pair in state Down has no live copy. For the start hook: a
        non-None answer means starting a live copy on ``host`` would make a second one. (The
        secondary of the current generation is a standby, not a live copy: its start must
        not be refused by this check.)
        """
        return self.start_check(vm_id, host, timeout)[0]

    def start_check(self, vm_id: str, host: str, timeout: float | None = None
                    ) -> tuple[str | None, StaleImage | None]:
        """What the start hook asks, in one read: (`other_member_live`, `stale_image`)."""
        _check_name("host", host)
        key, prefix = pair_key(vm_id), claims_prefix(vm_id)
        _, result = self._t.txn(f"read of pair {vm_id}", [],
                                [_get(key), _get(prefix, prefix=True, last=True),
                                 _get(stale_image_key(vm_id))], [], self._timeout(timeout))
        kv, ckv, skv = _ranges(result)
        mark = None if skv is None else StaleImage.decode(skv.value)
        return _live_other(vm_id, host, kv, ckv), mark


def _live_other(vm_id: str, host: str, kv: _Kv | None, ckv: _Kv | None) -> str | None:
    """`Arbiter.other_member_live` from the pair record and the last claim as read."""
    if kv is None:
        return None
    record = PairRecord.decode(kv.value, kv.mod_revision)
    if record.state == DOWN:
        return None
    live = record.primary
    # The last claim key is the highest generation's; it counts only if current.
    if ckv is not None and ckv.key == claim_key(vm_id, record.generation).encode():
        live = _claim_holder(ckv) or live
    return live if live != host else None


class LeaderLease:
    """Leadership of ``name`` for one ``holder`` at a time, on an etcd lease of ``ttl`` s.

    The holder counts itself leader only until ``ttl`` after the last successful grant or
    keepalive was sent, which is never later than etcd expires the lease: two holders can
    never both see ``is_leader`` true. acquire/refresh/release raise ArbiterUnavailable
    when etcd does not answer within the arbiter's bound.
    """

    def __init__(self, arbiter: Arbiter, name: str, holder: str, ttl: int = 5) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise InvalidArgument(f"lease ttl must be an integer >= 1 second; got {ttl!r}")
        self._t = arbiter._t
        self._bound = arbiter.bound
        self.key = leader_key(name)
        self.holder = _check_name("leader holder", holder)
        self.ttl = ttl
        self._lease: int | None = None
        self._valid_until = 0.0

    @property
    def is_leader(self) -> bool:
        return self._lease is not None and time.monotonic() < self._valid_until

    def _drop(self) -> None:
        self._lease = None
        self._valid_until = 0.0

    def acquire(self) -> bool:
        """Become leader if nobody is; refresh if already leader. Returns is_leader."""
        if self._lease is not None:
            return self.refresh()
        sent = time.monotonic()
        grant = self._t.lease_call(f"lease grant for {self.key}", "/lease/grant",
                                   {"TTL": self.ttl, "ID": 0}, self._bound)
        lease = int(grant["ID"])
        ok, result = self._t.txn(f"leader claim {self.key}", [_cmp_create(self.key, 0)],
                                 [_put(self.key, self.holder, lease)], [_get(self.key)],
                                 self._bound)
        if not ok:
            kv = _ranges(result)[0]
            ok = kv is not None and kv.lease == lease  # our own write, answered twice
        if ok:
            self._lease, self._valid_until = lease, sent + self.ttl
            log.info("%s: %s is leader", self.key, self.holder)
            return True
        self._revoke(lease)
        return False

    def refresh(self) -> bool:
        """Keep the lease alive. Returns False (and stops leading) if it was lost."""
        if self._lease is None:
            return False
        lease, sent = self._lease, time.monotonic()
        try:
            answer = self._t.lease_call(f"lease keepalive for {self.key}", "/lease/keepalive",
                                        {"ID": lease}, self._bound)
        except ArbiterRejected:
            answer = {}  # "requested lease not found": it expired
        ttl = int(answer.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            log.warning("%s: lease of %s expired; no longer leader", self.key, self.holder)
            self._drop()
            return False
        _, result = self._t.txn(f"read of {self.key}", [], [_get(self.key)], [], self._bound)
        kv = _ranges(result)[0]
        if kv is None or kv.lease != lease:
            self._drop()
            self._revoke(lease)
            return False
        self._valid_until = sent + self.ttl
        return True

    def release(self) -> None:
        """Stop leading at once; revoking the lease deletes the leader key for the others."""
        lease = self._lease
        self._drop()
        if lease is not None:
            self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        try:
            self._t.lease_call(f"lease revoke for {self.key}", "/lease/revoke", {"ID": lease},
                               self._bound)
        except ArbiterRejected as e:
            # An expired lease is already gone: nothing left to release.
            log.debug("%s: revoke of lease %x: %s", self.key, lease, e)
