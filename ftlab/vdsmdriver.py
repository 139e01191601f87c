"""The fake engine's way to the lab hosts: one VDSM stand-in per host (ftlab.vdsm.Vdsm,
running the real hooks inside the host), plus VDSM's periodic VM reports.

`VdsmFleet` is the engine's `HostDriver`: a start writes the idle guest's disk on the
chosen host and has that host's stand-in start the engine XML (before_vm_start hook,
libvirt, after_vm_start hook). Every `REPORT_INTERVAL` it reports, for each live host,
the VMs that host's VDSM holds (ftlab.vdsm: the ones it started, recovered or adopted),
with their live domain XML, as the engine's poll does (docs/engine-view.md). A libvirt
domain VDSM does not hold is adopted, as external, by the periodic lookup
(`lookup_interval`, VDSM's 60 s by default) after a libvirt event named it; the stand-in
takes a domain that appeared or changed state since the last listing as such an event
(libvirt sends one on every define, start, pause and resume). A domain that vanished runs
after_vm_destroy, as VDSM's releaseVm does when it sees QEMU die.

The engine's disks are the VM's disk attachments (StartRequest.disks, plugged ones only):
each is a qcow2 image under the host's images/<disk id>.qcow2, made from the idle or
Linux guest's image at the VM's first start there and kept across starts. A VM with the
lab-only custom property `ftlab_data_mib=N` gets a first disk of at least 2N MiB whose
first N MiB hold real data (pattern DATA_PATTERN) when it is made, so that a resync has
that much to copy and Syncing lasts (the fault tests crash hosts mid-sync).

The lab-only custom property `ftlab_guest` picks the guest: `idle` (the default, under
KVM), `linux` (the Linux test guest under KVM: tier 3, where KVM runs it at speed) or
`linux-tcg` (the Linux guest under TCG: tier 2; with ft=true tier 3T, which needs the
project's patched QEMU: on any other QEMU ft=true is refused, `tcg_colo_refusal`). A
Linux guest also needs `ftlab_guest_ip`, its address on the guest segment, where it
serves its HTTP counter.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sysconfig
import threading
import time
from collections.abc import Callable

import libvirt

from ftlab import guest, qemubuild
from ftlab.engine.engine_state import StartRequest
from ftlab.host import LabHost
from ftlab.vdsm import EXTERNAL_VM_LOOKUP_INTERVAL, Vdsm, VdsmError

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS_DIR = os.path.join(REPO, "hooks")
# Hooks run on the host's system Python (docs/decisions.md, D6); the repo and this
# interpreter's site-packages (etcd3gw) stand in for the installed host package.
HOOK_PYTHONPATH = (REPO, sysconfig.get_paths()["purelib"])
HOOK_TIMEOUT = 60.0
REPORT_INTERVAL = 1.0
GUEST_DISK_SIZE = 64 << 20
DATA_PROPERTY = "ftlab_data_mib"
DATA_PATTERN = 0x3C
MAX_DATA_MIB = 4096
GUEST_PROPERTY = "ftlab_guest"
GUEST_IP_PROPERTY = "ftlab_guest_ip"
GUESTS = ("idle", "linux", "linux-tcg")
LINUX_MEMORY_MIB = 256
PREFILL_TIMEOUT = 300.0
# The lab's templates (FakeEngine.add_template): the idle or Linux guest's disk, and for
# the Linux guest a NIC on the guest segment.
IDLE_TEMPLATE = "ftlab-idle"
LINUX_TEMPLATE = "ftlab-linux"
TEMPLATES = {IDLE_TEMPLATE: ([("disk1", GUEST_DISK_SIZE, "virtio", True)], []),
             LINUX_TEMPLATE: ([("disk1", GUEST_DISK_SIZE, "virtio", True)], ["nic1"])}


class HostVdsm:
    """One host's VDSM stand-in, serialised: VDSM handles one host's VM calls in order."""

    def __init__(self, host: LabHost, agent_config: str):
        self.host = host
        self.agent_config = agent_config
        self.lock = threading.RLock()
        self.vdsm = self._new()

    def _new(self) -> Vdsm:
        env = dict(os.environ, VDSM_FT_CONFIG=self.agent_config)
        return Vdsm(HOOKS_DIR, self.host.uri, env=env, pythonpath=HOOK_PYTHONPATH,
                    hook_timeout=HOOK_TIMEOUT, wrap=self.host.nsenter)

    def restart(self) -> list[str]:
        """VDSM restarts: a new stand-in that knows no VM recovers the host's domains
        (recovery.all_domains). Returns the ids of the loose domains it killed."""
        with self.lock:
            self.vdsm = self._new()
            return self.vdsm.recover()


class VdsmFleet:
    def __init__(self, hosts: dict[str, HostVdsm], cache_dir: str,
                 report: Callable[[str, list[dict]], None],
                 lookup_interval: float = EXTERNAL_VM_LOOKUP_INTERVAL):
        self.hosts = hosts
        self.cache_dir = cache_dir
        self.report = report
        self.lookup_interval = lookup_interval
        self.dead: set[str] = set()          # crashed hosts: no VDSM answers there
        self._seen: dict[str, dict[str, int]] = {}        # host -> {uuid: libvirt state}
        self._next_lookup: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- HostDriver

    def start_vm(self, request: StartRequest) -> None:
        hv = self._host(request.host_id)
        host = hv.host
        data_mib = _data_mib(request.custom_properties)
        kind, net = _guest(request.custom_properties)
        disks = [self._disk_image(host, d.id, i == 0 and data_mib, net)
                 for i, d in enumerate(request.disks)]
        if net is not None and not request.nics:
            raise VdsmError(f"{GUEST_PROPERTY}={kind} needs a NIC (plugged): make the VM "
                            f"from template {LINUX_TEMPLATE} or add one")
        memory_mib = max(request.memory >> 20, 64 if net is None else LINUX_MEMORY_MIB)
        nic = request.nics[0] if net is not None else None
        xml = guest.engine_domain_xml(guest.EngineVm(
            name=request.vm_name, vm_id=request.vm_id, memory_mib=memory_mib,
            disks=tuple(guest.EngineDisk(path, d.id) for path, d in zip(disks, request.disks)),
            mac=nic.mac if nic else "", nic_id=nic.id if nic else "",
            domain_type="qemu" if kind == "linux-tcg" else "kvm",
            serial_log=host.path("images", f"{request.vm_id}.serial"),
            custom=tuple(sorted(request.custom_properties.items()))))
        with hv.lock:
            hv.vdsm.start_vm(xml)
        log.info("VM %s started on %s", request.vm_name, host.name)

    def _disk_image(self, host: LabHost, disk_id: str, data_mib: int,
                    net: guest.GuestNet | None) -> str:
        """The disk's image on `host`, made at its first use there (a storage domain keeps
        an image across starts)."""
        path = host.path("images", f"{disk_id}.qcow2")
        if os.path.exists(path):
            return path
        size = max(GUEST_DISK_SIZE, 2 * data_mib << 20)
        cached = (guest.build_idle_disk(size, self.cache_dir) if net is None else
                  guest.build_linux_disk(net, size, cache_dir=self.cache_dir))
        disk = guest.install_disk(cached, path)
        if data_mib:
            proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                   f"write -P {DATA_PATTERN:#x} 0 {data_mib}M", disk],
                                  capture_output=True, text=True, timeout=PREFILL_TIMEOUT)
            if proc.returncode != 0:
                os.unlink(disk)
                raise VdsmError(f"cannot prefill {data_mib} MiB on {disk}: "
                                f"{proc.stderr.strip() or proc.stdout.strip()}")
        return disk

    def stop_vm(self, host_id: str, vm_id: str, graceful: bool) -> None:
        self.destroy_vm(host_id, vm_id)

    def destroy_vm(self, host_id: str, vm_id: str) -> None:
        hv = self._host(host_id)
        with hv.lock:
            record = hv.vdsm.vms.get(vm_id)
            if record is not None and not record.external:
                hv.vdsm.destroy_vm(vm_id)
                return
            hv.vdsm.vms.pop(vm_id, None)
        # An external VM: libvirt destroy only (VDSM skips undefine for external VMs).
        conn = libvirt.open(hv.host.uri)
        try:
            dom = conn.lookupByUUIDString(vm_id)
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise VdsmError(f"cannot destroy {vm_id} on {host_id}: "
                                f"{e.get_error_message()}") from None
        finally:
            conn.close()

    def _host(self, host_id: str) -> HostVdsm:
        if host_id in self.dead:
            raise VdsmError(f"host {host_id} does not answer (crashed)")
        try:
            return self.hosts[host_id]
        except KeyError:
            raise VdsmError(f"no lab host {host_id}") from None

    # ---------------------------------------------------------------- VM reports

    def _libvirt_events(self, name: str) -> None:
        """Tell the host's VDSM of every domain that appeared or changed state since the
        last listing (the libvirt lifecycle events clientIF.lookup_vm_from_event sees)."""
        hv = self.hosts[name]
        conn = libvirt.open(hv.host.uri)
        try:
            now: dict[str, int] = {}
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    now[dom.UUIDString()] = dom.state(0)[0]
                except libvirt.libvirtError:
                    continue            # it went away while listed
        finally:
            conn.close()
        before = self._seen.get(name, {})
        for vm_id, state in now.items():
            if before.get(vm_id) != state:
                hv.vdsm.lookup_vm_from_event(vm_id)
        self._seen[name] = now

    def report_once(self) -> None:
        clock = time.monotonic()
        for name, hv in self.hosts.items():
            if name in self.dead:
                continue
            try:
                with hv.lock:
                    self._libvirt_events(name)
                    due = self._next_lookup.setdefault(name, clock + self.lookup_interval)
                    if clock >= due:
                        # periodic.py: recovery.lookup_external_vms every
                        # external_vm_lookup_interval.
                        self._next_lookup[name] = clock + self.lookup_interval
                        for vm_id in hv.vdsm.lookup_external_vms():
                            log.info("VDSM on %s adopted external domain %s", name, vm_id)
                    reports = hv.vdsm.report()
                if name not in self.dead:
                    self.report(name, reports)
            except Exception as e:  # one host's failure must not stop the others' reports
                if name not in self.dead:
                    log.warning("VM report of %s failed: %s", name, e)

    def restart_vdsm(self, name: str) -> list[str]:
        """Restart the host's VDSM stand-in (recovery.all_domains); the next periodic lookup
        is a full interval away, as in a new VDSM process."""
        killed = self.hosts[name].restart()
        self._seen.pop(name, None)
        self._next_lookup[name] = time.monotonic() + self.lookup_interval
        return killed

    def start_reporting(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vdsm-reports", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL):
            self.report_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# The project's patches (packaging/qemu/patches) COLO needs under TCG: without the
# first the primary deadlocks at its first checkpoint; without the second the
# secondary's guest corrupts itself (upstream fixed that in 9.0, commit 03bfc2188f06).
TCG_COLO_FIXES = (("0001-colo-savevm-live-state-under-bql", None),
                  ("0002-ram_addr-rearm-tcg-notdirty-traps", (9, 0)))
BUILD_INFO = "build-info.json"          # scripts/build-qemu writes it beside bin/


def tcg_colo_refusal() -> str:
    """Why the lab's FT QEMU cannot protect a guest under TCG; "" when it can: it is a
    project build (its build-info.json) with both TCG fixes for its version."""
    choice = qemubuild.ft_emulator()
    info_path = os.path.join(os.path.dirname(os.path.dirname(choice.path)), BUILD_INFO)
    try:
        with open(info_path) as f:
            info = json.load(f)
        version = tuple(int(p) for p in str(info["upstream_version"]).split("."))
        applied = [str(p) for p in info["patches"]]
    except (OSError, ValueError, KeyError, TypeError):
        missing = [fix for fix, _ in TCG_COLO_FIXES]
    else:
        missing = [fix for fix, fixed_in in TCG_COLO_FIXES
                   if (fixed_in is None or version < fixed_in)
                   and not any(p.startswith(fix) for p in applied)]
    if not missing:
        return ""
    return (f"FT VMs run on {choice.path} ({choice.source}), which lacks the project's "
            f"QEMU patches for COLO under TCG ({', '.join(missing)}: without them the "
            "primary deadlocks at its first checkpoint, or the secondary's guest corrupts "
            "itself; docs/qemu.md); run scripts/build-qemu --variant colo, or use linux "
            "(KVM) or drop ft")


def _data_mib(custom: dict[str, str]) -> int:
    value = custom.get(DATA_PROPERTY)
    if value is None:
        return 0
    if not value.isdigit() or int(value) > MAX_DATA_MIB:
        raise VdsmError(f"custom property {DATA_PROPERTY}={value!r}: give a whole number "
                        f"of MiB from 0 to {MAX_DATA_MIB}")
    return int(value)


def _guest(custom: dict[str, str]) -> tuple[str, guest.GuestNet | None]:
    """The guest kind `ftlab_guest` asks for, and the Linux guest's network (None: idle)."""
    kind = custom.get(GUEST_PROPERTY, "idle")
    if kind not in GUESTS:
        raise VdsmError(f"custom property {GUEST_PROPERTY}={kind!r}: give one of "
                        + ", ".join(GUESTS))
    if kind == "idle":
        return kind, None
    if kind == "linux-tcg" and custom.get("ft", "").strip().lower() == "true":
        refusal = tcg_colo_refusal()
        if refusal:
            raise VdsmError(f"{GUEST_PROPERTY}=linux-tcg cannot have ft=true here: "
                            f"{refusal}")
    address = custom.get(GUEST_IP_PROPERTY, "")
    try:
        return kind, guest.GuestNet(address)
    except ValueError as e:
        raise VdsmError(f"{GUEST_PROPERTY}={kind} needs {GUEST_IP_PROPERTY}, the guest's "
                        f"address on the guest segment: {e}") from None
