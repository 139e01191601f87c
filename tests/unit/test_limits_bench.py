"""bench/limits.py refuses a shape this machine cannot hold before starting it, and
says with which numbers (the 8 GiB shape on a 24 GiB machine)."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))      # limits.py imports its sibling colo_report
_spec = importlib.util.spec_from_file_location("limits", BENCH / "limits.py")
limits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(limits)


def test_a_shape_the_machine_cannot_hold_is_refused_with_the_numbers():
    shape = limits.VmShape(memory_mib=8192)
    assert limits.memory_refusal(shape, 22538) == (
        "refused before start: the pair needs 8192 MiB on the primary and 16384 MiB on "
        "the secondary (2x: guest RAM plus COLO's RAM cache), + 1024 MiB margin = "
        "25600 MiB, but this machine has 22538 MiB available (both hosts share it here)")


def test_a_shape_that_fits_is_not_refused():
    assert limits.memory_refusal(limits.VmShape(memory_mib=4096), 22538) is None


def test_shapes_parse_and_the_matrix_varies_one_dimension_from_the_base():
    assert limits.parse_shape("4x128x4x2") == limits.VmShape(vcpus=4, disks=4, nics=2)
    for shapes in limits.DIMENSIONS.values():
        assert limits.BASE in shapes
        for shape in shapes:
            assert sum(v != vars(limits.BASE)[k] for k, v in vars(shape).items()) <= 1
