"""bench/colo_phases.py reads QEMU's trace lines into checkpoint phases correctly: a wrong
parser would print plausible numbers for the wrong intervals."""
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "colo_phases", Path(__file__).parents[2] / "bench" / "colo_phases.py")
colo_phases = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("colo_phases", colo_phases)   # dataclasses look their module up
_spec.loader.exec_module(colo_phases)

# The log backend's format with -msg timestamp=on, as QEMU 7.2 writes it (tid@s.us:event).
PRIMARY_LOG = """\
2026-12-07 14:40:00.000000Z qemu-system-x86_64: some unrelated message
77@1000.000000:colo_vm_state_change Change 'stop' => 'run'
77@1002.000000:colo_vm_state_change Change 'run' => 'stop'
77@1002.000100:colo_send_message Send 'checkpoint-request' message
77@1002.001100:colo_receive_message Receive 'checkpoint-reply' message
77@1002.001200:colo_send_message Send 'vmstate-send' message
77@1002.002200:savevm_state_complete_precopy
77@1002.002300:migration_bitmap_sync_start
77@1002.002800:migration_bitmap_sync_end dirty_pages 12
77@1002.003000:colo_send_message Send 'vmstate-size' message
77@1002.004000:colo_receive_message Receive 'vmstate-received' message
77@1002.007000:colo_receive_message Receive 'vmstate-loaded' message
77@1002.007100:colo_vm_state_change Change 'stop' => 'run'
77@1004.000000:colo_vm_state_change Change 'run' => 'stop'
"""

SECONDARY_LOG = """\
80@1002.000300:colo_receive_message Receive 'checkpoint-request' message
80@1002.000400:colo_vm_state_change Change 'run' => 'stop'
80@1002.000500:colo_send_message Send 'checkpoint-reply' message
80@1002.001300:colo_receive_message Receive 'vmstate-send' message
80@1002.001400:qemu_loadvm_state_section 4
80@1002.002900:qemu_loadvm_state_section 0
80@1002.003100:colo_receive_message Receive 'vmstate-size' message
80@1002.003900:colo_send_message Send 'vmstate-received' message
80@1002.004000:colo_flush_ram_cache_begin dirty_pages 12
80@1002.004500:colo_flush_ram_cache_end
80@1002.005000:qemu_loadvm_state_section 1
80@1002.005500:qemu_loadvm_state_section 0
80@1002.006900:colo_vm_state_change Change 'stop' => 'run'
"""


def test_a_checkpoint_is_the_marks_up_to_its_resume_and_partial_ones_are_dropped():
    marks = colo_phases.parse(PRIMARY_LOG.splitlines())
    assert [m.name for m in marks][:3] == ["stop => run", "run => stop",
                                           "send checkpoint-request"]
    (one,) = colo_phases.checkpoints(marks)   # the first run and the trailing stop are cut
    assert one[0].name == "run => stop" and one[-1].name == "stop => run"
    assert colo_phases.pause_ms(one) == pytest.approx(7.1)


def test_phases_are_gaps_between_marks_and_only_those_after_the_stop_count_as_pause():
    phases = {p.name: p for p in colo_phases.breakdown(
        colo_phases.checkpoints(colo_phases.parse(PRIMARY_LOG.splitlines())))}
    loaded = phases["receive vmstate-received -> receive vmstate-loaded"]
    assert loaded.ms == [pytest.approx(3.0)] and loaded.in_pause
    assert phases["bitmap sync -> bitmap synced"].ms == [pytest.approx(0.5)]
    assert sum(p.ms[0] for p in phases.values() if p.in_pause) == pytest.approx(7.1)


def test_the_secondary_counts_only_eof_sections_and_its_pause_starts_at_its_own_stop():
    # The secondary's log starts mid-way: prepend a resume so the checkpoint is whole.
    log = "80@1001.000000:colo_vm_state_change Change 'stop' => 'run'\n" + SECONDARY_LOG
    (one,) = colo_phases.checkpoints(colo_phases.parse(log.splitlines()))
    names = [m.name for m in one]
    assert names.count("loadvm EOF") == 2 and "loadvm 4" not in " ".join(names)
    phases = {p.name: p for p in colo_phases.breakdown([one])}
    assert not phases["receive checkpoint-request -> run => stop"].in_pause
    assert phases["RAM cache flushed -> loadvm EOF"].ms == [pytest.approx(1.0)]
    assert colo_phases.pause_ms(one) == pytest.approx(6.5)
    lines = colo_phases.report("secondary", [one])
    assert "traced pause p50 6.50 ms" in lines[0]
    assert any("resets its active and hidden overlays" in line for line in lines)
