"""HTTPS front of the fake engine: SSO, bearer tokens, fault injection, call counting.

Paths, as ovirtsdk4 4.6.3 uses them:
  POST /ovirt-engine/sso/oauth/token        form grant_type=password, username, password, scope
  POST /ovirt-engine/services/sso-logout    form token, scope
  *    /ovirt-engine/api/...                 `Authorization: Bearer <token>`, XML (rest.py)

An outage closes the listening socket and every open connection, so clients see what an
engine host that is down gives them: connection refused (curl error 7).
"""
from __future__ import annotations

import json
import logging
import secrets
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from .pki import ServerPki
from .rest import Response, RestApi, collection_key

log = logging.getLogger(__name__)

PREFIX = "/ovirt-engine"
API_PREFIX = PREFIX + "/api"
TOKEN_PATH = PREFIX + "/sso/oauth/token"
LOGOUT_PATH = PREFIX + "/services/sso-logout"
TLS_HANDSHAKE_TIMEOUT = 10.0
IDLE_CONNECTION_TIMEOUT = 30.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    front: "EngineHttpServer"

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            # A client that gave up (timeout, outage cut): not the server's fault.
            log.debug("connection from %s ended abruptly: %s", client_address, exc)
        else:
            log.exception("fake engine: request from %s failed", client_address)

    def finish_request(self, request, client_address) -> None:
        # TLS handshake in the connection's own thread, so one slow client cannot stall
        # the accept loop.
        front = self.front
        request.settimeout(TLS_HANDSHAKE_TIMEOUT)
        try:
            tls = front.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake from %s failed: %s", client_address, e)
            return
        tls.settimeout(IDLE_CONNECTION_TIMEOUT)
        if not front.track(tls):
            tls.close()
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            front.untrack(tls)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        # Only the request line; bodies (passwords, tokens) are never logged.
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        front = self.server.front
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        front.delay_for(method, url.path)
        if front.outage:
            self.close_connection = True
            return
        if url.path == TOKEN_PATH and method == "POST":
            front.count("POST sso/oauth/token")
            status, payload = front.sso_token(body)
            return self._send_json(status, payload)
        if url.path == LOGOUT_PATH and method == "POST":
            front.count("POST services/sso-logout")
            return self._send_json(200, front.sso_logout(body))
        if url.path == API_PREFIX or url.path.startswith(API_PREFIX + "/"):
            parts = [unquote(p) for p in url.path[len(API_PREFIX):].strip("/").split("/") if p]
            front.count(collection_key(method, parts))
            if not front.authorized(self.headers.get("Authorization", "")):
                return self._send(Response(401, b"", "text/plain"))
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            return self._send(front.api.handle(method, parts, query, body))
        front.count("%s %s" % (method, url.path))
        self._send(Response(404, b"", "text/plain"))

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(Response(status, json.dumps(payload).encode(), "application/json"))

    def _send(self, r: Response) -> None:
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.end_headers()
        if r.body:
            self.wfile.write(r.body)


class EngineHttpServer:
    def __init__(self, api: RestApi, users: Dict[str, str], pki: ServerPki,
                 host: str = "127.0.0.1", port: int = 0, token_ttl: float = 3600.0) -> None:
        self.api = api
        self._users = dict(users)
        self._tokens: Dict[str, Tuple[str, float]] = {}
        self.token_ttl = token_ttl
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.tls.load_cert_chain(str(pki.cert_file), str(pki.key_file))
        self.host, self.port = host, port
        self.outage = False
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._conns: Set[socket.socket] = set()
        self._delays: List[Tuple[Optional[str], str, float]] = []
        self._calls: Counter = Counter()
        self._lock = threading.Lock()

    # ----- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._listen()

    def _listen(self) -> None:
        httpd = _Server((self.host, self.port), _Handler)
        httpd.front = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-engine-https", daemon=True)
        self._thread.start()

    def _close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._close()

    def set_outage(self, down: bool) -> None:
        """Down: refuse connections and cut open ones. Up: listen again on the same port."""
        if down == self.outage:
            return
        self.outage = down
        if down:
            self._close()
        else:
            self._listen()

    def track(self, conn: socket.socket) -> bool:
        with self._lock:
            if self.outage:
                return False
            self._conns.add(conn)
            return True

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    # ----- fault injection and counting ----------------------------------------------------

    def set_delay(self, seconds: float, path: str = "", method: Optional[str] = None) -> None:
        """Delay requests whose API path (e.g. "vms", "hosts/", "" for all) starts with
        `path`; 0 removes the rule."""
        with self._lock:
            self._delays = [d for d in self._delays if (d[0], d[1]) != (method, path)]
            if seconds > 0:
                self._delays.append((method, path, seconds))

    def delay_for(self, method: str, url_path: str) -> None:
        rel = url_path[len(API_PREFIX):].strip("/") if url_path.startswith(API_PREFIX) else None
        with self._lock:
            delay = max([s for m, p, s in self._delays
                         if (m is None or m == method) and rel is not None and rel.startswith(p)],
                        default=0.0)
        if delay:
            time.sleep(delay)

    def count(self, key: str) -> None:
        with self._lock:
            self._calls[key] += 1

    def calls(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # ----- SSO -----------------------------------------------------------------------------

    def sso_token(self, body: bytes) -> Tuple[int, dict]:
        form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        scope = form.get("scope", "")
        if form.get("grant_type") != "password":
            return 400, {"error_code": "unsupported_grant_type",
                         "error": "The grant type is not supported by this fake engine."}
        user, password = form.get("username", ""), form.get("password", "")
        expected = self._users.get(user)
        if expected is None or not secrets.compare_digest(expected, password):
            # SsoService.sendJsonDataWithMessage: 400, and for the ovirt-app-api scope the
            # {"error_code", "error"} form.
            return 400, {"error_code": "access_denied",
                         "error": "Cannot authenticate user '%s': The username or password is "
                                  "incorrect.." % user}
        token = secrets.token_urlsafe(24)
        valid_to = time.time() + self.token_ttl
        with self._lock:
            self._tokens[token] = (user, valid_to)
        return 200, {"access_token": token, "scope": scope or "ovirt-app-api",
                     "exp": str(int(valid_to * 1000)), "token_type": "bearer"}

    def sso_logout(self, body: bytes) -> dict:
        form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        with self._lock:
            self._tokens.pop(form.get("token", ""), None)
        return {}

    def authorized(self, header: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        with self._lock:
            entry = self._tokens.get(header[len("Bearer "):].strip())
        return entry is not None and entry[1] > time.time()

    def expire_tokens(self) -> None:
        """Forget every token, like an engine restart: clients must log in again."""
        with self._lock:
            self._tokens.clear()
