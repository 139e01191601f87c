"""A real 3-member etcd cluster (Debian etcd-server, etcd 3.4) for the tests and the lab.

Members listen on loopback with free ports by default. In the lab each member can run in
its lab host's network namespace (``netns``), bound to that host's address; it is then
launched through ``ip netns exec`` and checked with ``etcdctl`` from inside that namespace.
Only processes started here are stopped here.

With ``tls`` the members serve their clients https (and ``client_cert_auth`` makes them
require a client certificate signed by ``tls.ca``); peers still talk http. The default is
plain http; the lab runs https with client certificates and etcd users (ftlab.etcdauth).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from vdsm_ft.api import TlsFiles

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "/sbin/ip"

# Far below etcd's defaults (100/1000 ms): a host crash that takes the etcd leader with it
# costs an election (one to two election timeouts, one more on a split vote) before the
# survivor's claim can commit, and that adds straight to the failover time. 5 / 50 ms is
# what kept that case under 300 ms at p99; lab links are sub-millisecond, and the false-
# election soak is in docs/benchmarks.md ("Host loss by where the etcd leader was").
HEARTBEAT_MS = 5
ELECTION_MS = 50
CLUSTER_TOKEN = "vdsm-ft-lab"


class EtcdError(RuntimeError):
    """The etcd cluster could not be started, reached or stopped as asked."""


@dataclass
class MemberSpec:
    """Where one member listens. Ports are chosen free on loopback when left unset."""

    host: str = "127.0.0.1"
    client_port: int | None = None
    peer_port: int | None = None
    netns: str | None = None


@dataclass
class _Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    netns: str | None
    data_dir: str
    log_path: str
    proc: subprocess.Popen | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{_url_host(self.host)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.peer_port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class EtcdCluster:
    """A 3-member (by default) etcd cluster made of real ``etcd`` processes."""

    specs: list[MemberSpec] = field(default_factory=lambda: [MemberSpec() for _ in range(3)])
    base_dir: str | None = None
    # Server certificate and key (naming every member's address, and allowing client auth:
    # etcd's JSON gateway dials the member with it) and the CA trusted for clients.
    tls: TlsFiles | None = None
    client_cert_auth: bool = False
    extra_args: tuple[str, ...] = ()          # more etcd flags, for every member
    heartbeat_ms: int = HEARTBEAT_MS
    election_ms: int = ELECTION_MS
    # The client certificate etcdctl presents (health checks, ctl_flags); None: the
    # server's. With etcd auth on it must be one whose CN is a user, e.g. root.
    ctl_tls: TlsFiles | None = None
    members: list[_Member] = field(default_factory=list, init=False)
    _own_base_dir: bool = field(default=False, init=False)

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of every member, in member order."""
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 30.0) -> "EtcdCluster":
        if not os.access(ETCD, os.X_OK):
            raise EtcdError(f"{ETCD} not found: install the Debian package etcd-server")
        if not self.specs:
            raise EtcdError("an etcd cluster needs at least one member")
        if self.base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="vdsm-ft-etcd-")
            self._own_base_dir = True
        os.makedirs(self.base_dir, exist_ok=True)
        self.members = []
        for i, spec in enumerate(self.specs):
            # Inside a namespace the default ports are free by construction.
            client = spec.client_port or (2379 if spec.netns else _free_port(spec.host))
            peer = spec.peer_port or (2380 if spec.netns else _free_port(spec.host))
            name = f"etcd{i}"
            self.members.append(_Member(
                name=name, host=spec.host, client_port=client, peer_port=peer,
                netns=spec.netns, data_dir=os.path.join(self.base_dir, f"{name}.data"),
                log_path=os.path.join(self.base_dir, f"{name}.log"),
                scheme="https" if self.tls else "http"))
        try:
            for i in range(len(self.members)):
                self._spawn(i, state="new")
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _argv(self, m: _Member, state: str) -> list[str]:
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        argv = [ETCD, "--name", m.name, "--data-dir", m.data_dir,
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", CLUSTER_TOKEN,
                "--initial-cluster-state", state,
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms)]
        if self.tls:
            argv += ["--cert-file", self.tls.cert, "--key-file", self.tls.key,
                     "--trusted-ca-file", self.tls.ca]
            if self.client_cert_auth:
                argv.append("--client-cert-auth")
        argv += list(self.extra_args)
        if m.netns:
            return [IP, "netns", "exec", m.netns] + argv
        return argv

    def _spawn(self, i: int, state: str) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            raise EtcdError(f"member {m.name} is already running (pid {m.proc.pid})")
        # A clean environment: stray ETCD_* variables would silently override flags.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        log = open(m.log_path, "ab")
        try:
            m.proc = subprocess.Popen(self._argv(m, state), stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        finally:
            log.close()

    def _healthy(self, m: _Member, timeout: float) -> bool:
        if m.netns:
            argv = [IP, "netns", "exec", m.netns, ETCDCTL, "--endpoints", m.client_url,
                    "--dial-timeout", f"{timeout}s", "--command-timeout", f"{timeout}s",
                    "endpoint", "health"]
            argv[-2:-2] = self.ctl_flags()
            try:
                return subprocess.run(argv, capture_output=True, timeout=timeout + 2,
                                      env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
                                      ).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        try:
            with urllib.request.urlopen(m.client_url + "/health", timeout=timeout,
                                        context=self._ssl_context()) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def ctl_flags(self) -> list[str]:
        """etcdctl's TLS flags for this cluster ([] for plain http)."""
        if not self.tls:
            return []
        ctl = self.ctl_tls or self.tls
        return ["--cacert", self.tls.ca, "--cert", ctl.cert, "--key", ctl.key]

    def _ssl_context(self) -> ssl.SSLContext | None:
        """For this module's own checks: trust the CA, present the server's certificate."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        ctx.load_cert_chain(self.tls.cert, self.tls.key)
        return ctx

    def _wait_members(self, indexes: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(indexes)
        while pending:
            for i in list(pending):
                m = self.members[i]
                if m.proc is None or m.proc.poll() is not None:
                    raise EtcdError(f"etcd member {m.name} exited (rc "
                                    f"{m.proc.returncode if m.proc else None}); log tail:\n"
                                    f"{_log_tail(m.log_path)}")
                if self._healthy(m, timeout=1.0):
                    pending.remove(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(self.members[i].name for i in pending)
                raise EtcdError(f"etcd members {names} not healthy within {timeout:.0f}s; "
                                f"log tail of {self.members[pending[0]].name}:\n"
                                f"{_log_tail(self.members[pending[0]].log_path)}")
            time.sleep(0.1)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running member reports healthy (it has a leader)."""
        self._wait_members([i for i, m in enumerate(self.members) if self.is_running(i)],
                           timeout)

    def is_running(self, i: int) -> bool:
        proc = self.members[i].proc
        return proc is not None and proc.poll() is None

    def stop_member(self, i: int, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop member i (SIGTERM, or SIGKILL with ``kill``); its data dir is kept."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                m.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(timeout=timeout)
        m.proc = None

    def start_member(self, i: int, timeout: float = 30.0) -> None:
        """Restart a stopped member on its existing data dir and wait until it is healthy."""
        self.start_members([i], timeout)

    def start_members(self, indexes: list[int], timeout: float = 30.0) -> None:
        """Restart several stopped members at once (a member alone cannot become healthy
        when quorum needs the others too)."""
        for i in indexes:
            self._spawn(i, state="existing")
        self._wait_members(indexes, timeout)

    def leader(self, timeout: float = 2.0) -> int | None:
        """Index of the current leader as seen by the first member that answers."""
        ids: dict[str, int] = {}
        leader_id = None
        for i, m in enumerate(self.members):
            if not self.is_running(i) or m.netns:
                continue
            req = urllib.request.Request(m.client_url + "/v3/maintenance/status", data=b"{}",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout,
                                            context=self._ssl_context()) as r:
                    status = json.load(r)
            except (OSError, ValueError, urllib.error.URLError):
                continue
            ids[status["header"]["member_id"]] = i
            leader_id = leader_id or status.get("leader")
        return ids.get(leader_id) if leader_id else None

    def stop(self) -> None:
        """Stop every member and remove the data dirs (and the base dir if made here)."""
        for i in range(len(self.members)):
            self.stop_member(i)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
        if self._own_base_dir and self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
