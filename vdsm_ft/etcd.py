"""The one place that speaks etcd: the v3 JSON gateway over ``etcd3gw``, for vdsm_ft.arbiter.

etcd 3.4 serves the gateway at ``/v3/``; the older ``/v3beta/`` path is gone from 3.5.
A Transport holds the endpoints of one cluster, the TLS files and the etcd user. Every call
takes an explicit total timeout and tries each endpoint in turn; failures come back as the
typed errors below. Reads are linearizable (etcd's default), so a member cut off from the
quorum never answers with stale data. Which keys the arbiter keeps and why: docs/arbiter.md.
"""
from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

log = logging.getLogger(__name__)

API_PATH = "/v3/"
_RETRY_PAUSE = 0.02
# A member on a powered-off host sends nothing back, not even a reset: in the first round
# each endpoint gets at most this long, so a silent member does not hold a claim for a
# third of the bound. Later rounds share the rest, for a cluster that is merely slow.
FIRST_ROUND_ATTEMPT_S = 0.2
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


def check_timeout(value: object) -> float:
    """``value`` as seconds, or InvalidArgument unless it is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds; got {value!r}")
    return float(value)


# --- requests and answers (etcd v3 JSON: keys and values in base64) --------------------

def b64(data: str | bytes) -> str:
    """A key or value as the gateway takes it."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def range_end(prefix: str) -> str:
    """The range_end (base64) that makes a range or delete cover every key under ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


def cmp_create(key: str, revision: int) -> dict:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": revision}


def cmp_mod(key: str, revision: int) -> dict:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def cmp_value(key: str, value: str | bytes) -> dict:
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def cmp_unchanged(key: str, mod_revision: int) -> dict:
    """Compare: ``key`` still has ``mod_revision`` (0: ``key`` is still absent)."""
    return cmp_mod(key, mod_revision) if mod_revision else cmp_create(key, 0)


def put(key: str, value: str | bytes, lease: int | None = None) -> dict:
    """A txn operation writing ``value`` at ``key`` (attached to ``lease`` if given)."""
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def get(key: str, prefix: bool = False, last: bool = False) -> dict:
    """A txn operation reading ``key`` (every key under it if ``prefix``; with ``last``,
    only the highest of them)."""
    req: dict[str, Any] = {"key": b64(key)}
    if prefix:
        req["range_end"] = range_end(key)
    if last:
        req.update(limit=1, sort_order="DESCEND", sort_target="KEY")
    return {"request_range": req}


def delete(key: str, end: str | None = None) -> dict:
    """A txn operation deleting ``key``, or every key from it up to ``end`` (base64)."""
    req = {"key": b64(key)}
    if end:
        req["range_end"] = end
    return {"request_delete_range": req}


@dataclass(frozen=True)
class Kv:
    """One key-value as read, decoded."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def ranges(result: dict) -> list[Kv | None]:
    """The first key-value of each range response of a txn result (None if absent)."""
    out: list[Kv | None] = []
    for resp in result.get("responses", []):
        if "response_range" not in resp:
            continue
        found = resp["response_range"].get("kvs") or []
        out.append(_kv(found[0]) if found else None)
    return out


def kvs(result: dict) -> list[Kv]:
    """Every key-value of the first response of a txn result (a prefix read)."""
    raw = result.get("responses", [{}])[0].get("response_range", {}).get("kvs") or []
    return [_kv(kv) for kv in raw]


def _kv(kv: dict) -> Kv:
    # proto3 JSON leaves out empty values and zero leases.
    return Kv(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")),
              int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))


# --- transport --------------------------------------------------------------------------

class _Client(Etcd3Client):
    """Etcd3Client whose request timeout and auth token are set per call (and per thread)
    by Transport."""

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


class Transport:
    """One etcd cluster as its client sees it: endpoints, TLS files, the etcd user.

    ``ca_cert``/``cert``/``key``: TLS to https:// endpoints (CA file; client certificate).
    ``username``/``password``: etcd authentication; a token is fetched when etcd asks for
    one and fetched again, once per attempt, when etcd says it expired. ``key_prefix`` is
    the prefix whose roles a permission error names.
    """

    def __init__(self, endpoints: Sequence[str], *, key_prefix: str,
                 ca_cert: str | None = None, cert: str | None = None, key: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
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
        self.key_prefix = key_prefix
        self.username = username or None
        self._password = password
        self._token: str | None = None
        if password and any(c.protocol == "http" for c in self.clients):
            log.warning("the etcd password for user %s goes in clear text to the http:// "
                        "endpoints; use https:// endpoints", username)
        self.preferred = 0
        self._lock = threading.Lock()

    @property
    def token(self) -> str | None:
        """The auth token in use: None before the first login and once etcd revoked it."""
        return self._token

    @property
    def password(self) -> str | None:
        """The password it logs in with; read-only."""
        return self._password

    def _call(self, what: str, op: Callable[[_Client], T], timeout: float) -> T:
        """Run op on the first endpoint that answers; give up when ``timeout`` is spent."""
        deadline = time.monotonic() + check_timeout(timeout)
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
                f"those keys; give it its component's role on {self.key_prefix}/ "
                "(docs/install.md, \"etcd\")")
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
        """One etcd transaction: (succeeded, the whole result). ``what`` names it in errors."""
        payload = {"compare": compare, "success": success, "failure": failure}
        result = self._call(what, lambda c: c.transaction(payload), timeout)
        # proto3 JSON leaves out false booleans.
        return bool(result.get("succeeded", False)), result

    def lease_grant(self, what: str, ttl: int, timeout: float) -> int:
        """A new lease of ``ttl`` seconds; returns its ID."""
        return int(self._lease_call(what, "/lease/grant", {"TTL": ttl, "ID": 0},
                                    timeout)["ID"])

    def lease_keepalive(self, what: str, lease: int, timeout: float) -> int:
        """Renew ``lease``; returns the TTL etcd granted (0: the lease has expired).
        Raises ArbiterRejected if etcd no longer knows the lease."""
        answer = self._lease_call(what, "/lease/keepalive", {"ID": lease}, timeout)
        return int(answer.get("result", {}).get("TTL", 0))

    def lease_revoke(self, what: str, lease: int, timeout: float) -> None:
        """Revoke ``lease``: etcd deletes every key attached to it."""
        self._lease_call(what, "/lease/revoke", {"ID": lease}, timeout)

    def _lease_call(self, what: str, path: str, body: dict, timeout: float) -> dict:
        return self._call(what, lambda c: c.post(c.get_url(path), json=body), timeout)


def _describe(e: Exception) -> str:
    detail = getattr(e, "detail_text", None)
    text = str(detail or e).strip() or type(e).__name__
    # requests' connection errors bury the cause in a long repr.
    for cause in ("Connection refused", "timed out", "No route to host",
                  "Network is unreachable", "Name or service not known"):
        if cause in text:
            return cause.lower()
    return text[:300]

