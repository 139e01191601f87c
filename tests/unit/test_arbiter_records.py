"""The arbiter's pure parts: record encoding, key layout, input validation, timing rule."""
import json
import socket
import time

import pytest

from vdsm_ft import colo
from vdsm_ft.arbiter import (ARBITER_BOUND_MS, ARBITER_BOUND_S, KILL_MARGIN_MS, Arbiter,
                             CorruptRecord, InvalidArgument, LeaderLease, PairRecord,
                             TimingRuleViolation, check_fencing_budget, claim_key,
                             claims_prefix, generation_key, leader_key, pair_key)

BAD_NAMES = ["", " vm", "a/b", "../x", "vm\n", "x" * 129, "-vm", None, 7, b"vm"]


def record(**kw):
    base = dict(vm_id="vm-1", generation=3, primary="hostA", secondary="hostB",
                state="Protected", reason="", updated_at=12.5)
    base.update(kw)
    return PairRecord(**base)


def test_record_round_trip_leaves_out_mod_revision():
    r = record(mod_revision=42)
    body = json.loads(r.encode())
    assert body == {"vm_id": "vm-1", "generation": 3, "primary": "hostA",
                    "secondary": "hostB", "state": "Protected", "reason": "",
                    "updated_at": 12.5}
    assert PairRecord.decode(r.encode(), 42) == r
    alone = record(secondary=None, state="Need Secondary")
    assert PairRecord.decode(alone.encode()) == alone
    assert alone.members == ("hostA",)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_vm_id_is_refused(name):
    with pytest.raises(InvalidArgument, match="vm id"):
        record(vm_id=name)
    with pytest.raises(InvalidArgument):
        pair_key(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_host_is_refused(name):
    with pytest.raises(InvalidArgument, match="primary host"):
        record(primary=name)
    if name is not None:
        with pytest.raises(InvalidArgument, match="secondary host"):
            record(secondary=name)


@pytest.mark.parametrize("generation", [0, -1, True, "1", 1.0, None])
def test_bad_generation_is_refused(generation):
    with pytest.raises(InvalidArgument, match="generation"):
        record(generation=generation)
    with pytest.raises(InvalidArgument):
        claim_key("vm-1", generation)


def test_other_bad_records_are_refused():
    with pytest.raises(InvalidArgument, match="two hosts"):
        record(secondary="hostA")
    with pytest.raises(InvalidArgument, match="state must be one of"):
        record(state="protected")
    with pytest.raises(InvalidArgument, match="reason"):
        record(reason="x" * 2000)


@pytest.mark.parametrize("data", [b"", b"not json", b"[1]", b'{"vm_id": "vm-1"}',
                                  b'{"vm_id": "a/b", "generation": 1, "primary": "h", '
                                  b'"secondary": null, "state": "Protected"}',
                                  json.dumps({**json.loads(record().encode()),
                                              "extra": 1}).encode()])
def test_corrupt_record_is_reported(data):
    with pytest.raises(CorruptRecord):
        PairRecord.decode(data)


def test_key_layout():
    assert pair_key("vm-1") == "/vdsm-ft/pairs/vm-1"
    assert generation_key("vm-1") == "/vdsm-ft/generations/vm-1"
    assert claims_prefix("vm-1") == "/vdsm-ft/claims/vm-1/"
    assert leader_key("poller") == "/vdsm-ft/leaders/poller"
    # Key order is generation order, which pruning old claims relies on.
    keys = [claim_key("vm-1", g) for g in (1, 2, 9, 10, 100, 12345)]
    assert keys == sorted(keys)
    assert claim_key("vm-1", 10) == "/vdsm-ft/claims/vm-1/000000000010"


def test_timing_rule_holds_for_the_shipped_constants():
    assert ARBITER_BOUND_MS == 1500 and ARBITER_BOUND_S == 1.5
    # The figure colo.py sets explicitly on colo-compare.
    assert colo.COMPARE_TIMEOUT_MS == 3000
    check_fencing_budget(detection_ms=500, compare_timeout_ms=colo.COMPARE_TIMEOUT_MS)
    assert 500 + ARBITER_BOUND_MS + KILL_MARGIN_MS < colo.COMPARE_TIMEOUT_MS
    with pytest.raises(TimingRuleViolation, match="compare_timeout"):
        check_fencing_budget(detection_ms=1000, compare_timeout_ms=colo.COMPARE_TIMEOUT_MS)
    with pytest.raises(TimingRuleViolation):
        check_fencing_budget(detection_ms=100, compare_timeout_ms=2000)


@pytest.mark.parametrize("endpoints", [[], "http://127.0.0.1:2379", ["127.0.0.1:2379"],
                                       ["ftp://h:1"], ["http://h:port"], ["http://h:1/v3"],
                                       [None]])
def test_bad_endpoints_are_refused(endpoints):
    with pytest.raises(InvalidArgument, match="endpoint"):
        Arbiter(endpoints)


@pytest.mark.parametrize("bound", [0, -1, "1", None, True])
def test_bad_bound_is_refused(bound):
    with pytest.raises(InvalidArgument, match="timeout"):
        Arbiter(["http://127.0.0.1:2379"], bound=bound)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_call_arguments_fail_before_any_network_call():
    # Nothing listens there: a network attempt would take the bound and raise
    # ArbiterUnavailable; validation must answer first, and at once.
    a = Arbiter([f"http://127.0.0.1:{_closed_port()}"], bound=2)
    t0 = time.monotonic()
    for call in (lambda: a.claim_live("", 1, "hostA"),
                 lambda: a.claim_live("vm-1", 0, "hostA"),
                 lambda: a.claim_live("vm-1", 1, "host/A"),
                 lambda: a.claim_live("vm-1", 1, "hostA", timeout=0),
                 lambda: a.begin_generation("vm-1", "hostA", "hostA"),
                 lambda: a.begin_generation("vm-1", "hostA", "hostB", state="Sync"),
                 lambda: a.other_member_live("vm-1", ""),
                 lambda: a.get_pair("a b"),
                 lambda: a.live_holder("vm-1", -3),
                 lambda: a.update_pair("vm-1", 0, state="Protected"),
                 lambda: a.update_pair("vm-1", 1, state="Up"),
                 lambda: a.update_pair("vm-1", 1, secondary="h/1"),
                 lambda: a.update_pair("vm-1", 1, reason=None),
                 lambda: LeaderLease(a, "poller", "p1", ttl=0),
                 lambda: LeaderLease(a, "poller", "", ttl=5),
                 lambda: LeaderLease(a, "", "p1", ttl=5)):
        with pytest.raises(InvalidArgument):
            call()
    assert time.monotonic() - t0 < 0.5
