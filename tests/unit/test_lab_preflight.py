"""lab up's preflight refuses a lab directory whose agents could not bind VM sockets."""
from __future__ import annotations

from ftlab import preflight


def _too_long(root: str, hosts: int) -> list[preflight.Problem]:
    return [p for p in preflight.check(root, 1, hosts) if "too long" in p.what]


def test_a_lab_directory_too_long_for_the_agents_sockets_is_refused_up_front():
    short = "/var/tmp/ftn-12345678/lab"
    assert _too_long(short, 4) == []
    long = "/var/tmp/ftlab-nemesis-wh7bppxj/lab"     # the nemesis soak's first lab
    [problem] = _too_long(long, 4)
    assert "/hosts/host4/ft/run is too long" in problem.what
    assert "shorter --lab-dir" in problem.fix
