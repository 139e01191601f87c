"""QMP through libvirt's own monitor, for tests that must not take the agent's socket.

A VM's private QMP socket (D5) accepts one client, and the agent holds it; tests and the
demo reach the same QEMU through libvirt's monitor instead.
"""
from __future__ import annotations

import json
from typing import Any

import libvirt
import libvirt_qemu

# QEMU's run states while a COLO pair is stopped for a checkpoint. It resumes within
# milliseconds, so a copy seen in one is as up as a running one (CI once caught a
# re-protected primary in finish-migrate and counted no live copy).
CHECKPOINT_STOPS = ("finish-migrate", "colo")


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

    def hmp(self, command_line: str) -> str:
        return self._command(command_line,
                             libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
