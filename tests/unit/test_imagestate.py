"""The rule for a start without FT while the storage-domain image may be behind
(vdsm_ft.imagestate), the arbiter's mark as stored, and the hook protocol's `image` call."""
from __future__ import annotations

import pytest

from tests.unit.test_hooks_api import VM
from vdsm_ft import imagestate
from vdsm_ft.arbiter import CorruptRecord, StaleImage
from vdsm_ft.hookapi import AgentRefused, HookClient

MARK = StaleImage(VM, 4, "host-b", 1_790_000_000.0)


@pytest.mark.parametrize("ft", [None, "false"])
def test_a_known_mark_refuses_with_where_the_data_is_and_the_ways_out(ft):
    with pytest.raises(imagestate.ImageStale) as e:
        imagestate.decide(VM, ft, mark=MARK)
    text = str(e.value)
    assert text.startswith(f"VM {VM} not started: its storage-domain image is behind")
    assert "2026-09-21 14:13:20 UTC" in text and "generation 4" in text
    assert "host host-b has run it on its own replica" in text
    assert "lose every write since" in text
    assert f"ovirt-ft accept-stale-image {VM} --lose-writes-since-failover" in text


@pytest.mark.parametrize("ft", [None, "false"])
def test_no_mark_is_an_answer_and_the_start_goes_on_silently(ft):
    assert imagestate.decide(VM, ft, mark=None) == ""


def test_nobody_can_tell_refuses_only_a_vm_with_ft_history():
    for ft, history in (("false", False), (None, True), ("false", True)):
        with pytest.raises(imagestate.ImageStale, match="cannot be checked now .etcd down"):
            imagestate.decide(VM, ft, unknown="etcd down", ft_history=history)
    warning = imagestate.decide(VM, None, unknown="etcd down")
    assert warning.startswith("vdsm-ft: WARNING:") and "etcd down" in warning


def test_an_unknown_answer_outweighs_a_mark_passed_with_it():
    assert imagestate.decide(VM, None, mark=MARK, unknown="etcd down").startswith(
        "vdsm-ft: WARNING:")


def test_the_mark_round_trips_and_a_bad_one_is_corrupt():
    assert StaleImage.decode(MARK.encode()) == MARK
    for bad in (b"{}", b"[1]", b'{"vm_id": "x", "generation": 0, "host": "h", "since": 1}',
                b"not json"):
        with pytest.raises(CorruptRecord):
            StaleImage.decode(bad)


def test_the_image_call_over_the_real_socket(agent):
    backend, path = agent
    client = HookClient(path, timeout=2.0)
    assert client.image(VM, "false") == ""
    assert client.image(VM, None) == ""
    backend.stale = "behind"
    with pytest.raises(AgentRefused, match="behind"):
        client.image(VM, None)
    assert backend.calls == [("image", VM, "false"), ("image", VM, None),
                             ("image", VM, None)]
    with pytest.raises(AgentRefused, match="ft must be") as e:
        client.image(VM, "true")
    assert e.value.code == "bad_request"
