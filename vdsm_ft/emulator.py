"""What one QEMU binary is: its version, its build id and its machine types.

FT VMs run on the QEMU that `[qemu] emulator` names (vdsm_ft.hostconfig): the project's
COLO build, since a distribution's qemu-kvm may be unable to do COLO (docs/qemu.md).
Everything here is asked from the binary itself (`--version`, `-machine help`), each
with its own timeout, and kept per file (path, inode, mtime, size): an upgrade replaces
the file, so the next question asks it again.

The build id tells two builds of one version apart (their patch sets), from either
- a one-line file `<binary>.build-id` beside the binary, e.g. `7.2.22
  qemu=1:7.2+dfsg-7+deb12u18 colo patches-1a2b3c4d` (for packages), or
- scripts/build-qemu's `<prefix>/build-info.json` for `<prefix>/bin/qemu-system-x86_64`,
  whose prefix is named after the source version, variant and the hash of its configure
  options and patches.
A QEMU without either (a distribution's) is known by its version line. Both sides of a
COLO pair must have the same identity (`Emulator.identity`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

ASK_TIMEOUT = 5.0
BUILD_ID_SUFFIX = ".build-id"
BUILD_INFO = "build-info.json"
BUILD_ID_MAX = 512
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?[^\n]*")
_MACHINE_RE = re.compile(r"^(\S+)\s+(.*)$")
_ALIAS_RE = re.compile(r"\(alias of (\S+)\)")


class EmulatorError(Exception):
    """The binary cannot be used or asked; the message says which file and why."""


@dataclass(frozen=True)
class Emulator:
    path: str
    version: tuple[int, int, int]
    version_line: str                 # "QEMU emulator version 7.2.22 (Debian ...)"
    build_id: str                     # the `<binary>.build-id` line; "" if none
    machines: tuple[str, ...]         # every machine type, aliases included
    aliases: tuple[tuple[str, str], ...] = ()   # ("pc", "pc-i440fx-7.2"), ...

    @property
    def identity(self) -> str:
        """What must be equal on both sides of a pair: the build id, else the version."""
        return self.build_id or self.version_line

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def resolve(self, machine: str) -> str:
        """The concrete machine type behind an alias (`pc` -> `pc-i440fx-7.2`)."""
        return dict(self.aliases).get(machine, machine)

    @property
    def i440fx(self) -> str | None:
        """This QEMU's own (newest) i440fx type: what `pc` stands for, else the last one."""
        if "pc" in dict(self.aliases):
            return self.resolve("pc")
        found = [m for m in self.machines if m.startswith("pc-i440fx-")]
        return found[0] if found else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Emulator":
        return cls(path=str(data["path"]), version=tuple(int(v) for v in data["version"]),
                   version_line=str(data["version_line"]), build_id=str(data["build_id"]),
                   machines=tuple(str(m) for m in data["machines"]),
                   aliases=tuple((str(a), str(b)) for a, b in data.get("aliases", ())))


class MachineNotAvailable(EmulatorError):
    """The VM's machine type has no counterpart in this QEMU."""


def colo_machine(engine_machine: str, emu: Emulator) -> str:
    """The machine type an FT VM runs with on `emu`, the same on both sides of a pair.

    The engine sends its cluster's type: on EL9 clusters `pc-i440fx-rhel7.6.0`, which only
    Red Hat's QEMU has (docs/qemu.md, "Why the distribution's qemu-kvm cannot be used on
    EL9 oVirt hosts"). A type this QEMU has is kept (an alias resolved, so both sides name
    the same one); an i440fx type it lacks becomes its own newest i440fx type; q35 likewise
    its own q35 (refused on QEMUs whose COLO crashes with q35, domxml._refuse_q35).
    """
    machine = engine_machine or "pc"
    if machine in emu.machines:
        return emu.resolve(machine)
    if "q35" in machine:
        if "q35" in emu.machines:
            return emu.resolve("q35")
        raise MachineNotAvailable(f"{emu.path} (QEMU {emu.version_text}) has no q35 "
                                  f"machine type for the VM's {machine}")
    if machine.startswith("pc"):
        own = emu.i440fx
        if own:
            return own
    raise MachineNotAvailable(f"{emu.path} (QEMU {emu.version_text}) has no i440fx "
                              f"machine type for the VM's {machine}: it cannot run FT VMs; "
                              "install vdsm-ft-qemu (docs/qemu.md)")


def build_id_path(binary: str) -> str:
    return binary + BUILD_ID_SUFFIX


def build_info_path(binary: str) -> str:
    """scripts/build-qemu's description of a cached build: `<prefix>/build-info.json`."""
    return os.path.join(os.path.dirname(os.path.dirname(binary)), BUILD_INFO)


def _run(binary: str, args: Sequence[str], timeout: float) -> str:
    try:
        proc = subprocess.run([binary, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EmulatorError(f"{binary} {' '.join(args)} did not answer within "
                            f"{timeout:g}s") from None
    except OSError as e:
        raise EmulatorError(f"cannot run {binary}: {e}") from None
    if proc.returncode != 0:
        raise EmulatorError(f"{binary} {' '.join(args)} failed ({proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[:300]!r}")
    return proc.stdout


def _read_build_id(binary: str) -> str:
    try:
        with open(build_id_path(binary), encoding="utf-8", errors="replace") as f:
            lines = f.read(BUILD_ID_MAX).strip().splitlines()
        if lines:
            return lines[0].strip()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise EmulatorError(f"cannot read {build_id_path(binary)}: {e}") from None
    info = build_info_path(binary)
    try:
        with open(info, encoding="utf-8") as f:
            data = json.load(f)
        # The prefix's name carries the hash of the configure options and patches.
        return (f"{data['upstream_version']} {data['source_package']} {data['variant']} "
                f"{os.path.basename(os.path.dirname(info))}")
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmulatorError(f"{info} is not a build-qemu build description: {e}") from None


def parse_machines(text: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """`-machine help` output -> (machine names, (alias, target) pairs)."""
    names: list[str] = []
    aliases: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = _MACHINE_RE.match(line)
        if not m or line.startswith("Supported machines"):
            continue
        names.append(m.group(1))
        alias = _ALIAS_RE.search(m.group(2))
        if alias:
            aliases.append((m.group(1), alias.group(1)))
    return tuple(names), tuple(aliases)


def identify(binary: str, timeout: float = ASK_TIMEOUT) -> Emulator:
    """Ask `binary` what it is (two short runs, each bounded by `timeout`)."""
    if not os.path.isabs(binary):
        raise EmulatorError(f"the QEMU emulator must be an absolute path, not {binary!r}")
    if not os.path.exists(binary):
        raise EmulatorError(f"{binary} does not exist: install vdsm-ft-qemu (the project's "
                            "COLO QEMU, docs/qemu.md) or set [qemu] emulator in the host "
                            "config")
    out = _run(binary, ["--version"], timeout)
    m = _VERSION_RE.search(out)
    if not m:
        raise EmulatorError(f"{binary} --version gave no QEMU version: {out.strip()[:200]!r}")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    machines, aliases = parse_machines(_run(binary, ["-machine", "help"], timeout))
    return Emulator(path=binary, version=version, version_line=m.group(0).strip(),
                    build_id=_read_build_id(binary), machines=machines, aliases=aliases)


def file_key(binary: str) -> tuple[int, int, int, int]:
    """What changes when the file is replaced or rewritten: (inode, device, mtime, size),
    the build-id file's mtime folded in. OSError if the binary is missing."""
    st = os.stat(binary)
    bid = 0
    for path in (build_id_path(binary), build_info_path(binary)):
        try:
            bid ^= os.stat(path).st_mtime_ns
        except OSError:
            pass
    return (st.st_ino, st.st_dev, st.st_mtime_ns ^ bid, st.st_size)


class CachedEmulators:
    """`identify` for the agent, which prepares every start: a binary is asked again
    only when its file changed (`file_key`)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int, int], Emulator]] = {}
        self._lock = threading.Lock()

    def __call__(self, binary: str) -> Emulator:
        try:
            key = file_key(binary)
        except OSError:
            return identify(binary)             # fails, saying why
        with self._lock:
            known = self._known.get(binary)
        if known is not None and known[0] == key:
            return known[1]
        emu = identify(binary)
        with self._lock:
            self._known[binary] = (key, emu)
        return emu
