"""`FakeEngine`: the lab's oVirt engine, an HTTPS REST server plus a Python control API.

    engine = FakeEngine(users={"admin@internal": "secret"})
    info = engine.start()            # info.url, info.ca_file, info.username
    conn = ovirtsdk4.Connection(url=info.url, username=info.username,
                                password="secret", ca_file=str(info.ca_file))
    ...
    engine.stop()

The lab drives engine-side facts that the REST API cannot (host death, VDSM reports,
outages) through the methods here; REST clients see the consequences.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .engine_state import (EngineState, EngineTiming, HostDriver, ObservedAction, VmReport)
from .http_server import API_PREFIX, EngineHttpServer
from .model import GiB, AffinityGroup, AffinityRule, Cluster, Event, Hook, Host, Tag, Template, Vm
from .pki import make_server_pki
from . import render
from .rest import RestApi

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    url: str          # https://127.0.0.1:<port>/ovirt-engine/api
    ca_file: Path     # the lab CA, for ovirtsdk4.Connection(ca_file=...)
    username: str


class FakeEngine:
    def __init__(self, users: Dict[str, str], driver: Optional[HostDriver] = None,
                 timing: Optional[EngineTiming] = None, host: str = "127.0.0.1", port: int = 0,
                 workdir: Optional[Path] = None, default_cluster: Optional[str] = "Default"
                 ) -> None:
        if not users:
            raise ValueError("FakeEngine needs at least one user: users={'admin@internal': pw}")
        self._users = dict(users)
        self._listen_host, self._port = host, port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fake-engine-"))
        self.state = EngineState(driver=driver, timing=timing)
        self.api = RestApi(self.state)
        self._http: Optional[EngineHttpServer] = None
        self._monitor: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.default_cluster = (self.state.add_cluster(default_cluster).name
                                if default_cluster else None)

    # ----- life cycle ----------------------------------------------------------------------

    def start(self) -> EngineInfo:
        pki = make_server_pki(self.workdir / "pki", hostnames=("localhost",),
                              addresses=(self._listen_host,) if self._listen_host != "0.0.0.0"
                              else ("127.0.0.1",))
        self._http = EngineHttpServer(self.api, self._users, pki, self._listen_host, self._port)
        self._http.start()
        self._stopping.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name="fake-engine-monitor",
                                         daemon=True)
        self._monitor.start()
        self.ca_file = pki.ca_file
        return self.info

    @property
    def info(self) -> EngineInfo:
        if self._http is None:
            raise RuntimeError("FakeEngine is not started")
        return EngineInfo(url="https://%s:%d%s" % (self._listen_host, self._http.port, API_PREFIX),
                          ca_file=self.ca_file, username=next(iter(self._users)))

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "FakeEngine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _monitor_loop(self) -> None:
        while not self._stopping.wait(self.state.timing.refresh):
            try:
                self.state.tick()
            except Exception:  # a bug in one round must not stop host monitoring for good
                log.exception("fake engine monitoring round failed")

    # ----- inventory -----------------------------------------------------------------------

    def add_cluster(self, name: str) -> Cluster:
        return self.state.add_cluster(name)

    def add_host(self, name: str, cluster: Optional[str] = None, address: str = "",
                 memory: int = 64 * GiB, reserved_memory: int = 1 * GiB, status: str = "up",
                 hooks: Iterable[Hook] = (), power_management: bool = False,
                 spm: bool = False) -> Host:
        return self.state.add_host(name, self._cluster(cluster), address=address, memory=memory,
                                   reserved_memory=reserved_memory, status=status, hooks=hooks,
                                   power_management=power_management, spm=spm)

    def set_host_hooks(self, host: str, hooks: Iterable[Hook]) -> None:
        self.state.set_host_hooks(host, hooks)

    def add_vm(self, name: str, cluster: Optional[str] = None, memory: int = 1 * GiB,
               cpus: int = 1, custom_properties: Optional[Dict[str, str]] = None,
               ha: bool = False, ha_priority: int = 1,
               lease_storage_domain: Optional[str] = None, host: Optional[str] = None,
               status: str = "down", tags: Iterable[str] = (),
               template: Optional[str] = None) -> Vm:
        """A VM, with copies of the template's disks and NICs (default Blank: none); with
        `host` it is already running there (status defaults to up)."""
        return self.state.add_vm(name, self._cluster(cluster), memory=memory, cpus=cpus,
                                 custom_properties=custom_properties, ha=ha,
                                 ha_priority=ha_priority,
                                 lease_storage_domain=lease_storage_domain, host=host,
                                 status=status, tags=tags, template=template)

    def add_template(self, name: str, disks: Sequence[Tuple[str, int, str, bool]] = (),
                     nics: Sequence[str] = (), memory: int = 1 * GiB) -> Template:
        """A template; VMs made from it get these disks (name, size bytes, interface,
        bootable) and NICs (names)."""
        return self.state.add_template(name, disks=disks, nics=nics, memory=memory)

    def add_tag(self, name: str) -> Tag:
        return self.state.add_tag(name)

    def add_affinity_group(self, name: str, vms: Sequence[str], cluster: Optional[str] = None,
                           positive: bool = False, enforcing: bool = True) -> AffinityGroup:
        return self.state.add_affinity_group(
            self._cluster(cluster), name, AffinityRule(True, enforcing, positive), None, vms=vms)

    def _cluster(self, cluster: Optional[str]) -> str:
        key = cluster or self.default_cluster
        if key is None:
            raise ValueError("no cluster given and the engine has no default cluster")
        return key

    def vm(self, key: str) -> Vm:
        """The VM record by id or name (read it; change it only through this API)."""
        with self.state.lock:
            return self.state.vm(key)

    def host(self, key: str) -> Host:
        with self.state.lock:
            self.state.refresh_memory()
            return self.state.host(key)

    def vms(self) -> List[Vm]:
        with self.state.lock:
            return list(self.state.vms.values())

    def events(self) -> List[Event]:
        with self.state.lock:
            return list(self.state.events)

    def actions(self) -> List[ObservedAction]:
        """What the engine did to hosts (starts, stops, destroys, fences), oldest first."""
        with self.state.lock:
            return list(self.state.actions)

    # ----- engine behaviour the lab triggers -----------------------------------------------

    def kill_host(self, host: str) -> None:
        """The host stops answering: Connecting, then NonResponsive after the grace period."""
        self.state.kill_host(host)

    def revive_host(self, host: str) -> None:
        self.state.revive_host(host)

    def report_vms(self, host: str, reports: Iterable[VmReport | dict], full: bool = True) -> None:
        """A VDSM report from `host`: dicts with uuid, name, status, has_ovirt_metadata,
        memory and domxml (the live domain XML, Host.dumpxmls; None: devices unchanged)."""
        self.state.report_vms(host, [r if isinstance(r, VmReport) else VmReport(**r)
                                     for r in reports], full=full)

    def wait_vm_status(self, vm: str, status: str, timeout: float = 10.0) -> Vm:
        self.state.wait_for(lambda: self.state.vm(vm).status == status, timeout,
                            "VM %s to be %s" % (vm, status))
        return self.vm(vm)

    def wait_host_status(self, host: str, status: str, timeout: float = 10.0) -> Host:
        self.state.wait_for(lambda: self.state.host(host).status == status, timeout,
                            "host %s to be %s" % (host, status))
        return self.host(host)

    # ----- fault injection and measurement -------------------------------------------------

    def set_outage(self, down: bool) -> None:
        """Down: every API call fails like an unreachable engine (connection refused)."""
        self._server.set_outage(down)

    def set_delay(self, seconds: float, path: str = "", method: Optional[str] = None) -> None:
        """Hold requests to API paths starting with `path` ("vms", "events", "" = all)."""
        self._server.set_delay(seconds, path, method)

    def warm_cache(self) -> None:
        """Serialize every VM, host and event now, so the first list call of a benchmark
        measures serving, not the one-off SDK serialization (about 60 us per VM)."""
        st = self.state
        with st.lock:
            st.refresh_memory()
            for vm in st.vms.values():
                render.cached(vm, lambda vm=vm: render.vm_type(st, vm))
            for h in st.hosts.values():
                render.cached(h, lambda h=h: render.host_type(st, h))
            for e in st.events:
                render.cached(e, lambda e=e: render.event_type(e))

    def expire_tokens(self) -> None:
        self._server.expire_tokens()

    def api_calls(self) -> Dict[str, int]:
        """Requests served, keyed "METHOD collection/{id}/...", e.g. "GET vms"."""
        return self._server.calls()

    def reset_api_calls(self) -> None:
        self._server.reset_calls()

    @property
    def _server(self) -> EngineHttpServer:
        if self._http is None:
            raise RuntimeError("FakeEngine is not started")
        return self._http
