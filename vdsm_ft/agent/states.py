"""The per-VM state machine, as one table.

Each reconcile step observes the VM (its QEMU, its COLO mode, the peer, what was asked)
and takes the first row whose state and condition match. The row names one action, the
state it enters while that action runs (if any) and the states the action may lead to;
anything else is a bug and is refused. States are the ones admins see (api.VmState).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from vdsm_ft.api import VmState

S = VmState


@dataclass(frozen=True)
class Observation:
    """What one reconcile step sees, all booleans so the table reads plainly."""

    is_primary: bool
    launched: bool           # the domain was started (a hook registers before that)
    qemu_alive: bool
    in_colo: bool            # query-colo-status mode is this side's role
    stopping: bool           # an intentional stop (hook or guest shutdown) was seen
    disable_requested: bool  # unprotect / suspend
    peer_assigned: bool      # the poller named a peer (primary) or a pair exists
    peer_lost: bool          # heartbeat + probe, or COLO itself, says the peer is gone
    image_stale: bool = False  # runs on its replica; the engine's image is behind
    move_requested: bool = False  # restart-secondary / migrate-secondary
    test_failover_requested: bool = False
    # A primary still not launched [agent] launch_timeout after its `prepare`.
    launch_overdue: bool = False
    dropped_by_primary: bool = False  # its primary's unprotect (a secondary's record)

    def holds(self, condition: "When") -> bool:
        return CONDITIONS[condition](self)


class When(str, Enum):
    """A row's condition, by the words the table shows."""

    ALWAYS = "always"
    QEMU_GONE = "qemu gone"
    STOPPING = "stopping"
    DISABLE_REQUESTED = "disable requested"
    TEST_FAILOVER = "test failover requested"
    PEER_LOST = "peer lost"
    PRIMARY_ALONE = "primary, no peer"
    PRIMARY_PEER_NAMED = "primary, peer named"
    IN_COLO = "in COLO"
    ENABLED_AGAIN = "enabled again"
    MOVE_REQUESTED = "move requested"
    IMAGE_STALE = "image stale"
    IMAGE_STALE_QEMU_GONE = "image stale, QEMU gone"
    NEVER_LAUNCHED = "never launched"
    DROPPED = "dropped by its primary"


class Action(str, Enum):
    """A row's action; the controller maps each one to its method
    (controller.VmController.ACTIONS), NONE changes the state only."""

    NONE = "none"
    ABANDON = "abandon"
    COPY_BACK = "copy_back"
    DROP_SECONDARY = "drop_secondary"
    FAIL_OVER = "fail_over"
    FORGET = "forget"
    MARK_DOWN = "mark_down"
    MOVE_SECONDARY = "move_secondary"
    PROTECT = "protect"
    RETRY_COPY_BACK = "retry_copy_back"
    TAKE_IDENTITY = "take_identity"
    TEARDOWN = "teardown"
    TEST_FAILOVER = "test_failover"
    UNPROTECT = "unprotect"


CONDITIONS: dict[When, Callable[[Observation], bool]] = {
    When.ALWAYS: lambda o: True,
    # A secondary's record is written just before its domain starts, so one without a
    # QEMU (its host crashed mid-start) is gone too.
    When.QEMU_GONE: lambda o: (o.launched or not o.is_primary) and not o.qemu_alive,
    When.STOPPING: lambda o: o.stopping,
    When.DISABLE_REQUESTED: lambda o: o.disable_requested,
    When.TEST_FAILOVER: lambda o: o.test_failover_requested and o.is_primary,
    When.PEER_LOST: lambda o: o.peer_lost,
    When.PRIMARY_ALONE: lambda o: o.is_primary and o.launched and o.qemu_alive
    and not o.peer_assigned,
    When.PRIMARY_PEER_NAMED: lambda o: o.is_primary and o.qemu_alive and o.peer_assigned,
    When.IN_COLO: lambda o: o.in_colo,
    When.ENABLED_AGAIN: lambda o: not o.disable_requested,
    When.MOVE_REQUESTED: lambda o: o.move_requested,
    When.IMAGE_STALE: lambda o: o.image_stale and o.is_primary and o.qemu_alive,
    When.IMAGE_STALE_QEMU_GONE: lambda o: o.image_stale and o.is_primary
    and not o.qemu_alive,
    # Never while a QEMU runs: a start whose `started` was lost is adopted, not dropped.
    When.NEVER_LAUNCHED: lambda o: o.is_primary and not o.launched and o.launch_overdue
    and not o.qemu_alive,
    # A secondary that failed over runs the VM: it is nobody's to drop any more.
    When.DROPPED: lambda o: o.dropped_by_primary and not o.is_primary,
}


@dataclass(frozen=True)
class Row:
    state: VmState
    condition: When
    action: Action
    leads_to: frozenset[VmState]
    # Saved before a long action runs, so that an agent restarted meanwhile finds it.
    entering: VmState | None = None


def _row(state: VmState, condition: str, action: str, *leads_to: VmState,
         entering: VmState | None = None) -> Row:
    """The table below writes conditions and actions by their words; a word that is
    not a When or an Action fails here, at import."""
    return Row(state, When(condition), Action(action), frozenset(leads_to), entering)


@dataclass(frozen=True)
class Safety:
    """A row that comes first in every state (but those in SAFETY_EXCEPT); it leads to
    Down."""

    condition: When
    action: Action


# A QEMU that is gone is Down; an intentional stop ends the pair.
SAFETY: tuple[Safety, ...] = (
    Safety(When.QEMU_GONE, Action.MARK_DOWN),
    Safety(When.STOPPING, Action.TEARDOWN),
)

# The states whose safety rows differ from SAFETY: these conditions, in this order.
SAFETY_EXCEPT: dict[VmState, tuple[When, ...]] = {
    # A stop that is seen once its QEMU is gone is still a stop, not a loss for the
    # secondary to take over.
    S.PROTECTED: (When.STOPPING, When.QEMU_GONE),
    # The abandon (or the failover) runs first; the state it leads to takes the stop.
    S.SYNCING: (When.QEMU_GONE,),
    S.FAILING_OVER: (When.QEMU_GONE,),
    # Nothing runs to mark Down or to stop.
    S.DOWN: (),
}

# Each state's own rows, after its safety rows; within a state the first match wins.
ROWS: tuple[Row, ...] = (
    # state               condition              action              may lead to
    # A prepare whose domain libvirt never ran here (a failed or forged start, VDSM gone
    # before after_vm_start) holds nothing: removed, so that it holds no cap slot.
    _row(S.STARTING,       "never launched",      "forget",           S.DOWN),
    # Its primary ended the pair (or gave up on it mid-prepare): QEMU, domain and disks
    # go. A prepare-secondary of the same VM waits for that (Services.vm_lock).
    _row(S.STARTING,       "dropped by its primary", "drop_secondary", S.DOWN),
    # A secondary whose primary is lost before COLO began holds no consistent copy.
    _row(S.STARTING,       "peer lost",           "teardown",         S.DOWN),
    _row(S.STARTING,       "in COLO",             "none",             S.PROTECTED),
    _row(S.STARTING,       "primary, no peer",    "none",             S.NEED_SECONDARY),
    _row(S.STARTING,       "primary, peer named", "protect",          S.PROTECTED,
         S.NEED_SECONDARY, S.NOT_PROTECTED, entering=S.SYNCING),

    # A survivor that ran on its replica first makes the engine's image current
    # (docs/decisions.md, D2);
    # protection waits, so the next resync reads from that image.
    _row(S.NEED_SECONDARY, "image stale",         "copy_back",        S.NOT_PROTECTED,
         S.NEED_SECONDARY),
    _row(S.NEED_SECONDARY, "disable requested",   "none",             S.DISABLED),
    _row(S.NEED_SECONDARY, "primary, peer named", "protect",          S.PROTECTED,
         S.NEED_SECONDARY, S.NOT_PROTECTED, entering=S.SYNCING),

    _row(S.NOT_PROTECTED,  "image stale",         "copy_back",        S.NOT_PROTECTED,
         S.NEED_SECONDARY),
    _row(S.NOT_PROTECTED,  "disable requested",   "none",             S.DISABLED),
    _row(S.NOT_PROTECTED,  "primary, peer named", "protect",          S.PROTECTED,
         S.NEED_SECONDARY, S.NOT_PROTECTED, entering=S.SYNCING),

    # Syncing is the state while `protect` runs (its rows enter it); a step that finds
    # it (agent restart mid-sync) drops the half-made pair and starts over.
    _row(S.SYNCING,        "in COLO",             "none",             S.PROTECTED),
    _row(S.SYNCING,        "always",              "abandon",          S.NEED_SECONDARY),

    # Before "peer lost": the primary that drops it holds the generation and leaves
    # COLO right after, which this side sees as a lost peer.
    _row(S.PROTECTED,      "dropped by its primary", "drop_secondary", S.DOWN),
    # Failing Over while the claim and the failover run, so that a restarted agent goes
    # on with them; a secondary that etcd cannot answer yet stays there and asks again.
    _row(S.PROTECTED,      "peer lost",           "fail_over",        S.NEED_SECONDARY,
         S.DOWN, S.FAILING_OVER, S.TAKING_IDENTITY, entering=S.FAILING_OVER),
    _row(S.PROTECTED,      "disable requested",   "unprotect",        S.DISABLED, S.DOWN),
    _row(S.PROTECTED,      "move requested",      "move_secondary",   S.NEED_SECONDARY,
         S.DOWN),
    # vSphere's test failover: this QEMU goes; the next step sees it gone, and the
    # secondary takes over as after a crash.
    _row(S.PROTECTED,      "test failover requested", "test_failover", S.PROTECTED),

    # The primary that drops it is alive and ended the pair on purpose: no failover.
    _row(S.FAILING_OVER,   "dropped by its primary", "drop_secondary", S.DOWN),
    _row(S.FAILING_OVER,   "always",              "fail_over",        S.NEED_SECONDARY,
         S.DOWN, S.FAILING_OVER, S.TAKING_IDENTITY),

    # A promoted secondary moves into a domain with the VM's own identity
    # (vdsm_ft/identity.py); a failed move leaves it running as it was.
    _row(S.TAKING_IDENTITY, "always",             "take_identity",    S.NEED_SECONDARY),

    # A stop whose copy-back could not finish keeps the replica and retries it; until
    # then a start is refused (the engine's image is behind).
    _row(S.DOWN,           "image stale, QEMU gone", "retry_copy_back", S.DOWN),

    _row(S.DISABLED,       "enabled again",       "none",             S.NEED_SECONDARY),
)


def safety_rows(state: VmState) -> tuple[Row, ...]:
    actions = {s.condition: s.action for s in SAFETY}
    conditions = SAFETY_EXCEPT.get(state, tuple(s.condition for s in SAFETY))
    return tuple(Row(state, c, actions[c], frozenset({S.DOWN})) for c in conditions)


# What each step follows: every state's safety rows, then its own.
TABLE: tuple[Row, ...] = tuple(
    row for state in VmState
    for row in safety_rows(state) + tuple(r for r in ROWS if r.state is state))


class IllegalTransition(RuntimeError):
    """An action ended in a state its row does not allow."""


def next_row(state: VmState, seen: Observation) -> Row | None:
    for row in TABLE:
        if row.state is state and seen.holds(row.condition):
            return row
    return None


def check(row: Row, result: VmState) -> VmState:
    if result not in row.leads_to:
        raise IllegalTransition(f"{row.action.value} from {row.state.value} ended in "
                                f"{result.value}; allowed: "
                                f"{sorted(s.value for s in row.leads_to)}")
    return result
