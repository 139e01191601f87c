"""scripts/build-qemu's promises that others rely on (issue 10): `--print` names a cached
build's emulator as its last stdout line and never builds; builds are keyed by source,
variant and the options and patches that go in. No build is run here (that takes
minutes: scripts/setup-debian does it); the cache is a temporary directory."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-qemu"


def _load_script():
    loader = importlib.machinery.SourceFileLoader("build_qemu_script", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = module     # dataclasses look their module up
    loader.exec_module(module)
    return module


build_qemu = _load_script()


def _print(cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "--print", *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, VDSM_FT_QEMU_CACHE=str(cache)))


def test_print_without_a_build_exits_1_and_says_how_to_build(tmp_path):
    proc = _print(tmp_path, "--variant", "el9-lookalike")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "scripts/build-qemu --variant el9-lookalike --source bookworm" in proc.stderr
    assert list(tmp_path.iterdir()) == []          # --print made nothing


def test_print_names_the_cached_build_of_the_asked_variant(tmp_path):
    for variant in ("colo", "el9-lookalike"):
        binary = tmp_path / build_qemu.make_plan("bookworm", variant).key / build_qemu.BINARY
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        proc = _print(tmp_path, "--variant", variant)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == str(binary)


def test_builds_are_keyed_by_source_variant_and_recipe():
    plans = {(s, v): build_qemu.make_plan(s, v)
             for s in ("bookworm", "trixie") for v in ("colo", "el9-lookalike")}
    assert len({p.key for p in plans.values()}) == 4
    colo, el9 = plans["bookworm", "colo"], plans["bookworm", "el9-lookalike"]
    assert colo.key.startswith("7.2+dfsg-7+deb12u18-colo-")
    assert "--enable-replication" in colo.options and colo.patches
    assert "--disable-replication" in el9.options and not el9.patches
    assert "--enable-replication" not in el9.options
    assert f"--block-drv-rw-whitelist={build_qemu.EL9_RW_ALLOWLIST}" in el9.options
    assert "quorum" not in build_qemu.EL9_RW_ALLOWLIST
    assert colo.build_id == f"7.2.22 debian-1:7.2+dfsg-7+deb12u18 colo-{colo.digest}"


def test_a_changed_patch_changes_the_key(tmp_path):
    plan = build_qemu.make_plan("bookworm", "colo")
    copy = tmp_path / plan.patches[0].name
    copy.write_bytes(plan.patches[0].read_bytes() + b"\n")
    changed = build_qemu.Plan(plan.source, plan.variant, plan.options,
                              (copy,) + plan.patches[1:])
    assert changed.key != plan.key
