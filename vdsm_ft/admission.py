"""Admission of an ft=true start: whether this VM may start as a COLO primary on this host,
and its preparation (the primary XML, the run dir, the kept engine XML), with every input
passed in. The agent runs it for the start hook with its parts warm; the hook
(vdsm_ft/hooks.py) runs it itself only when the agent is unreachable. Heavy modules
(lxml, the etcd client) are imported inside the functions that need them, so that the
hook's import of this module costs a VM without FT nothing."""
from __future__ import annotations

import grp
import os
import pwd
import stat
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from vdsm_ft.arbiter import StaleImage
    from vdsm_ft.emulator import Emulator
    from vdsm_ft.hostconfig import HostConfig


class LiveCheck(Protocol):
    """The part of `vdsm_ft.arbiter.Arbiter` the start hook uses."""

    def start_check(self, vm_id: str, host: str, timeout: float | None = None
                    ) -> "tuple[str | None, StaleImage | None]": ...

    def stale_image(self, vm_id: str, timeout: float | None = None) -> "StaleImage | None": ...


class StartRefused(Exception):
    """before_vm_start must refuse the start; the message says why and what to do."""


class _Unprepared(Exception):
    """A step of the preparation failed; prepare_primary turns it into StartRefused."""



def _check_engine_xml(xml: str, vm_id: str) -> str | None:
    """Why this XML cannot be an FT primary (other than COLO's own limits), or None."""
    from lxml import etree

    from vdsm_ft import domxml
    try:
        root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False,
                                                              no_network=True))
    except etree.XMLSyntaxError as e:
        raise domxml.MalformedXml(f"domain XML does not parse: {e}") from None
    if (root.findtext("uuid") or "").strip().lower() != vm_id:
        return (f"the domain XML's <uuid> {root.findtext('uuid')!r} is not the vmId "
                f"{vm_id} VDSM passed")
    if root.find("devices/lease") is not None:
        return ("the VM has a VM lease: the engine would restart it beside its promoted "
                "secondary after a failover (docs/engine-view.md rule 2). Fix: remove the "
                "lease (VM > High Availability > Target Storage Domain for VM Lease: No VM "
                "Lease) and turn high availability off")
    return None


ENGINE_XML = "engine.xml"


def _owned_run_dir(config: "HostConfig", vm_id: str) -> str:
    """The VM's socket directory, usable by the QEMU user (libvirt does not chown what only
    <qemu:commandline> names)."""
    path = config.vm_run_dir(vm_id)
    try:
        user = pwd.getpwnam(config.qemu_user)
    except KeyError:
        raise _Unprepared(f"the QEMU user {config.qemu_user!r} ([libvirt] qemu_user in "
                        f"{config.path}) does not exist on this host") from None
    try:
        os.makedirs(path, mode=0o770, exist_ok=True)
        # VDSM runs hooks as vdsm:kvm: the directory is shared through its group, which
        # the setgid parent (root:kvm 2770, made by the agent) hands down. The agent (root)
        # keeps that group too, so that a hook run without the agent can use it later.
        parent_setgid = os.stat(os.path.dirname(path)).st_mode & stat.S_ISGID
        if os.geteuid() == 0:
            os.chown(path, user.pw_uid, -1 if parent_setgid else user.pw_gid)
        if stat.S_IMODE(os.stat(path).st_mode) != 0o2770:
            os.chmod(path, 0o2770)              # only its owner may; vdsm owns what it made
        if os.geteuid() != 0:
            gid = os.stat(path).st_gid
            groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall()
                                      if config.qemu_user in g.gr_mem}
            if gid not in groups:
                raise _Unprepared(f"{path} has group {gid}, which the QEMU user "
                                f"{config.qemu_user} is not in; make "
                                f"{os.path.dirname(path)} root:kvm mode 2770")
    except OSError as e:
        raise _Unprepared(f"cannot prepare the VM's run directory {path}: {e}") from None
    return path


def prepare_primary(config: "HostConfig", arbiter: LiveCheck,
                    emulators: "Callable[[str], Emulator]", vm_id: str, xml: str) -> str:
    """before_vm_start's work for an ft=true VM: check the engine XML, rewrite it as the
    COLO primary, ask the arbiter, make the run dir and keep the engine XML there. Returns
    the primary XML; raises `StartRefused`. The agent runs it for the hook with its warm
    parts (`emulators` its cache of what each QEMU binary is), the hook itself only when
    the agent is unreachable."""
    from vdsm_ft import domxml, emulator
    try:
        problem = _check_engine_xml(xml, vm_id)
    except domxml.DomXmlError as e:
        raise StartRefused(str(e)) from None
    if problem:
        raise StartRefused(f"VM {vm_id} cannot start with ft=true: {problem}")
    try:
        # Local refusals first: they need no etcd.
        emu = emulators(config.qemu_emulator)
        machine = emulator.colo_machine(domxml.engine_machine(xml), emu)
        new_xml = domxml.primary_xml(xml, config.vm_run_dir(vm_id), emu.version,
                                     emulator=emu.path, machine=machine)
    except domxml.Unsupported as e:
        raise StartRefused(f"VM {vm_id}: {e}") from None
    except (_Unprepared, domxml.DomXmlError, emulator.EmulatorError) as e:
        raise StartRefused(f"VM {vm_id} cannot be prepared for fault tolerance: {e}") from None
    _check_arbiter(arbiter, config, vm_id)
    try:
        run_dir = _owned_run_dir(config, vm_id)
        _keep_engine_xml(run_dir, xml)
        _placeholders(run_dir, new_xml)
    except _Unprepared as e:
        raise StartRefused(f"VM {vm_id} cannot be prepared for fault tolerance: {e}") from None
    return new_xml


def _placeholders(run_dir: str, primary_xml: str) -> None:
    """The disks' placeholder sources the primary XML names (vdsm_ft/runfiles.py)."""
    from vdsm_ft import runfiles
    try:
        runfiles.make_placeholders(primary_xml)
    except OSError as e:
        raise _Unprepared(f"cannot create the disk placeholders in {run_dir}: {e}") from None


def _keep_engine_xml(run_dir: str, xml: str) -> None:
    """The engine's XML beside the VM's sockets: an agent that was down at start time
    finds the VM there, and needs this XML to derive its secondary."""
    path = os.path.join(run_dir, ENGINE_XML)
    # Per process: a hook that gave up waiting may write while the agent still does.
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(xml)
        os.replace(tmp, path)
    except OSError as e:
        raise _Unprepared(f"cannot keep the engine XML in {run_dir}: {e}") from None


def _check_arbiter(arbiter: LiveCheck, config: "HostConfig", vm_id: str) -> None:
    """Refuse when another member of the pair is live, when the VM's storage-domain
    image is behind (vdsm_ft.imagestate), or when etcd cannot tell us."""
    try:
        from vdsm_ft import arbiter as arb
        live, mark = arbiter.start_check(vm_id, config.host_id)
    except ImportError as e:
        raise StartRefused(f"VM {vm_id} not started: the etcd client is not installed "
                           f"({e}); install the vdsm-ft host package's dependencies") from None
    except arb.ArbiterError as e:
        raise StartRefused(f"VM {vm_id} not started: cannot ask the arbiter (etcd) whether "
                           f"another copy of it is live, and starting blind could make two: "
                           f"{e}. Fix etcd (or this host's [etcd] endpoints in "
                           f"{config.path}), then start again") from None
    if mark is not None:
        # An ft=true start boots the engine's image too (as the primary's disk).
        from vdsm_ft import imagestate
        raise StartRefused(imagestate.stale_reason(vm_id, mark))
    if live is not None:
        raise StartRefused(f"VM {vm_id} not started: its live copy runs on host {live} (per "
                           "the arbiter), and a second copy would split the VM's brain. If "
                           f"host {live} is really down, wait until the poller has fenced it "
                           "and marked the pair Down, then start again")
