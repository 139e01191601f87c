"""What each VDSM hook point does for vdsm-ft; the scripts in hooks/ only call `run`.

Every function takes its inputs explicitly (VDSM's env, the domain XML, a `HookContext`
holding the host config, the agent client and the arbiter) and returns a `HookResult`:
the exit code, the new domain XML or None (unchanged), and a message for vdsm.log. Exit
codes and their effect per hook point: research/ovirt.md §1.3; decisions: docs/hooks.md.

A VM without `ft=true` costs nothing: no config is read, no agent or etcd is asked, and
the heavy modules (lxml, the etcd client) are not imported. For an ft=true VM the start
hook hands its work (`prepare_primary`) to the agent, which has them warm; the hook does
it itself only when the agent is unreachable. VDSM gives hooks no timeout, so every call
out of the process here has its own bound.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import subprocess
import sys
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Protocol

from vdsm_ft import hooking

if TYPE_CHECKING:
    from vdsm_ft.hookapi import AgentUnreachable, HookClient
    from vdsm_ft.hostconfig import HostConfig

FT_ENV = "ft"
VM_ID_ENV = "vmId"
QEMU_VERSION_TIMEOUT = 5.0
# Where QEMU lives when the domain XML has no <emulator>: Debian, then EL.
QEMU_BINARIES = ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm", "/usr/bin/qemu-kvm")
_QEMU_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")

MIGRATE_REFUSED = ("vdsm-ft: FT VMs are not live-migrated by the engine; use "
                   "`ovirt-ft migrate-secondary` or disable FT (ft=false) first")
HIBERNATE_REFUSED = ("vdsm-ft: an FT VM cannot be suspended (hibernated): the saved state "
                     "would leave its COLO pair behind. Disable FT (ft=false), or shut the "
                     "VM down instead")
DEHIBERNATE_REFUSED = ("vdsm-ft: an FT VM cannot be restored from a suspended state or a "
                       "memory snapshot: VDSM ignores before_vm_start on that path, so the "
                       "restored VM would not be prepared for protection. Restore it with "
                       "ft=false, then shut it down and start it with ft=true")


class HookResult(NamedTuple):
    rc: int                 # 0 ok, 1 failed (other scripts run), 2 failed (stop)
    xml: str | None         # the new domain XML, or None to leave the file alone
    message: str            # for vdsm.log (VDSM shows the last failing hook's to the engine)


class LiveCheck(Protocol):
    """The part of `vdsm_ft.arbiter.Arbiter` the start hook uses."""

    def other_member_live(self, vm_id: str, host: str,
                          timeout: float | None = None) -> str | None: ...


class HookError(Exception):
    """A hook cannot do its job; the message says why and what to do."""


class StartRefused(Exception):
    """before_vm_start must refuse the start; the message says why and what to do."""


def _qemu_binary(emulator: str | None) -> str:
    if emulator:
        return emulator
    for path in QEMU_BINARIES:
        if os.path.exists(path):
            return path
    raise HookError("no QEMU binary found (looked for " + ", ".join(QEMU_BINARIES) + ")")


def qemu_version(emulator: str | None = None, timeout: float = QEMU_VERSION_TIMEOUT
                 ) -> tuple[int, int, int]:
    """The version of the QEMU that will run the VM, from `<emulator> --version`."""
    binary = _qemu_binary(emulator)
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HookError(f"cannot ask {binary} for its version: {e}") from None
    m = _QEMU_VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise HookError(f"{binary} --version gave no version: "
                        f"{(proc.stdout + proc.stderr).strip()[:200]!r}")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


class CachedQemuVersion:
    """`qemu_version` for the agent, which prepares every start: QEMU is asked again only
    when its binary changed (an upgrade replaces the file)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], tuple[int, int, int]] = {}

    def __call__(self, emulator: str | None) -> tuple[int, int, int]:
        binary = _qemu_binary(emulator)
        try:
            st = os.stat(binary)
        except OSError:
            return qemu_version(binary)         # fails, saying why
        key = (binary, st.st_ino, st.st_mtime_ns)
        if key not in self._known:
            self._known[key] = qemu_version(binary)
        return self._known[key]


class HookContext:
    """The outside parts a hook talks to, each made on first use (so a VM without FT never
    reads the config or touches the network). The agent passes its own (warm) ones in for
    `prepare_primary`; so do tests."""

    def __init__(self, env: Mapping[str, str], *, config: "HostConfig | None" = None,
                 agent: "HookClient | None" = None, arbiter: LiveCheck | None = None,
                 qemu_probe: Callable[[str | None], tuple[int, int, int]] | None = None):
        self.env = env
        if config is not None:
            self.__dict__["config"] = config
        if agent is not None:
            self.__dict__["agent"] = agent
        if arbiter is not None:
            self.__dict__["arbiter"] = arbiter
        self.qemu_version = qemu_probe or qemu_version

    @cached_property
    def config(self) -> "HostConfig":
        from vdsm_ft import hostconfig
        return hostconfig.load(hostconfig.config_path(dict(self.env)))

    @cached_property
    def agent(self) -> "HookClient":
        from vdsm_ft.hookapi import HookClient
        return HookClient(self.config.hook_socket, timeout=self.config.agent_timeout)

    @cached_property
    def arbiter(self) -> LiveCheck:
        from vdsm_ft.arbiter import Arbiter
        c = self.config
        return Arbiter(c.etcd_endpoints, ca_cert=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key,
                       username=c.etcd_username, password=c.etcd_password)


def _no_ft(env: Mapping[str, str]) -> bool:
    """The fast path: ft unset or false, decided before anything heavy is imported."""
    return env.get(FT_ENV) in (None, "false")


def _ft_quiet(env: Mapping[str, str]) -> bool:
    """For hook points that cannot refuse anything: an invalid value counts as no FT."""
    if _no_ft(env):
        return False
    from vdsm_ft import domxml
    try:
        return domxml.parse_ft_value(env.get(FT_ENV))
    except domxml.InvalidProperty:
        return False


def _invalid_ft(env: Mapping[str, str]) -> HookResult | None:
    """The refusal of an ft value other than unset, `false` or `true`, else None. Only an
    invalid value imports domxml (lxml), whose parse_ft_value says what is accepted."""
    if env.get(FT_ENV) in (None, "false", "true"):
        return None
    from vdsm_ft import domxml
    try:
        domxml.parse_ft_value(env.get(FT_ENV))
    except domxml.InvalidProperty as e:
        return _refuse(str(e))
    return None


def _vm_id(env: Mapping[str, str]) -> str:
    from vdsm_ft.hookapi import BadHookRequest, check_vm_id
    try:
        return check_vm_id(env.get(VM_ID_ENV))
    except BadHookRequest:
        raise HookError(f"VDSM passed no valid vmId ({env.get(VM_ID_ENV)!r})") from None


# ------------------------------------------------------------------ before_vm_start

def _refuse(message: str) -> HookResult:
    return HookResult(hooking.FAILED_STOP, None, f"vdsm-ft: {message}")


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


def _emulator(xml: str) -> str | None:
    m = re.search(r"<emulator>\s*([^<\s]+)\s*</emulator>", xml)
    return m.group(1) if m else None


ENGINE_XML = "engine.xml"


def _owned_run_dir(config: "HostConfig", vm_id: str) -> str:
    """The VM's socket directory, usable by the QEMU user (libvirt does not chown what only
    <qemu:commandline> names)."""
    path = config.vm_run_dir(vm_id)
    try:
        user = pwd.getpwnam(config.qemu_user)
    except KeyError:
        raise HookError(f"the QEMU user {config.qemu_user!r} ([libvirt] qemu_user in "
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
                raise HookError(f"{path} has group {gid}, which the QEMU user "
                                f"{config.qemu_user} is not in; make "
                                f"{os.path.dirname(path)} root:kvm mode 2770")
    except OSError as e:
        raise HookError(f"cannot prepare the VM's run directory {path}: {e}") from None
    return path


def before_vm_start(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    """Prepare an ft=true VM as a COLO primary: the agent does it, or this process when
    the agent is unreachable; see docs/hooks.md."""
    if _no_ft(env):
        return HookResult(hooking.OK, None, "")
    from vdsm_ft import hookapi, hostconfig
    refusal = _invalid_ft(env)
    if refusal:
        return refusal
    try:
        vm_id = _vm_id(env)
        config = ctx.config
    except HookError as e:
        return _refuse(str(e))
    except hostconfig.ConfigError as e:
        return _refuse(f"VM {vm_id} cannot start with ft=true: {e}")
    try:
        new_xml = ctx.agent.prepare(vm_id, xml)
    except hookapi.AgentRefused as e:
        if e.code != hookapi.REFUSED:       # the request itself, not the VM, was refused
            return _refuse(f"VM {vm_id} not started: the vdsm-ft agent refused it: "
                           f"{e.message}")
        return _refuse(e.message)
    except hookapi.AgentUnreachable as e:
        return _prepare_here(ctx, config, vm_id, xml, e)
    return HookResult(hooking.OK, new_xml, f"vdsm-ft: VM {vm_id} prepared as COLO primary "
                                           "and registered with the agent")


def _prepare_here(ctx: HookContext, config: "HostConfig", vm_id: str, xml: str,
                  unreachable: "AgentUnreachable") -> HookResult:
    """The agent's work done here (cold: lxml, the etcd client, a QEMU subprocess), then
    `[hooks] agent_unreachable` decides whether the VM starts unprotected."""
    from vdsm_ft import hostconfig
    try:
        new_xml = prepare_primary(ctx, vm_id, xml)
    except StartRefused as e:
        return _refuse(str(e))
    if config.agent_unreachable == hostconfig.REFUSE:
        return HookResult(hooking.FAILED_CONTINUE, None,
                          f"vdsm-ft: VM {vm_id} not started: {unreachable}; this host refuses "
                          f"FT starts without the agent ([hooks] agent_unreachable = refuse "
                          f"in {config.path}). Start vdsm-ft-agent, then start again")
    return HookResult(hooking.OK, new_xml,
                      f"vdsm-ft: WARNING: VM {vm_id} starts prepared for protection but "
                      f"unprotected: {unreachable}. Protection begins when the agent is back "
                      "(it finds the VM by itself)")


def prepare_primary(ctx: HookContext, vm_id: str, xml: str) -> str:
    """before_vm_start's work for an ft=true VM: check the engine XML, rewrite it as the
    COLO primary, ask the arbiter, make the run dir and keep the engine XML there. Returns
    the primary XML; raises `StartRefused`. The agent runs it for the hook (warm), the hook
    itself only when the agent is unreachable."""
    from vdsm_ft import domxml
    try:
        problem = _check_engine_xml(xml, vm_id)
    except domxml.DomXmlError as e:
        raise StartRefused(str(e)) from None
    if problem:
        raise StartRefused(f"VM {vm_id} cannot start with ft=true: {problem}")
    config = ctx.config
    try:
        # Local refusals first: they need no etcd.
        new_xml = domxml.primary_xml(xml, config.vm_run_dir(vm_id),
                                     ctx.qemu_version(_emulator(xml)))
    except domxml.Unsupported as e:
        raise StartRefused(f"VM {vm_id}: {e}") from None
    except (HookError, domxml.DomXmlError) as e:
        raise StartRefused(f"VM {vm_id} cannot be prepared for fault tolerance: {e}") from None
    _check_arbiter(ctx, vm_id, config.host_id)
    try:
        run_dir = _owned_run_dir(config, vm_id)
        _keep_engine_xml(run_dir, xml)
    except HookError as e:
        raise StartRefused(f"VM {vm_id} cannot be prepared for fault tolerance: {e}") from None
    return new_xml


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
        raise HookError(f"cannot keep the engine XML in {run_dir}: {e}") from None


def _check_arbiter(ctx: HookContext, vm_id: str, host: str) -> None:
    """Refuse when another member of the pair is live, or when etcd cannot tell us."""
    try:
        from vdsm_ft import arbiter as arb
        live = ctx.arbiter.other_member_live(vm_id, host)
    except ImportError as e:
        raise StartRefused(f"VM {vm_id} not started: the etcd client is not installed "
                           f"({e}); install the vdsm-ft host package's dependencies") from None
    except arb.ArbiterError as e:
        raise StartRefused(f"VM {vm_id} not started: cannot ask the arbiter (etcd) whether "
                           f"another copy of it is live, and starting blind could make two: "
                           f"{e}. Fix etcd (or this host's [etcd] endpoints in "
                           f"{ctx.config.path}), then start again") from None
    if live is not None:
        raise StartRefused(f"VM {vm_id} not started: its live copy runs on host {live} (per "
                           "the arbiter), and a second copy would split the VM's brain. If "
                           f"host {live} is really down, wait until the poller has fenced it "
                           "and marked the pair Down, then start again")


# ------------------------------------------------------------------ other hook points

def _tell_agent(env: Mapping[str, str], ctx: HookContext, what: str,
                call: Callable[["HookClient", str], None]) -> HookResult:
    """For hook points whose failure VDSM ignores: tell the agent, log, always rc 0."""
    if not _ft_quiet(env):
        return HookResult(hooking.OK, None, "")
    try:
        vm_id = _vm_id(env)
        call(ctx.agent, vm_id)
    except Exception as e:      # the agent finds out by itself; never block VDSM here
        return HookResult(hooking.OK, None, f"vdsm-ft: could not tell the agent that VM "
                                            f"{env.get(VM_ID_ENV)} {what}: {e}")
    return HookResult(hooking.OK, None, f"vdsm-ft: told the agent that VM {vm_id} {what}")


def after_vm_start(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    """Hand control to the agent (after_* failures never matter to VDSM)."""
    return _tell_agent(env, ctx, "started", lambda a, vm: a.started(vm, xml or None))


def before_vm_destroy(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    """An intentional stop: the agent tears the pair down, never a failover."""
    return _tell_agent(env, ctx, "is being stopped", lambda a, vm: a.stopping(vm))


def after_vm_destroy(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    """The domain is gone (a stop, or QEMU died: the agent tells them apart)."""
    return _tell_agent(env, ctx, "is gone", lambda a, vm: a.destroyed(vm))


def _refuse_for_ft(env: Mapping[str, str], message: str) -> HookResult:
    """Refuse for ft=true, and for an invalid ft value too (safer than guessing)."""
    if _no_ft(env):
        return HookResult(hooking.OK, None, "")
    return _invalid_ft(env) or HookResult(hooking.FAILED_STOP, None, message)


def before_vm_migrate_source(env: Mapping[str, str], xml: str,
                             ctx: HookContext) -> HookResult:
    return _refuse_for_ft(env, MIGRATE_REFUSED)


def before_vm_hibernate(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    return _refuse_for_ft(env, HIBERNATE_REFUSED)


def before_vm_dehibernate(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    return _refuse_for_ft(env, DEHIBERNATE_REFUSED)


HOOK_POINTS: dict[str, Callable[[Mapping[str, str], str, HookContext], HookResult]] = {
    "before_vm_start": before_vm_start,
    "after_vm_start": after_vm_start,
    "before_vm_migrate_source": before_vm_migrate_source,
    "before_vm_destroy": before_vm_destroy,
    "after_vm_destroy": after_vm_destroy,
    "before_vm_hibernate": before_vm_hibernate,
    "before_vm_dehibernate": before_vm_dehibernate,
}
# before_vm_destroy gets no XML from VDSM (research/ovirt.md §1.4).
_NO_XML = ("before_vm_destroy",)
# Where an unexpected error must stop the operation rather than let it go on unchecked.
_FAIL_CLOSED = ("before_vm_start", "before_vm_migrate_source", "before_vm_hibernate",
                "before_vm_dehibernate")


def run(hook_point: str) -> int:
    """The body of each script in hooks/: read VDSM's input (os.environ and the file named
    by `_hook_domxml`), run the hook, write the XML back if it changed, log, and return the
    exit code."""
    env = os.environ
    func = HOOK_POINTS[hook_point]
    try:
        xml = "" if hook_point in _NO_XML or not env.get(hooking.DOMXML_ENV) \
            else hooking.read_domxml()
        result = func(env, xml, HookContext(env))
        if result.xml is not None:
            hooking.write_domxml(result.xml)
    except Exception as e:      # a bug must not pass silently, nor abort a stop
        rc = hooking.FAILED_STOP if hook_point in _FAIL_CLOSED else hooking.OK
        hooking.log(f"vdsm-ft {hook_point}: unexpected error: {type(e).__name__}: {e}")
        return rc
    if result.message:
        hooking.log(result.message)
    return result.rc


def main(hook_point: str) -> None:
    sys.exit(run(hook_point))
