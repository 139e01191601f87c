"""Host agents for the engine-side integration tests: the REAL agent protocol
(`vdsm_ft.api.AgentServer` over mutual TLS) with a SCRIPTED backend that records every
call and reports whatever status the test sets. The real agent (issue 4) replaces the
backend; the protocol, TLS and addressing are already the real ones.

Each lab host gets its own loopback address (127.0.0.11, .12, ...), all agents listen on
the same port, as on real hosts, and the engine's `host.address` points at them.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import replace
from pathlib import Path

from ftlab.pki import issue, make_ca
from vdsm_ft.api import (DEFAULT_POLLER_IDENTITY, AgentServer, Backend, Conflict, HostStatus,
                         NotFound, PeerSpec, PrepareSecondary, Role, SecondaryReady, TlsFiles,
                         VmState, VmStatus)
from vdsm_ft.qemu_probe import QemuCapability


class ScriptedBackend(Backend):
    def __init__(self, host_id: str, replication_address: str):
        self.host_id = host_id
        self.replication_address = replication_address
        self.vms: dict[str, VmStatus] = {}
        self.calls: list[tuple] = []
        self.on_call = None          # optional hook(name, *args), e.g. to inject a fault
        self.qemu: QemuCapability | None = None     # what the host status says of its QEMU
        self.lock = threading.Lock()

    def _record(self, *call) -> None:
        with self.lock:
            self.calls.append(call)
        if self.on_call is not None:
            self.on_call(*call)

    def set_vm(self, status: VmStatus) -> None:
        with self.lock:
            self.vms[status.vm_id] = status

    def drop_vm(self, vm_id: str) -> None:
        with self.lock:
            self.vms.pop(vm_id, None)

    def calls_named(self, name: str) -> list[tuple]:
        with self.lock:
            return [c for c in self.calls if c[0] == name]

    def _get(self, vm_id: str) -> VmStatus:
        with self.lock:
            if vm_id not in self.vms:
                raise NotFound(f"VM {vm_id} is not known to the agent on {self.host_id}")
            return self.vms[vm_id]

    def _update(self, vm_id: str, **changes) -> VmStatus:
        st = replace(self._get(vm_id), **changes)
        self.set_vm(st)
        return st

    def host_status(self) -> HostStatus:
        with self.lock:
            return HostStatus(host_id=self.host_id,
                              replication_address=self.replication_address,
                              agent_version="scripted", vms=tuple(self.vms.values()),
                              qemu=self.qemu)

    def vm_status(self, vm_id: str) -> VmStatus:
        return self._get(vm_id)

    def protect(self, vm_id: str, peer: PeerSpec) -> VmStatus:
        self._record("protect", vm_id, peer)
        st = self._get(vm_id)
        if st.state in (VmState.SYNCING, VmState.PROTECTED) and st.secondary_host != peer.host_id:
            raise Conflict(f"VM {vm_id} is already paired with {st.secondary_host}")
        return self._update(vm_id, state=VmState.SYNCING, secondary_host=peer.host_id,
                            generation=st.generation + 1)

    def unprotect(self, vm_id: str) -> VmStatus:
        self._record("unprotect", vm_id)
        return self._update(vm_id, state=VmState.DISABLED, secondary_host=None)

    def suspend(self, vm_id: str) -> VmStatus:
        self._record("suspend", vm_id)
        return self._update(vm_id, state=VmState.DISABLED, suspended=True)

    def resume(self, vm_id: str) -> VmStatus:
        self._record("resume", vm_id)
        return self._update(vm_id, state=VmState.NEED_SECONDARY, suspended=False)

    def test_failover(self, vm_id: str) -> VmStatus:
        self._record("test_failover", vm_id)
        return self._update(vm_id, state=VmState.FAILING_OVER)

    def restart_secondary(self, vm_id: str) -> VmStatus:
        self._record("restart_secondary", vm_id)
        return self._update(vm_id, state=VmState.SYNCING)

    def migrate_secondary(self, vm_id: str, to: PeerSpec) -> VmStatus:
        self._record("migrate_secondary", vm_id, to)
        return self._update(vm_id, state=VmState.SYNCING, secondary_host=to.host_id)

    def prepare_secondary(self, request: PrepareSecondary) -> SecondaryReady:
        self._record("prepare_secondary", request)
        return SecondaryReady(vm_id=request.vm_id, generation=request.generation,
                              migration_port=49152, nbd_port=49153)

    def pairing(self, vm_id: str) -> tuple[Role, PeerSpec | None] | None:
        # A scripted status names its pair by host id only; the poller is its one caller.
        return None

    def metrics(self) -> str:
        with self.lock:
            return "".join(f'vdsm_ft_vm_protected{{vm="{v.name}"}} '
                           f'{int(v.state is VmState.PROTECTED)}\n' for v in self.vms.values())


def free_port_on(addresses: list[str]) -> int:
    """A TCP port free on every address (tried in order; loopback aliases share ranges)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            socks = []
            for a in addresses:
                s = socket.socket()
                socks.append(s)
                s.bind((a, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


class AgentFleet:
    """One scripted agent per host, with certificates from a test CA."""

    def __init__(self, directory: Path, host_ids: list[str], first_octet: int = 11):
        self.ca = make_ca(directory)
        self.addresses = {h: f"127.0.0.{first_octet + i}" for i, h in enumerate(host_ids)}
        self.port = free_port_on(list(self.addresses.values()))
        self.poller_tls: TlsFiles = issue(directory, self.ca, DEFAULT_POLLER_IDENTITY)
        self.backends: dict[str, ScriptedBackend] = {}
        self.servers: dict[str, AgentServer] = {}
        self._tls: dict[str, TlsFiles] = {}
        for h, addr in self.addresses.items():
            self._tls[h] = issue(directory, self.ca, f"agent-{h}", addresses=[addr])
            self.backends[h] = ScriptedBackend(h, f"192.168.77.{addr.rsplit('.', 1)[1]}")
            self.start(h)

    def start(self, host_id: str) -> None:
        srv = AgentServer((self.addresses[host_id], self.port), self.backends[host_id],
                          self._tls[host_id])
        srv.start()
        self.servers[host_id] = srv

    def kill(self, host_id: str) -> None:
        """The host died: its agent stops answering at once."""
        srv = self.servers.pop(host_id)
        srv.shutdown()
        srv.server_close()

    def stop(self) -> None:
        for h in list(self.servers):
            self.kill(h)


def primary_status(vm_id: str, name: str, host_id: str, state: VmState = VmState.NEED_SECONDARY,
                   **kw) -> VmStatus:
    return VmStatus(vm_id=vm_id, name=name, state=state, role=Role.PRIMARY,
                    primary_host=host_id, **kw)
