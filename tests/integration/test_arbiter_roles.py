"""The per-component etcd users and roles (vdsm_ft.etcdroles), against a REAL 3-member
etcd 3.4 serving https with --client-cert-auth and authentication on, set up as the lab
sets it up (ftlab.etcdauth.SecureEtcd): each component can do its work, and what etcd's
key ranges can refuse, it refuses."""
import json
import os
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from engine_plugin import config as poller_config
from engine_plugin.poller import make_lease
from ftlab import pki
from ftlab.etcd import ETCDCTL, EtcdCluster
from ftlab.etcdauth import ROOT, SecureEtcd
from vdsm_ft import etcd, etcdroles
from vdsm_ft.arbiter import (ArbiterAuthError, HostRecord, LeaderLease, NotAPairMember,
                             claim_key)

HOSTS = ("host-a", "host-b", "host-c")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("etcd-roles")
    ca = pki.make_ca(d / "ca")
    started = time.monotonic()
    auth = SecureEtcd(d, ca, HOSTS, ["127.0.0.1"])
    made = time.monotonic()
    cluster = EtcdCluster(tls=auth.server, client_cert_auth=True, ctl_tls=auth.ctl).start()
    up = time.monotonic()
    try:
        auth.enable(cluster.endpoints[0])
        print(f"certificates and passwords {made - started:.2f} s, cluster {up - made:.2f} s, "
              f"users and roles {time.monotonic() - up:.2f} s")
        yield auth, cluster
    finally:
        cluster.stop()


def agent(site, host: str):
    auth, cluster = site
    return auth.arbiter(cluster.endpoints, etcdroles.agent_user(host))


def poller(site):
    auth, cluster = site
    return auth.arbiter(cluster.endpoints, etcdroles.POLLER_USER)


def new_vm() -> str:
    return f"vm-{uuid.uuid4()}"


def test_passwords_are_in_0600_files_only(site):
    auth, _ = site
    for login in auth.logins.values():
        assert os.stat(login.password_file).st_mode & 0o777 == 0o600


def test_the_agents_roles_carry_a_pair_through_its_life(site):
    a, b = agent(site, "host-a"), agent(site, "host-b")
    vm = new_vm()
    g = a.begin_generation(vm, "host-a", "host-b")
    a.update_pair(vm, g, state="Protected")
    assert b.start_check(vm, "host-b") == ("host-a", None)       # the secondary's hook
    assert b.claim_live(vm, g, "host-b") is True                  # with the stale-image mark
    assert a.claim_live(vm, g, "host-a") is False
    assert b.stale_image(vm).host == "host-b"
    g2 = b.begin_generation(vm, "host-b", None)                   # prunes old claims
    b.image_current(vm, g2, "host-b")
    assert a.stale_image(vm) is None
    for host, arbiter in (("host-a", a), ("host-b", b)):
        arbiter.put_host(HostRecord(host, "0.1.0", None))
    b.delete_pair(vm)
    assert a.get_pair(vm) is None


def test_the_pollers_role_holds_the_lease_and_drops_a_stale_image_mark(site, tmp_path):
    auth, cluster = site
    login = auth.poller
    engine_ca = tmp_path / "engine-ca.pem"
    engine_ca.write_text(open(login.tls.ca).read())
    path = str(tmp_path / "poller.conf")
    poller_config.write(path, {
        "engine": {"url": "https://engine.invalid/ovirt-engine/api", "username": "u@internal",
                   "password": "engine-pw", "ca_file": str(engine_ca)},
        "poller": {"etcd_endpoints": ",".join(cluster.endpoints), "etcd_ca": login.tls.ca,
                   "etcd_cert": login.tls.cert, "etcd_key": login.tls.key,
                   "etcd_username": login.user, "etcd_password": login.password()}})
    lease = make_lease(poller_config.load(path, env={}))
    try:
        assert lease.acquire() and lease.refresh()
    finally:
        lease.release()
    vm = new_vm()
    b = agent(site, "host-b")
    g = b.begin_generation(vm, "host-a", "host-b")
    assert b.claim_live(vm, g, "host-b")
    p = poller(site)
    assert p.stale_image(vm).generation == g                      # ovirt-ft accept-stale-image
    assert p.discard_stale_image(vm).host == "host-b"
    assert b.stale_image(vm) is None


def test_an_agent_may_not_write_another_hosts_record(site):
    a = agent(site, "host-a")
    with pytest.raises(ArbiterAuthError, match="etcd user ft-agent-host-a has no permission "
                                               "on those keys"):
        a.put_host(HostRecord("host-b", "0.1.0", None))
    with pytest.raises(ArbiterAuthError, match="has no permission"):
        a.hosts()                  # the other hosts' records are not its business either


def test_an_agent_may_not_take_the_pollers_lease(site):
    lease = LeaderLease(agent(site, "host-a"), "ovirt-ft-poller", "rogue", ttl=5)
    with pytest.raises(ArbiterAuthError, match="has no permission"):
        lease.acquire()


@pytest.mark.parametrize("step", ["begin_generation", "claim", "put_host"])
def test_the_poller_may_not_write_pairs_claims_or_host_records(site, step):
    vm = new_vm()
    g = agent(site, "host-a").begin_generation(vm, "host-a", "host-b")
    p = poller(site)
    call = {"begin_generation": lambda: p.begin_generation(vm, "host-a", "host-b"),
            "claim": lambda: p.claim_live(vm, g, "host-a"),
            "put_host": lambda: p.put_host(HostRecord("host-a", "0.1.0", None))}[step]
    with pytest.raises(ArbiterAuthError, match="etcd user ovirt-ft-poller has no permission"):
        call()


def test_what_etcd_cannot_refuse_a_host_outside_the_pair_writes_its_claim(site):
    """Claims are keyed by VM, not by host, so any agent's user may write any pair's
    claim (docs/arbiter.md, "What a writer with etcd access can still do"). The arbiter's
    rules refuse the claim; etcd itself takes the raw write."""
    a, c = agent(site, "host-a"), agent(site, "host-c")
    vm = new_vm()
    g = a.begin_generation(vm, "host-a", "host-b")
    with pytest.raises(NotAPairMember):
        c.claim_live(vm, g, "host-c")
    planted = etcd.put(claim_key(vm, g), json.dumps({"host": "host-c", "claimed_at": 1}))
    ok, _ = c.transport.txn("planted claim", [], [planted], [], 2.0)
    assert ok


def test_etcdctl_is_root_by_its_certificate_without_a_password(site):
    """The lab's health checks and move-leader: etcdctl over gRPC, where etcd takes the
    certificate's CN as the user."""
    auth, cluster = site
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
    base = [ETCDCTL, *cluster.ctl_flags(), "--endpoints", ",".join(cluster.endpoints)]
    health = subprocess.run([*base, "endpoint", "health"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert health.returncode == 0, health.stderr
    roles = subprocess.run([*base, "user", "get", ROOT], capture_output=True, text=True,
                           env=env, timeout=30)
    assert roles.returncode == 0 and "root" in roles.stdout, roles.stderr
    leader = cluster.leader()
    target = next(i for i in range(3) if i != leader)
    status = subprocess.run([ETCDCTL, *cluster.ctl_flags(), "--endpoints",
                             cluster.endpoints[target], "endpoint", "status", "-w", "json"],
                            capture_output=True, text=True, env=env, timeout=30)
    member = json.loads(status.stdout)[0]["Status"]["header"]["member_id"]
    moved = subprocess.run([ETCDCTL, *cluster.ctl_flags(), "--endpoints",
                            cluster.endpoints[leader], "move-leader", f"{member:x}"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert moved.returncode == 0, moved.stderr
    assert cluster.leader() == target
    cluster.stop_member(2)
    cluster.start_member(2)                     # healthy again, with auth on


def _install_guide_commands() -> list[str]:
    """The etcdctl lines of docs/install.md's users-and-roles blocks, in order."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "install.md").read_text()
    section = text[text.index("- **Users and roles.**"):text.index("- **Tokens cost")]
    blocks = section.split("```")[1::2]
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("etcdctl ")]


def test_the_install_guides_etcdctl_commands_work_as_written(tmp_path):
    """docs/install.md's commands, run with etcdctl as an admin would (passwords on
    stdin), give a site where each component works and is held to its ranges."""
    ca = pki.make_ca(tmp_path / "ca")
    auth = SecureEtcd(tmp_path, ca, ["host-a", "host-b"], ["127.0.0.1"])
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
    with EtcdCluster(tls=auth.server, client_cert_auth=True, ctl_tls=auth.ctl) as cluster:
        base = [ETCDCTL, *cluster.ctl_flags(), "--endpoints", cluster.endpoints[0]]
        commands = _install_guide_commands()
        assert commands[0] == "etcdctl user add root"
        for host in ("host-a", "host-b"):
            for line in commands:
                if "$H" not in line and host != "host-a":
                    continue                      # the once-only block, run once
                argv = shlex.split(line.replace("$H", host))[1:]
                stdin = None
                if "<" in argv:
                    argv, name = argv[:argv.index("<")], argv[argv.index("<") + 1]
                    stdin = auth.logins[name.removesuffix(".password")].password()
                elif argv[:2] == ["user", "add"]:
                    argv.append("--interactive=false")    # the prompt, answered on stdin
                    stdin = auth.logins[argv[2]].password()
                done = subprocess.run([*base, *argv], input=stdin, capture_output=True,
                                      text=True, env=env, timeout=30)
                assert done.returncode == 0, (line, done.stderr)
        done = subprocess.run([*base, "auth", "enable"], capture_output=True, text=True,
                              env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        a = auth.arbiter(cluster.endpoints, etcdroles.agent_user("host-a"))
        vm = new_vm()
        g = a.begin_generation(vm, "host-a", "host-b")
        assert auth.arbiter(cluster.endpoints, etcdroles.agent_user("host-b")).claim_live(
            vm, g, "host-b")
        a.put_host(HostRecord("host-a", "0.1.0", None))
        with pytest.raises(ArbiterAuthError, match="no permission"):
            a.put_host(HostRecord("host-b", "0.1.0", None))
        p = auth.arbiter(cluster.endpoints, etcdroles.POLLER_USER)
        lease = LeaderLease(p, "ovirt-ft-poller", "p1", ttl=5)
        assert lease.acquire()
        lease.release()
        assert p.discard_stale_image(vm).host == "host-b"
        with pytest.raises(ArbiterAuthError, match="no permission"):
            p.begin_generation(vm, "host-a", "host-b")
