"""vdsm_ft.vmstats: which Paused entries the after_get_all_vm_stats hook reports Up."""
import json
import os
import subprocess

import pytest

from vdsm_ft import vmstats
from vdsm_ft.vmstats import PAUSED, PAUSED_UNKNOWN, RUNNING

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "hooks", "after_get_all_vm_stats", "50_ft")
PAUSED_USER = 1
PAUSED_IOERROR = 2
A, B = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def probe_of(sequences: dict) -> vmstats.Probe:
    """Each VM's successive (is_ft, state, reason) answers; the last one repeats."""
    calls = {k: 0 for k in sequences}

    def probe(vm_id):
        seq = sequences.get(vm_id)
        if seq is None:
            return None
        i = min(calls[vm_id], len(seq) - 1)
        calls[vm_id] += 1
        return seq[i]
    return probe


def no_sleep(_):
    pass


def stats(*pairs):
    return [{"vmId": v, "status": s, "cpuUser": "1.0"} for v, s in pairs]


def test_checkpoint_stop_that_resumes_becomes_up_and_other_fields_stay():
    probe = probe_of({A: [(True, PAUSED, PAUSED_UNKNOWN), (True, RUNNING, 1)]})
    assert vmstats.rewrite(stats((A, "Paused")), probe, sleep=no_sleep) == \
        [{"vmId": A, "status": "Up", "cpuUser": "1.0"}]


def test_stuck_paused_after_recovery_while_running_becomes_up():
    probe = probe_of({A: [(True, RUNNING, 1)], B: [(True, RUNNING, 1)]})
    assert vmstats.rewrite(stats((A, "Paused"), (B, "Up")), probe, sleep=no_sleep) == \
        stats((A, "Up"), (B, "Up"))


@pytest.mark.parametrize("reason", [PAUSED_USER, PAUSED_IOERROR])
def test_admin_and_io_error_pauses_stay_paused(reason):
    probe = probe_of({A: [(True, PAUSED, reason), (True, RUNNING, 1)]})
    assert vmstats.rewrite(stats((A, "Paused")), probe, sleep=no_sleep) is None


def test_lasting_unknown_stop_stays_paused():
    probe = probe_of({A: [(True, PAUSED, PAUSED_UNKNOWN)]})
    assert vmstats.rewrite(stats((A, "Paused")), probe, sleep=no_sleep) is None


def test_vm_without_ft_stays_paused_even_when_running():
    probe = probe_of({A: [(False, RUNNING, 1)]})
    assert vmstats.rewrite(stats((A, "Paused")), probe, sleep=no_sleep) is None


def test_unknown_domain_stays_paused():
    assert vmstats.rewrite(stats((A, "Paused")), probe_of({}), sleep=no_sleep) is None


@pytest.mark.parametrize("data", [{"vmId": A, "status": "Paused"}, [A], [{"status": "Paused"}],
                                  [{"vmId": 7, "status": "Paused"}], "Paused"])
def test_malformed_stats_are_left_alone(data):
    probe = probe_of({A: [(True, RUNNING, 1)]})
    assert vmstats.rewrite(data, probe, sleep=no_sleep) is None


def _file(tmp_path, text):
    path = tmp_path / "stats.json"
    path.write_text(text)
    return path


def test_run_rewrites_the_file(tmp_path):
    path = _file(tmp_path, json.dumps(stats((A, "Paused"))))
    rc = vmstats.run({vmstats.JSON_ENV: str(path)}, probe_of({A: [(True, RUNNING, 1)]}))
    assert rc == 0
    assert json.loads(path.read_text()) == stats((A, "Up"))
    assert os.listdir(tmp_path) == ["stats.json"]


@pytest.mark.parametrize("text", ['[{"vmId": "x", "status": "Paused"', "not json \"Paused\"",
                                  '{"status": "Paused"}', '[{"status": "Paused"}]'])
def test_run_leaves_bad_input_byte_for_byte(tmp_path, text):
    path = _file(tmp_path, text)
    rc = vmstats.run({vmstats.JSON_ENV: str(path)}, probe_of({A: [(True, RUNNING, 1)]}))
    assert rc in (0, 1)
    assert path.read_text() == text
    assert os.listdir(tmp_path) == ["stats.json"]


def test_run_leaves_the_file_when_the_probe_fails(tmp_path):
    text = json.dumps(stats((A, "Paused")))
    path = _file(tmp_path, text)

    def broken(vm_id):
        raise OSError("libvirt down")
    assert vmstats.run({vmstats.JSON_ENV: str(path)}, broken) == 1
    assert path.read_text() == text


def _script(path, pythonpath: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "_hook_json": str(path), "PYTHONPATH": pythonpath,
           "VDSM_FT_CONFIG": "/nonexistent/agent.conf"}
    return subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=30)


def test_script_without_a_paused_entry_never_starts_python(tmp_path):
    """With no vdsm_ft importable, Python would fail: exit 0 proves it never ran."""
    text = json.dumps(stats((A, "Up"), (B, "Up")))
    path = _file(tmp_path, text)
    out = _script(path, pythonpath=str(tmp_path))
    assert (out.returncode, out.stderr) == (0, "")
    assert path.read_text() == text


def test_script_with_a_paused_entry_runs_vmstats(tmp_path):
    """Past the filter vmstats.run decides; here it cannot load the host config, so it
    says so and leaves the stats as VDSM wrote them."""
    text = json.dumps(stats((A, "Paused")))
    path = _file(tmp_path, text)
    out = _script(path, pythonpath=REPO)
    assert out.returncode == 1
    assert "vdsm-ft after_get_all_vm_stats: stats unchanged" in out.stderr
    assert path.read_text() == text


def test_ft_marker_is_the_quorum_node_name():
    from vdsm_ft import layout
    assert layout.QUORUM_FMT.format(0).startswith(vmstats.FT_MARKER)
