"""The agent's monitor: heartbeats out, peer suspicion in, the overlay cap and discovery.

Every heartbeat interval it tells each peer which VMs they share and whether their QEMU
here is alive, and tells a VM's controller when its peer is suspected lost (docs/agent.md,
"Detecting a lost peer"). Less often it drops a secondary when the overlays pass the cap,
and adopts FT VMs that the start hook could not register.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from vdsm_ft import admission, domains, domxml, hostconfig, replica
from vdsm_ft.agent.controller import VmController
from vdsm_ft.agent.heartbeat import Heartbeat, probe
from vdsm_ft.agent.registry import Registry
from vdsm_ft.agent.services import Services
from vdsm_ft.agent.store import VmRecord
from vdsm_ft.agenterrors import AgentRefused
from vdsm_ft.api import Role, VmState

log = logging.getLogger("vdsm_ft.agent")

# How often to look for FT VMs the start hook could not register.
DISCOVERY_INTERVAL = 5.0
# How often to measure the overlays against [storage] overlay_size_cap.
OVERLAY_CHECK_INTERVAL = 1.0


class Monitor:
    def __init__(self, config: hostconfig.HostConfig, registry: Registry[VmController],
                 services: Services[VmController], heartbeat: Heartbeat,
                 adopt: Callable[[str, str], None]):
        """`adopt(vm_id, engine_xml)` takes on a primary found running without a record."""
        self.config = config
        self.registry = registry
        self.services = services
        self.heartbeat = heartbeat
        self.adopt = adopt
        self._stopped = threading.Event()
        self._probed_at: dict[str, float] = {}
        self._answered_at: dict[str, float] = {}
        self._overlay_warned = False
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def discover(self) -> None:
        """Adopt FT VMs that started while this agent was down.

        The start hook keeps each VM's engine XML in its run dir; a live QEMU for it
        without a record here means the hook could not register it.
        """
        vms_dir = os.path.join(self.config.run_dir, "vms")
        try:
            entries = os.listdir(vms_dir)
        except FileNotFoundError:
            return
        for vm_id in entries:
            path = os.path.join(vms_dir, vm_id, admission.ENGINE_XML)
            known = self.registry.get(vm_id) is not None
            if known or not os.path.exists(path):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    engine_xml = f.read()
                name = domxml.layout_from_domxml(engine_xml, "/").name
            except (OSError, domxml.DomXmlError) as exc:
                log.warning("ignoring %s: %s", path, exc)
                continue
            if domains.qemu_pid(name) is None:
                continue
            log.info("%s: found running without a record; adopting it", name)
            try:
                self.adopt(vm_id, engine_xml)
            except AgentRefused as exc:     # one VM's refusal must not stop the others
                log.warning("%s: not adopted: %s", name, exc)

    def _loop(self) -> None:
        interval = self.config.heartbeat_interval
        next_discovery = time.monotonic() + DISCOVERY_INTERVAL
        next_overlay_check = time.monotonic()
        while not self._stopped.wait(interval):
            try:
                self.once()
                if time.monotonic() > next_overlay_check:
                    next_overlay_check = time.monotonic() + OVERLAY_CHECK_INTERVAL
                    self.enforce_overlay_cap()
                if time.monotonic() > next_discovery:
                    next_discovery = time.monotonic() + DISCOVERY_INTERVAL
                    self.discover()
            except Exception:  # the monitor must outlive any single bad record
                log.exception("monitor step failed")

    def once(self) -> None:
        """One round: wake loops whose QEMU died, send heartbeats, report lost peers."""
        beats: dict[tuple[str, int], dict[str, tuple[int, bool]]] = {}
        ctls = self.registry.all()
        for ctl in ctls:
            rec = ctl.record
            alive = ctl.qemu_alive() if rec.launched else True
            if rec.launched and not alive and rec.state is not VmState.DOWN:
                ctl.wake()
            if rec.peer is None or rec.state not in (VmState.STARTING, VmState.SYNCING,
                                                     VmState.PROTECTED):
                continue
            key = (rec.peer.replication_address, rec.peer.agent_port)
            beats.setdefault(key, {})[rec.vm_id] = (rec.generation, alive)
            why = self._peer_suspicion(rec)
            if why:
                ctl.peer_lost(why)
        for (address, port), vms in beats.items():
            self.heartbeat.send(address, port, vms)

    def enforce_overlay_cap(self) -> None:
        """Overlays are RAM: past the cap, drop the secondary whose overlays take most.
        Its primary sees COLO break, runs on alone and asks for a new secondary."""
        usage = replica.overlay_usage(self.config.overlay_dir)
        total, cap = sum(usage.values()), self.config.overlay_size_cap
        if total <= cap:
            self._overlay_warned = False
            return
        ours = {ctl.vm_id: ctl for ctl in self.registry.all()
                if ctl.record.role is Role.SECONDARY and ctl.vm_id in usage}
        why = (f"this host's overlays take {replica.mib(total)} in "
               f"{self.config.overlay_dir}, over [storage] overlay_size_cap "
               f"({replica.mib(cap)})")
        if not ours:
            if not self._overlay_warned:
                log.warning("%s, but no secondary of this agent holds them", why)
                self._overlay_warned = True
            return
        vm_id = max(ours, key=lambda v: usage[v])
        ctl = ours[vm_id]
        log.warning("%s: dropping this secondary: its overlays take %s; %s",
                    ctl.record.name, replica.mib(usage[vm_id]), why)
        self.services.forget(ctl, reason=f"dropped: {why}")

    def _peer_suspicion(self, rec: VmRecord) -> str:
        peer = rec.peer
        vm = self.heartbeat.peer_vm(peer.host_id, rec.vm_id)
        if vm is not None and vm.generation == rec.generation and not vm.qemu_alive:
            return f"{peer.host_id} reports its QEMU for this VM exited"
        silent = self.heartbeat.silent_for(peer.host_id)
        if silent <= self.config.heartbeat_timeout:
            return ""
        # Silence alone may be an agent restart; a host whose kernel answers is alive.
        # Its host is lost only once it has not been heard from (heartbeat or probe
        # answer) for heartbeat_timeout: one probe lost on a lossy link while the agent
        # restarts is not a dead host. A host that died is silent since its last
        # heartbeat, so this finds it as soon as before.
        now = time.monotonic()
        if now - self._probed_at.get(peer.host_id, float("-inf")) > \
                self.config.heartbeat_interval:
            self._probed_at[peer.host_id] = now
            if probe(peer.agent_address, peer.agent_port, self.config.heartbeat_interval):
                self._answered_at[peer.host_id] = time.monotonic()
        heard = max(now - silent, self._answered_at.get(peer.host_id, float("-inf")))
        if time.monotonic() - heard <= self.config.heartbeat_timeout:
            return ""
        return (f"no heartbeat from {peer.host_id} for {silent * 1000:.0f} ms and its "
                "host does not answer")
