"""Which libvirt domain on a lab host is a given engine VM.

A VM's copy is the domain named like the VM where the engine started it, and
`<vm>-ft-secondary` (docs/engine-view.md) where a secondary was started, which stays its
name after a failover promotes it.
"""
from __future__ import annotations

import libvirt

from vdsm_ft import domxml


def vm_domain(uri: str, vm_name: str) -> str | None:
    """The name of the running domain of `vm_name` on the libvirtd at `uri`, if any."""
    # A missing name is an answer here, not an error for libvirt to print on stderr.
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(uri)
    try:
        for name in (vm_name, domxml.secondary_name(vm_name)):
            try:
                if conn.lookupByName(name).isActive():
                    return name
            except libvirt.libvirtError:
                continue
        return None
    finally:
        conn.close()
