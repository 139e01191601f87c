"""An agent lab for the agent benchmarks, with cleanup on every exit.

The same parts as `tests/integration/test_agent_failover.py`: lab hosts on a private
wire (own netns, own libvirtd), a real 3-member etcd with one member per host, a lab CA,
a real `vdsm-ft-agent` in every host (`ftlab.hostagent.LabAgent`), VMs started by the
VDSM stand-in running the real hook scripts inside the host, and the test's own client
namespace on the wire (the wire is not routed to the root namespace, so in-process
clients run on a `NetnsWorker` thread there). Leaving the `with` block, by return,
exception, Ctrl-C or SIGTERM, kills and removes everything it made.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import libvirt  # noqa: E402

from ftlab import guest, netns  # noqa: E402
from ftlab.etcd import EtcdCluster, MemberSpec  # noqa: E402
from ftlab.host import LabHost  # noqa: E402
from ftlab.hostagent import API_PORT, LabAgent  # noqa: E402
from ftlab.pki import issue, make_ca  # noqa: E402
from ftlab.vdsm import Vdsm  # noqa: E402
from vdsm_ft import domains, domxml  # noqa: E402
from vdsm_ft.api import PeerSpec, VmState, VmStatus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = os.path.join(REPO, "hooks")
# Hooks run on /usr/bin/python3 (D6); the repo and this interpreter's site-packages
# stand in for the host package and its dependencies (as in the agent tests).
HOOK_PYTHONPATH = (REPO, sysconfig.get_paths()["purelib"])
MiB = 1 << 20
CLIENT_INDEX = 90


def _leader(endpoints: list[str], timeout: float = 2.0) -> int | None:
    ids: dict[str, int] = {}
    leader = None
    for i, url in enumerate(endpoints):
        req = urllib.request.Request(url + "/v3/maintenance/status", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status = json.load(r)
        except (OSError, ValueError):
            continue
        ids[status["header"]["member_id"]] = i
        leader = leader or status.get("leader")
    return ids.get(leader) if leader else None


class AgentBenchError(RuntimeError):
    """The lab could not do what the benchmark asked (never a number)."""


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(f"benchmark stopped by signal {signum}")


@dataclass
class LabVm:
    vm_id: str
    name: str
    host: str           # where the primary was started
    disk: str

    @property
    def secondary_name(self) -> str:
        return domxml.secondary_name(self.name)


class AgentLab:
    """Hosts `<prefix>-a`, `-b`, `-c` on wire `<prefix>-wire`, each with etcd and an agent."""

    def __init__(self, prefix: str, hosts: int = 3, heartbeat_interval: float = 0.05,
                 heartbeat_timeout: float = 0.15):
        self.prefix = prefix
        self.count = hosts
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

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> "AgentLab":
        signal.signal(signal.SIGTERM, _terminate)
        self.base = tempfile.mkdtemp(prefix=f"ftlab-{self.prefix}-", dir="/tmp")
        os.chmod(self.base, 0o755)
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def _up(self) -> None:
        for i in range(self.count):
            host = LabHost(f"{self.prefix}-{chr(ord('a') + i)}", i + 1, self.base,
                           wire=self.wire)
            self.hosts.append(host)
            host.up()
        self.etcd = EtcdCluster([MemberSpec(host=h.address, netns=h.netns)
                                 for h in self.hosts],
                                base_dir=os.path.join(self.base, "etcd")).start()
        pki = Path(self.base) / "pki"
        ca = make_ca(pki)
        client_tls = issue(pki, ca, "poller")
        netns.create(self.client_ns)
        netns.join_rep(self.client_ns, CLIENT_INDEX, netns.netns_name(self.wire))
        self.net = netns.NetnsWorker(self.client_ns)
        interval, timeout = self.heartbeat
        for h in self.hosts:
            agent = LabAgent(h, self.etcd.endpoints, issue(pki, ca, h.name,
                                                           addresses=[h.address]),
                             client_tls, heartbeat_interval=interval,
                             heartbeat_timeout=timeout, reach=self.net.call)
            self.agents.append(agent)
            agent.start()
            self.vdsm[h.name] = Vdsm(HOOKS, h.uri,
                                     env=dict(os.environ, VDSM_FT_CONFIG=agent.config_path),
                                     pythonpath=HOOK_PYTHONPATH, hook_timeout=60,
                                     wrap=h.nsenter)

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

    # -- agents ----------------------------------------------------------------------

    def agent(self, name: str) -> LabAgent:
        return next(a for a in self.agents if a.host.name == name)

    def host(self, name: str) -> LabHost:
        return self.agent(name).host

    def call(self, host_name: str, method: str, *args: object) -> object:
        """An agent API call from the client namespace (mutual TLS)."""
        def run() -> object:
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
            except Exception as exc:  # not known there yet
                last = exc
            if isinstance(last, VmStatus) and last.state is state:
                return last
            time.sleep(poll)
        raise AgentBenchError(f"{vm_id} on {host_name} never reached {state.value}; "
                              f"last: {last}; see {self.agent(host_name).log_path}")

    def checkpoints(self, host_name: str, vm_id: str) -> int:
        text = self.call(host_name, "metrics")
        for line in text.splitlines():
            if line.startswith("vdsm_ft_checkpoints_total{") and f'vm="{vm_id}"' in line:
                return int(line.rsplit(" ", 1)[1])
        return 0

    def wait_checkpoint(self, host_name: str, vm_id: str, count: int = 1,
                        timeout: float = 15.0, poll: float = 0.05) -> None:
        start = self.checkpoints(host_name, vm_id)
        deadline = time.monotonic() + timeout
        while self.checkpoints(host_name, vm_id) < start + count:
            if time.monotonic() > deadline:
                raise AgentBenchError(f"{vm_id}: no checkpoint within {timeout}s")
            time.sleep(poll)

    def etcd_leader(self) -> int | None:
        """Index of the etcd member that leads, asked from the client namespace."""
        assert self.etcd is not None and self.net is not None
        return self.net.call(_leader, self.etcd.endpoints)

    def move_etcd_leader(self, index: int, timeout: float = 10.0) -> None:
        """Make member `index` the etcd leader (etcdctl move-leader, from the client
        namespace), so a benchmark can lose the leader with a host on purpose."""
        assert self.etcd is not None
        endpoint = self.etcd.endpoints[index]
        status = netns.run_in(self.client_ns, [
            "etcdctl", "--endpoints", endpoint, "endpoint", "status", "-w", "json"],
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, timeout=timeout)
        member = json.loads(status.stdout)[0]["Status"]["header"]["member_id"]
        deadline = time.monotonic() + timeout
        while self.etcd_leader() != index:
            if time.monotonic() > deadline:
                raise AgentBenchError(f"etcd member {index} did not become leader: "
                                      f"{status.stderr.strip()}")
            leader = self.etcd_leader()
            if leader is None:
                time.sleep(0.2)
                continue
            status = netns.run_in(self.client_ns, [
                "etcdctl", "--endpoints", self.etcd.endpoints[leader], "move-leader",
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
        index = self.hosts.index(agent.host)
        assert self.etcd is not None
        if not self.etcd.is_running(index):
            self.etcd.start_member(index)
        agent.start()

    # -- VMs -------------------------------------------------------------------------

    def start_vm(self, host_name: str) -> LabVm:
        """A VM start as VDSM does it on that host: the real hooks (inside the host),
        libvirt, after_vm_start. The idle guest, ft=true."""
        host = self.host(host_name)
        vm_id = str(uuid.uuid4())
        name = f"{self.prefix}-{vm_id[:8]}"
        disk = self.new_disk(host_name, vm_id)
        xml = guest.idle_guest_xml(name, disk, mac=guest.guest_mac(2),
                                   serial_log=host.path("images", f"{vm_id}.serial"),
                                   vm_id=vm_id)
        self.vdsm[host_name].start_vm(xml)
        return LabVm(vm_id, name, host_name, disk)

    def new_disk(self, host_name: str, vm_id: str) -> str:
        return guest.install_disk(guest.build_idle_disk(64 * MiB),
                                  self.host(host_name).path("images", f"{vm_id}.qcow2"))

    def protect(self, vm: LabVm, secondary: str, timeout: float = 60.0,
                attempts: int = 3) -> None:
        """Protect as the poller does: ask, wait for Protected on both sides; a failed
        attempt (back to Need Secondary with a reason) is asked again, and noted in
        `protect_failures`."""
        self.wait_status(vm.host, vm.vm_id, VmState.NEED_SECONDARY, timeout)
        for attempt in range(attempts):
            before = self.status(vm.host, vm.vm_id).reason
            self.call(vm.host, "protect", vm.vm_id, self.peer(secondary))
            synced = False
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                now = self.status(vm.host, vm.vm_id)
                if now.state is VmState.PROTECTED:
                    self.wait_status(secondary, vm.vm_id, VmState.PROTECTED, timeout)
                    return
                synced = synced or now.state is VmState.SYNCING
                if now.state is VmState.NEED_SECONDARY and now.reason and (
                        synced or now.reason != before):
                    self.protect_failures.append(now.reason)
                    break
                time.sleep(0.1)
            else:
                raise AgentBenchError(f"{vm.vm_id} not Protected within {timeout}s: {now}")
        raise AgentBenchError(f"{vm.vm_id}: protection failed {attempts} times: "
                              f"{self.protect_failures[-attempts:]}")

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
        for path in (vm.disk, vm.disk.removesuffix(".qcow2") + ".serial"):
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
