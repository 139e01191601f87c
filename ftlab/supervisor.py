"""The lab's supervisor: the one detached process that builds the lab and keeps it.

`vdsm-ft lab up` starts it (`python -m ftlab.supervisor --lab-dir DIR`) in its own
session and waits for `lab.json` to say `ready` or `failed`. It builds, in order:
the lab CA; the hosts (each its own netns, mount namespace, libvirtd; ftlab.host); one
etcd member per host, https with client certificates and one etcd user per component
(ftlab.etcdauth); the agents (ftlab.hostagent); the fake engine over HTTPS with a
generated admin password (0600 file, never printed); a VDSM stand-in per host
(ftlab.vdsmdriver); and the real poller as its own process. Then it serves the control
socket (ftlab.labcontrol) until it is killed: `lab down` removes everything, using pid
files and the lab's fixed names, whether or not this process is still alive.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from engine_plugin import config as poller_config
from ftlab import qemubuild, vmlocate
from ftlab.engine import FakeEngine, Hook
from ftlab.etcd import EtcdCluster, MemberSpec
from ftlab.etcdauth import SecureEtcd
from ftlab.host import LabHost
from ftlab.hostagent import API_PORT, LabAgent
from ftlab.labcontrol import ControlServer
from ftlab.labstate import (DEFAULT_HOSTS, ENGINE_USER, HOOK_NAME, HOST_RESERVED_MEMORY,
                            HostInfo, LabPaths, LabState, host_memory, host_name, write_pid,
                            write_state)
from ftlab.pki import heartbeat_key, issue, make_ca
from ftlab.vdsmdriver import HOOKS_DIR, REPO, TEMPLATES, HostVdsm, VdsmFleet
from vdsm_ft import domains
from vdsm_ft.api import DEFAULT_POLLER_IDENTITY, AgentError, Role, TlsFiles, VmState

log = logging.getLogger("ftlab.supervisor")

POLLER_INTERVAL = 1.0
POLLER_START_TIMEOUT = 30.0
REPLICA_FULL_SIZE = "1m"
LINK_DEV = "eth0"                     # a lab host's replication link (ftlab.netns.join_rep)
LOSS_CHAIN = "FTLAB-LOSS"
TBF_BURST = "32kbit"
TBF_LATENCY = "400ms"


def _hook_list() -> list[Hook]:
    """The hooks VDSM reports for a host: every installed script with its md5."""
    hooks = []
    for point in sorted(os.listdir(HOOKS_DIR)):
        script = os.path.join(HOOKS_DIR, point, HOOK_NAME)
        if os.path.isfile(script):
            with open(script, "rb") as f:
                hooks.append(Hook(point, HOOK_NAME, hashlib.md5(f.read()).hexdigest()))
    return hooks


class Supervisor:
    def __init__(self, root: str, n_hosts: int, engine_port: int):
        self.paths = LabPaths(root)
        self.state = LabState(state="starting", lab_dir=root, supervisor_pid=os.getpid(),
                              control_socket=self.paths.control, started_at=time.time())
        self.n_hosts = n_hosts
        self.engine_port = engine_port
        self.hosts: list[LabHost] = []
        self.agents: list[LabAgent] = []
        self.etcd: EtcdCluster | None = None
        self.etcd_auth: SecureEtcd | None = None
        self.engine: FakeEngine | None = None
        self.fleet: VdsmFleet | None = None
        self.poller: subprocess.Popen | None = None
        self.engine_outage = False
        self.lock = threading.Lock()          # one fault at a time

    # ---------------------------------------------------------------- build

    def build(self) -> None:
        p = self.paths
        for d in (p.hosts, p.pki, p.engine, p.cache, p.logs):
            os.makedirs(d, mode=0o755, exist_ok=True)
        log.info("%s", qemubuild.describe())
        log.info("lab CA")
        ca = make_ca(Path(p.pki))
        client = issue(Path(p.pki), ca, DEFAULT_POLLER_IDENTITY)
        self.state.lab_ca, self.state.client_cert, self.state.client_key = \
            client.ca, client.cert, client.key
        for i in range(1, self.n_hosts + 1):
            log.info("host %s", host_name(i))
            self.hosts.append(LabHost(host_name(i), i, p.hosts).up())
        log.info("etcd cluster (https, client certificates, etcd users)")
        auth = self.etcd_auth = SecureEtcd(Path(p.pki), ca, [h.name for h in self.hosts],
                                           [h.address for h in self.hosts])
        self.etcd = EtcdCluster([MemberSpec(host=h.address, netns=h.netns) for h in self.hosts],
                                base_dir=p.etcd, tls=auth.server, client_cert_auth=True,
                                ctl_tls=auth.ctl).start()
        auth.enable(self.etcd.endpoints[0])
        self.state.etcd_endpoints = self.etcd.endpoints
        for h in self.hosts:
            log.info("agent on %s", h.name)
            tls = issue(Path(p.pki), ca, h.name, addresses=[h.address])
            self.agents.append(LabAgent(h, self.etcd.endpoints, tls, client,
                                        heartbeat_key_file=heartbeat_key(Path(p.pki)),
                                        etcd_login=auth.agent(h.name)).start())
        self.state.hosts = [HostInfo(name=h.name, index=h.index, address=h.address,
                                     netns=h.netns, uri=h.uri, dir=h.dir,
                                     agent_config=a.config_path, run_dir=a.run_dir)
                            for h, a in zip(self.hosts, self.agents)]
        self._start_engine()
        self._start_poller(client)

    def _start_engine(self) -> None:
        p = self.paths
        password = secrets.token_urlsafe(24)
        fd = os.open(p.password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self.fleet = VdsmFleet({h.name: HostVdsm(h, a.config_path)
                                for h, a in zip(self.hosts, self.agents)},
                               p.cache, self._report)
        log.info("fake engine")
        self.engine = FakeEngine(users={ENGINE_USER: password}, driver=self.fleet,
                                 port=self.engine_port, workdir=Path(p.engine))
        info = self.engine.start()
        hooks = _hook_list()
        for name, (disks, nics) in TEMPLATES.items():
            self.engine.add_template(name, disks=disks, nics=nics)
        memory = host_memory(len(self.hosts))
        for h in self.hosts:
            # Engine host id = the agent's host id (LabAgent configures the host's name).
            self.engine.state.add_host(h.name, self.engine.default_cluster, address=h.address,
                                       memory=memory, reserved_memory=HOST_RESERVED_MEMORY,
                                       hooks=hooks, host_id=h.name)
        self.state.engine_url, self.state.engine_ca = info.url, str(info.ca_file)
        self.state.password_file = p.password
        self.fleet.start_reporting()

    def _report(self, host: str, reports: list[dict]) -> None:
        assert self.engine is not None
        self.engine.report_vms(host, reports)

    def _start_poller(self, client: TlsFiles) -> None:
        p = self.paths
        assert self.etcd_auth is not None
        etcd = self.etcd_auth.poller
        with open(p.password) as f:
            password = f.read().strip()
        poller_config.write(p.poller_conf, {
            "engine": {"url": self.state.engine_url, "username": ENGINE_USER,
                       "password": password, "ca_file": self.state.engine_ca, "timeout": 10},
            "agents": {"port": API_PORT, "cert": client.cert, "key": client.key,
                       "ca": client.ca, "timeout": 3},
            "placement": {"hook_name": HOOK_NAME},
            "poller": {"interval": POLLER_INTERVAL,
                       "etcd_endpoints": ",".join(self.state.etcd_endpoints),
                       "etcd_ca": etcd.tls.ca, "etcd_cert": etcd.tls.cert,
                       "etcd_key": etcd.tls.key, "etcd_username": etcd.user,
                       "etcd_password": etcd.password()}})
        log.info("poller")
        log_file = open(os.path.join(p.logs, "poller.log"), "ab")
        env = dict(os.environ, PYTHONPATH=REPO)
        self.poller = subprocess.Popen(
            [sys.executable, "-c", "import sys; from engine_plugin.poller import main; "
             "sys.exit(main(sys.argv[1:]))", "--config", p.poller_conf],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        log_file.close()
        write_pid(p.poller_pid, self.poller.pid)
        self.state.poller_pid = self.poller.pid
        time.sleep(1.0)
        if self.poller.poll() is not None:
            raise RuntimeError(f"the poller exited at start ({self.poller.returncode}); see "
                               f"{os.path.join(p.logs, 'poller.log')}")

    # ---------------------------------------------------------------- control operations

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ValueError(f"no lab host {name!r}; the lab has "
                         f"{', '.join(h.name for h in self.hosts)}")

    def agent(self, name: str) -> LabAgent:
        return self.agents[self.hosts.index(self.host(name))]

    def op_status(self) -> dict[str, Any]:
        assert self.engine is not None and self.fleet is not None
        hosts = []
        for h, a in zip(self.hosts, self.agents):
            entry: dict[str, Any] = {"name": h.name, "address": h.address,
                                     "running": h.holder_pid() is not None,
                                     "engine_status": self.engine.host(h.name).status,
                                     "agent": "", "qemu": "", "vms": []}
            if h.name in self.fleet.dead:
                entry["agent"] = "host crashed"
            else:
                client = a.client(timeout=2.0)
                try:
                    st = client.host_status()
                    entry["agent"] = "up"
                    if st.qemu is not None:
                        can = "COLO ok" if st.qemu.capable else "cannot do COLO"
                        entry["qemu"] = f"{st.qemu.version} {can}"
                    entry["vms"] = [{"vm_id": v.vm_id, "name": v.name, "state": v.state.value,
                                     "role": v.role.value, "reason": v.reason,
                                     "generation": v.generation,
                                     "secondary_host": v.secondary_host}
                                    for v in st.vms]
                except AgentError as e:
                    entry["agent"] = f"unreachable: {e}"
                finally:
                    client.close()
            hosts.append(entry)
        vms = [{"id": v.id, "name": v.name, "status": v.status, "origin": v.origin,
                "host": v.host_id, "custom": dict(v.custom_properties)}
               for v in self.engine.vms()]
        return {"hosts": hosts, "vms": vms,
                "poller": "running" if self.poller and self.poller.poll() is None
                else "exited", "engine_outage": self.engine_outage}

    def op_host_crash(self, host: str) -> dict[str, float]:
        assert self.engine is not None and self.fleet is not None
        h = self.host(host)
        with self.lock:
            self.fleet.dead.add(h.name)
            at = time.monotonic()
            h.crash()
            killed = time.monotonic()
            self.engine.kill_host(h.name)
        log.info("host %s crashed", h.name)
        return {"at": at, "killed": killed}

    def op_host_revive(self, host: str) -> str:
        assert self.engine is not None and self.fleet is not None and self.etcd is not None
        h = self.host(host)
        with self.lock:
            h.up()
            i = self.hosts.index(h)
            if not self.etcd.is_running(i):
                self.etcd.start_member(i)
            agent = self.agent(host)
            if agent.proc is None or agent.proc.poll() is not None:
                agent.start()
            self.fleet.restart_vdsm(h.name)
            self.fleet.dead.discard(h.name)
            self.engine.revive_host(h.name)
        return f"{h.name} is back: libvirtd, etcd member, agent; the engine sees it Up"

    def op_vdsm_restart(self, host: str) -> str:
        """Restart the host's VDSM stand-in: it recovers the domains there and kills the
        loose ones (recovery.all_domains)."""
        assert self.fleet is not None
        h = self.host(host)
        if h.name in self.fleet.dead:
            raise ValueError(f"host {host} is crashed: revive it first")
        with self.lock:
            killed = self.fleet.restart_vdsm(h.name)
        return (f"VDSM on {host} restarted; recovered {len(self.fleet.hosts[h.name].vdsm.vms)} "
                f"domains, killed {len(killed)} loose ones {' '.join(killed)}".rstrip())

    def op_agent_crash(self, host: str, restart: bool = False) -> str:
        agent = self.agent(host)
        with self.lock:
            if restart:
                agent.start()
                return f"agent on {host} restarted"
            agent.crash()
        return f"agent on {host} killed (SIGKILL); its QEMUs go on"

    def op_etcd_crash(self, host: str, restart: bool = False) -> str:
        """SIGKILL the etcd member on `host` alone (its host, agent and QEMUs go on), or
        start it again on its data dir."""
        assert self.etcd is not None
        i = self.hosts.index(self.host(host))
        with self.lock:
            if restart:
                if not self.etcd.is_running(i):
                    self.etcd.start_member(i)
                return f"etcd member on {host} restarted"
            down = [self.hosts[j].name for j in range(len(self.hosts))
                    if j != i and not self.etcd.is_running(j)]
            if down:
                raise ValueError(f"the etcd member on {' '.join(down)} is down already: "
                                 "with a second one down the cluster may lose quorum")
            self.etcd.stop_member(i, kill=True)
        return f"etcd member on {host} killed (SIGKILL)"

    def op_qemu_crash(self, vm: str, host: str | None = None) -> str:
        """SIGKILL the QEMU of `vm` (name or id): on `host`, else where it runs as the
        primary of the newest generation."""
        assert self.fleet is not None
        name, primaries = vm, []
        for h, a in zip(self.hosts, self.agents):
            if h.name in self.fleet.dead:
                continue
            client = a.client(timeout=2.0)
            try:
                for st in client.host_status().vms:
                    if vm in (st.vm_id, st.name):
                        name = st.name
                        if st.role is Role.PRIMARY and st.state is not VmState.DOWN:
                            primaries.append((st.generation, h.name))
            except AgentError:
                continue
            finally:
                client.close()
        where = [host] if host else [h for _, h in sorted(primaries, reverse=True)]
        for candidate in where:
            h = self.host(candidate)
            found = vmlocate.vm_domain(h.uri, name)
            pid = domains.qemu_pid(found, among=h.pids()) if found else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                return f"QEMU of {found} on {candidate} (pid {pid}) killed"
        if host:
            raise ValueError(f"no running QEMU of VM {name!r} on {host}")
        raise ValueError(f"no agent reports a running primary of VM {vm!r}; name a host: "
                         "qemu-crash VM --host HOST")

    def op_partition(self, a: str, b: str, heal: bool = False) -> str:
        ha, hb = self.host(a), self.host(b)
        verb = "del" if heal else "add"
        for x, y in ((ha, hb), (hb, ha)):
            x.run(["ip", "route", verb, "blackhole", f"{y.address}/32"])
        return f"link {a} <-> {b} {'healed' if heal else 'cut (blackhole routes both ways)'}"

    def op_slow_link(self, host: str, delay: str = "", loss: str = "", rate: str = "",
                     clear: bool = False) -> str:
        """netem delay/loss/rate on the host's replication link (eth0, egress). A kernel
        without sch_netem still gets what it can run: loss through iptables' statistic
        match, rate through tbf; a delay it cannot produce is refused, in words."""
        h = self.host(host)
        if clear:
            h.run(["tc", "qdisc", "del", "dev", LINK_DEV, "root"], check=False)
            self._drop_loss_rule(h)
            return f"{host}: link back to normal"
        loss_pct = _percent(loss) if loss else None
        netem = ["tc", "qdisc", "replace", "dev", LINK_DEV, "root", "netem"]
        for key, value in (("delay", delay), ("loss", loss), ("rate", rate)):
            if value:
                netem += [key, value]
        proc = h.run(netem, check=False)
        if proc.returncode == 0:
            self._drop_loss_rule(h)
            return f"{host}: replication link now has netem {' '.join(netem[7:])}"
        if not _no_qdisc(proc.stderr):
            raise RuntimeError(f"tc netem on {host} failed: {proc.stderr.strip()}")
        if delay:
            raise RuntimeError(
                f"{host}: this kernel has no sch_netem qdisc (CONFIG_NET_SCH_NETEM), so a "
                f"--delay cannot be produced here; --loss (iptables statistic match) and "
                f"--rate (tbf) work without it. For delays use a kernel with netem, e.g. "
                f"Debian's linux-image-amd64")
        done = []
        if rate:
            tbf = ["tc", "qdisc", "replace", "dev", LINK_DEV, "root", "tbf", "rate", rate,
                   "burst", TBF_BURST, "latency", TBF_LATENCY]
            proc = h.run(tbf, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"tc tbf on {host} failed: {proc.stderr.strip()}")
            done.append(f"rate {rate} (tbf: no sch_netem in this kernel)")
        if loss_pct is not None:
            self._drop_loss_rule(h)
            h.run(["iptables", "-N", LOSS_CHAIN])
            h.run(["iptables", "-A", LOSS_CHAIN, "-m", "statistic", "--mode", "random",
                   "--probability", f"{loss_pct / 100:.6f}", "-j", "DROP"])
            h.run(["iptables", "-I", "OUTPUT", "-o", LINK_DEV, "-j", LOSS_CHAIN])
            done.append(f"loss {loss} (iptables statistic match: no sch_netem in this "
                        f"kernel)")
        return f"{host}: replication link now has {', '.join(done)}"

    @staticmethod
    def _drop_loss_rule(h: LabHost) -> None:
        if h.run(["iptables", "-D", "OUTPUT", "-o", LINK_DEV, "-j", LOSS_CHAIN],
                 check=False).returncode == 0:
            h.run(["iptables", "-F", LOSS_CHAIN])
            h.run(["iptables", "-X", LOSS_CHAIN])

    def op_engine_down(self, up: bool = False) -> str:
        assert self.engine is not None
        self.engine.set_outage(not up)
        self.engine_outage = not up
        return "engine back up" if up else "engine down (connections refused)"

    def op_disk_full(self, host: str, undo: bool = False) -> str:
        agent = self.agent(host)
        h = agent.host
        replicas = h.path("ft", "replicas")
        if undo:
            h.run(["umount", replicas])
            return f"{host}: replica directory back to normal"
        os.makedirs(replicas, exist_ok=True)
        # A tiny full tmpfs over the replica dir, inside the host's own mount namespace.
        h.run(["mount", "-t", "tmpfs", "-o", f"size={REPLICA_FULL_SIZE}", "tmpfs", replicas])
        h.run(["dd", "if=/dev/zero", f"of={replicas}/.fill", "bs=64k"], check=False)
        return f"{host}: replica directory {replicas} is full"

    def handlers(self) -> dict[str, Any]:
        return {"status": self.op_status, "host-crash": self.op_host_crash,
                "host-revive": self.op_host_revive, "agent-crash": self.op_agent_crash,
                "etcd-crash": self.op_etcd_crash,
                "vdsm-restart": self.op_vdsm_restart,
                "qemu-crash": self.op_qemu_crash, "partition": self.op_partition,
                "slow-link": self.op_slow_link, "engine-down": self.op_engine_down,
                "disk-full": self.op_disk_full}


def _percent(text: str) -> float:
    value = text[:-1] if text.endswith("%") else text
    try:
        pct = float(value)
    except ValueError:
        pct = -1.0
    if not 0 < pct <= 100:
        raise ValueError(f"loss {text!r}: give a percentage above 0 and at most 100, "
                         "e.g. 1%")
    return pct


def _no_qdisc(stderr: str) -> bool:
    """tc's words for a qdisc kind this kernel does not have."""
    text = stderr.lower()
    return "unknown qdisc" in text or "specified qdisc kind is unknown" in text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlab.supervisor")
    parser.add_argument("--lab-dir", required=True)
    parser.add_argument("--hosts", type=int, default=DEFAULT_HOSTS)
    parser.add_argument("--engine-port", type=int, required=True)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.lab_dir)
    paths = LabPaths(root)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    write_pid(paths.supervisor_pid, os.getpid())
    sup = Supervisor(root, args.hosts, args.engine_port)
    write_state(sup.state)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        sup.build()
    except Exception as e:
        traceback.print_exc()
        sup.state.state, sup.state.error = "failed", f"{type(e).__name__}: {e}"
        write_state(sup.state)
        return 1
    server = ControlServer(paths.control, sup.handlers())
    sup.state.state = "ready"
    write_state(sup.state)
    log.info("lab ready")
    server.serve(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
