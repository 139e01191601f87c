"""The lab's guest choice (`ftlab_guest`) and the client-side checks of tier 3: a
counter that must rise with every reply, and the gap a fault leaves."""
from __future__ import annotations

import pytest

from ftlab import counterclient
from ftlab.counterclient import Reply
from ftlab.preflight import is_lab_namespace
from ftlab.vdsm import VdsmError
from ftlab.vdsmdriver import _guest


def test_idle_guest_is_the_default():
    assert _guest({"ft": "true"}) == ("idle", None)


def test_linux_guest_gets_its_address():
    kind, net = _guest({"ftlab_guest": "linux", "ftlab_guest_ip": "10.78.0.10"})
    assert kind == "linux" and net is not None and net.address == "10.78.0.10"


@pytest.mark.parametrize("custom, words", [
    ({"ftlab_guest": "windows"}, "give one of idle, linux, linux-tcg"),
    ({"ftlab_guest": "linux"}, "needs ftlab_guest_ip"),
    ({"ftlab_guest": "linux", "ftlab_guest_ip": "10.78.0.10,x"}, "not a dotted IPv4"),
    ({"ftlab_guest": "linux-tcg", "ftlab_guest_ip": "10.78.0.10", "ft": "true"},
     "deadlocks under TCG"),
])
def test_bad_guest_choice_is_refused_with_what_to_give(custom, words):
    with pytest.raises(VdsmError, match=words):
        _guest(custom)


def _replies(*points):
    return [Reply(t, v, "" if v is not None else "timed out") for t, v in points]


def test_a_rising_counter_has_no_fork_and_errors_do_not_count():
    replies = _replies((1.0, 5), (1.1, None), (1.2, 6), (1.3, 9))
    assert counterclient.forks(replies) == []


def test_a_repeated_or_lower_value_is_a_fork():
    replies = _replies((1.0, 5), (1.1, 6), (1.2, 6), (1.3, 4), (1.4, 7))
    assert counterclient.forks(replies) == [(6, 6), (6, 4)]


def test_gap_runs_from_the_last_reply_before_to_the_first_after():
    replies = _replies((1.0, 5), (1.5, 6), (1.6, None), (2.25, 7), (2.3, 8))
    assert counterclient.gap_ms(replies, at=1.55) == pytest.approx(750.0)


def test_no_gap_without_replies_on_both_sides():
    replies = _replies((1.0, 5), (2.0, None))
    assert counterclient.gap_ms(replies, at=1.5) is None
    assert counterclient.gap_ms(replies, at=0.5) is None


def test_the_demo_client_namespace_is_the_labs_own():
    assert is_lab_namespace("ftlab-client")
    assert not is_lab_namespace("ftlab-t2-client")
