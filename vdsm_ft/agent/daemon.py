"""The per-host agent's wiring: it builds the parts, starts and stops them.

It serves the poller and peer agents over HTTPS with mutual TLS (`vdsm_ft.api`, backend
`api_backend.py`) and the hooks over a unix socket (`vdsm_ft.hookapi`, backend
`hook_backend.py`), over the parts that do the work: the registry of VM controllers,
their services, the monitor, the secondary bring-up, this host's QEMU probe and the
image marks. State is persisted per VM, so a restarted agent
re-attaches to the running QEMUs and protection carries on without a failover.
"""
from __future__ import annotations

import logging
import os

from vdsm_ft import colo, emulator, hostconfig, replica
from vdsm_ft.agent.api_backend import AgentApiBackend
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.heartbeat import Heartbeat, read_key
from vdsm_ft.agent.hook_backend import AgentHookBackend
from vdsm_ft.agent.hostqemu import HostQemu
from vdsm_ft.agent.imagemarks import ImageMarks
from vdsm_ft.agent.monitor import Monitor
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.secondary import Secondaries
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import ImageNotes, Store, VmRecord
from vdsm_ft.api import AgentServer, Role, TlsFiles, VmState, client_context
from vdsm_ft.arbiter import ARBITER_BOUND_S, check_fencing_budget, host_arbiter
from vdsm_ft.hookapi import HookServer, serve_hooks

log = logging.getLogger("vdsm_ft.agent")

VERSION = "0.1.0"


class Agent:
    def __init__(self, config: hostconfig.HostConfig):
        hostconfig.require_secure_etcd(config)
        self.config = config
        detection_ms = int((config.heartbeat_timeout + config.heartbeat_interval) * 1000)
        check_fencing_budget(detection_ms, colo.COMPARE_TIMEOUT_MS)
        self.store = Store(os.path.join(config.state_dir, "vms"))
        self.arbiter = host_arbiter(config)
        self.arbiter_bound = ARBITER_BOUND_S
        self.emulators = emulator.CachedEmulators()
        self.tls = TlsFiles(cert=config.tls_cert, key=config.tls_key, ca=config.tls_ca)
        self.registry: Registry[VmController] = Registry(self.store)
        self.image_marks = ImageMarks(config.host_id, self.arbiter, self.arbiter_bound,
                                      ImageNotes(os.path.join(config.state_dir,
                                                              "image-current")))
        self.services: Services[VmController] = Services(
            config, self.registry, self.arbiter, self.arbiter_bound, self.emulators,
            client_context(self.tls), self.image_marks.made_current)
        key = read_key(config.heartbeat_key_file) if config.heartbeat_key_file else None
        if key is None:
            log.warning("no [agent] heartbeat_key_file: heartbeats are unsigned, so anyone "
                        "on the replication network can forge them (docs/security.md)")
        self.heartbeat = Heartbeat(config.host_id, config.replication_address,
                                   config.api_port, key)
        self.host_qemu = HostQemu(config, self.arbiter, VERSION)
        self.hook_backend = AgentHookBackend(
            config, self.registry, self.services, self._controller,
            self.host_qemu.capability, self.arbiter, self.arbiter_bound, self.emulators,
            self.image_marks)
        self.monitor = Monitor(config, self.registry, self.services, self.heartbeat,
                               self.hook_backend.adopt)
        self.secondaries = Secondaries(config, self.services, self.registry,
                                       self._controller, self.host_qemu.capability)
        self.api_backend = AgentApiBackend(config, self.registry, self.secondaries,
                                           self.host_qemu, VERSION)
        self.api: AgentServer | None = None
        self.hooks: HookServer | None = None

    def start(self) -> "Agent":
        self.host_qemu.capability()
        for record in self.registry.load():
            if record.role is Role.SECONDARY and record.state is VmState.DOWN:
                # Written back after its forget by agents before the registry owned
                # removal; it would refuse the VM's start here (AgentHookBackend.prepare).
                log.info("%s: dropping a leftover Down secondary record", record.name)
                self.store.delete(record.vm_id)
                replica.remove_secondary_disks(record.vm_id, self.config.replica_dir,
                                               self.config.overlay_dir)
                continue
            self.registry.install(record, self._controller).start().wake()
        self.monitor.discover()
        self.heartbeat.start()
        self.api = AgentServer((self.config.api_address, self.config.api_port),
                               self.api_backend, self.tls,
                               poller_identity=self.config.poller_identity)
        self.api.start()
        self.hooks = serve_hooks(self.config.hook_socket, self.hook_backend)
        self.monitor.start()
        self.host_qemu.start()
        self.image_marks.start()
        log.info("agent %s up: %d VMs, API %s:%d, replication %s", self.config.host_id,
                 len(self.registry.all()), self.config.api_address, self.config.api_port,
                 self.config.replication_address)
        return self

    def stop(self) -> None:
        self.monitor.stop()
        self.host_qemu.stop()
        self.image_marks.stop()
        if self.api is not None:
            self.api.shutdown()
            self.api.server_close()
        if self.hooks is not None:
            self.hooks.close()
        self.heartbeat.stop()
        for ctl in self.registry.all():
            ctl.stop()

    def _controller(self, record: VmRecord) -> VmController:
        return VmController(self.services, record)
