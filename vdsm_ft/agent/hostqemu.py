"""This host's QEMU as probed (`[qemu] emulator`), and this host's record in the arbiter.

The probe is kept in the state dir across restarts and made again when the binary
changes; a watch thread looks for that, retries publishing the host record, and
rewrites it now and then so that the agent's etcd login stays warm (below).
"""
from __future__ import annotations

import logging
import os
import threading
import time

from vdsm_ft import hostconfig, qemu_probe
from vdsm_ft.arbiter import Arbiter, ArbiterError, HostRecord

log = logging.getLogger("vdsm_ft.agent")

# How often to look whether the QEMU binary changed (then it is probed again), and to
# retry publishing the host record.
QEMU_CHECK_INTERVAL = 2.0
# etcd drops a login token after --auth-token-ttl (300 s by default) without use on the
# member, and a new login is a bcrypt check (80-250 ms, docs/install.md) that a failover's
# claim would otherwise pay inside its 1500 ms bound. The agent lists its own member
# first (docs/install.md), so rewriting the host record well within the TTL keeps the
# token the survivor's claim will use alive.
HOST_RECORD_REFRESH_S = 60.0


class HostQemu:
    def __init__(self, config: hostconfig.HostConfig, arbiter: Arbiter, agent_version: str):
        self.config = config
        self.arbiter = arbiter
        self.agent_version = agent_version
        # As last probed (kept across restarts in the state dir).
        self.last: qemu_probe.QemuCapability | None = qemu_probe.load(config.state_dir)
        self._lock = threading.Lock()
        self._published: qemu_probe.QemuCapability | None = None
        self._refresh_at = 0.0      # time.monotonic() of the next rewrite
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qemu-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def capability(self) -> qemu_probe.QemuCapability:
        """The probe of `[qemu] emulator`, made again when the binary changed."""
        with self._lock:
            known = self.last
            if known is not None and known.path == self.config.qemu_emulator \
                    and known.current():
                return known
            result = qemu_probe.probe(self.config.qemu_emulator,
                                      os.path.join(self.config.state_dir, "probe"))
            if result.capable:
                log.info("QEMU %s (%s, %s) can do COLO (probed in %.0f ms)", result.path,
                         result.version, result.build, result.took_ms)
            else:
                log.error("FT VMs cannot run on this host: %s", result.reason)
            try:
                qemu_probe.save(self.config.state_dir, result)
            except OSError as exc:
                log.warning("QEMU probe result not kept in %s: %s", self.config.state_dir,
                            exc)
            self.last = result
        self.publish()
        return result

    def publish(self) -> None:
        """This host's record in the arbiter; retried by the watch until it lands."""
        qemu = self.last
        if qemu is None or (qemu == self._published and
                            time.monotonic() < self._refresh_at):
            return
        try:
            self.arbiter.put_host(HostRecord(host_id=self.config.host_id,
                                             agent_version=self.agent_version, qemu=qemu))
        except ArbiterError as exc:
            log.warning("host record not published (retried): %s", exc)
            return
        self._published = qemu
        self._refresh_at = time.monotonic() + HOST_RECORD_REFRESH_S

    def _loop(self) -> None:
        while not self._stopped.wait(QEMU_CHECK_INTERVAL):
            try:
                self.capability()
                self.publish()
            except Exception:   # the watch must outlive one bad probe
                log.exception("QEMU probe failed")
