"""The project's QEMU recipe (issue 10, item 1): one configure-options list and one
patches/ directory, used alike by scripts/build-qemu (through packaging/qemu/recipe.py)
and by the EL9 spec packaging/qemu/vdsm-ft-qemu.spec (through its own Lua, checked
here with the real rpmspec)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QEMU_DIR = REPO / "packaging" / "qemu"
SPEC = QEMU_DIR / "vdsm-ft-qemu.spec"
# Debian 12's 7.2.22 and trixie's 10.0.13: the two candidates (docs/qemu.md).
VERSIONS = ("7.2.22", "10.0.13")


def _load_recipe():
    spec = importlib.util.spec_from_file_location("qemu_recipe", QEMU_DIR / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()


def _rpmspec(*args: str, version: str | None = None) -> str:
    if shutil.which("rpmspec") is None:
        pytest.fail("rpmspec is not installed (scripts/setup-debian installs Debian's rpm)")
    defines = ["--define", f"_sourcedir {QEMU_DIR}",
               "--define", f"vdsm_ft_patchdir {QEMU_DIR / 'patches'}"]
    if version:
        defines += ["--define", f"qemu_version {version}"]
    proc = subprocess.run(["rpmspec", *defines, *args, str(SPEC)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _spec_patches(parsed: str) -> list[str]:
    return re.findall(r"^Patch\d+:\s*(\S+)\s*$", parsed, flags=re.M)


def _spec_configure_options(parsed: str) -> list[str]:
    """The quoted options of the spec's ../configure call (its own install paths and
    flags are unquoted and not part of the shared list). rpmspec -P prints no %build
    header, so the call is found by itself."""
    calls = parsed.split("\n../configure \\\n")
    assert len(calls) == 2, "expected one ../configure call in the spec"
    call = calls[1].split("\n\n", 1)[0]
    return [m.replace("'\\''", "'") for m in re.findall(r"^\s+'(.*)' \\$", call, flags=re.M)]


@pytest.mark.parametrize("version", VERSIONS)
def test_spec_takes_exactly_the_shared_options_and_patches(version):
    parsed = _rpmspec("-P", version=version)
    assert _spec_patches(parsed) == [p.name for p in recipe.patches(version)]
    assert _spec_configure_options(parsed) == recipe.configure_options(version)


def test_spec_default_version_builds_the_upstream_tarball_into_libexec():
    parsed = _rpmspec("-P")
    version = _rpmspec("-q", "--qf", "%{VERSION}\n").strip()
    assert f"Source0:        https://download.qemu.org/qemu-{version}.tar.xz" in parsed
    files = parsed.split("\n%files\n", 1)[1]
    assert "/usr/libexec/vdsm-ft/qemu-system-x86_64\n" in files
    # vdsm_ft/emulator.py tells builds apart by it.
    assert "/usr/libexec/vdsm-ft/qemu-system-x86_64.build-id\n" in files
    post = parsed.split("\n%post\n", 1)[1].split("\n%postun\n", 1)[0]
    assert "semanage fcontext -a -t qemu_exec_t" in post and "restorecon" in post
    requires = set(_rpmspec("-q", "--requires").split())
    assert {"seabios-bin", "seavgabios-bin", "ipxe-roms-qemu"} <= requires


@pytest.mark.parametrize("version", VERSIONS)
def test_shared_options_build_what_colo_needs(version):
    options = recipe.configure_options(version)
    assert "--target-list=x86_64-softmmu" in options
    assert "--enable-replication" in options
    assert not [o for o in options if o.startswith("--block-drv")]
    assert [o for o in options if o.startswith("--firmwarepath=")]
    assert ("--enable-colo-proxy" in options) == (version != "7.2.22")


def test_patch_subsets_per_version():
    assert [p.name for p in recipe.patches("7.2.22")] == [
        "0001-colo-savevm-live-state-under-bql-7.2.patch",
        "0002-ram_addr-rearm-tcg-notdirty-traps-in-fast-sync.patch",
        "0003-migration-socket-tcp-nodelay.patch",
        "0004-monitor-cont-in-inmigrate-only-arms-autostart.patch",
        "0005-filter-rewriter-no-offset-from-a-handshake-a-checkpoint-cut.patch",
        "0006-colo-primary-stops-before-the-checkpoint-handshake-7.2.patch",
        "0007-colo-compare-hold-a-syn-whose-isns-differ.patch",
        "0008-colo-compare-deliver-the-packets-it-releases-at-removal-7.2.patch"]
    # 10.0 has upstream the dirty-tracking fix (03bfc2188f06) and cont-in-inmigrate
    # behaviour, and bql_lock().
    assert [p.name for p in recipe.patches("10.0.13")] == [
        "0001-colo-savevm-live-state-under-bql.patch",
        "0003-migration-socket-tcp-nodelay.patch",
        "0005-filter-rewriter-no-offset-from-a-handshake-a-checkpoint-cut.patch",
        "0006-colo-primary-stops-before-the-checkpoint-handshake.patch",
        "0007-colo-compare-hold-a-syn-whose-isns-differ.patch",
        "0008-colo-compare-deliver-the-packets-it-releases-at-removal.patch"]


def test_every_patch_file_is_in_the_series():
    series = (QEMU_DIR / "patches" / "series").read_text()
    for patch in (QEMU_DIR / "patches").glob("*.patch"):
        assert re.search(rf"^{re.escape(patch.name)}\b", series, flags=re.M), patch.name


def test_a_mistyped_condition_is_an_error_not_a_line_for_every_version(tmp_path):
    listing = tmp_path / "configure-options"
    listing.write_text("--enable-kvm\n--enable-colo-proxy  # qemu => 8.1\n")
    with pytest.raises(recipe.RecipeError, match="not a condition"):
        recipe.selected(listing, "7.2.22")


def test_conditions_compare_whole_versions(tmp_path):
    listing = tmp_path / "series"
    listing.write_text("a  # qemu < 9.0\nb  # qemu >= 9.0\nc  # qemu <= 10.0.13\nd\n")
    assert recipe.selected(listing, "8.2.10") == ["a", "c", "d"]
    assert recipe.selected(listing, "9.0") == ["b", "c", "d"]
    assert recipe.selected(listing, "10.0.14") == ["b", "d"]
