"""The etcd roles (vdsm_ft.etcdroles) against the arbiter's key layout, and the install
guide's etcdctl commands against the roles. tests/integration/test_arbiter_roles.py
checks them on a real etcd."""
from __future__ import annotations

from pathlib import Path

from vdsm_ft import arbiter, etcdroles

INSTALL = Path(__file__).resolve().parents[2] / "docs" / "install.md"
VM, HOST = "vm-1", "host-a"


def _covers(grants, key: str, write: bool) -> bool:
    for g in grants:
        inside = key.startswith(g.key) if g.prefix else key == g.key
        if inside and (g.perm == etcdroles.READWRITE or not write):
            return True
    return False


def _grants(user: str, hosts=(HOST, "host-b")) -> list:
    roles = etcdroles.roles(list(hosts))
    return [g for role in etcdroles.users(list(hosts))[user] for g in roles[role]]


def test_an_agent_may_write_every_key_a_pair_needs_and_its_own_host_record():
    grants = _grants(etcdroles.agent_user(HOST))
    for key in (arbiter.pair_key(VM), arbiter.generation_key(VM), arbiter.claim_key(VM, 7),
                arbiter.stale_image_key(VM), arbiter.host_key(HOST)):
        assert _covers(grants, key, write=True), key


def test_an_agent_may_not_touch_another_hosts_record_nor_the_pollers_lease():
    grants = _grants(etcdroles.agent_user(HOST))
    for key in (arbiter.host_key("host-b"), arbiter.host_key(HOST + "x"),
                arbiter.leader_key("ovirt-ft-poller")):
        assert not _covers(grants, key, write=False), key


def test_the_poller_may_hold_its_lease_and_drop_a_stale_image_mark_only():
    grants = _grants(etcdroles.POLLER_USER)
    assert _covers(grants, arbiter.leader_key("ovirt-ft-poller"), write=True)
    assert _covers(grants, arbiter.stale_image_key(VM), write=True)
    for key in (arbiter.pair_key(VM), arbiter.generation_key(VM), arbiter.claim_key(VM, 1),
                arbiter.host_key(HOST)):
        assert not _covers(grants, key, write=True), key


def test_the_install_guide_gives_every_grant_as_an_etcdctl_command():
    text = " ".join(INSTALL.read_text().split())
    # The guide names the host's id $H (a shell variable); ids cannot contain "$".
    for role, grants in etcdroles.roles(["HOSTID"]).items():
        for g in grants:
            line = " ".join(["etcdctl", *g.etcdctl(role)]).replace("HOSTID", "$H")
            assert line in text, line
    for user, roles in etcdroles.users(["HOSTID"]).items():
        for role in roles:
            line = f"etcdctl user grant-role {user} {role}".replace("HOSTID", "$H")
            assert line in text, line
