"""The fake engine's way to the lab hosts: one VDSM stand-in per host (ftlab.vdsm.Vdsm,
running the real hooks inside the host), plus VDSM's periodic VM reports.

`VdsmFleet` is the engine's `HostDriver`: a start writes the idle guest's disk on the
chosen host and has that host's stand-in start the engine XML (before_vm_start hook,
libvirt, after_vm_start hook). Every `REPORT_INTERVAL` it reports each live host's
libvirt domains to the engine as VDSM does (docs/engine-view.md): the primary with the
VM's own UUID and oVirt metadata, a COLO secondary under its derived UUID without
metadata, so the engine imports it as an external VM. A domain that vanished runs
after_vm_destroy, as VDSM's releaseVm does when it sees QEMU die.

The fake engine has no disk model, so the guest's disk is the idle guest's 64 MiB one.
A VM with the lab-only custom property `ftlab_data_mib=N` gets a disk of at least 2N MiB
whose first N MiB hold real data (pattern DATA_PATTERN) before it starts, so that a
resync has that much to copy and Syncing lasts (the fault tests crash hosts mid-sync).

The lab-only custom property `ftlab_guest` picks the guest: `idle` (the default, under
KVM), `linux` (the Linux test guest under KVM: tier 3, where KVM runs it at speed) or
`linux-tcg` (the Linux guest under TCG: tier 2, which COLO cannot protect, so it is
refused with ft=true). A Linux guest also needs `ftlab_guest_ip`, its address on the
guest segment, where it serves its HTTP counter.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sysconfig
import threading
import uuid
from collections.abc import Callable

import libvirt

from ftlab import guest
from ftlab.engine.engine_state import StartRequest
from ftlab.host import LabHost
from ftlab.vdsm import OVIRT_VM_NS, Vdsm, VdsmError

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS_DIR = os.path.join(REPO, "hooks")
# Hooks run on the host's system Python (D6); the repo and this interpreter's
# site-packages (etcd3gw) stand in for the installed host package.
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
_STATES = {libvirt.VIR_DOMAIN_RUNNING: "up", libvirt.VIR_DOMAIN_PAUSED: "paused",
           libvirt.VIR_DOMAIN_BLOCKED: "up"}


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

    def reset(self) -> None:
        """After a host crash: VDSM restarts knowing no VM."""
        with self.lock:
            self.vdsm = self._new()


class VdsmFleet:
    def __init__(self, hosts: dict[str, HostVdsm], cache_dir: str,
                 report: Callable[[str, list[dict]], None]):
        self.hosts = hosts
        self.cache_dir = cache_dir
        self.report = report
        self.dead: set[str] = set()          # crashed hosts: no VDSM answers there
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- HostDriver

    def start_vm(self, request: StartRequest) -> None:
        hv = self._host(request.host_id)
        host = hv.host
        data_mib = _data_mib(request.custom_properties)
        size = max(GUEST_DISK_SIZE, 2 * data_mib << 20)
        kind, net = _guest(request.custom_properties)
        cached = (guest.build_idle_disk(size, self.cache_dir) if net is None else
                  guest.build_linux_disk(net, size, cache_dir=self.cache_dir))
        disk = guest.install_disk(cached, host.path("images", f"{request.vm_id}.qcow2"))
        if data_mib:
            proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                   f"write -P {DATA_PATTERN:#x} 0 {data_mib}M", disk],
                                  capture_output=True, text=True, timeout=PREFILL_TIMEOUT)
            if proc.returncode != 0:
                raise VdsmError(f"cannot prefill {data_mib} MiB on {disk}: "
                                f"{proc.stderr.strip() or proc.stdout.strip()}")
        memory_mib = max(request.memory >> 20, 64 if net is None else LINUX_MEMORY_MIB)
        xml = guest.engine_domain_xml(guest.EngineVm(
            name=request.vm_name, disk=disk, vm_id=request.vm_id, memory_mib=memory_mib,
            mac="" if net is None else guest.guest_mac(uuid.UUID(request.vm_id).int & 0xFFFFFF),
            domain_type="qemu" if kind == "linux-tcg" else "kvm",
            serial_log=host.path("images", f"{request.vm_id}.serial"),
            custom=tuple(sorted(request.custom_properties.items()))))
        with hv.lock:
            hv.vdsm.start_vm(xml)
        log.info("VM %s started on %s", request.vm_name, host.name)

    def stop_vm(self, host_id: str, vm_id: str, graceful: bool) -> None:
        self.destroy_vm(host_id, vm_id)

    def destroy_vm(self, host_id: str, vm_id: str) -> None:
        hv = self._host(host_id)
        with hv.lock:
            if vm_id in hv.vdsm.vms:
                hv.vdsm.destroy_vm(vm_id)
                return
        # A domain VDSM did not start (an external VM): libvirt only, as VDSM does.
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

    def domains(self, name: str) -> list[dict]:
        """What VDSM would report for host `name`: one dict per running domain."""
        hv = self.hosts[name]
        conn = libvirt.open(hv.host.uri)
        try:
            reports = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    state = _STATES.get(dom.state()[0])
                    if state is None:
                        continue
                    reports.append({"uuid": dom.UUIDString(), "name": dom.name(),
                                    "status": state,
                                    "has_ovirt_metadata": OVIRT_VM_NS in dom.XMLDesc(0),
                                    "memory": dom.maxMemory() * 1024})
                except libvirt.libvirtError:
                    continue            # it went away while listed
            return reports
        finally:
            conn.close()

    def report_once(self) -> None:
        for name, hv in self.hosts.items():
            if name in self.dead:
                continue
            try:
                with hv.lock:
                    reports = self.domains(name)
                    running = {r["uuid"] for r in reports}
                    for vm_id in [v for v in hv.vdsm.vms if v not in running]:
                        hv.vdsm.qemu_died(vm_id)
                if name not in self.dead:
                    self.report(name, reports)
            except Exception as e:  # one host's failure must not stop the others' reports
                if name not in self.dead:
                    log.warning("VM report of %s failed: %s", name, e)

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
        raise VdsmError(f"{GUEST_PROPERTY}=linux-tcg cannot have ft=true: QEMU 7.2's COLO "
                        "deadlocks under TCG (DESIGN.md); use linux (KVM) or drop ft")
    address = custom.get(GUEST_IP_PROPERTY, "")
    try:
        return kind, guest.GuestNet(address)
    except ValueError as e:
        raise VdsmError(f"{GUEST_PROPERTY}={kind} needs {GUEST_IP_PROPERTY}, the guest's "
                        f"address on the guest segment: {e}") from None
