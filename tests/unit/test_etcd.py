"""The etcd transport (vdsm_ft.etcd) on its own: the v3 JSON requests it builds, the answers
it decodes, and how it maps a gateway's answers to typed errors, against a scripted stand-in
for the gateway on loopback (tests/integration/test_arbiter*.py run a real etcd)."""
import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vdsm_ft import etcd
from vdsm_ft.etcd import (ArbiterAuthError, ArbiterRejected, ArbiterUnavailable,
                          InvalidArgument, Transport)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_txn_decoding_handles_omitted_fields():
    # proto3 JSON leaves out empty kvs, zero leases and false booleans.
    k, v = base64.b64encode(b"/k").decode(), base64.b64encode(b"7").decode()
    result = {"header": {"revision": "9"}, "responses": [
        {"response_range": {"header": {}}},
        {"response_range": {"kvs": [{"key": k, "value": v, "mod_revision": "8"}],
                            "count": "1"}},
        {"response_put": {"header": {}}}]}
    empty, kv = etcd.ranges(result)
    assert empty is None
    assert (kv.key, kv.value, kv.mod_revision, kv.lease) == (b"/k", b"7", 8, 0)


def test_a_prefix_read_decodes_every_kv():
    result = {"responses": [{"response_range": {"kvs": [
        {"key": b64(b"/p/a"), "value": b64(b"1"), "mod_revision": "3", "lease": "12"},
        {"key": b64(b"/p/b")}]}}]}
    assert etcd.kvs(result) == [etcd.Kv(b"/p/a", b"1", 3, 12), etcd.Kv(b"/p/b", b"", 0, 0)]
    assert etcd.kvs({"responses": [{"response_range": {}}]}) == []
    assert etcd.kvs({}) == []


def test_requests_are_etcd_v3_json():
    assert etcd.b64("/k") == etcd.b64(b"/k") == b64(b"/k")
    assert etcd.range_end("/p/") == b64(b"/p0")
    assert etcd.get("/k") == {"request_range": {"key": b64(b"/k")}}
    assert etcd.get("/p/", prefix=True, last=True) == {"request_range": {
        "key": b64(b"/p/"), "range_end": b64(b"/p0"), "limit": 1, "sort_order": "DESCEND",
        "sort_target": "KEY"}}
    assert etcd.put("/k", "v") == {"request_put": {"key": b64(b"/k"), "value": b64(b"v")}}
    assert etcd.put("/k", b"v", lease=7)["request_put"]["lease"] == 7
    assert etcd.delete("/k") == {"request_delete_range": {"key": b64(b"/k")}}
    assert etcd.delete("/p/", etcd.range_end("/p/")) == {"request_delete_range": {
        "key": b64(b"/p/"), "range_end": b64(b"/p0")}}
    assert etcd.cmp_unchanged("/k", 0) == etcd.cmp_create("/k", 0) == {
        "key": b64(b"/k"), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
    assert etcd.cmp_unchanged("/k", 5) == etcd.cmp_mod("/k", 5) == {
        "key": b64(b"/k"), "target": "MOD", "result": "EQUAL", "mod_revision": 5}
    assert etcd.cmp_value("/k", "3") == {"key": b64(b"/k"), "target": "VALUE",
                                         "result": "EQUAL", "value": b64(b"3")}


@pytest.mark.parametrize("timeout", [0, -1, "1", None, True])
def test_bad_timeout_is_refused(timeout):
    with pytest.raises(InvalidArgument, match="timeout"):
        etcd.check_timeout(timeout)


class Gateway:
    """A scripted etcd JSON gateway: ``replies[path]`` is a list of (status, body) answered
    in turn (then 200 {}); every request is kept as (path, Authorization, body)."""

    def __init__(self) -> None:
        self.replies: dict[str, list[tuple[int, object]]] = {}
        self.requests: list[tuple[str, str | None, dict]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gateway.requests.append((self.path, self.headers.get("Authorization"), body))
                queue = gateway.replies.get(self.path) or [(200, {})]
                status, answer = queue.pop(0) if len(queue) > 1 else queue[0]
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway():
    g = Gateway()
    yield g
    g.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_txn_posts_the_transaction_and_reads_succeeded(gateway):
    t = Transport([gateway.url], key_prefix="/p")
    gateway.replies["/v3/kv/txn"] = [(200, {"header": {"revision": "4"}}),
                                     (200, {"succeeded": True, "header": {"revision": "5"}})]
    ok, result = t.txn("a read", [etcd.cmp_create("/k", 0)], [etcd.put("/k", "v")],
                       [etcd.get("/k")], 1.0)
    assert (ok, result["header"]["revision"]) == (False, "4")
    assert t.txn("a write", [], [], [], 1.0)[0] is True
    path, token, body = gateway.requests[0]
    assert (path, token) == ("/v3/kv/txn", None)
    assert body == {"compare": [etcd.cmp_create("/k", 0)], "success": [etcd.put("/k", "v")],
                    "failure": [etcd.get("/k")]}


def test_lease_calls(gateway):
    t = Transport([gateway.url], key_prefix="/p")
    gateway.replies["/v3/lease/grant"] = [(200, {"ID": "7", "TTL": "5"})]
    gateway.replies["/v3/lease/keepalive"] = [(200, {"result": {"ID": "7", "TTL": "5"}}),
                                              (200, {"result": {"ID": "7"}})]
    assert t.lease_grant("grant", 5, 1.0) == 7
    assert t.lease_keepalive("keepalive", 7, 1.0) == 5
    assert t.lease_keepalive("keepalive", 7, 1.0) == 0  # proto3 JSON leaves out TTL 0
    assert t.lease_revoke("revoke", 7, 1.0) is None
    assert [(p, b) for p, _, b in gateway.requests] == [
        ("/v3/lease/grant", {"TTL": 5, "ID": 0}), ("/v3/lease/keepalive", {"ID": 7}),
        ("/v3/lease/keepalive", {"ID": 7}), ("/v3/lease/revoke", {"ID": 7})]


def test_a_refusal_is_rejected_at_once_and_names_the_request(gateway):
    t = Transport([gateway.url], key_prefix="/p")
    gateway.replies["/v3/lease/keepalive"] = [
        (400, {"error": "etcdserver: requested lease not found", "code": 5})]
    t0 = time.monotonic()
    with pytest.raises(ArbiterRejected, match="refused keepalive of 7: .*lease not found") as e:
        t.lease_keepalive("keepalive of 7", 7, 5.0)
    assert not isinstance(e.value, ArbiterAuthError)
    assert time.monotonic() - t0 < 1.0 and len(gateway.requests) == 1


def test_permission_denied_names_the_key_prefix(gateway):
    t = Transport([gateway.url], key_prefix="/my-prefix", username="u", password="pw")
    gateway.replies["/v3/kv/txn"] = [(403, {"error": "etcdserver: permission denied"})]
    with pytest.raises(ArbiterAuthError, match="a read: etcd user u has no permission on "
                       "those keys; give it its component's role on /my-prefix/"):
        t.txn("a read", [], [], [], 1.0)


def test_a_token_is_fetched_when_etcd_asks_and_sent_from_then_on(gateway):
    t = Transport([gateway.url], key_prefix="/p", username="u", password="pw")
    gateway.replies["/v3/kv/txn"] = [(400, {"error": "etcdserver: user name is empty"}),
                                     (200, {"succeeded": True})]
    gateway.replies["/v3/auth/authenticate"] = [(200, {"token": "tok-1"})]
    assert t.txn("a write", [], [], [], 1.0)[0] is True
    assert t.txn("a write", [], [], [], 1.0)[0] is True
    assert [(p, a) for p, a, _ in gateway.requests] == [
        ("/v3/kv/txn", None), ("/v3/auth/authenticate", None), ("/v3/kv/txn", "tok-1"),
        ("/v3/kv/txn", "tok-1")]
    assert gateway.requests[1][2] == {"name": "u", "password": "pw"}


def test_etcd_asking_for_a_token_without_credentials_is_an_auth_error(gateway):
    t = Transport([gateway.url], key_prefix="/p")
    gateway.replies["/v3/kv/txn"] = [(401, {"error": "etcdserver: invalid auth token"})]
    with pytest.raises(ArbiterAuthError, match="requires authentication, but no etcd "
                       "username and password are configured"):
        t.txn("a read", [], [], [], 1.0)


def test_the_next_endpoint_answers_and_is_preferred_from_then_on(gateway):
    t = Transport([f"http://127.0.0.1:{_closed_port()}", gateway.url], key_prefix="/p")
    gateway.replies["/v3/kv/txn"] = [(200, {"succeeded": True})]
    assert t.txn("a write", [], [], [], 1.0)[0] is True
    assert t.preferred == 1


def test_no_endpoint_answering_is_unavailable_within_the_timeout():
    t = Transport([f"http://127.0.0.1:{_closed_port()}"], key_prefix="/p")
    t0 = time.monotonic()
    with pytest.raises(ArbiterUnavailable, match="no etcd endpoint answered a read within "
                       "300 ms .*connection refused"):
        t.txn("a read", [], [], [], 0.3)
    assert time.monotonic() - t0 < 0.3 + 0.2


@pytest.mark.parametrize("kw,message", [
    ({"endpoints": []}, "endpoints must be a non-empty list"),
    ({"endpoints": ["etcd1:2379"]}, "bad etcd endpoint"),
    ({"cert": "/x.pem"}, "needs both cert and key"),
    ({"username": "u"}, "needs both a username and a password"),
])
def test_bad_settings_are_refused(kw, message):
    args = {"endpoints": ["https://127.0.0.1:2379"], "key_prefix": "/p", **kw}
    with pytest.raises(InvalidArgument, match=message):
        Transport(**args)
