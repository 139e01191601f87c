"""`ovirt-ft` as an admin runs it: a separate process, settings from a 0600 file, the REAL
ovirtsdk4 over HTTPS to the fake engine, and host agents that speak the real agent
protocol over mutual TLS with a scripted backend (tests/integration/scripted_agents.py;
the real agent of issue 4 replaces that backend)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine_plugin import config
from ftlab import qemubuild
from ftlab.engine.fake_engine import FakeEngine
from ftlab.engine.model import GiB, Hook
from tests.integration.scripted_agents import AgentFleet, primary_status
from vdsm_ft import qemu_probe
from vdsm_ft.api import Role, VmState, VmStatus

USER, PASSWORD = "admin@internal", "cli-pass-8f2"
HOOK = [Hook("before_vm_start", "50_ft", "0" * 32)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    engine = FakeEngine(users={USER: PASSWORD})
    info = engine.start()
    fleet = AgentFleet(tmp / "pki", ["h1", "h2", "h3"], first_octet=31)
    ids = {}
    for h in ("h1", "h2", "h3"):
        ids[h] = engine.add_host(h, address=fleet.addresses[h], hooks=HOOK).id
        fleet.backends[h].host_id = ids[h]
    web = engine.add_vm("web", memory=2 * GiB, cpus=2, host="h1",
                        custom_properties={"ft": "true"})
    engine.add_vm("db", memory=GiB, custom_properties={"sndbuf": "0"})
    fleet.backends["h1"].set_vm(primary_status(
        web.id, "web", ids["h1"], VmState.PROTECTED, secondary_host=ids["h2"], generation=3,
        checkpoints_per_minute=42.0, last_checkpoint_pause_ms=7.5, replication_bytes=10 << 20,
        replication_bytes_per_second=3 << 20, lag_seconds=0.25))
    fleet.backends["h2"].set_vm(VmStatus(vm_id=web.id, name="web", state=VmState.PROTECTED,
                                         role=Role.SECONDARY, primary_host=ids["h1"],
                                         secondary_host=ids["h2"], generation=3))
    good = tmp / "ovirt-ft.conf"
    sections = {
        "engine": {"url": info.url, "username": USER, "password": PASSWORD,
                   "ca_file": info.ca_file, "timeout": 3},
        "agents": {"port": fleet.port, "cert": fleet.poller_tls.cert,
                   "key": fleet.poller_tls.key, "ca": fleet.poller_tls.ca, "timeout": 2}}
    config.write(str(good), sections)
    bad = tmp / "bad-password.conf"
    config.write(str(bad), sections | {"engine": sections["engine"] | {"password": "wrong"}})
    try:
        yield {"engine": engine, "fleet": fleet, "conf": good, "bad": bad, "ids": ids,
               "web": web}
    finally:
        fleet.stop()
        engine.stop()


def ovirt_ft(conf, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVIRT_FT_")}
    env["OVIRT_FT_CONFIG"] = str(conf)
    env["PYTHONPATH"] = ROOT
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "engine_plugin.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_status_table(lab):
    r = ovirt_ft(lab["conf"], "status")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:4] == ["VM", "STATE", "PRIMARY", "SECONDARY"]
    web = next(line for line in rows if line.startswith("web"))
    for cell in ("Protected", "h1", "h2", "42.0", "7.5 ms", "3.00 MiB/s", "0.25 s"):
        assert cell in web, web
    assert not any(line.startswith("db") for line in rows)   # not an FT VM


def test_status_json_for_one_vm(lab):
    r = ovirt_ft(lab["conf"], "status", "web", "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert (row["vm"], row["state"], row["primary_host"], row["secondary_host"]) == \
        ("web", "Protected", "h1", "h2")
    assert row["generation"] == 3 and row["replication_bytes"] == 10 << 20


def test_status_shows_a_copy_back_in_progress(lab):
    vm = lab["engine"].add_vm("batch", host="h1", custom_properties={"ft": "true"})
    lab["fleet"].backends["h1"].set_vm(primary_status(
        vm.id, "batch", lab["ids"]["h1"], VmState.NOT_PROTECTED, generation=4, failovers=1,
        reason="copying back to the storage domain, 63%"))
    r = ovirt_ft(lab["conf"], "status", "batch")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("batch"))
    assert "Not Protected" in row and "copying back to the storage domain, 63%" in row


def test_hosts_show_what_each_agents_qemu_probe_found(lab, tmp_path):
    """h1 reports a real probe of this machine's QEMU, h2 one of a QEMU that is not
    there, h3 none (an agent from before the probe)."""
    backends = lab["fleet"].backends
    backends["h1"].qemu = qemu_probe.probe(qemubuild.DEBIAN_QEMU, str(tmp_path))
    backends["h2"].qemu = qemu_probe.probe("/opt/none/qemu-system-x86_64", str(tmp_path))
    try:
        r = ovirt_ft(lab["conf"], "hosts")
        assert r.returncode == 0, r.stderr
        header, *rows = r.stdout.splitlines()
        assert header.split() == ["HOST", "COLO", "QEMU", "EMULATOR", "REASON"]
        by_host = {line.split()[0]: line for line in rows}
        assert by_host["h1"].split()[1:4] == ["yes", backends["h1"].qemu.version,
                                             qemubuild.DEBIAN_QEMU]
        assert by_host["h2"].split()[1] == "no" and "does not exist" in by_host["h2"]
        assert by_host["h3"].split()[1] == "unknown" and "no QEMU probe" in by_host["h3"]
        status = ovirt_ft(lab["conf"], "status")
        assert status.returncode == 0 and "\n\nHOST " in status.stdout
        assert by_host["h2"] in status.stdout
        [h2] = [row for row in json.loads(ovirt_ft(lab["conf"], "hosts", "--json").stdout)
                if row["host"] == "h2"]
        assert (h2["colo"], h2["failed"]) == ("no", ["run"])
        assert h2["reason"] == backends["h2"].qemu.reason
    finally:
        backends["h1"].qemu = backends["h2"].qemu = None


def test_enable_and_disable_keep_the_other_custom_properties(lab):
    r = ovirt_ft(lab["conf"], "enable", "db")
    assert r.returncode == 0, r.stderr
    assert lab["engine"].vm("db").custom_properties == {"sndbuf": "0", "ft": "true"}
    r = ovirt_ft(lab["conf"], "status", "db")
    assert "Down" in r.stdout
    r = ovirt_ft(lab["conf"], "disable", "db")
    assert r.returncode == 0, r.stderr
    assert lab["engine"].vm("db").custom_properties == {"sndbuf": "0", "ft": "false"}


def test_operations_reach_the_primarys_agent(lab):
    b1 = lab["fleet"].backends["h1"]
    for op in ("suspend", "resume", "test-failover", "restart-secondary"):
        r = ovirt_ft(lab["conf"], op, "web")
        assert r.returncode == 0, r.stderr
        assert f"{op} web: accepted by the agent on h1" in r.stdout
    r = ovirt_ft(lab["conf"], "migrate-secondary", "web", "--to", "h3")
    assert r.returncode == 0, r.stderr
    [(_, vm_id, peer)] = b1.calls_named("migrate_secondary")
    assert vm_id == lab["web"].id and peer.host_id == lab["ids"]["h3"]
    assert peer.agent_address == lab["fleet"].addresses["h3"]
    assert [c[0] for c in b1.calls] == ["suspend", "resume", "test_failover",
                                        "restart_secondary", "migrate_secondary"]


def test_migrate_to_unknown_host_is_a_clear_error(lab):
    r = ovirt_ft(lab["conf"], "migrate-secondary", "web", "--to", "nohost")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.strip() == "ovirt-ft: no host named 'nohost' in the engine"


def test_bad_password(lab):
    r = ovirt_ft(lab["bad"], "status")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"ovirt-ft: the engine refused the credentials of {USER}")
    assert "wrong" not in r.stderr


@pytest.mark.parametrize("args", [("status", "nope"), ("enable", "nope"), ("suspend", "nope")])
def test_unknown_vm(lab, args):
    r = ovirt_ft(lab["conf"], *args)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "ovirt-ft: no VM named 'nope' in the engine"


def test_unreachable_engine(lab):
    lab["engine"].set_outage(True)
    try:
        r = ovirt_ft(lab["conf"], "status")
    finally:
        lab["engine"].set_outage(False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("ovirt-ft: cannot reach the engine at https://"), r.stderr
    assert "curl error 7" in r.stderr


def test_settings_file_must_be_private(lab, tmp_path):
    loose = tmp_path / "loose.conf"
    loose.write_bytes(lab["conf"].read_bytes())
    loose.chmod(0o644)
    r = ovirt_ft(loose, "status")
    assert r.returncode == 1
    assert f"chmod 600 {loose}" in r.stderr and PASSWORD not in r.stderr


def test_settings_from_the_environment_only(lab, tmp_path):
    info = lab["engine"].info
    env = {"OVIRT_FT_ENGINE_URL": info.url, "OVIRT_FT_ENGINE_USERNAME": USER,
           "OVIRT_FT_ENGINE_PASSWORD": PASSWORD, "OVIRT_FT_ENGINE_CA_FILE": str(info.ca_file)}
    r = ovirt_ft(tmp_path / "absent.conf", "enable", "web", env_extra=env | {
        "OVIRT_FT_CONFIG": ""})
    # No config file at all: the environment alone is enough for engine-only commands.
    assert r.returncode == 0, r.stderr


def test_no_password_option(lab):
    r = ovirt_ft(lab["conf"], "--help")
    assert r.returncode == 0 and "password" not in r.stdout.lower()


def test_accept_stale_image_is_refused_while_the_replica_is_held_then_needs_the_flag(
        lab, etcd_cluster, tmp_path):
    """The admin's way out when a survivor's replica is lost (vdsm_ft.imagestate)."""
    from vdsm_ft.arbiter import Arbiter
    ids = lab["ids"]
    vm = lab["engine"].add_vm("orphan", host="h2", custom_properties={"ft": "false"})
    arbiter = Arbiter(etcd_cluster.endpoints)
    generation = arbiter.begin_generation(vm.id, ids["h1"], ids["h2"])
    assert arbiter.claim_live(vm.id, generation, ids["h2"])     # h2 took over on its replica
    conf = tmp_path / "with-etcd.conf"
    text = open(lab["conf"]).read()
    poller = {"etcd_endpoints": ",".join(etcd_cluster.endpoints)}
    config.write(str(conf), {**_sections(text), "poller": poller})
    r = ovirt_ft(conf, "accept-stale-image", "orphan", "--lose-writes-since-failover")
    assert r.returncode == 1 and "are plain http" in r.stderr, r
    assert "[poller] etcd_allow_plain_http = yes" in r.stderr
    # This test's etcd is the plain-http one of the session: accept that explicitly.
    config.write(str(conf), {**_sections(text), "poller": {
        **poller, "etcd_allow_plain_http": "yes"}})
    lab["fleet"].backends["h2"].set_vm(primary_status(
        vm.id, "orphan", ids["h2"], VmState.DOWN, generation=generation, failovers=1,
        reason="stopped; the storage-domain image is NOT current (the offline copy failed)"))
    try:
        r = ovirt_ft(conf, "accept-stale-image", "orphan", "--lose-writes-since-failover")
        assert r.returncode == 1 and "still has its replica" in r.stderr, r
        assert "the offline copy failed" in r.stderr and "Nothing was changed" in r.stderr
        assert arbiter.stale_image(vm.id) is not None
    finally:
        lab["fleet"].backends["h2"].drop_vm(vm.id)
    r = ovirt_ft(conf, "accept-stale-image", "orphan")
    assert r.returncode == 1 and "--lose-writes-since-failover" in r.stderr, r
    assert f"generation {generation}" in r.stderr and "h2" in r.stderr
    assert arbiter.stale_image(vm.id) is not None
    r = ovirt_ft(conf, "accept-stale-image", "orphan", "--lose-writes-since-failover")
    assert r.returncode == 0 and "accepted as it is" in r.stdout, r
    assert arbiter.stale_image(vm.id) is None
    r = ovirt_ft(conf, "accept-stale-image", "orphan", "--lose-writes-since-failover")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r


def _sections(text: str) -> dict:
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return {name: dict(parser[name]) for name in parser.sections()}
