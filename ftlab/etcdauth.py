"""The lab's authenticated etcd: https, client certificates, and one etcd user per component.

`SecureEtcd` makes the certificates (under `<pki>/etcd/`), a password per user in a
0600 file there, and, once the cluster runs, the users and roles of
`vdsm_ft.etcdroles` through etcd's v3 JSON API (so no password is ever on a command
line), then turns authentication on. Each component then logs in with its `EtcdLogin`.
"""
from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import requests

from ftlab.pki import issue
from vdsm_ft import etcd, etcdroles
from vdsm_ft.api import TlsFiles
from vdsm_ft.arbiter import Arbiter
from vdsm_ft.hostconfig import read_private

ROOT = "root"
REQUEST_TIMEOUT = 10.0


class EtcdAuthError(RuntimeError):
    """etcd refused a step of the users' and roles' setup."""


@dataclass(frozen=True)
class EtcdLogin:
    """How one component reaches the lab's etcd: a client certificate without a CN
    (etcd's JSON gateway refuses one with a CN once authentication is on) and a user
    whose password is in a 0600 file."""

    user: str
    password_file: str
    tls: TlsFiles

    def password(self) -> str:
        return read_private(self.password_file).decode().strip()


def _write_secret(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24) + "\n")


class SecureEtcd:
    """Certificates, users and passwords of one lab's etcd, for hosts `host_ids`
    whose members listen on `addresses`."""

    def __init__(self, pki: Path, ca: tuple[Path, Path], host_ids: Sequence[str],
                 addresses: Sequence[str]) -> None:
        self.dir = pki / "etcd"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.host_ids = list(host_ids)
        # The gateway dials its own member with this certificate, so it serves as client
        # too (ftlab.pki.issue allows both).
        self.server = issue(self.dir, ca, "etcd-server", addresses=[*addresses, "127.0.0.1"],
                            common_name=False)
        # etcdctl (health checks, move-leader) speaks gRPC, where etcd takes the CN as
        # the user: this certificate is root without a password.
        self.ctl = issue(self.dir, ca, ROOT)
        self.logins: dict[str, EtcdLogin] = {}
        for user in [ROOT, *etcdroles.users(self.host_ids)]:
            secret = self.dir / f"{user}.password"
            _write_secret(secret)
            self.logins[user] = EtcdLogin(user, str(secret),
                                          issue(self.dir, ca, f"client-{user}",
                                                common_name=False))

    def agent(self, host_id: str) -> EtcdLogin:
        return self.logins[etcdroles.agent_user(host_id)]

    @property
    def poller(self) -> EtcdLogin:
        return self.logins[etcdroles.POLLER_USER]

    def enable(self, endpoint: str, call: Callable[..., Any] = lambda fn, *a: fn(*a)) -> None:
        """Add the users and roles through `endpoint`, then turn authentication on.
        `call` runs the requests where the endpoint is reachable (a NetnsWorker's)."""
        call(self._enable, endpoint)

    def _enable(self, endpoint: str) -> None:
        root = self.logins[ROOT]
        with requests.Session() as s:
            s.trust_env = False
            s.verify, s.cert = root.tls.ca, (root.tls.cert, root.tls.key)

            def post(path: str, body: dict) -> None:
                r = s.post(f"{endpoint}/v3/{path}", json=body, timeout=REQUEST_TIMEOUT)
                if r.status_code != 200:
                    # etcd's error names the user or role, never the password.
                    raise EtcdAuthError(f"etcd refused {path}: {r.status_code} "
                                        f"{r.text[:300]}")

            for role, grants in etcdroles.roles(self.host_ids).items():
                post("auth/role/add", {"name": role})
                for g in grants:
                    perm = {"key": etcd.b64(g.key), "permType": g.perm}
                    if g.prefix:
                        perm["range_end"] = etcd.range_end(g.key)
                    post("auth/role/grant", {"name": role, "perm": perm})
            for user, login in self.logins.items():
                post("auth/user/add", {"name": user, "password": login.password()})
            post("auth/user/grant", {"user": ROOT, "role": ROOT})
            for user, user_roles in etcdroles.users(self.host_ids).items():
                for role in user_roles:
                    post("auth/user/grant", {"user": user, "role": role})
            post("auth/enable", {})

    def ssl_context(self, user: str = ROOT) -> ssl.SSLContext:
        """For plain HTTPS requests to etcd (e.g. its status) with `user`'s certificate."""
        tls = self.logins[user].tls
        context = ssl.create_default_context(cafile=tls.ca)
        context.load_cert_chain(tls.cert, tls.key)
        return context

    def arbiter(self, endpoints: Sequence[str], user: str = ROOT, **kw: Any) -> Arbiter:
        """An arbiter client logged in as `user` (root by default: tests that read or
        plant any key)."""
        login = self.logins[user]
        return Arbiter(list(endpoints), ca_cert=login.tls.ca, cert=login.tls.cert,
                       key=login.tls.key, username=login.user, password=login.password(),
                       **kw)
