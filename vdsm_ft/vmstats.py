"""after_get_all_vm_stats: a COLO checkpoint stop is not a pause (docs/engine-view.md).

VDSM's API.getAllVmStats hands the stats list to hooks.after_get_all_vm_stats, a JSON hook:
the list is in the file named by `_hook_json`, read back with json.loads whatever the exit
code (raiseError=False), so a corrupt file would fail the whole call. Hence: nothing is
written unless an entry changes, and then atomically (os.replace); any doubt leaves the
stats as they are.

An entry reported Paused becomes Up only when its domain is an FT primary (its XML names
the quorum node vdsm_ft/domxml.py builds) and libvirt says it is running, or it is
paused for no reason libvirt knows (what a stop libvirt did not ask for reads as) and is
running again within SETTLE_S: a checkpoint stop lasts milliseconds, an admin pause
(PAUSED_USER), an I/O error pause (PAUSED_IOERROR) or any other lasting stop stays Paused.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

JSON_ENV = "_hook_json"
# The quorum node name of an FT primary's block graph (vdsm_ft/layout.py QUORUM_FMT), in
# the live XML's <qemu:commandline> / <qemu:override>; kept here so the fast path imports
# nothing of ours.
FT_MARKER = "ft-quorum"
SETTLE_S = 0.2
_STEP_S = 0.02

# libvirt's virDomainState and virDomainPausedReason values (libvirt-domain.h), so the rule
# and its tests need no libvirt import.
RUNNING = 1
PAUSED = 3
PAUSED_UNKNOWN = 0

# (is an FT primary, state, reason) of a VM id, or None when libvirt does not know it.
Probe = Callable[[str], "tuple[bool, int, int] | None"]


def transient_stop(vm_id: str, probe: Probe, settle: float = SETTLE_S,
                   sleep: Callable[[float], None] = time.sleep) -> bool:
    """Whether `vm_id` is an FT primary that is running, or stopped only for a moment."""
    facts = probe(vm_id)
    if facts is None or not facts[0]:
        return False
    waited = 0.0
    while True:
        _, state, reason = facts
        if state == RUNNING:
            return True
        if state != PAUSED or reason != PAUSED_UNKNOWN or waited >= settle:
            return False
        sleep(_STEP_S)
        waited += _STEP_S
        facts = probe(vm_id)
        if facts is None:
            return False


def rewrite(stats: object, probe: Probe, settle: float = SETTLE_S,
            sleep: Callable[[float], None] = time.sleep) -> list | None:
    """The stats list with checkpoint stops reported Up, or None when nothing changes
    (including input that is not VDSM's list of dicts)."""
    if not isinstance(stats, list):
        return None
    changed = False
    out = []
    for entry in stats:
        if (isinstance(entry, dict) and entry.get("status") == "Paused"
                and isinstance(entry.get("vmId"), str)
                and transient_stop(entry["vmId"], probe, settle, sleep)):
            entry = dict(entry, status="Up")
            changed = True
        out.append(entry)
    return out if changed else None


def libvirt_probe(uri: str) -> tuple[Probe, Callable[[], None]]:
    """A read-only libvirt probe (no monitor commands, which would taint the domain) and
    its close."""
    import libvirt

    conn = libvirt.openReadOnly(uri)

    def probe(vm_id: str) -> tuple[bool, int, int] | None:
        try:
            dom = conn.lookupByUUIDString(vm_id)
            is_ft = FT_MARKER in dom.XMLDesc(0)
            state, reason = dom.state(0)
        except libvirt.libvirtError:
            return None
        return is_ft, state, reason

    return probe, conn.close


def _write_atomically(path: str, text: str) -> None:
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".vdsm-ft-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(env: "dict[str, str] | None" = None, probe: Probe | None = None) -> int:
    """The hook script's body; returns its exit code (0: VDSM reads the file back anyway)."""
    env = os.environ if env is None else env
    path = env.get(JSON_ENV)
    if not path:
        return 0
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # Fast path: a poll with no Paused VM costs one read and one substring search.
        if '"Paused"' not in text:
            return 0
        import json     # only past the fast path
        stats = json.loads(text)
        close = None
        if probe is None:
            from vdsm_ft import hostconfig
            uri = hostconfig.load(hostconfig.config_path(dict(env))).libvirt_uri
            probe, close = libvirt_probe(uri)
        try:
            new = rewrite(stats, probe)
        finally:
            if close is not None:
                close()
        if new is not None:
            _write_atomically(path, json.dumps(new))
    except Exception as e:      # the stats stay as VDSM made them
        sys.stderr.write(f"vdsm-ft after_get_all_vm_stats: stats unchanged: "
                         f"{type(e).__name__}: {e}\n")
        return 1
    return 0
