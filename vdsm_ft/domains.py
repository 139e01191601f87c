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
        if dom.isActive():
            raise DomainError(f"cannot destroy {name}: {exc.get_error_message()}") \
                from None
    return True


def qemu_pid(name: str, among: list[int] | None = None) -> int | None:
    """The pid of the QEMU that libvirt runs for domain `name`, if any.

    libvirt names its guests `-name guest=<name>,...` (commas doubled); scanning /proc works for every
    libvirtd on the machine, including the lab hosts' private ones. `among` limits the
    search to some pids (one host's, where several hosts run a domain of that name).
    """
    wanted = ("guest=" + name.replace(",", ",,") + ",").encode()
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
                any(a.startswith(wanted) for a in args):
            return int(entry)
    return None
