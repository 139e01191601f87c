"""A VDSM stand-in: starts, stops and checks VMs the way VDSM does, running the real hook scripts.

It follows the contract in docs/ovirt-facts.md (VDSM's `_runHooksDir`):
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

Which domains it knows (its `vmContainer`, here `vms`) follows VDSM too
(docs/engine-view.md): the VMs it started; at its own start the domains it recovers
(`recover`); while running, unknown domains it was told about by a libvirt event, adopted
by the periodic lookup as external VMs (`lookup_external_vms`). It reports only those.

Differences from VDSM, none of which a hook can see: no `taskset` wrapper, no launch
flags file, no JSON-RPC, and an optional per-script timeout (VDSM has none; a lab test
would rather fail than hang).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Mapping

import libvirt
from lxml import etree

from vdsm_ft.libvirtconn import LibvirtConnectError

log = logging.getLogger(__name__)

OVIRT_VM_NS = "http://ovirt.org/vm/1.0"
# vmxml.has_vdsm_metadata also counts the legacy guest agent channel as VDSM's.
LEGACY_AGENT_CHANNEL = "com.redhat.rhevm.vdsm"
# VDSM's config [sampling] external_vm_lookup_interval.
EXTERNAL_VM_LOOKUP_INTERVAL = 60.0
# Hook points whose errors VDSM only logs (docs/ovirt-facts.md, "Exit codes per hook
# point").
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
    # Vm._lastStatus in the engine's spelling: set at start or fixed at recovery.
    status: str = "up"
    external: bool = False                 # recovered as external: VDSM does not manage it


def is_external(domxml: str) -> bool:
    """recovery._is_external_vm: no ovirt-vm metadata and no legacy agent channel; the
    domain's name plays no part."""
    root = etree.fromstring(domxml.encode())
    if root.find(f"metadata/{{{OVIRT_VM_NS}}}vm") is not None:
        return False
    return not any(t.get("name") == LEGACY_AGENT_CHANNEL
                   for t in root.iterfind("devices/channel/target"))


def metadata_values(domxml: str) -> dict[str, object]:
    """The top-level `<ovirt-vm:vm>` values as VDSM's metadata.Descriptor reads them: an
    element with `type="int"`, `"float"` or `"bool"` is converted, and a value that does
    not convert raises ValueError (VDSM's recovery of that VM then fails)."""
    root = etree.fromstring(domxml.encode())
    vm = root.find(f"metadata/{{{OVIRT_VM_NS}}}vm")
    out: dict[str, object] = {}
    if vm is None:
        return out
    for el in vm:
        if not isinstance(el.tag, str) or len(el):
            continue
        text, kind = (el.text or "").strip(), el.get("type")
        if kind == "int":
            value: object = int(text)
        elif kind == "float":
            value = float(text)
        elif kind == "bool":
            if text not in ("true", "false", "True", "False"):
                raise ValueError(f"metadata {etree.QName(el).localname}: {text!r} is no bool")
            value = text.lower() == "true"
        else:
            value = text
        out[etree.QName(el).localname] = value
    return out


def recover_status(state: int, reason: int, outgoing_migration: bool) -> str:
    """Vm._recover_status, in the engine's spelling ("migrating_from" is VDSM's
    Migration Source, "migrating_to" its Migration Destination)."""
    if state == libvirt.VIR_DOMAIN_PAUSED:
        if reason in (libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, libvirt.VIR_DOMAIN_PAUSED_MIGRATION):
            return "migrating_from"
        return "paused"
    if state == libvirt.VIR_DOMAIN_RUNNING:
        if reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY:
            return "migrating_to"
        return "migrating_from" if outgoing_migration else "up"
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
        return "down"
    return "up"     # "Unexpected VM state": VDSM sets Up


def last_status(status: str, state: int) -> str:
    """Vm._get_lastStatus: Paused whenever the guest CPUs are stopped and the status is
    one of PAUSED_STATES (Up, Powering down, Reboot in progress)."""
    if state == libvirt.VIR_DOMAIN_PAUSED and status in ("up", "powering_down",
                                                         "reboot_in_progress"):
        return "paused"
    return status


# Vm status names: the engine's spelling here, VDSM's (vdsm.virt.vmstatus) there.
VDSM_STATUS = {"up": "Up", "paused": "Paused", "migrating_from": "Migration Source",
               "migrating_to": "Migration Destination", "down": "Down",
               "powering_down": "Powering down", "reboot_in_progress": "RebootInProgress"}
ENGINE_STATUS = {v: k for k, v in VDSM_STATUS.items()}


def custom_properties(engine_xml: str) -> dict[str, str]:
    """The VM custom properties the engine wrote into `<ovirt-vm:custom>`
    (docs/ovirt-facts.md, "Custom properties")."""
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
                 connect: Callable[[], libvirt.virConnect] | None = None,
                 hook_user: tuple[str, str] | None = None):
        # `hook_user` (user, group): who the hooks run as. Real VDSM runs them as its own
        # user, vdsm:kvm, and owns the data file it hands them; None: as this process.
        self.hook_user = hook_user
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
        self.unknown_vm_ids: set[str] = set()  # clientIF._unknown_vm_ids

    # ---------------------------------------------------------------- hooks

    def scripts(self, hook_point: str) -> list[str]:
        directory = os.path.join(self.hooks_dir, hook_point)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        paths = [os.path.join(directory, n) for n in names]
        return sorted(p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK))

    def _script_env(self, vm_id: str | None, custom: Mapping[str, str], data_file: str,
                    json_hook: bool = False) -> dict[str, str]:
        env = dict(self.env)
        env.update(custom)
        if vm_id:
            env["vmId"] = vm_id
        ppath = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = ":".join([p for p in ppath.split(":") if p] + list(self.pythonpath))
        env["_hook_json" if json_hook else "_hook_domxml"] = data_file
        return env

    def run_hooks(self, hook_point: str, data: str | None, vm_id: str | None,
                  custom: Mapping[str, str], json_hook: bool = False) -> HooksOutcome:
        """Run `hook_point`'s scripts and apply VDSM's rc rules; raises HookError when VDSM
        would abort the operation. `json_hook`: VDSM's _JSON_HOOK, the data file is named by
        `_hook_json` instead of `_hook_domxml`."""
        fd, path = tempfile.mkstemp(prefix=f"vdsm-hook-{hook_point}-")
        runs: list[HookRun] = []
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data or "")
            env = self._script_env(vm_id, custom, path, json_hook)
            as_user: dict[str, Any] = {}
            if self.hook_user is not None:
                user, group = self.hook_user
                shutil.chown(path, user, group)
                as_user = {"user": user, "group": group, "extra_groups": []}
            for script in self.scripts(hook_point):
                proc = subprocess.run(self.wrap([script]), env=env, stdin=subprocess.DEVNULL,
                                      capture_output=True, timeout=self.hook_timeout,
                                      **as_user)
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

    def pause_vm(self, vm_id: str) -> HooksOutcome:
        """VM.pause (Vm.pause -> hooks.before_vm_pause, then the domain's suspend); a hook
        failure aborts it (HookError) and the domain runs on."""
        record = self._record(vm_id)
        outcome = self.run_hooks("before_vm_pause", record.xml, vm_id, record.custom)
        conn = self._connect()
        try:
            conn.lookupByUUIDString(vm_id).suspend()
        finally:
            conn.close()
        return outcome

    # ---------------------------------------------------------------- which VMs it knows

    def recover(self) -> list[str]:
        """At VDSM start (clientIF._recoverExistingVms -> recovery.all_domains): recover every
        running domain. A domain with metadata whose recovery fails is destroyed ("loose
        domain found, killing it"); a failed external one is only logged. Returns the ids
        of the domains it killed."""
        killed: list[str] = []
        conn = self._connect()
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    vm_id, xml = dom.UUIDString(), dom.XMLDesc(0)
                except libvirt.libvirtError:
                    continue                    # gone while listed
                external = is_external(xml)
                if self._recover_domain(dom, vm_id, xml, external):
                    continue
                if external:
                    log.info("Failed to recover external domain: %s", vm_id)
                    continue
                log.info("recovery: loose domain %s found, killing it.", vm_id)
                try:
                    dom.destroy()
                    killed.append(vm_id)
                except libvirt.libvirtError as e:
                    log.error("recovery: failed to kill loose domain %s: %s", vm_id,
                              e.get_error_message())
        finally:
            conn.close()
        return killed

    def lookup_vm_from_event(self, vm_id: str) -> None:
        """clientIF.lookup_vm_from_event: a libvirt event for a domain VDSM does not hold
        queues it for the next external VM lookup."""
        if vm_id not in self.vms:
            self.unknown_vm_ids.add(vm_id)

    def lookup_external_vms(self) -> list[str]:
        """recovery.lookup_external_vms (every external_vm_lookup_interval): recover each
        queued domain, always as external, even when it carries oVirt metadata. Down
        external domains are ignored (_is_ignored_vm). Returns the adopted ids."""
        adopted: list[str] = []
        pending, self.unknown_vm_ids = self.unknown_vm_ids, set()
        if not pending:
            return adopted
        conn = self._connect()
        try:
            for vm_id in sorted(pending):
                if vm_id in self.vms:
                    continue
                try:
                    dom = conn.lookupByUUIDString(vm_id)
                    xml = dom.XMLDesc(0)
                    active = dom.isActive()
                except libvirt.libvirtError:
                    continue                    # VIR_ERR_NO_DOMAIN: nothing to adopt
                if not active:
                    continue
                if self._recover_domain(dom, vm_id, xml, external=True):
                    adopted.append(vm_id)
        finally:
            conn.close()
        return adopted

    def _recover_domain(self, dom: libvirt.virDomain, vm_id: str, xml: str,
                        external: bool) -> bool:
        """recovery._recover_domain: build the VM from the domain; False if that fails."""
        try:
            if not external:
                metadata_values(xml)            # metadata.Descriptor, read at Vm.__init__
            root = etree.fromstring(xml.encode())
            state, reason = dom.state(0)
            try:
                outgoing = dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
            except libvirt.libvirtError:
                outgoing = False
        except (ValueError, etree.XMLSyntaxError, libvirt.libvirtError) as e:
            log.warning("recovery of %s failed: %s", vm_id, e)
            return False
        status = recover_status(state, reason, outgoing)
        if status == "down":
            return False
        self.vms[vm_id] = VmRecord(vm_id, root.findtext("name") or vm_id,
                                   {} if external else custom_properties(xml), xml,
                                   status=status, external=external)
        return True

    def report(self) -> list[dict]:
        """Host.getAllVmStats plus Host.dumpxmls for the VMs VDSM holds: one dict per VM
        (uuid, name, status, has_ovirt_metadata, memory, domxml). A VM whose domain is gone
        is released (releaseVm -> after_vm_destroy) and not reported."""
        reports: list[dict] = []
        gone: list[str] = []
        conn = self._connect()
        try:
            for vm_id, record in list(self.vms.items()):
                try:
                    dom = conn.lookupByUUIDString(vm_id)
                    state = dom.state(0)[0]
                    xml = dom.XMLDesc(0)
                    memory = dom.maxMemory() * 1024
                except libvirt.libvirtError:
                    gone.append(vm_id)
                    continue
                if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                    gone.append(vm_id)
                    continue
                record.xml = xml
                reports.append({"uuid": vm_id, "name": record.name,
                                "status": last_status(record.status, state),
                                "has_ovirt_metadata": not is_external(xml),
                                "memory": memory, "domxml": xml})
        finally:
            conn.close()
        for vm_id in gone:
            self.qemu_died(vm_id)
        for entry, status in zip(reports, self.after_get_all_vm_stats(reports)):
            entry["status"] = status
        return reports

    def after_get_all_vm_stats(self, reports: list[dict]) -> list[str]:
        """API.getAllVmStats -> hooks.after_get_all_vm_stats: a JSON hook over VDSM's stats
        list, errors ignored, the file read back with json.loads (a corrupt one raises);
        returns each report's status after the hooks, in the engine's spelling."""
        if not self.scripts("after_get_all_vm_stats"):
            return [r["status"] for r in reports]
        stats = [{"vmId": r["uuid"], "status": VDSM_STATUS[r["status"]]} for r in reports]
        outcome = self.run_hooks("after_get_all_vm_stats", json.dumps(stats), None, {},
                                 json_hook=True)
        back = {e["vmId"]: e["status"] for e in json.loads(outcome.data)}
        return [ENGINE_STATUS[back[r["uuid"]]] for r in reports]

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
