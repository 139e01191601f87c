"""What a QEMU binary is (`vdsm_ft.emulator`): asked from real binaries (this host's
QEMU, and small scripts standing in for other builds), and the machine type mapping."""
from __future__ import annotations

import json
import os
import time

import pytest

from ftlab import qemubuild
from vdsm_ft import emulator

DEBIAN = qemubuild.DEBIAN_QEMU


def _fake_qemu(path, version: str, machines: str, asked=None):
    log = f"echo x >> {asked}\n" if asked else ""
    path.write_text(f"""#!/bin/sh
{log}case "$1" in
--version) echo 'QEMU emulator version {version}';;
-machine) printf '%s\\n' 'Supported machines are:' {machines};;
esac
""")
    path.chmod(0o755)
    return str(path)


RHEL_MACHINES = ("'pc-i440fx-rhel7.6.0   RHEL 7.6.0 PC (i440FX + PIIX, 1996) (deprecated)' "
                 "'pc                   RHEL 10 PC (alias of pc-q35-rhel10.0.0)' "
                 "'q35                  RHEL 10 (alias of pc-q35-rhel10.0.0)' "
                 "'pc-q35-rhel10.0.0    RHEL 10 (default)' 'none   empty machine'")


def test_debian_qemu_is_identified_with_its_own_i440fx():
    emu = emulator.identify(DEBIAN)
    assert emu.version >= (7, 2, 0)
    assert emu.version_line.startswith("QEMU emulator version ")
    assert "pc" in emu.machines and emu.i440fx and emu.i440fx.startswith("pc-i440fx-")
    assert emu.resolve("pc") == emu.i440fx
    # An EL9 cluster's machine type is mapped to this QEMU's own i440fx.
    assert emulator.colo_machine("pc-i440fx-rhel7.6.0", emu) == emu.i440fx
    assert emulator.colo_machine("", emu) == emu.i440fx
    assert emulator.colo_machine("pc-i440fx-6.2", emu) == "pc-i440fx-6.2"
    assert emulator.colo_machine("q35", emu).startswith("pc-q35-")
    assert emulator.Emulator.from_dict(emu.to_dict()) == emu


def test_build_id_file_is_the_identity(tmp_path):
    qemu = _fake_qemu(tmp_path / "qemu", "7.2.22", "'pc-i440fx-7.2  Standard PC'")
    plain = emulator.identify(qemu)
    assert plain.build_id == "" and plain.identity == "QEMU emulator version 7.2.22"
    (tmp_path / "qemu.build-id").write_text("7.2.22 debian-1:7.2+dfsg-7 patches-abc123\n")
    built = emulator.identify(qemu)
    assert built.identity == built.build_id == "7.2.22 debian-1:7.2+dfsg-7 patches-abc123"
    # Without a `pc` alias the first (newest) i440fx type listed is this QEMU's own.
    assert emulator.colo_machine("pc-i440fx-rhel7.6.0", built) == "pc-i440fx-7.2"


def test_a_build_qemu_cache_entry_is_known_by_its_build_info(tmp_path):
    prefix = tmp_path / "7.2+dfsg-7+deb12u18-colo-0123456789ab"
    (prefix / "bin").mkdir(parents=True)
    qemu = _fake_qemu(prefix / "bin" / "qemu-system-x86_64", "7.2.22", "'pc-i440fx-7.2  PC'")
    (prefix / "build-info.json").write_text(json.dumps({
        "source_package": "qemu=1:7.2+dfsg-7+deb12u18", "upstream_version": "7.2.22",
        "variant": "colo", "patches": ["0001-a.patch"]}))
    assert emulator.identify(qemu).identity == (
        "7.2.22 qemu=1:7.2+dfsg-7+deb12u18 colo 7.2+dfsg-7+deb12u18-colo-0123456789ab")
    (prefix / "build-info.json").write_text("{}")
    with pytest.raises(emulator.EmulatorError, match="not a build-qemu build description"):
        emulator.identify(qemu)


def test_a_qemu_without_i440fx_cannot_run_ft_vms(tmp_path):
    emu = emulator.identify(_fake_qemu(tmp_path / "qemu", "10.1.0", RHEL_MACHINES))
    assert emulator.colo_machine("pc-i440fx-rhel7.6.0", emu) == "pc-i440fx-rhel7.6.0"
    el10 = emulator.identify(_fake_qemu(tmp_path / "q10", "10.1.0",
                                        "'q35  RHEL (alias of pc-q35-rhel10.0.0)' "
                                        "'pc-q35-rhel10.0.0  RHEL 10'"))
    with pytest.raises(emulator.MachineNotAvailable, match="no i440fx machine type"):
        emulator.colo_machine("pc-i440fx-rhel7.6.0", el10)


def test_missing_or_broken_binaries_say_what_to_do(tmp_path):
    with pytest.raises(emulator.EmulatorError, match="does not exist: install vdsm-ft-qemu"):
        emulator.identify("/nonexistent/qemu-system-x86_64")
    with pytest.raises(emulator.EmulatorError, match="absolute path"):
        emulator.identify("qemu-system-x86_64")
    bad = tmp_path / "bad"
    bad.write_text("#!/bin/sh\necho nope\n")
    bad.chmod(0o755)
    with pytest.raises(emulator.EmulatorError, match="gave no QEMU version"):
        emulator.identify(str(bad))
    hung = tmp_path / "hung"
    hung.write_text("#!/bin/sh\nexec sleep 30\n")
    hung.chmod(0o755)
    start = time.monotonic()
    with pytest.raises(emulator.EmulatorError, match="did not answer within"):
        emulator.identify(str(hung), timeout=0.5)
    assert time.monotonic() - start < 5


def test_the_agent_asks_each_binary_once_until_it_changes(tmp_path):
    asked = tmp_path / "asked"
    qemu = _fake_qemu(tmp_path / "qemu", "9.2.1", "'pc-i440fx-9.2  PC'", asked)
    cached = emulator.CachedEmulators()
    assert cached(qemu).version == cached(qemu).version == (9, 2, 1)
    assert asked.read_text() == "x\nx\n"          # --version and -machine help, once
    _fake_qemu(tmp_path / "qemu", "11.0.0", "'pc-i440fx-11.0  PC'", asked)
    os.utime(qemu, ns=(0, time.time_ns() + 10**9))      # an upgrade replaced the binary
    assert cached(qemu).version == (11, 0, 0)
    (tmp_path / "qemu.build-id").write_text("11.0.0 patches-1\n")
    assert cached(qemu).build_id == "11.0.0 patches-1"  # a new build id counts too
    with pytest.raises(emulator.EmulatorError, match="does not exist"):
        cached("/nonexistent/qemu")
