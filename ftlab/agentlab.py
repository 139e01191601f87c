"""A lab of real host agents, for the agent tests and the agent benchmarks.

Lab hosts on a private wire (own netns, own libvirtd), a real etcd with one member per
host, or on the hosts `etcd_hosts` names (https, client certificates and one etcd user per component, as
docs/install.md sets it up; plain http only with `secure_etcd=False`), a lab CA, a real
`vdsm-ft-agent` in every host (`ftlab.hostagent.LabAgent`), a VDSM stand-in per host
running the real hook scripts inside it, and the caller's own client namespace on the
wire: the wire is not routed to the root namespace, so in-process clients run on a
`NetnsWorker` thread there. Leaving the `with` block, by return, exception, Ctrl-C or
SIGTERM, kills and removes everything it made.

No engine and no poller: the caller asks for protection as the poller would.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import libvirt

from ftlab import guest, netns
from ftlab.etcd import ELECTION_MS, HEARTBEAT_MS, EtcdCluster, MemberSpec
from ftlab.etcdauth import ROOT, SecureEtcd
from ftlab.host import LabHost
from ftlab.hostagent import API_PORT, LabAgent
from ftlab.pki import heartbeat_key, issue, make_ca
from ftlab.vdsm import Vdsm
from ftlab.vdsmdriver import (DATA_PATTERN, GUEST_DISK_SIZE, HOOK_PYTHONPATH,
                              HOOK_TIMEOUT, HOOKS_DIR)
from vdsm_ft import domains, domxml
from vdsm_ft.api import DEFAULT_POLLER_IDENTITY, PeerSpec, VmState, VmStatus
from vdsm_ft.arbiter import Arbiter

MiB = 1 << 20
CLIENT_INDEX = 90        # the caller's namespace on the wire, where the poller would be


class AgentLabError(RuntimeError):
    """The lab did not reach the state asked for in time."""


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(f"agent lab stopped by signal {signum}")


def _etcd_statuses(endpoints: list[str], context: ssl.SSLContext | None,
                   timeout: float = 2.0) -> dict[int, dict]:
    """Each answering member's /v3/maintenance/status, by member index."""
    out: dict[int, dict] = {}
    for i, url in enumerate(endpoints):
        req = urllib.request.Request(url + "/v3/maintenance/status", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
                out[i] = json.load(r)
        except (OSError, ValueError):
            continue
    return out


def _etcd_leader(endpoints: list[str], context: ssl.SSLContext | None) -> int | None:
    statuses = _etcd_statuses(endpoints, context)
    ids = {status["header"]["member_id"]: i for i, status in statuses.items()}
    leader = next((s["leader"] for s in statuses.values() if s.get("leader")), None)
    return ids.get(leader) if leader else None


def _etcd_raft_term(endpoints: list[str], context: ssl.SSLContext | None) -> int | None:
    terms = [int(s["raftTerm"]) for s in _etcd_statuses(endpoints, context).values()
             if "raftTerm" in s]
    return max(terms) if terms else None


@dataclass(frozen=True)
class VmShape:
    """What a lab VM is made of: the idle guest with this many vCPUs, MiB of RAM, disks
    and NICs (bench/limits.py varies them)."""

    vcpus: int = 1
    memory_mib: int = 128
    disks: int = 1
    nics: int = 1

    def __str__(self) -> str:
        return (f"{self.vcpus} vCPU, {self.memory_mib} MiB, {self.disks} disk(s), "
                f"{self.nics} NIC(s)")


@dataclass
class LabVm:
    vm_id: str
    name: str
    disk: str
    # Every disk's image, the first being `disk`.
    disks: tuple[str, ...] = ()

    @property
    def secondary_name(self) -> str:
        return domxml.secondary_name(self.name)


class AgentLab:
    """Hosts `<prefix>-a`, `-b`, ... (three by default) on wire `<prefix>-wire`, each with
    an etcd member, an agent and a VDSM stand-in."""

    def __init__(self, prefix: str, hosts: int = 3, heartbeat_interval: float = 0.05,
                 heartbeat_timeout: float = 0.15, sasl: bool = False,
                 emulators: dict[str, str] | None = None, secure_etcd: bool = True,
                 etcd_hosts: Sequence[int] | None = None,
                 etcd_timing_ms: tuple[int, int] | None = None):
        self.prefix = prefix
        # The hosts (by index) that run an etcd member, and etcd's heartbeat interval
        # and election timeout; default: a member on every host, ftlab.etcd's timing.
        self.etcd_hosts = list(range(hosts)) if etcd_hosts is None else list(etcd_hosts)
        if not self.etcd_hosts or not set(self.etcd_hosts) <= set(range(hosts)):
            raise AgentLabError(f"etcd_hosts {etcd_hosts} must name some of the "
                                f"{hosts} hosts by index")
        self.etcd_timing_ms = etcd_timing_ms or (HEARTBEAT_MS, ELECTION_MS)
        # Host letter ("a", "b", ...) -> its [qemu] emulator; others get the lab's choice
        # (ftlab.qemubuild).
        self.emulators = emulators or {}
        self.count = hosts
        self.sasl = sasl                # libvirtds that want a SASL login, as on oVirt
        self.secure_etcd = secure_etcd
        self.etcd_auth: SecureEtcd | None = None
        self.wire = f"{prefix}-wire"
        self.heartbeat = (heartbeat_interval, heartbeat_timeout)
        self.base = ""
        self.hosts: list[LabHost] = []
        self.agents: list[LabAgent] = []
        self.etcd: EtcdCluster | None = None
        self.net: netns.NetnsWorker | None = None
        self.client_ns = netns.netns_name(f"{prefix}-client")
        self.vdsm: dict[str, Vdsm] = {}
        self.protect_failures: list[str] = []
        self._sigterm: Any = None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> "AgentLab":
        wire = netns.netns_name(self.wire)
        if netns.exists(wire):
            # The namespace names come from the prefix: a second lab would share the first
            # one's hosts, and its cleanup would kill them.
            raise AgentLabError(f"a lab with prefix {self.prefix!r} is already up ({wire} "
                                "exists): wait for it to end, or remove what it left")
        # SIGTERM unwinds like Ctrl-C, so that close() runs; the caller's handler is
        # back once the lab is gone.
        self._sigterm = signal.signal(signal.SIGTERM, _terminate)
        self.base = tempfile.mkdtemp(prefix=f"ftlab-{self.prefix}-", dir="/tmp")
        os.chmod(self.base, 0o755)       # QEMU (libvirt-qemu) traverses into the hosts
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def _up(self) -> None:
        for i in range(self.count):
            host = LabHost(f"{self.prefix}-{chr(ord('a') + i)}", i + 1, self.base,
                           wire=self.wire, sasl=self.sasl)
            self.hosts.append(host)
            host.up()
        pki = Path(self.base) / "pki"
        ca = make_ca(pki)
        members = [self.hosts[i] for i in self.etcd_hosts]
        if self.secure_etcd:
            self.etcd_auth = SecureEtcd(pki, ca, [h.name for h in self.hosts],
                                        [h.address for h in members])
        auth = self.etcd_auth
        heartbeat_ms, election_ms = self.etcd_timing_ms
        self.etcd = EtcdCluster([MemberSpec(host=h.address, netns=h.netns)
                                 for h in members],
                                base_dir=os.path.join(self.base, "etcd"),
                                tls=auth.server if auth else None,
                                client_cert_auth=auth is not None,
                                ctl_tls=auth.ctl if auth else None,
                                heartbeat_ms=heartbeat_ms, election_ms=election_ms).start()
        client_tls = issue(pki, ca, DEFAULT_POLLER_IDENTITY)
        netns.create(self.client_ns)
        netns.join_rep(self.client_ns, CLIENT_INDEX, netns.netns_name(self.wire))
        self.net = netns.NetnsWorker(self.client_ns)
        if auth:
            auth.enable(self.etcd.endpoints[0], self.net.call)
        interval, timeout = self.heartbeat
        for h in self.hosts:
            agent = LabAgent(h, self.etcd.endpoints, issue(pki, ca, h.name,
                                                           addresses=[h.address]),
                             client_tls, heartbeat_interval=interval,
                             heartbeat_timeout=timeout, reach=self.net.call,
                             heartbeat_key_file=heartbeat_key(pki),
                             etcd_login=auth.agent(h.name) if auth else None,
                             etcd_allow_plain_http=auth is None)
            agent.emulator = self.emulators.get(h.name.rsplit("-", 1)[1], agent.emulator)
            self.agents.append(agent)
            agent.start()
            self.vdsm[h.name] = Vdsm(HOOKS_DIR, h.uri,
                                     env=dict(os.environ, VDSM_FT_CONFIG=agent.config_path),
                                     pythonpath=HOOK_PYTHONPATH, hook_timeout=HOOK_TIMEOUT,
                                     wrap=h.nsenter, connect=h.connect)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.net is not None:
            self.net.close()
        for agent in self.agents:
            agent.crash()
        netns.delete(self.client_ns)
        if self.etcd is not None:
            self.etcd.stop()
        for host in self.hosts:
            host.down()
        netns.delete(netns.netns_name(self.wire))
        for agent in self.agents:
            shutil.rmtree(agent.overlay_dir, ignore_errors=True)
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    # -- hosts and agents ------------------------------------------------------------

    def agent(self, name: str) -> LabAgent:
        return next(a for a in self.agents if a.host.name == name)

    def host(self, name: str) -> LabHost:
        return self.agent(name).host

    def call(self, host_name: str, method: str, *args: object) -> Any:
        """An agent API call from the client namespace (mutual TLS)."""
        def run() -> Any:
            client = self.agent(host_name).client()
            try:
                return getattr(client, method)(*args)
            finally:
                client.close()
        assert self.net is not None
        return self.net.call(run)

    def peer(self, name: str) -> PeerSpec:
        host = self.host(name)
        return PeerSpec(host_id=host.name, agent_address=host.address,
                        agent_port=API_PORT, replication_address=host.address)

    def status(self, host_name: str, vm_id: str) -> VmStatus:
        return self.call(host_name, "vm_status", vm_id)

    def wait_status(self, host_name: str, vm_id: str, state: VmState,
                    timeout: float = 60.0, poll: float = 0.1) -> VmStatus:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = self.status(host_name, vm_id)
            except Exception as exc:  # the VM may not be known there yet
                last = exc
            if isinstance(last, VmStatus) and last.state is state:
                return last
            time.sleep(poll)
        raise AgentLabError(f"{vm_id} on {host_name} never reached {state.value}; "
                            f"last: {last}\n{self.agent_logs()}")

    def wait_reason(self, host_name: str, vm_id: str, words: str,
                    timeout: float = 30.0) -> VmStatus:
        """The VM's status once its reason names `words` (a refusal, a wait)."""
        deadline = time.monotonic() + timeout
        while words not in (now := self.status(host_name, vm_id)).reason:
            if time.monotonic() > deadline:
                raise AgentLabError(f"{vm_id} on {host_name}: no reason with {words!r} "
                                    f"within {timeout}s; last: {now}\n{self.agent_logs()}")
            time.sleep(0.2)
        return now

    def agent_logs(self, lines: int = 40) -> str:
        """The agents' last log lines: the lab's directory is gone once it closes, so a
        failure has to say what the agents saw."""
        out = []
        for agent in self.agents:
            try:
                with open(agent.log_path, errors="replace") as f:
                    tail = "".join(f.readlines()[-lines:])
            except OSError as exc:
                tail = f"(no log: {exc})\n"
            out.append(f"--- {agent.host.name} agent log ---\n{tail}")
        return "\n".join(out)

    def checkpoints(self, host_name: str, vm_id: str) -> int:
        """Completed COLO checkpoints of the VM, as the agent counts them."""
        text = self.call(host_name, "metrics")
        for line in text.splitlines():
            if line.startswith("vdsm_ft_checkpoints_total{") and f'vm="{vm_id}"' in line:
                return int(line.rsplit(" ", 1)[1])
        return 0

    def wait_checkpoints(self, host_name: str, vm_id: str, count: int = 2,
                         timeout: float = 15.0, poll: float = 0.05) -> None:
        """Wait for `count` more completed checkpoints. Two by default: the first may
        have begun before the caller's last write, so only the second covers it."""
        start = self.checkpoints(host_name, vm_id)
        deadline = time.monotonic() + timeout
        while self.checkpoints(host_name, vm_id) < start + count:
            if time.monotonic() > deadline:
                raise AgentLabError(f"{vm_id}: fewer than {count} checkpoints within "
                                    f"{timeout}s")
            time.sleep(poll)

    def arbiter(self, user: str = ROOT, **kw: Any) -> Arbiter:
        """A client of the lab's etcd, logged in as `user` (root: any key); call it
        from the client namespace (`net.call`)."""
        assert self.etcd is not None
        if self.etcd_auth is None:
            return Arbiter(self.etcd.endpoints, **kw)
        return self.etcd_auth.arbiter(self.etcd.endpoints, user, **kw)

    def etcd_leader(self) -> int | None:
        """Index of the etcd member that leads, asked from the client namespace."""
        assert self.etcd is not None and self.net is not None
        context = self.etcd_auth.ssl_context() if self.etcd_auth else None
        return self.net.call(_etcd_leader, self.etcd.endpoints, context)

    def etcd_raft_term(self) -> int | None:
        """The highest raft term the members report: it grows by one per election."""
        assert self.etcd is not None and self.net is not None
        context = self.etcd_auth.ssl_context() if self.etcd_auth else None
        return self.net.call(_etcd_raft_term, self.etcd.endpoints, context)

    def move_etcd_leader(self, index: int, timeout: float = 10.0) -> None:
        """Make member `index` the etcd leader (etcdctl move-leader, from the client
        namespace), so that losing a host can lose the leader on purpose."""
        assert self.etcd is not None
        endpoint = self.etcd.endpoints[index]
        status = netns.run_in(self.client_ns, [
            "etcdctl", *self.etcd.ctl_flags(), "--endpoints", endpoint, "endpoint", "status",
            "-w", "json"],
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, timeout=timeout)
        member = json.loads(status.stdout)[0]["Status"]["header"]["member_id"]
        deadline = time.monotonic() + timeout
        while self.etcd_leader() != index:
            if time.monotonic() > deadline:
                raise AgentLabError(f"etcd member {index} did not become leader: "
                                    f"{status.stderr.strip()}")
            leader = self.etcd_leader()
            if leader is None:
                time.sleep(0.2)
                continue
            status = netns.run_in(self.client_ns, [
                "etcdctl", *self.etcd.ctl_flags(), "--endpoints", self.etcd.endpoints[leader],
                "move-leader",
                f"{member:x}"], env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
                timeout=timeout)
            time.sleep(0.2)

    def cut_link(self, host_name: str) -> None:
        """Set the host's port on the wire's replication bridge down: from then on the
        host is silent, as a powered-off one (revive() sets it up again)."""
        host = self.host(host_name)
        netns.ip("link", "set", f"r{host.index}", "down", netns=host.wire)

    def revive(self, host_name: str) -> None:
        """Bring a crashed host back: libvirtd, its etcd member, its agent."""
        agent = self.agent(host_name)
        agent.host.up()
        index = self.etcd_member(host_name)
        assert self.etcd is not None
        if index is not None and not self.etcd.is_running(index):
            self.etcd.start_member(index)
        agent.start()

    def etcd_member(self, host_name: str) -> int | None:
        """The index of the etcd member this host runs, None if it runs none."""
        i = self.hosts.index(self.host(host_name))
        return self.etcd_hosts.index(i) if i in self.etcd_hosts else None

    # -- VMs -------------------------------------------------------------------------

    def start_vm(self, host_name: str, data_mib: int = 0,
                 shape: VmShape = VmShape()) -> LabVm:
        """A VM start as VDSM does it on that host: the real hook scripts (run inside
        the host), libvirt, after_vm_start. The idle guest, ft=true, of that shape
        (`data_mib` goes on its first disk)."""
        host = self.host(host_name)
        vm_id = str(uuid.uuid4())
        name = f"{self.prefix}-{vm_id[:8]}"
        disk = self.new_disk(host_name, vm_id, data_mib)
        extra = tuple(self.new_disk(host_name, f"{vm_id}-d{i}")
                      for i in range(1, shape.disks))
        xml = guest.idle_guest_xml(
            name, disk, mac=guest.guest_mac(2) if shape.nics else "",
            serial_log=host.path("images", f"{vm_id}.serial"), vm_id=vm_id,
            vcpus=shape.vcpus, memory_mib=shape.memory_mib,
            extra_disks=tuple(guest.EngineDisk(path, str(uuid.uuid4())) for path in extra),
            extra_macs=tuple(guest.guest_mac(2 + 256 * i) for i in range(1, shape.nics)))
        self.vdsm[host_name].start_vm(xml)
        return LabVm(vm_id, name, disk, (disk, *extra))

    def new_disk(self, host_name: str, vm_id: str, data_mib: int = 0) -> str:
        """The idle guest's disk in the host's images; with `data_mib`, that many MiB of
        real blocks for the resync mirror to copy, so that Syncing takes a while."""
        disk = guest.install_disk(guest.build_idle_disk(max(GUEST_DISK_SIZE,
                                                            2 * data_mib * MiB)),
                                  self.host(host_name).path("images", f"{vm_id}.qcow2"))
        if data_mib:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                            f"write -P {DATA_PATTERN:#x} 0 {data_mib}M", disk],
                           check=True, capture_output=True, timeout=120)
        return disk

    def protect(self, vm: LabVm, primary: str, secondary: str, timeout: float = 60.0,
                attempts: int = 1) -> None:
        """Protect as the poller does: ask the primary's agent, wait for Protected on
        both sides. A failed attempt (back to Need Secondary with a reason) is noted in
        `protect_failures` and, up to `attempts`, asked again."""
        self.wait_status(primary, vm.vm_id, VmState.NEED_SECONDARY, timeout)
        for _ in range(attempts):
            before = self.status(primary, vm.vm_id).reason
            self.call(primary, "protect", vm.vm_id, self.peer(secondary))
            synced = False
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                now = self.status(primary, vm.vm_id)
                if now.state is VmState.PROTECTED:
                    self.wait_status(secondary, vm.vm_id, VmState.PROTECTED, timeout)
                    return
                synced = synced or now.state is VmState.SYNCING
                # A reason left from before the request is not this attempt's failure.
                if now.state is VmState.NEED_SECONDARY and now.reason and (
                        synced or now.reason != before):
                    self.protect_failures.append(now.reason)
                    break
                time.sleep(0.1)
            else:
                raise AgentLabError(f"{vm.vm_id} not Protected within {timeout}s: {now}"
                                    f"\n{self.agent_logs()}")
        raise AgentLabError(f"{vm.vm_id}: protection failed {attempts} time(s): "
                            f"{self.protect_failures[-attempts:]}\n{self.agent_logs()}")

    def qemu_pid(self, host_name: str, domain: str) -> int | None:
        return domains.qemu_pid(domain, among=self.host(host_name).pids())

    def remove_vm(self, vm: LabVm) -> None:
        """Stop the VM wherever it runs, as VDSM would (the destroy hooks tell the agents,
        so they forget it), and delete its disk. Best effort: a host may be down."""
        for host_name, vdsm in self.vdsm.items():
            host = self.host(host_name)
            if host.holder_pid() is None:
                continue
            try:
                if vm.vm_id in vdsm.vms:
                    vdsm.destroy_vm(vm.vm_id)
                else:
                    vdsm.run_hooks("before_vm_destroy", None, vm.vm_id, {"ft": "true"})
                    self._destroy_domains(host, (vm.name, vm.secondary_name))
                    vdsm.run_hooks("after_vm_destroy", None, vm.vm_id, {"ft": "true"})
            except Exception:   # cleanup must go on; the next VM has a fresh id
                self._destroy_domains(host, (vm.name, vm.secondary_name))
        for path in (*(vm.disks or (vm.disk,)), vm.disk.removesuffix(".qcow2") + ".serial"):
            if os.path.exists(path):
                os.unlink(path)

    @staticmethod
    def _destroy_domains(host: LabHost, names: tuple[str, ...]) -> None:
        try:
            conn = host.connect()
        except libvirt.libvirtError:
            return
        try:
            for name in names:
                try:
                    domains.destroy(conn, name)
                except (libvirt.libvirtError, domains.DomainError):
                    pass
        finally:
            conn.close()
