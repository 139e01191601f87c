"""Files in a VM's run dir that its libvirt XML names.

Each engine disk's `<disk>` has an empty raw file of its own as source
(vdsm_ft/domxml.placeholder_path): libvirt builds the guest device from it and labels
it, while the device really sits on our block node. It must exist before libvirt starts
the domain; whoever starts a role's XML creates them here first.
"""
from __future__ import annotations

import os

from vdsm_ft import domxml


def make_placeholders(role_xml: str) -> list[str]:
    """Create the empty placeholder files `role_xml` names (kept if present); libvirt
    relabels them for QEMU. Returns their paths."""
    paths = domxml.placeholders(role_xml)
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o660)
        os.close(fd)
    return paths
