"""The COLO conformance suite: tier 1's cycle against any QEMU, to guard QEMU upgrades.

For each emulator (tests/conformance/conftest.py): it probes as COLO-capable; then tier
1's own tests, imported from tests/integration/test_tier1_colo.py and run here with
this module's `hosts` and `pair` (both members on that emulator): protect, checkpoints
rising, failover both ways (primary killed, secondary killed), re-protect twice, and the
three block-level data rules (a covered write survives, an uncovered write on a dying
primary is rolled back, a never-written region stays empty). Results per build go in
docs/qemu.md.
"""
from __future__ import annotations

import pytest

from tests.integration.test_tier1_colo import (  # noqa: F401 - collected here, per emulator
    idle_pair, test_primary_killed_secondary_takes_over_with_checkpointed_data,
    test_protect_reaches_protected_with_replication_and_checkpoints,
    test_reprotect_twice_a_to_b_to_c,
    test_secondary_killed_primary_carries_on_and_later_writes_land, three_hosts)
from vdsm_ft import qemu_probe

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts(kvm, emulator):
    yield from three_hosts("cf")


@pytest.fixture
def pair(hosts, emulator):
    yield from idle_pair(hosts, "cf", emulator)


def test_the_probe_finds_it_colo_capable(emulator, tmp_path):
    result = qemu_probe.probe(emulator, str(tmp_path))
    assert result.capable, result.reason
