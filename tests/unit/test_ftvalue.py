"""vdsm_ft.ftvalue: the one rule for the `ft` custom property, and that the hooks and the
poller read it by that rule."""
import pytest

from engine_plugin.inventory import VmInfo
from engine_plugin.reconcile import ft_wanted
from vdsm_ft import ftvalue, hooks

VALUES = ["true", "false", None, "yes", "True", "1", "", " true", "on"]


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), (None, False)])
def test_parse_ft_value_accepts_exactly_true_false_or_unset(value, expected):
    assert ftvalue.parse(value) is expected


@pytest.mark.parametrize("value", ["yes", "True", "1", "", " true", "on"])
def test_parse_ft_value_refuses_anything_else(value):
    with pytest.raises(ftvalue.InvalidFtValue) as e:
        ftvalue.parse(value)
    assert "ft=true or ft=false" in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("value", VALUES)
def test_the_hooks_and_the_poller_read_a_value_alike(value):
    env = {} if value is None else {hooks.FT_ENV: value}
    wanted = ftvalue.wanted(value)
    assert hooks._no_ft(env) is (wanted is False)
    assert hooks._ft_quiet(env) is (wanted is True)
    assert (hooks._invalid_ft(env) is not None) is (wanted is None)
    vm = VmInfo(id="v", name="web", cluster_id="c", status="up", host_id=None, memory=1,
                vcpus=1, custom_properties=() if value is None else (("ft", value),))
    assert ft_wanted(vm) is wanted


def test_a_huge_value_is_quoted_cut_in_the_hook_message_and_the_engine_event():
    """Issue 16: a 10 KB value was copied whole into two engine events."""
    from engine_plugin.agents import AgentView
    from engine_plugin.inventory import Inventory
    from engine_plugin.placement import Limits
    from engine_plugin.reconcile import plan
    value = "x" * 10_000
    with pytest.raises(ftvalue.InvalidFtValue) as e:
        ftvalue.parse(value)
    assert len(str(e.value)) < 200 and "(10000 characters)" in str(e.value)
    vm = VmInfo(id="v", name="web", cluster_id="c", status="up", host_id=None, memory=1,
                vcpus=1, custom_properties=(("ft", value),))
    p = plan(Inventory(vms={"v": vm}), AgentView(), Limits(), lambda _: [], now=0.0)
    [event] = [ev for ev in p.events if ev.kind == "invalid-ft"]
    assert len(event.description) < 300 and "(10000 characters)" in event.description
    assert len(p.reasons["web"]) < 100
