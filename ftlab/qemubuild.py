"""Which QEMU runs the lab's and the tests' FT VMs: the one place that chooses.

In this order:
1. `$VDSM_FT_EMULATOR`, an absolute path: the caller's explicit choice;
2. the project's COLO build, when `scripts/build-qemu --print --variant colo` finds it in
   its cache (/var/cache/vdsm-ft/qemu/...);
3. Debian's own /usr/bin/qemu-system-x86_64, said loudly on stderr: it lacks the
   project's patches (docs/qemu.md). With `$VDSM_FT_REQUIRE_COLO_BUILD=1` (CI, once the
   build step has run) this is an error instead.

`describe()` is one line saying which binary and why; pytest prints it in its header
(tests/conftest.py) and the lab's supervisor logs it.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SCRIPT = os.path.join(REPO, "scripts", "build-qemu")
DEBIAN_QEMU = "/usr/bin/qemu-system-x86_64"
EMULATOR_ENV = "VDSM_FT_EMULATOR"
REQUIRE_ENV = "VDSM_FT_REQUIRE_COLO_BUILD"
PRINT_TIMEOUT = 60.0
COLO = "colo"
EL9_LOOKALIKE = "el9-lookalike"


class QemuBuildMissing(RuntimeError):
    """The QEMU a caller asked for is not built (the message says how to build it)."""


@dataclass(frozen=True)
class Choice:
    path: str
    source: str          # "VDSM_FT_EMULATOR", "project build" or "Debian fallback"
    why: str

    @property
    def project_build(self) -> bool:
        return self.source == "project build"


def built(variant: str = COLO, source: str | None = None) -> str | None:
    """The emulator of a cached project build (`scripts/build-qemu --print`), or None
    when that build is not there (yet)."""
    if not os.path.exists(BUILD_SCRIPT):
        return None
    argv = [BUILD_SCRIPT, "--print", "--variant", variant]     # a Python script
    if source:
        argv += ["--source", source]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PRINT_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.path.isfile(lines[-1].strip()):
        return None
    return lines[-1].strip()


def require(variant: str, source: str | None = None) -> str:
    """`built`, or QemuBuildMissing naming the command that builds it."""
    path = built(variant, source)
    if path is None:
        extra = f" --source {source}" if source else ""
        raise QemuBuildMissing(f"the {variant}{' ' + source if source else ''} QEMU is not "
                               f"built: run `scripts/build-qemu --variant {variant}{extra}`")
    return path


@functools.cache
def ft_emulator() -> Choice:
    """The QEMU for FT VMs in this process (decided once)."""
    asked = os.environ.get(EMULATOR_ENV)
    if asked:
        if not os.path.isabs(asked) or not os.path.isfile(asked):
            raise QemuBuildMissing(f"${EMULATOR_ENV}={asked!r} is not an existing absolute "
                                   "path to a QEMU binary")
        return Choice(asked, EMULATOR_ENV, f"set by ${EMULATOR_ENV}")
    path = built(COLO)
    if path is not None:
        return Choice(path, "project build", "scripts/build-qemu --print --variant colo")
    why = ("scripts/build-qemu --print --variant colo found no build; run "
           "`scripts/build-qemu --variant colo` to use the project's COLO QEMU")
    if os.environ.get(REQUIRE_ENV) == "1":
        raise QemuBuildMissing(f"${REQUIRE_ENV}=1 but {why}")
    print(f"ftlab: WARNING: FT VMs run on Debian's {DEBIAN_QEMU}, not the project's COLO "
          f"build: {why}", file=sys.stderr)
    return Choice(DEBIAN_QEMU, "Debian fallback", why)


def describe(choice: Choice | None = None) -> str:
    c = choice or ft_emulator()
    return f"FT VMs run on {c.path} ({c.source}: {c.why})"
