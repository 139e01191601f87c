"""A VDSM stand-in: starts, stops and checks VMs the way VDSM does, running the real hook scripts.

It follows the contract of research/ovirt.md §1.2-1.5 (VDSM's `_runHooksDir`):
- the executables of `<hooks_dir>/<hook point>/` (files or symlinks to files, executable)
  run one at a time in lexicographic order, each as its own process (argv, no shell);
- each gets the process environment, plus the VM's custom properties (from the engine
  XML's `<ovirt-vm:custom>`) as env vars, `vmId`, `PYTHONPATH`, and `_hook_domxml` naming
  a temp file that holds the XML; each script sees the previous one's output;
- rc != 0 is an error, rc 2 also stops the remaining scripts, rc > 2 is logged;
- before_vm_start: any error aborts the start with a HookError carrying the last
  error's stderr; other before_* hooks: an error aborts the operation; before_vm_destroy
  and every after_* hook: errors are only logged.
The domain is defined and started through libvirt (`defineXML` + `createWithFlags`, as
VDSM does) at the URI given, e.g. a lab host's.

Differences from VDSM, none of which a hook can see: no `taskset` wrapper, no launch
flags file, no JSON-RPC, and an optional per-script timeout (VDSM has none; a lab test
would rather fail than hang).
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Mapping

import libvirt
from lxml import etree

from vdsm_ft.libvirtconn import LibvirtConnectError

log = logging.getLogger(__name__)

OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
# Hook points whose errors VDSM only logs (research/ovirt.md §1.3).
_ERRORS_IGNORED = ("before_vm_destroy", "before_vm_set_ticket")


class VdsmError(Exception):
    """The stand-in could not do what was asked (libvirt failure, unknown VM)."""


class HookError(VdsmError):
    """A hook failed and VDSM aborts the operation (VDSM's HookError, code 1500)."""

    def __init__(self, hook_point: str, message: str, runs: list["HookRun"]):
        super().__init__(f"Hook Error: {message}")
        self.hook_point = hook_point
        self.message = message
        self.runs = runs


@dataclass(frozen=True)
class HookRun:
    script: str
    rc: int
    stderr: str


@dataclass
class HooksOutcome:
    hook_point: str
    data: str                              # the XML file's content after the last script
    runs: list[HookRun] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [r.stderr for r in self.runs if r.rc != 0]


@dataclass
class VmRecord:
    vm_id: str
    name: str
    custom: dict[str, str]
    xml: str                               # the last known domain XML


def custom_properties(engine_xml: str) -> dict[str, str]:
    """The VM custom properties the engine wrote into `<ovirt-vm:custom>` (§1.5)."""
    root = etree.fromstring(engine_xml.encode())
    custom = root.find(f"metadata/{{{OVIRT_VM_NS}}}vm/{{{OVIRT_VM_NS}}}custom")
    if custom is None:
        return {}
    return {etree.QName(el).localname: el.text or "" for el in custom
            if isinstance(el.tag, str)}


class Vdsm:
    """One host's VDSM, as far as VM lifecycle and hooks go.

    `env` is VDSM's own process environment (default: this process's); hooks inherit it.
    `pythonpath` entries are appended to PYTHONPATH, as VDSM appends its hook module dir.
    """

    def __init__(self, hooks_dir: str, libvirt_uri: str, env: Mapping[str, str] | None = None,
                 pythonpath: tuple[str, ...] = (), hook_timeout: float | None = None,
                 wrap: Callable[[list[str]], list[str]] = list,
                 connect: Callable[[], libvirt.virConnect] | None = None):
        # `wrap` turns a hook's argv into one that runs on the host, e.g. a lab host's
        # `nsenter`: real VDSM runs its hooks on the hypervisor itself.
        self.wrap = wrap
        # `connect` opens libvirt as real VDSM does where libvirtd wants a SASL login,
        # e.g. a lab host's `connect`; by default libvirt_uri, with no login.
        self._open = connect or (lambda: libvirt.open(libvirt_uri))
        self.hooks_dir = hooks_dir
        self.libvirt_uri = libvirt_uri
        self.env = dict(os.environ if env is None else env)
        self.pythonpath = pythonpath
        self.hook_timeout = hook_timeout
        self.vms: dict[str, VmRecord] = {}

    # ---------------------------------------------------------------- hooks

    def scripts(self, hook_point: str) -> list[str]:
        directory = os.path.join(self.hooks_dir, hook_point)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        paths = [os.path.join(directory, n) for n in names]
        return sorted(p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK))

    def _script_env(self, vm_id: str | None, custom: Mapping[str, str], data_file: str
                    ) -> dict[str, str]:
        env = dict(self.env)
        env.update(custom)
        if vm_id:
            env["vmId"] = vm_id
        ppath = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = ":".join([p for p in ppath.split(":") if p] + list(self.pythonpath))
        env["_hook_domxml"] = data_file
        return env

    def run_hooks(self, hook_point: str, data: str | None, vm_id: str | None,
                  custom: Mapping[str, str]) -> HooksOutcome:
        """Run `hook_point`'s scripts and apply VDSM's rc rules; raises HookError when VDSM
        would abort the operation."""
        fd, path = tempfile.mkstemp(prefix=f"vdsm-hook-{hook_point}-")
        runs: list[HookRun] = []
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data or "")
            env = self._script_env(vm_id, custom, path)
            for script in self.scripts(hook_point):
                proc = subprocess.run(self.wrap([script]), env=env, stdin=subprocess.DEVNULL,
                                      capture_output=True, timeout=self.hook_timeout)
                err = proc.stderr.decode("utf-8", "replace")
                runs.append(HookRun(script, proc.returncode, err))
                log.info("%s: rc=%s err=%s", script, proc.returncode, err)
                if proc.returncode == 2:
                    break
                if proc.returncode > 2:
                    log.warning("hook returned unexpected return code %s", proc.returncode)
            with open(path, encoding="utf-8") as f:
                outcome = HooksOutcome(hook_point, f.read(), runs)
        finally:
            os.unlink(path)
        failed = [r for r in runs if r.rc != 0]
        if failed and hook_point not in _ERRORS_IGNORED and not hook_point.startswith("after_"):
            raise HookError(hook_point, failed[-1].stderr, runs)
        return outcome

    # ---------------------------------------------------------------- VM lifecycle

    def _connect(self) -> libvirt.virConnect:
        try:
            return self._open()
        except libvirt.libvirtError as e:
            raise VdsmError(f"cannot reach libvirt at {self.libvirt_uri}: "
                            f"{e.get_error_message()}") from None
        except LibvirtConnectError as e:     # a SASL login refused
            raise VdsmError(str(e)) from None

    def start_vm(self, engine_xml: str) -> tuple[VmRecord, HooksOutcome]:
        """VM.create: before_vm_start, define + start the domain, after_vm_start."""
        root = etree.fromstring(engine_xml.encode())
        vm_id, name = root.findtext("uuid").strip(), root.findtext("name")
        custom = custom_properties(engine_xml)
        outcome = self.run_hooks("before_vm_start", engine_xml, vm_id, custom)
        conn = self._connect()
        try:
            try:
                dom = conn.defineXML(outcome.data)
                dom.createWithFlags(0)
            except libvirt.libvirtError as e:
                self._undefine(conn, name)
                raise VdsmError(f"libvirt refused VM {name}: {e.get_error_message()}") from None
            record = VmRecord(vm_id, name, custom, dom.XMLDesc(0))
        finally:
            conn.close()
        self.vms[vm_id] = record
        self.run_hooks("after_vm_start", record.xml, vm_id, custom)
        return record, outcome

    def destroy_vm(self, vm_id: str) -> list[HooksOutcome]:
        """VM.destroy: before_vm_destroy (never aborts), destroy + undefine, after_vm_destroy."""
        record = self._record(vm_id)
        before = self.run_hooks("before_vm_destroy", None, vm_id, record.custom)
        conn = self._connect()
        try:
            try:
                conn.lookupByName(record.name).destroy()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN and \
                        "not running" not in (e.get_error_message() or ""):
                    raise VdsmError(f"cannot destroy VM {record.name}: "
                                    f"{e.get_error_message()}") from None
            self._undefine(conn, record.name)
        finally:
            conn.close()
        return [before, self._release(record)]

    def qemu_died(self, vm_id: str) -> HooksOutcome:
        """What VDSM does when it sees the domain's QEMU die: releaseVm -> after_vm_destroy."""
        record = self._record(vm_id)
        conn = self._connect()
        try:
            self._undefine(conn, record.name)
        finally:
            conn.close()
        return self._release(record)

    def migrate_check(self, vm_id: str) -> HooksOutcome:
        """The go/no-go part of VM.migrate: before_vm_migrate_source; a failure aborts the
        migration (HookError). The lab never migrates further than this."""
        record = self._record(vm_id)
        return self.run_hooks("before_vm_migrate_source", record.xml, vm_id, record.custom)

    def _release(self, record: VmRecord) -> HooksOutcome:
        self.vms.pop(record.vm_id, None)
        return self.run_hooks("after_vm_destroy", record.xml, record.vm_id, record.custom)

    def _record(self, vm_id: str) -> VmRecord:
        try:
            return self.vms[vm_id]
        except KeyError:
            raise VdsmError(f"VDSM runs no VM {vm_id} on this host") from None

    @staticmethod
    def _undefine(conn: libvirt.virConnect, name: str) -> None:
        try:
            conn.lookupByName(name).undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise VdsmError(f"cannot undefine VM {name}: {e.get_error_message()}") from None
