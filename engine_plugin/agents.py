"""The engine side's view of the host agents: one status call per host, in parallel.

An agent is reached at the engine's `host.address` and the configured port. Its
answer is checked against the engine's host id, so a mis-addressed or misconfigured
agent is never mistaken for another host's.
"""
from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine_plugin.config import AgentSettings
from engine_plugin.inventory import HostInfo
from vdsm_ft.api import (AgentClient, AgentError, HostStatus, PeerSpec, VmStatus,
                         client_context)

log = logging.getLogger(__name__)

# Hosts in these engine states run no VMs; their agents are not asked.
IDLE_HOST_STATES = frozenset({"maintenance", "installing", "install_failed",
                              "installing_os", "pending_approval", "down"})


@dataclass
class AgentView:
    """What the agents said this cycle."""

    statuses: dict[str, HostStatus] = field(default_factory=dict)   # host id -> status
    problems: dict[str, str] = field(default_factory=dict)          # host id -> why not
    port: int = 0
    _by_vm: dict[str, list[tuple[str, VmStatus]]] | None = None

    def reports(self, vm_id: str) -> list[tuple[str, VmStatus]]:
        """(host id, status) of every agent that reports `vm_id`."""
        if self._by_vm is None:
            self._by_vm = {}
            for host_id, hs in self.statuses.items():
                for st in hs.vms:
                    self._by_vm.setdefault(st.vm_id, []).append((host_id, st))
        return self._by_vm.get(vm_id, [])

    def vm_ids(self) -> set[str]:
        self.reports("")
        assert self._by_vm is not None
        return set(self._by_vm)

    def peer_spec(self, host: HostInfo) -> PeerSpec:
        return PeerSpec(host_id=host.id, agent_address=host.address, agent_port=self.port,
                        replication_address=self.statuses[host.id].replication_address)


class Agents:
    """Clients for every host's agent, kept across cycles (persistent TLS sessions)."""

    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self._context: ssl.SSLContext = client_context(settings.tls)
        self._clients: dict[tuple[str, int], AgentClient] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=settings.workers,
                                        thread_name_prefix="agent-status")
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-poll")

    def client(self, host: HostInfo) -> AgentClient:
        key = (host.address, self.settings.port)
        with self._lock:
            c = self._clients.get(key)
            if c is None:
                c = AgentClient(host.address, self.settings.port, self._context,
                                self.settings.timeout)
                self._clients[key] = c
            return c

    def poll(self, hosts: Iterable[HostInfo]) -> AgentView:
        """Ask every non-idle host's agent for its status; bounded by the agent timeout
        (the calls run in parallel)."""
        view = AgentView(port=self.settings.port)
        asked = []
        for h in hosts:
            if h.status in IDLE_HOST_STATES:
                view.problems[h.id] = f"host is {h.status}"
            elif not h.address:
                view.problems[h.id] = "the engine has no address for this host"
            else:
                asked.append((h, self._pool.submit(self._status, h)))
        for h, fut in asked:
            status, problem = fut.result()
            if status is not None:
                view.statuses[h.id] = status
            else:
                view.problems[h.id] = problem
        return view

    def poll_async(self, hosts: Iterable[HostInfo]) -> Future[AgentView]:
        """`poll` in the background (the poller overlaps it with the engine's VM list)."""
        return self._background.submit(self.poll, list(hosts))

    def _status(self, host: HostInfo) -> tuple[HostStatus | None, str]:
        try:
            status = self.client(host).host_status()
        except AgentError as e:
            return None, str(e)
        if status.host_id != host.id:
            return None, (f"the agent at {host.address} says it is host {status.host_id}, "
                          f"not {host.id}; fix host_id in its configuration")
        return status, ""

    def close(self) -> None:
        self._background.shutdown(wait=False)
        self._pool.shutdown(wait=False)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
