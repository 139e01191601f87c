"""Is a VM's storage-domain image current? The rule for a start that would read it
(docs/decisions.md, D2).

After a failover onto the secondary, the survivor runs on its host's replica, and the
image the engine names is behind until the copy-back (vdsm_ft/copyback.py) made it
current again. The arbiter holds a mark for that window (`Arbiter.stale_image`): written
in the same etcd transaction in which the secondary won the generation
(`Arbiter.claim_live`), dropped once the copy-back was verified (`Arbiter.image_current`)
or an admin gave the newer data up (`ovirt-ft accept-stale-image`).

Every start through the hooks reads the image, with FT or without. `decide` is the rule
for a start without FT (ft unset or ft=false); docs/operations.md "Copy-back after a
failover" has it as a table and says why:

- a mark is known (etcd, or this host's agent runs the VM on its replica): refused;
- etcd answered and holds no mark: the start goes on;
- nobody can tell (etcd or the agent unreachable, no config): refused for a VM with FT
  history (ft=false, which `ovirt-ft disable` sets, or one this host's agent knows),
  else the start goes on with a warning in vdsm.log.

This module imports nothing heavy: the agent and the hook (when the agent does not
answer) read the mark themselves and pass what they learned.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vdsm_ft import ftvalue

if TYPE_CHECKING:
    from vdsm_ft.arbiter import StaleImage

DOCS = 'docs/operations.md, "Copy-back after a failover"'
ACCEPT_COMMAND = "ovirt-ft accept-stale-image {vm} --lose-writes-since-failover"


class ImageStale(Exception):
    """The start must be refused; the message says why and what to do."""


def when(epoch: float) -> str:
    """A mark's time, as messages show it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def stale_reason(vm_id: str, mark: "StaleImage", detail: str = "") -> str:
    """Why a start is refused while `mark` stands, and the ways out."""
    more = f" ({detail})" if detail else ""
    return (f"VM {vm_id} not started: its storage-domain image is behind. Since "
            f"{when(mark.since)} (the failover of generation {mark.generation}) host "
            f"{mark.host} has run it on its own replica, and the copy-back onto the image "
            f"has not finished{more}; a start now would boot the disk as it was at the "
            "failover and lose every write since. Let the copy-back finish (`ovirt-ft "
            f"status` shows its progress or why it is held up), or bring host {mark.host} "
            "back so its agent copies the replica back. Only if that host's replica is "
            f"lost for good: `{ACCEPT_COMMAND.format(vm=vm_id)}` ({DOCS})")


def behind_here(vm_id: str, why: str) -> str:
    """This host's agent runs (or ran) the VM on its replica: the image is behind."""
    return (f"VM {vm_id} not started: its storage-domain image is behind this host's "
            f"replica ({why}); a start now would lose every write since the failover. Let "
            f"the copy-back finish ({DOCS})")


def decide(vm_id: str, ft: str | None, *, mark: "StaleImage | None" = None,
           unknown: str | None = None, ft_history: bool = False) -> str:
    """The rule for a start without FT. `mark` is the arbiter's answer (None: it holds
    none), `unknown` why nobody could answer (then `mark` is ignored), `ft_history`
    whether this host's agent knows the VM. Raises ImageStale to refuse; returns what
    vdsm.log should say ("" when the image is known current)."""
    if unknown is None:
        if mark is not None:
            raise ImageStale(stale_reason(vm_id, mark))
        return ""
    if ft == ftvalue.FALSE or ft_history:
        raise ImageStale(f"VM {vm_id} not started: it was an FT VM (ft=false), and whether "
                         f"its storage-domain image is current cannot be checked now "
                         f"({unknown}). After a failover that image stays behind until the "
                         "copy-back has finished, and a start from it would lose every "
                         "write since. Fix what is named (vdsm-ft-agent, etcd), then start "
                         f"again ({DOCS})")
    return (f"vdsm-ft: WARNING: VM {vm_id} starts without the storage-domain image check "
            f"({unknown}); it has no ft property, so no FT history is known")
