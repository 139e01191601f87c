"""The vdsm-ft agent of one lab host: its config file, and the process in the host.

The agent runs inside the host's network and mount namespaces, so it sees the host's
own libvirtd at qemu:///system, as on a real hypervisor. Everything it writes lives
under the host's directory (or its own tmpfs directory), visible from outside too.
"""
from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ftlab import qemubuild
from ftlab.etcdauth import EtcdLogin
from ftlab.host import LabHost
from vdsm_ft.api import AgentClient, AgentError, TlsFiles, client_context

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_PORT = 54329
START_TIMEOUT = 30.0


class LabAgent:
    def __init__(self, host: LabHost, etcd_endpoints: list[str], tls: TlsFiles,
                 client_tls: TlsFiles, heartbeat_interval: float = 0.05,
                 heartbeat_timeout: float = 0.15,
                 reach: Callable[..., Any] = lambda fn, *a: fn(*a), host_id: str = "",
                 heartbeat_key_file: str = "", etcd_login: EtcdLogin | None = None,
                 etcd_allow_plain_http: bool = False):
        self.host = host
        # The engine's id of this host: the poller ignores an agent answering for
        # another id. Tests without an engine use the lab host's name.
        self.host_id = host_id or host.name
        self.etcd_endpoints = etcd_endpoints
        # The host's etcd user and certificate (ftlab.etcdauth); None only for a lab that
        # asked for plain http, which must then say so (`[etcd] allow_plain_http`).
        self.etcd_login = etcd_login
        self.etcd_allow_plain_http = etcd_allow_plain_http
        self.tls = tls
        self.client_tls = client_tls
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        # How this process reaches the host's network (a NetnsWorker's `call` when the
        # wire is not routed to the root namespace).
        self.reach = reach
        self.proc: subprocess.Popen | None = None
        self.config_path = host.path("ft", "agent.conf")
        self.overlay_dir = os.path.join("/dev/shm", f"ftlab-{host.name}")
        self.overlay_size_cap = ""          # [storage] overlay_size_cap; "": the default
        self.copyback_rate = ""             # [storage] copyback_rate; "": the default
        self.colo_tls_dir = ""              # [agent] colo_tls_dir; "": plain TCP
        self.heartbeat_key_file = heartbeat_key_file
        self.emulator = qemubuild.ft_emulator().path     # [qemu] emulator

    @property
    def run_dir(self) -> str:
        return self.host.path("ft", "run")

    @property
    def hook_socket(self) -> str:
        return self.host.path("ft", "agent.sock")

    def write_config(self) -> str:
        cfg = configparser.ConfigParser(interpolation=None)
        cfg["host"] = {"id": self.host_id, "replication_address": self.host.address}
        cfg["agent"] = {"api_port": str(API_PORT), "hook_socket": self.hook_socket,
                        "run_dir": self.run_dir, "state_dir": self.host.path("ft", "state"),
                        "heartbeat_interval": str(self.heartbeat_interval),
                        "heartbeat_timeout": str(self.heartbeat_timeout)}
        if self.heartbeat_key_file:
            cfg["agent"]["heartbeat_key_file"] = self.heartbeat_key_file
        if self.colo_tls_dir:
            cfg["agent"]["colo_tls_dir"] = self.colo_tls_dir
        cfg["tls"] = {"ca": self.tls.ca, "cert": self.tls.cert, "key": self.tls.key}
        cfg["storage"] = {"replica_dir": self.host.path("ft", "replicas"),
                          "overlay_dir": self.overlay_dir}
        if self.overlay_size_cap:
            cfg["storage"]["overlay_size_cap"] = self.overlay_size_cap
        if self.copyback_rate:
            cfg["storage"]["copyback_rate"] = self.copyback_rate
        cfg["qemu"] = {"emulator": self.emulator}
        cfg["libvirt"] = {"uri": "qemu:///system", "qemu_user": "libvirt-qemu"}
        if self.host.sasl:          # the host's libvirtd wants VDSM's login, as on oVirt
            cfg["libvirt"].update(username=self.host.sasl_username,
                                  password_file=self.host.password_file)
        # This host's own member first: the arbiter asks the endpoint that last answered
        # first, and a lost host's member would cost a failover its first attempt.
        own = [e for e in self.etcd_endpoints if f"//{self.host.address}:" in e]
        ordered = own + [e for e in self.etcd_endpoints if e not in own]
        cfg["etcd"] = {"endpoints": ",".join(ordered)}
        if self.etcd_login is not None:
            login = self.etcd_login
            # The password makes this file a secret: it is written 0600 below.
            cfg["etcd"].update(ca=login.tls.ca, cert=login.tls.cert, key=login.tls.key,
                               username=login.user, password=login.password())
        if self.etcd_allow_plain_http:
            cfg["etcd"]["allow_plain_http"] = "yes"
        os.makedirs(os.path.dirname(self.config_path), mode=0o755, exist_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            cfg.write(f)
        return self.config_path

    def start(self, timeout: float = START_TIMEOUT) -> "LabAgent":
        self.write_config()
        env = dict(os.environ, VDSM_FT_CONFIG=self.config_path, PYTHONPATH=REPO)
        log = open(self.host.path("ft", "agent.log"), "ab")
        self.proc = self.host.popen(
            [sys.executable, "-c", "import sys; from vdsm_ft.agent.main import main; "
             "sys.exit(main())"], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        client = self.client(timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent on {self.host.name} exited with "
                                       f"{self.proc.returncode}; see {self.log_path}")
                try:
                    self.reach(client.host_status)
                    return self
                except AgentError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"agent on {self.host.name} did not answer "
                                           f"within {timeout}s; see {self.log_path}")
                    time.sleep(0.1)
        finally:
            client.close()

    @property
    def log_path(self) -> str:
        return self.host.path("ft", "agent.log")

    def client(self, timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.host.address, API_PORT, client_context(self.client_tls),
                           timeout=timeout)

    def stop(self) -> None:
        """A clean stop (SIGTERM), as systemd does on restart."""
        self._signal(signal.SIGTERM)

    def crash(self) -> None:
        """The agent alone dies; its QEMUs go on."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # popen ran nsenter, which execs the agent: the pid is the agent's.
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
