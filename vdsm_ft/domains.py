"""The libvirt side of a VM's lifecycle: start from XML, find its QEMU, destroy it."""
from __future__ import annotations

import os

import libvirt


class DomainError(RuntimeError):
    """libvirt refused or failed an operation; the message is libvirt's."""


def start(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    """Start a transient domain, as VDSM does after its hooks ran."""
    try:
        return conn.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise DomainError(f"libvirt refused the domain: {exc.get_error_message()}") \
            from None


def destroy(conn: libvirt.virConnect, name: str) -> bool:
    """Destroy `name` if it exists; returns whether there was one."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        # Its QEMU may exit meanwhile (killed just before, as kill_qemu does): a
        # transient domain then goes, and "no domain" is what was wanted.
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN and _active(dom):
            raise DomainError(f"cannot destroy {name}: {exc.get_error_message()}") \
                from None
    return True


def _active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise DomainError(f"libvirt cannot tell whether {dom.name()} runs: "
                          f"{exc.get_error_message()}") from None


def running_name(conn: libvirt.virConnect, uuid: str) -> str | None:
    """The name of the running domain whose UUID is `uuid`, or None."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        return dom.name() if dom.isActive() else None
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise DomainError(f"libvirt cannot look up domain {uuid}: "
                          f"{exc.get_error_message()}") from None


def qemu_pid(name: str, among: list[int] | None = None) -> int | None:
    """The pid of the QEMU that libvirt runs for domain `name` on this host, if any.

    libvirt names its guests `-name guest=<name>,...` (commas doubled). Only processes in
    this process's network namespace count: on a real host that is every QEMU, and lab
    hosts share one machine's pids but each has its own namespace (a secondary domain
    has the same name on every host it ever ran on). `among` replaces that scope with
    the caller's own list of pids (a lab host's, looked at from outside).
    """
    wanted = ("guest=" + name.replace(",", ",,") + ",").encode()
    own_net = _net_ns("self") if among is None else None
    candidates = [str(p) for p in among] if among is not None else os.listdir("/proc")
    for entry in candidates:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        # Debian runs qemu-system-x86_64, EL /usr/libexec/qemu-kvm.
        if args and os.path.basename(args[0]).startswith(b"qemu") and \
                any(a.startswith(wanted) for a in args) and \
                (own_net is None or _net_ns(entry) == own_net):
            return int(entry)
    return None


def process_alive(pid: int) -> bool:
    """True while any thread of `pid` runs. A dead QEMU stays in /proc as a zombie until
    its parent (libvirtd, or init for a daemonized one) reaps it, which may take seconds;
    and a killed QEMU's main thread turns zombie before its other threads have exited and
    closed its files (its image locks with them)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (/proc/<pid>/stat, field 22). With
    the pid it names one process: a pid the kernel gave to another since is not it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])      # fields after the name start at field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def _net_ns(pid: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
