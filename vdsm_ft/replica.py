"""The secondary's own disk copy and its COLO overlays (docs/decisions.md, D2).

The replica lives in a configurable directory on the peer; the active and hidden
overlays go on tmpfs. All three must have the primary disk's virtual size (QEMU's
block-replication rule) and be usable by the QEMU user, because libvirt does not
relabel or chown what only `<qemu:commandline>` names.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import subprocess
import uuid
from dataclasses import replace

from vdsm_ft.layout import Disk

log = logging.getLogger(__name__)

QEMU_IMG_TIMEOUT = 60.0


class ReplicaError(RuntimeError):
    """The secondary's disks could not be prepared; nothing is left behind."""


def virtual_size(image: str, fmt: str | None = None) -> int:
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    proc = subprocess.run(argv + [image], capture_output=True, text=True,
                          timeout=QEMU_IMG_TIMEOUT)
    if proc.returncode != 0:
        raise ReplicaError(f"cannot read the size of {image}: {proc.stderr.strip()}")
    return int(json.loads(proc.stdout)["virtual-size"])


def _create_qcow2(path: str, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
                          capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    if proc.returncode != 0:
        raise ReplicaError(f"cannot create {path}: {proc.stderr.strip()}")


def _check_space(directory: str, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ReplicaError(
            f"{what} directory {directory} has {free // 2**20} MiB free but the "
            f"secondary needs up to {needed // 2**20} MiB; free space there or point "
            f"the agent's {what} directory elsewhere")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def overlay_usage(overlay_dir: str) -> dict[str, int]:
    """Bytes each VM's overlays take in `overlay_dir` (on tmpfs: host RAM), by VM id."""
    usage: dict[str, int] = {}
    try:
        vms = [e for e in os.scandir(overlay_dir) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return usage
    for vm in vms:
        try:
            usage[vm.name] = sum(f.stat(follow_symlinks=False).st_blocks * 512
                                 for f in os.scandir(vm.path)
                                 if f.is_file(follow_symlinks=False))
        except FileNotFoundError:
            continue                  # removed while we looked
    return usage


def secondary_disk(vm_id: str, disk: Disk, replica_dir: str, overlay_dir: str) -> Disk:
    """Where the secondary's copy of `disk` and its overlays live on this host."""
    return replace(disk, fmt="qcow2",
                   image=os.path.join(replica_dir, vm_id, f"disk{disk.index}.qcow2"),
                   hidden=os.path.join(overlay_dir, vm_id, f"hidden{disk.index}.qcow2"),
                   active=os.path.join(overlay_dir, vm_id, f"active{disk.index}.qcow2"))


def create_secondary_disks(vm_id: str, disks: tuple[Disk, ...], replica_dir: str,
                           overlay_dir: str, qemu_user: str,
                           overlay_cap: int | None = None) -> tuple[Disk, ...]:
    """Blank replica + hidden + active images for each primary disk.

    Blank is enough: the resync mirror copies every block (docs/colo-facts.md,
    "A blank replica is enough"). With
    `overlay_cap`, a secondary whose new, empty overlays already take this host's
    overlays over the cap is refused.
    """
    try:
        uuid.UUID(vm_id)
    except ValueError:
        raise ReplicaError(f"VM id {vm_id!r} is not a UUID") from None
    try:
        owner = pwd.getpwnam(qemu_user)
    except KeyError:
        raise ReplicaError(f"QEMU user {qemu_user!r} does not exist on this host") from None
    vm_replica = os.path.join(replica_dir, vm_id)
    vm_overlay = os.path.join(overlay_dir, vm_id)
    for directory in (vm_replica, vm_overlay):
        os.makedirs(directory, mode=0o750, exist_ok=True)
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    _check_space(vm_replica, sum(d.size for d in disks), "replica")
    result = []
    try:
        for disk in disks:
            sec = secondary_disk(vm_id, disk, replica_dir, overlay_dir)
            for path in (sec.image, sec.hidden, sec.active):
                _create_qcow2(path, disk.size)
                os.chown(path, owner.pw_uid, owner.pw_gid)
            result.append(sec)
        if overlay_cap is not None:
            total = sum(overlay_usage(overlay_dir).values())
            if total > overlay_cap:
                raise ReplicaError(
                    f"the overlays in {overlay_dir} would take {mib(total)} with this "
                    f"secondary's, over [storage] overlay_size_cap ({mib(overlay_cap)}); "
                    "move a secondary off this host or raise the cap (the overlays are "
                    "RAM on tmpfs)")
    except (OSError, ReplicaError):
        remove_secondary_disks(vm_id, replica_dir, overlay_dir)
        raise
    return tuple(result)


def remove_secondary_disks(vm_id: str, replica_dir: str, overlay_dir: str) -> None:
    def failed(_func: object, path: str, exc_info: tuple) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            log.warning("cannot remove %s: %s", path, exc_info[1])

    for directory in (os.path.join(replica_dir, vm_id), os.path.join(overlay_dir, vm_id)):
        shutil.rmtree(directory, onerror=failed)


def remove_overlays(vm_id: str, overlay_dir: str) -> None:
    """Drop a promoted secondary's overlays (tmpfs) once no QEMU uses them; the replica
    stays: it holds the VM's disk now."""
    shutil.rmtree(os.path.join(overlay_dir, vm_id), ignore_errors=True)
