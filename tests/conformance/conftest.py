"""Which QEMUs the COLO conformance suite runs on.

`--emulators PATH[:PATH...]` or `$VDSM_FT_CONFORMANCE_EMULATORS` (the same, colon-
separated) name them; by default, the lab's COLO QEMU (ftlab.qemubuild: the project's
build when it is there) and Debian's own /usr/bin/qemu-system-x86_64. Every test of the
suite runs once per emulator; its id names the build.
"""
from __future__ import annotations

import os

import pytest

from ftlab import qemubuild

ENV = "VDSM_FT_CONFORMANCE_EMULATORS"


def pytest_addoption(parser):
    parser.addoption("--emulators", default=None, metavar="PATH[:PATH...]",
                     help="QEMU binaries for the COLO conformance suite (tests/conformance; "
                          f"default ${ENV}, else the lab's COLO QEMU and Debian's own)")


def emulators(config) -> list[str]:
    given = config.getoption("--emulators") or os.environ.get(ENV)
    if given:
        paths = [p for p in given.split(":") if p]
        for p in paths:
            if not os.path.isabs(p) or not os.path.isfile(p):
                raise pytest.UsageError(f"conformance emulator {p!r} is not an existing "
                                        "absolute path to a QEMU binary")
        return paths
    chosen = [qemubuild.ft_emulator().path, qemubuild.DEBIAN_QEMU]
    return list(dict.fromkeys(chosen))


def emulator_id(path: str) -> str:
    """A readable test id: the build-qemu cache key, else the path."""
    parts = path.split(os.sep)
    if "vdsm-ft" in parts and parts[-2:-1] == ["bin"]:
        return parts[-3]
    return path


def pytest_generate_tests(metafunc):
    if "emulator" in metafunc.fixturenames:
        paths = emulators(metafunc.config)
        metafunc.parametrize("emulator", paths, ids=[emulator_id(p) for p in paths],
                             scope="module")


def pytest_report_header(config):
    return [f"COLO conformance emulators: {', '.join(emulators(config))}"]
