"""Every QEMU of one VM on every lab host, read from each host's processes and each
copy's own monitor, and which of them could send output to clients. The fault suite
and the nemesis soak judge "at most one live copy" with these."""
from __future__ import annotations

from dataclasses import dataclass

import libvirt

from ftlab import netns
from ftlab.labstate import LabState
from ftlab.monitor import CHECKPOINT_STOPS, LibvirtMonitor
from vdsm_ft import domains, domxml


@dataclass
class Copy:
    host: str
    domain: str
    pid: int
    status: str                  # QEMU's run state, "?" if its monitor did not answer
    colo: str                    # query-colo-status mode: primary, secondary, none, "?"


def copies(state: LabState, vm_name: str) -> list[Copy]:
    """Every QEMU of the VM on every host, whether or not its libvirtd still answers."""
    found = []
    for h in state.hosts:
        pids = netns.pids(h.netns)
        for dom in (vm_name, domxml.secondary_name(vm_name)):
            pid = domains.qemu_pid(dom, among=pids)
            if pid is None:
                continue
            status = colo = "?"
            try:
                mon = LibvirtMonitor(h.uri, dom)
                status = mon.execute("query-status")["status"]
                colo = mon.execute("query-colo-status")["mode"]
            except (RuntimeError, libvirt.libvirtError):
                pass
            found.append(Copy(h.name, dom, pid, status, colo))
    return found


def is_up(c: Copy) -> bool:
    """Running, or in COLO and inside a checkpoint (an unanswering monitor counts as up:
    it cannot be shown harmless)."""
    return c.status in ("running", "?") or (c.colo in ("primary", "secondary")
                                            and c.status in CHECKPOINT_STOPS)


def live_outside_colo(found: list[Copy]) -> list[Copy]:
    """Copies whose output can reach clients: up, and not a COLO secondary."""
    return [c for c in found if is_up(c) and c.colo != "secondary"]
