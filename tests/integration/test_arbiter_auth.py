"""The arbiter over TLS with client certificates and etcd authentication, against a REAL
3-member etcd 3.4 cluster (ftlab.etcd) serving https with --client-cert-auth and auth on.

Users, roles and `auth enable/disable` go through etcd's own v3 JSON API from this process,
so no password ever appears on a command line.
"""
import logging
import os
import secrets
import time
import uuid
from pathlib import Path

import pytest
import requests

from engine_plugin import config as poller_config
from engine_plugin.poller import make_lease
from ftlab import pki
from ftlab.etcd import EtcdCluster
from vdsm_ft.arbiter import (ARBITER_BOUND_S, Arbiter, ArbiterAuthError, ArbiterTlsError,
                             LeaderLease)
from vdsm_ft.etcd import b64

USER = "ft-agent"
# etcd drops a simple token this many seconds after its last use on a member.
TOKEN_TTL = 2


class Admin:
    """etcd's auth API, as root, over the same TLS the arbiter uses."""

    def __init__(self, url: str, tls, root_password: str) -> None:
        self.url, self.root_password = url, root_password
        self.s = requests.Session()
        self.s.trust_env = False
        self.s.verify, self.s.cert = tls.ca, (tls.cert, tls.key)

    def post(self, path: str, body: dict, token: str | None = None) -> requests.Response:
        headers = {"Authorization": token} if token else {}
        return self.s.post(f"{self.url}/v3/{path}", json=body, headers=headers, timeout=10)

    def ok(self, path: str, body: dict, token: str | None = None) -> dict:
        r = self.post(path, body, token)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    def root_token(self) -> str:
        return self.ok("auth/authenticate", {"name": "root",
                                             "password": self.root_password})["token"]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """The cluster, its PKI and the passwords: a user with readwrite on /vdsm-ft/, one with
    no role, auth on."""
    d = tmp_path_factory.mktemp("etcd-pki")
    ca = pki.make_ca(d / "ca")
    server = pki.issue(d, ca, "etcd-server", addresses=["127.0.0.1"])
    client = pki.issue(d, ca, "arbiter-client", common_name=False)
    named = pki.issue(d, ca, "host-a")                        # CN=host-a
    other_ca = pki.make_ca(d / "other", name="another CA")
    cluster = EtcdCluster(tls=server, client_cert_auth=True,
                          extra_args=("--auth-token", "simple",
                                      "--auth-token-ttl", str(TOKEN_TTL))).start()
    try:
        pw = {"root": secrets.token_hex(16), USER: secrets.token_hex(16),
              "ft-norole": secrets.token_hex(16)}
        admin = Admin(cluster.endpoints[0], client, pw["root"])
        for name, password in pw.items():
            admin.ok("auth/user/add", {"name": name, "password": password})
        admin.ok("auth/user/grant", {"user": "root", "role": "root"})
        admin.ok("auth/role/add", {"name": "vdsm-ft"})
        admin.ok("auth/role/grant", {"name": "vdsm-ft", "perm": {
            "key": b64("/vdsm-ft/"), "range_end": b64("/vdsm-ft0"), "permType": "READWRITE"}})
        admin.ok("auth/user/grant", {"user": USER, "role": "vdsm-ft"})
        admin.ok("auth/enable", {})
        yield {"cluster": cluster, "client": client, "named": named, "ca": ca[0],
               "other_ca": other_ca[0], "pw": pw, "admin": admin}
    finally:
        cluster.stop()


def arbiter(secure, **kw) -> Arbiter:
    c = secure["client"]
    args = dict(ca_cert=str(secure["ca"]), cert=c.cert, key=c.key, username=USER,
                password=secure["pw"][USER])
    args.update(kw)
    return Arbiter(secure["cluster"].endpoints, **args)


def new_vm() -> str:
    return f"vm-{uuid.uuid4()}"


def assert_no_secret(secure, *texts: str) -> None:
    for text in texts:
        for password in secure["pw"].values():
            assert password not in text


def test_right_certificate_and_password(secure, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    # requests would let this replace the configured CA; the arbiter must not.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(secure["other_ca"]))
    a = arbiter(secure)
    vm = new_vm()
    g = a.begin_generation(vm, "hostA", "hostB")
    assert a.claim_live(vm, g, "hostB") is True
    assert a.live_holder(vm, g) == "hostB"
    lease = LeaderLease(a, f"auth-{uuid.uuid4().hex[:8]}", "p1", ttl=5)
    assert lease.acquire() and lease.refresh()
    lease.release()
    assert_no_secret(secure, caplog.text, repr(a), repr(a.transport), repr(lease))


def test_wrong_password_is_a_clear_auth_error(secure, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = secrets.token_hex(16)
    started = time.monotonic()
    with pytest.raises(ArbiterAuthError, match="refused user ft-agent: wrong user name or "
                                               "password") as err:
        arbiter(secure, password=wrong).get_pair(new_vm())
    assert time.monotonic() - started < ARBITER_BOUND_S
    assert wrong not in str(err.value) and wrong not in caplog.text
    assert_no_secret(secure, str(err.value), caplog.text)


def test_no_credentials_when_etcd_requires_them(secure):
    with pytest.raises(ArbiterAuthError, match="requires authentication, but no etcd "
                                               "username and password are configured"):
        arbiter(secure, username=None, password=None).current_generation(new_vm())


def test_user_without_permission(secure):
    with pytest.raises(ArbiterAuthError, match="ft-norole has no permission on those keys; give it its "
                                               "component's role on /vdsm-ft/"):
        arbiter(secure, username="ft-norole",
                password=secure["pw"]["ft-norole"]).current_generation(new_vm())


def test_missing_client_certificate_is_a_clear_tls_error(secure):
    started = time.monotonic()
    with pytest.raises(ArbiterTlsError, match="requires a client certificate") as err:
        arbiter(secure, cert=None, key=None).current_generation(new_vm())
    assert time.monotonic() - started < ARBITER_BOUND_S
    assert "Traceback" not in str(err.value)
    assert_no_secret(secure, str(err.value))


def test_wrong_ca_is_a_clear_tls_error(secure):
    with pytest.raises(ArbiterTlsError, match=r"etcd's certificate is not trusted "
                                              r"\(unable to get local issuer certificate\)") as err:
        arbiter(secure, ca_cert=str(secure["other_ca"])).current_generation(new_vm())
    assert str(secure["other_ca"]) in str(err.value)
    assert_no_secret(secure, str(err.value))


def test_client_certificate_with_a_common_name_is_explained(secure):
    named = secure["named"]
    with pytest.raises(ArbiterAuthError, match="empty subject CN"):
        arbiter(secure, cert=named.cert, key=named.key).current_generation(new_vm())


def _token_state(secure, token: str) -> str:
    r = secure["admin"].post("kv/range", {"key": b64("/vdsm-ft/x")}, token)
    return r.json().get("error", "valid") if r.status_code != 200 else "valid"


def test_expired_token_is_renewed(secure):
    a = arbiter(secure)
    vm = new_vm()
    g = a.begin_generation(vm, "hostA", "hostB")
    old = a.transport.token
    time.sleep(TOKEN_TTL + 1.5)
    assert _token_state(secure, old) == "etcdserver: invalid auth token"
    assert a.claim_live(vm, g, "hostA", timeout=ARBITER_BOUND_S) is True
    assert a.transport.token not in (None, old)


def test_token_revoked_by_auth_disable_and_enable_is_renewed(secure):
    admin, a = secure["admin"], arbiter(secure)
    vm = new_vm()
    a.begin_generation(vm, "hostA", None)
    old = a.transport.token
    admin.ok("auth/disable", {}, admin.root_token())
    try:
        assert a.current_generation(vm) == 1        # etcd now wants no token at all
        assert a.transport.token is None
    finally:
        admin.ok("auth/enable", {})
    assert _token_state(secure, old) == "etcdserver: invalid auth token"
    assert a.begin_generation(vm, "hostA", "hostB") == 2
    assert a.transport.token is not None


def test_poller_lease_over_tls_and_auth(secure, tmp_path):
    c = secure["client"]
    engine_ca = tmp_path / "engine-ca.pem"
    engine_ca.write_text(Path(secure["ca"]).read_text())
    path = str(tmp_path / "poller.conf")
    poller_config.write(path, {
        "engine": {"url": "https://engine.invalid/ovirt-engine/api", "username": "u@internal",
                   "password": "engine-pw", "ca_file": str(engine_ca)},
        "poller": {"etcd_endpoints": ",".join(secure["cluster"].endpoints),
                   "etcd_ca": str(secure["ca"]), "etcd_cert": c.cert, "etcd_key": c.key,
                   "etcd_username": USER, "etcd_password": secure["pw"][USER]}})
    settings = poller_config.load(path, env={})
    assert secure["pw"][USER] not in repr(settings)
    lease = make_lease(settings)
    assert lease is not None
    rival = LeaderLease(arbiter(secure), settings.poller.lease_name, "rival", ttl=5)
    try:
        assert lease.acquire() and lease.is_leader
        assert rival.acquire() is False
    finally:
        lease.release()
    assert os.stat(path).st_mode & 0o077 == 0
