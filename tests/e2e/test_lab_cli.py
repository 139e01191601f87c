"""The lab as a newcomer uses it: `lab up`, `lab demo` (PASS), `lab status`, `lab down`,
each as its own process; and `lab down` leaves the machine as it found it, also after
the lab itself crashed."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from ftlab.labstate import read_state

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

DEMO_BUDGET_S = 600


def _ok(proc, what: str) -> str:
    assert proc.returncode == 0, (f"{what} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def test_lab_up_demo_passes_and_down_leaves_nothing(lab_cli, take_snapshot):
    before = take_snapshot(lab_cli.lab_dir)
    assert not before.lab_dir_exists and not before.processes

    out = _ok(lab_cli.run("up"), "lab up")
    assert "lab up in" in out
    state = read_state(lab_cli.lab_dir)
    assert state.state == "ready" and len(state.hosts) == 3
    password = open(state.password_file).read().strip()
    assert os.stat(state.password_file).st_mode & 0o777 == 0o600
    assert password and password not in out

    again = lab_cli.run("up")
    assert again.returncode == 1 and "lab down" in again.stderr, again.stderr

    t0 = time.monotonic()
    demo = lab_cli.run("demo", timeout=DEMO_BUDGET_S + 60)
    took = time.monotonic() - t0
    print(demo.stdout)
    out = _ok(demo, "lab demo")
    assert out.rstrip().splitlines()[-1] == "PASS"
    assert took < DEMO_BUDGET_S, f"the demo took {took:.0f}s"
    assert re.search(r"covered blocks lost: 0 ", out)
    assert len(re.findall(r"ok   failover to host\d: \d+ ms", out)) == 2
    # After each failover the survivor copied the disk back onto the engine's image.
    assert len(re.findall(r"ok   the storage-domain image is current again: COPY-BACK",
                          out)) == 2, out
    # After each failover the survivor is the VM itself in the engine (issue 19).
    for line in (r"ok   demo-\w+ is Up by its own id on host\d in the engine",
                 r"ok   exactly one VM named demo-\w+", r"ok   no external VM of the old "
                 r"secondary remains", r"ok   a VDSM restart on host\d leaves demo-\w+ "
                 r"running", r"ok   an engine event says what happened"):
        assert len(re.findall(line, out)) == 2, (line, out)
    assert len(re.findall(r"ok   demo-\w+'s disk attachments are all active", out)) == 3
    assert password not in out + demo.stderr

    # `demo --guest linux` (tier 3, or 3T under TCG here) is tests/e2e/test_tier3t.py.

    status = _ok(lab_cli.run("status"), "lab status")
    assert re.search(r"^demo-\w+ ", status, re.M), status

    during = take_snapshot(lab_cli.lab_dir)
    assert during.namespaces and during.processes and during.lab_dir_exists

    down = _ok(lab_cli.run("down"), "lab down")
    assert "removed namespace ftlab-wire" in down
    assert take_snapshot(lab_cli.lab_dir) == before


def test_lab_down_after_the_lab_itself_crashed(lab_cli, take_snapshot):
    before = take_snapshot(lab_cli.lab_dir)
    _ok(lab_cli.run("up"), "lab up")
    state = read_state(lab_cli.lab_dir)
    os.kill(state.supervisor_pid, signal.SIGKILL)

    status = lab_cli.run("status")
    assert status.returncode == 1 and "lab down" in status.stderr, status.stderr

    _ok(lab_cli.run("down"), "lab down")
    assert take_snapshot(lab_cli.lab_dir) == before
