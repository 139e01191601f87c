"""The secondary's overlays are RAM (tmpfs): what they take, and [storage]
overlay_size_cap at the moment a secondary's disks are made (real qemu-img)."""
from __future__ import annotations

import os
import uuid

import pytest

from vdsm_ft import replica
from vdsm_ft.layout import Disk

MiB = 1 << 20


def _dirs(tmp_path):
    replica_dir, overlay_dir = tmp_path / "replica", tmp_path / "overlays"
    replica_dir.mkdir()
    overlay_dir.mkdir()
    return str(replica_dir), str(overlay_dir)


def test_usage_counts_allocated_bytes_per_vm(tmp_path):
    a, b = tmp_path / "vm-a", tmp_path / "vm-b"
    a.mkdir()
    b.mkdir()
    (a / "hidden0.qcow2").write_bytes(b"\1" * MiB)
    (a / "active0.qcow2").write_bytes(b"\1" * (2 * MiB))
    with open(b / "sparse.qcow2", "wb") as f:
        f.truncate(64 * MiB)                   # sparse: takes (almost) nothing
    usage = replica.overlay_usage(str(tmp_path))
    assert usage["vm-a"] == 3 * MiB
    assert usage["vm-b"] < MiB
    assert replica.overlay_usage(str(tmp_path / "missing")) == {}


def test_a_secondary_over_the_cap_is_refused_and_leaves_nothing(tmp_path):
    replica_dir, overlay_dir = _dirs(tmp_path)
    vm_id = str(uuid.uuid4())
    disks = (Disk(index=0, image="", size=64 * MiB),)
    with pytest.raises(replica.ReplicaError, match=r"over \[storage\] overlay_size_cap"):
        replica.create_secondary_disks(vm_id, disks, replica_dir, overlay_dir, "root",
                                       overlay_cap=64 * 1024)
    assert os.listdir(replica_dir) == [] and os.listdir(overlay_dir) == []


def test_a_secondary_within_the_cap_gets_its_disks(tmp_path):
    replica_dir, overlay_dir = _dirs(tmp_path)
    vm_id = str(uuid.uuid4())
    disks = (Disk(index=0, image="", size=64 * MiB),)
    made = replica.create_secondary_disks(vm_id, disks, replica_dir, overlay_dir, "root",
                                          overlay_cap=64 * MiB)
    assert all(os.path.exists(p) for d in made for p in (d.image, d.hidden, d.active))
    assert 0 < replica.overlay_usage(overlay_dir)[vm_id] <= 64 * MiB
