"""What each VDSM hook point does for vdsm-ft; the scripts in hooks/ only call `run`.

Every function takes its inputs explicitly (VDSM's env, the domain XML, a `HookContext`
holding the host config, the agent client and the arbiter) and returns a `HookResult`:
the exit code, the new domain XML or None (unchanged), and a message for vdsm.log. Exit
codes and their effect per hook point: docs/ovirt-facts.md, "Exit codes per hook
point"; decisions: docs/hooks.md.

A start without `ft=true` asks one question, whether the VM's storage-domain image is
current (after a failover it is behind until the copy-back: vdsm_ft/imagestate.py), of the
local agent over its unix socket; the heavy modules (lxml, the etcd client) are not
imported unless the agent does not answer. The other hook points cost a VM without FT
nothing. For an ft=true VM the start hook hands its work (`admission.prepare_primary`) to the agent,
which has them warm; the hook does it itself only when the agent is unreachable. VDSM gives hooks no timeout, so every call
out of the process here has its own bound.
"""
from __future__ import annotations

import os
import re
import sys
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple

from vdsm_ft import ftvalue, hooking

if TYPE_CHECKING:
    from vdsm_ft.admission import LiveCheck
    from vdsm_ft.emulator import Emulator
    from vdsm_ft.agenterrors import AgentUnreachable
    from vdsm_ft.hookapi import HookClient
    from vdsm_ft.hostconfig import HostConfig

FT_ENV = "ft"
VM_ID_ENV = "vmId"
_MACHINE_RE = re.compile(r"""<type\b[^>]*\bmachine=["']([^"']+)["']""")
_EMULATOR_RE = re.compile(r"<emulator>\s*([^<\s]+)\s*</emulator>")

MIGRATE_REFUSED = ("vdsm-ft: FT VMs are not live-migrated by the engine; use "
                   "`ovirt-ft migrate-secondary` or disable FT (ft=false) first")
HIBERNATE_REFUSED = ("vdsm-ft: an FT VM cannot be suspended (hibernated): the saved state "
                     "would leave its COLO pair behind. Disable FT (ft=false), or shut the "
                     "VM down instead")
PAUSE_REFUSED = ("vdsm-ft: a protected VM cannot be paused: COLO restarts its guest at the "
                 "next checkpoint, so the pause would not hold. Disable FT (ft=false) "
                 "first, or shut the VM down instead")
DEHIBERNATE_REFUSED = ("vdsm-ft: an FT VM cannot be restored from a suspended state or a "
                       "memory snapshot: VDSM ignores before_vm_start on that path, so the "
                       "restored VM would not be prepared for protection. Restore it with "
                       "ft=false, then shut it down and start it with ft=true")


class HookResult(NamedTuple):
    rc: int                 # 0 ok, 1 failed (other scripts run), 2 failed (stop)
    xml: str | None         # the new domain XML, or None to leave the file alone
    message: str            # for vdsm.log (VDSM shows the last failing hook's to the engine)


class HookError(Exception):
    """A hook cannot do its job; the message says why and what to do."""


class HookContext:
    """The outside parts a hook talks to, each made on first use (so a VM without FT never
    reads the config or touches the network). Tests pass their own in."""

    def __init__(self, env: Mapping[str, str], *, config: "HostConfig | None" = None,
                 agent: "HookClient | None" = None, arbiter: "LiveCheck | None" = None,
                 emulators: "Callable[[str], Emulator] | None" = None):
        self.env = env
        if config is not None:
            self.__dict__["config"] = config
        if agent is not None:
            self.__dict__["agent"] = agent
        if arbiter is not None:
            self.__dict__["arbiter"] = arbiter
        self._emulators = emulators

    def emulator(self, binary: str) -> "Emulator":
        """What the QEMU binary is (the agent passes its cache; the hook asks it once)."""
        if self._emulators is None:
            from vdsm_ft.emulator import identify
            self._emulators = identify
        return self._emulators(binary)

    @cached_property
    def config(self) -> "HostConfig":
        from vdsm_ft import hostconfig
        return hostconfig.load(hostconfig.config_path(dict(self.env)))

    @cached_property
    def agent(self) -> "HookClient":
        from vdsm_ft.hookapi import HookClient
        return HookClient(self.config.hook_socket, timeout=self.config.agent_timeout)

    @cached_property
    def arbiter(self) -> "LiveCheck":
        from vdsm_ft.arbiter import host_arbiter
        return host_arbiter(self.config)


def _no_ft(env: Mapping[str, str]) -> bool:
    """ft unset or false."""
    return ftvalue.wanted(env.get(FT_ENV)) is False


def _ft_quiet(env: Mapping[str, str]) -> bool:
    """For hook points that cannot refuse anything: an invalid value counts as no FT."""
    return ftvalue.wanted(env.get(FT_ENV)) is True


def _invalid_ft(env: Mapping[str, str]) -> HookResult | None:
    """The refusal of an ft value other than unset, `false` or `true`, else None."""
    try:
        ftvalue.parse(env.get(FT_ENV))
    except ftvalue.InvalidFtValue as e:
        return _refuse(str(e))
    return None


def _vm_id(env: Mapping[str, str]) -> str:
    from vdsm_ft.agenterrors import BadRequest, check_id
    try:
        return check_id(env.get(VM_ID_ENV), "VM id", uuid=True)
    except BadRequest:
        raise HookError(f"VDSM passed no valid vmId ({env.get(VM_ID_ENV)!r})") from None


# ------------------------------------------------------------------ before_vm_start

def _refuse(message: str) -> HookResult:
    return HookResult(hooking.FAILED_STOP, None, f"vdsm-ft: {message}")


def qemu_summary(engine_xml: str, new_xml: str) -> str:
    """For the hook's log: " (on QEMU, machine type A mapped to B)", or "" when the new
    XML names neither."""
    machine = _MACHINE_RE.search(engine_xml)
    mapped = _MACHINE_RE.search(new_xml)
    emulator = _EMULATOR_RE.search(new_xml)
    if not (mapped and emulator):
        return ""
    was, now = (machine.group(1) if machine else "(none)"), mapped.group(1)
    change = f"machine type {was} mapped to {now}" if was != now else f"machine type {now}"
    return f" (on {emulator.group(1)}, {change})"


def before_vm_start(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    """Prepare an ft=true VM as a COLO primary: the agent does it, or this process when
    the agent is unreachable; see docs/hooks.md. Any other start goes on unless the VM's
    storage-domain image is behind (`normal_start`)."""
    if _no_ft(env):
        return normal_start(env, ctx)
    from vdsm_ft import agenterrors, hostconfig
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
    except agenterrors.AgentRefused as e:
        if e.code == agenterrors.QEMU_INCAPABLE:
            return _qemu_incapable(config, vm_id, e.message)
        if e.code != agenterrors.REFUSED:       # the request itself, not the VM, was refused
            return _refuse(f"VM {vm_id} not started: the vdsm-ft agent refused it: "
                           f"{e.message}")
        return _refuse(e.message)
    except agenterrors.AgentUnreachable as e:
        return _prepare_here(ctx, config, vm_id, xml, e)
    return HookResult(hooking.OK, new_xml, f"vdsm-ft: VM {vm_id} prepared as COLO primary"
                                           f"{qemu_summary(xml, new_xml)} and registered "
                                           "with the agent")


def normal_start(env: Mapping[str, str], ctx: HookContext) -> HookResult:
    """A start without FT boots the image the engine names: refused while that image is
    behind its replica after a failover (vdsm_ft.imagestate). The agent answers with etcd
    warm; without it this process asks etcd itself (cold, but only then)."""
    from vdsm_ft import agenterrors, hostconfig, imagestate
    ft = env.get(FT_ENV)
    try:
        vm_id = _vm_id(env)
        try:
            config = ctx.config
        except hostconfig.ConfigError as e:
            message = imagestate.decide(vm_id, ft, unknown=f"no usable vdsm-ft config: {e}")
            return HookResult(hooking.OK, None, message)
        try:
            message = ctx.agent.image(vm_id, ft)
        except agenterrors.AgentRefused as e:
            raise imagestate.ImageStale(e.message) from None
        except agenterrors.AgentUnreachable as e:
            message = _image_from_etcd(ctx, vm_id, ft, f"{e}; {config.path}")
    except HookError as e:
        # VDSM always passes vmId; without one nothing can be checked.
        return _refuse(str(e)) if ft == "false" else HookResult(hooking.OK, None,
                                                               f"vdsm-ft: WARNING: {e}")
    except imagestate.ImageStale as e:
        return _refuse(str(e))
    return HookResult(hooking.OK, None, message)


def _image_from_etcd(ctx: HookContext, vm_id: str, ft: str | None, no_agent: str) -> str:
    """`imagestate.decide` on etcd's answer, asked from here: the agent did not answer."""
    from vdsm_ft import imagestate
    try:
        from vdsm_ft.arbiter import ArbiterError
        mark = ctx.arbiter.stale_image(vm_id)
    except ImportError as e:
        return imagestate.decide(vm_id, ft, unknown=f"{no_agent}; the etcd client is not "
                                 f"installed ({e})")
    except ArbiterError as e:
        return imagestate.decide(vm_id, ft, unknown=f"{no_agent}; and etcd: {e}")
    return imagestate.decide(vm_id, ft, mark=mark)


def _qemu_incapable(config: "HostConfig", vm_id: str, reason: str) -> HookResult:
    """This host's QEMU cannot do COLO: `[hooks] qemu_incapable` says what happens."""
    from vdsm_ft import hostconfig
    if config.qemu_incapable == hostconfig.REFUSE:
        return _refuse(f"{reason}. The start with ft=true is refused on this host "
                       f"([hooks] qemu_incapable = refuse in {config.path}); start the VM "
                       "on a host whose QEMU can do COLO")
    return HookResult(hooking.OK, None,
                      f"vdsm-ft: WARNING: VM {vm_id} starts unprotected, as an ordinary VM: "
                      f"{reason} ([hooks] qemu_incapable = start_unprotected in "
                      f"{config.path})")


def _kept_probe(config: "HostConfig") -> str | None:
    """The agent's kept QEMU probe says this QEMU cannot do COLO: its reason (a result
    for another binary, or made before the binary changed, says nothing)."""
    from vdsm_ft import qemu_probe
    kept = qemu_probe.load(config.state_dir)
    if kept is None or kept.capable or kept.path != config.qemu_emulator \
            or not kept.current():
        return None
    return kept.reason


def _prepare_here(ctx: HookContext, config: "HostConfig", vm_id: str, xml: str,
                  unreachable: "AgentUnreachable") -> HookResult:
    """The agent's work done here (cold: lxml, the etcd client, asking the QEMU binary),
    then `[hooks] agent_unreachable` decides whether the VM starts unprotected. The hook
    starts no QEMU: whether it can do COLO comes from the agent's kept probe."""
    from vdsm_ft import hostconfig
    incapable = _kept_probe(config)
    if incapable:
        return _qemu_incapable(config, vm_id, f"VM {vm_id}: {incapable}")
    from vdsm_ft import admission
    try:
        new_xml = admission.prepare_primary(config, ctx.arbiter, ctx.emulator, vm_id, xml)
    except admission.StartRefused as e:
        return _refuse(str(e))
    if config.agent_unreachable == hostconfig.REFUSE:
        return HookResult(hooking.FAILED_CONTINUE, None,
                          f"vdsm-ft: VM {vm_id} not started: {unreachable}; this host refuses "
                          f"FT starts without the agent ([hooks] agent_unreachable = refuse "
                          f"in {config.path}). Start vdsm-ft-agent, then start again")
    return HookResult(hooking.OK, new_xml,
                      f"vdsm-ft: WARNING: VM {vm_id} starts prepared for protection"
                      f"{qemu_summary(xml, new_xml)} but unprotected: {unreachable}. "
                      "Protection begins when the agent is back (it finds the VM by itself)")


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


def before_vm_pause(env: Mapping[str, str], xml: str, ctx: HookContext) -> HookResult:
    return _refuse_for_ft(env, PAUSE_REFUSED)


HOOK_POINTS: dict[str, Callable[[Mapping[str, str], str, HookContext], HookResult]] = {
    "before_vm_start": before_vm_start,
    "after_vm_start": after_vm_start,
    "before_vm_migrate_source": before_vm_migrate_source,
    "before_vm_destroy": before_vm_destroy,
    "after_vm_destroy": after_vm_destroy,
    "before_vm_hibernate": before_vm_hibernate,
    "before_vm_dehibernate": before_vm_dehibernate,
    "before_vm_pause": before_vm_pause,
}
# before_vm_destroy gets no XML from VDSM (docs/ovirt-facts.md, "Payloads").
_NO_XML = ("before_vm_destroy",)
# Where an unexpected error must stop the operation rather than let it go on unchecked.
_FAIL_CLOSED = ("before_vm_start", "before_vm_migrate_source", "before_vm_hibernate",
                "before_vm_dehibernate", "before_vm_pause")


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
