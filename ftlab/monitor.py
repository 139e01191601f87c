"""QMP through libvirt's own monitor, for tests that must not take the agent's socket.

A VM's private QMP socket (docs/decisions.md, D5) accepts one client, and the agent
holds it; tests and the demo reach the same QEMU through libvirt's monitor instead.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import libvirt
import libvirt_qemu

# QEMU's run states while a COLO pair is stopped for a checkpoint. It resumes within
# milliseconds, so a copy seen in one is as up as a running one (CI once caught a
# re-protected primary in finish-migrate and counted no live copy).
CHECKPOINT_STOPS = ("finish-migrate", "colo")
# libvirt's monitor calls have no timeout of their own. A block-layer HMP command (qemu-io)
# runs with QEMU's main loop held until its I/O ends: one whose I/O never ends (seen once
# in CI, cause not found) would hang the test run instead of failing one test.
HMP_TIMEOUT_S = 60.0


class MonitorTimeout(RuntimeError):
    """QEMU did not answer a monitor command in time."""


class LibvirtMonitor:
    def __init__(self, uri: str, domain: str):
        self.uri = uri
        self.domain = domain

    def _command(self, text: str, flags: int) -> str:
        conn = libvirt.open(self.uri)
        try:
            dom = conn.lookupByName(self.domain)
            return libvirt_qemu.qemuMonitorCommand(dom, text, flags)
        finally:
            conn.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        reply = json.loads(self._command(json.dumps(msg), 0))
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error'].get('desc')}")
        return reply["return"]

    def hmp(self, command_line: str, timeout: float = HMP_TIMEOUT_S) -> str:
        done: dict[str, Any] = {}

        def call() -> None:
            try:
                done["reply"] = self._command(
                    command_line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            except Exception as exc:   # re-raised in the caller's thread
                done["error"] = exc

        worker = threading.Thread(target=call, name=f"hmp-{self.domain}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise MonitorTimeout(f"{self.domain}: HMP {command_line!r} got no answer "
                                 f"within {timeout:.0f} s (QEMU's main loop is held)")
        if "error" in done:
            raise done["error"]
        return done["reply"]
