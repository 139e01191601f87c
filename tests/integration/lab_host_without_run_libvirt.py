"""Bring a lab host up on a view of this machine where /run/libvirt does not exist, as on
a new Debian machine without systemd (issue 10, item 5). Run by
test_lab_host.py inside `unshare --mount --propagation private`, so nothing done here
is seen by the rest of the machine:

- /run is replaced by a tmpfs holding everything the real /run has except libvirt/
  (bind mounts of the real entries, so /run/netns and the rest still work);
- a lab host is brought up, its libvirtd asked for its version, and the host removed.

Arguments: a base directory, and the mount namespace inode of the caller (refused if
this runs in the same one). Prints one JSON line: whether /run/libvirt was missing before and made by the lab, and
the libvirt version the host's daemon answered with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ftlab import netns
from ftlab.host import LabHost

HIDDEN = "libvirt"
WIRE = "tlh-nr-wire"


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def run_without_run_libvirt(base: str) -> None:
    """Replace /run with a copy lacking /run/libvirt (this mount namespace only)."""
    real = os.path.join(base, "real-run")
    os.makedirs(real)
    _mount("--bind", "/run", real)
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    for name in sorted(os.listdir(real)):
        source, target = os.path.join(real, name), os.path.join("/run", name)
        if name == HIDDEN:
            continue
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
            continue
        # mount(8) may have made /run/mount (its utab) on the new tmpfs already.
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            open(target, "w").close()
        _mount("--rbind", source, target)


def main(base: str, caller_mount_ns: int) -> None:
    if os.stat("/proc/self/ns/mnt").st_ino == caller_mount_ns:
        sys.exit("refusing to run outside a private mount namespace: it would hide the "
                 "machine's /run; run it under unshare --mount --propagation private")
    run_without_run_libvirt(base)
    missing_before = not os.path.exists("/run/libvirt")
    host = LabHost("tlh-nr", 3, base, wire=WIRE)
    try:
        host.up()
        conn = host.connect()
        try:
            version = conn.getLibVersion()
        finally:
            conn.close()
        made = os.path.isdir("/run/libvirt")
    finally:
        host.down()
        netns.delete(netns.netns_name(WIRE))
    print(json.dumps({"missing_before": missing_before, "made_by_lab": made,
                      "libvirt_version": version}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
