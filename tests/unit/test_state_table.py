"""The state table decides every (state, observation) pair as it did when its safety
rows were written once: each VmState against all combinations of Observation's
booleans, compared with a snapshot of the table before that change
(state_table_before.json), apart from the changes listed in `intended`. Booleans added
since (`ADDED`) were False for every decision in the snapshot.

The snapshot was written once from a8a2383's table with this module's `decisions()`, over
FIELDS alone: per state, one character per observation (in `snapshot_index` order),
indexing the sorted list of distinct decisions."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from vdsm_ft.agent import states
from vdsm_ft.api import VmState

SNAPSHOT = Path(__file__).with_name("state_table_before.json")
# Observation's booleans, in the snapshot's bit order (the first is the highest bit).
FIELDS = ("is_primary", "launched", "qemu_alive", "in_colo", "stopping",
          "disable_requested", "peer_assigned", "peer_lost", "image_stale",
          "move_requested", "test_failover_requested")
ADDED = ("launch_overdue", "dropped_by_primary")
CODES = "0123456789abcdefghijklmnopqrstuvwxyz"


def observations() -> list[states.Observation]:
    fields = FIELDS + ADDED
    return [states.Observation(**dict(zip(fields, bits)))
            for bits in itertools.product((False, True), repeat=len(fields))]


def snapshot_index(seen: states.Observation) -> int:
    """The position of `seen`'s snapshot fields among the snapshot's observations."""
    index = 0
    for name in FIELDS:
        index = index * 2 + getattr(seen, name)
    return index


def decision(row: states.Row | None) -> str:
    if row is None:
        return "-"
    leads = ", ".join(sorted(s.value for s in row.leads_to))
    enters = f" (enters {row.entering.value})" if row.entering else ""
    return f"{row.action.value}{enters} -> {leads}"


def decisions() -> dict[str, list[str]]:
    return {state.value: [decision(states.next_row(state, seen))
                          for seen in observations()] for state in VmState}


def snapshot() -> dict[str, list[str]]:
    data = json.loads(SNAPSHOT.read_text())
    assert tuple(data["fields"]) == FIELDS
    return {state: [data["decisions"][CODES.index(c)] for c in column]
            for state, column in data["table"].items()}


def intended(state: VmState, seen: states.Observation, before: str) -> str:
    """What the table decides now where it was changed on purpose."""
    # A primary still not launched [agent] launch_timeout after its prepare is removed
    # (issue 16): a failed or forged start must not hold a cap slot. Only an intentional
    # stop, a safety row, comes first.
    if state is VmState.STARTING and seen.launch_overdue and seen.is_primary and \
            not seen.launched and not seen.qemu_alive and not seen.stopping:
        return "forget -> Down"
    # A secondary its primary dropped (unprotect) is torn down by its own loop, no
    # longer forgotten in the request thread (issue 11). Only the safety rows come first,
    # and its QEMU gone is Down anyway; in Protected and Failing Over it comes before the
    # failover, which the primary's leaving COLO would otherwise start.
    if seen.dropped_by_primary and not seen.is_primary and seen.qemu_alive and (
            state is VmState.FAILING_OVER or
            state in (VmState.STARTING, VmState.PROTECTED) and not seen.stopping):
        return "drop_secondary -> Down"
    action, _, leads = before.partition(" -> ")
    # Syncing and Failing Over are entered through their rows, no longer written by
    # the actions themselves.
    if action == "protect":
        return f"protect (enters Syncing) -> {leads}"
    if state is VmState.PROTECTED and action == "fail_over":
        return f"fail_over (enters Failing Over) -> {leads}"
    return before


def test_every_state_and_observation_is_decided_as_before():
    before = snapshot()
    now = decisions()
    assert set(now) == set(before)
    differ = [(state, seen, was, now[state.value][i])
              for state in VmState for i, seen in enumerate(observations())
              for was in [before[state.value][snapshot_index(seen)]]
              if now[state.value][i] != intended(state, seen, was)]
    assert not differ, f"{len(differ)} decisions changed, e.g. {differ[:3]}"
    assert sum(len(column) for column in now.values()) == \
        len(VmState) * 2 ** len(FIELDS + ADDED)
