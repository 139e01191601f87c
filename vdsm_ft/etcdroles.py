"""The etcd users and roles of a vdsm-ft site: which component may read or write which
of the arbiter's keys (docs/arbiter.md, "Key layout"; docs/install.md, "etcd").

etcd v3 grants per key or per key range, and the arbiter keys everything a pair needs
by VM (`pairs/<vm>`, `generations/<vm>`, `claims/<vm>/<g>`, `stale-images/<vm>`), not
by host. So every agent holds the same role on those ranges; only a host's own record
(`hosts/<id>`) is a key of that host alone. The poller needs only its leader lease and,
for `ovirt-ft accept-stale-image`, the stale-image marks. The lab sets these up
(`ftlab.etcdauth`), and docs/install.md gives the same as etcdctl commands.
"""
from __future__ import annotations

from dataclasses import dataclass

from vdsm_ft.arbiter import PREFIX, host_key

AGENT_ROLE = "vdsm-ft-agent"
POLLER_ROLE = "vdsm-ft-poller"
POLLER_USER = "ovirt-ft-poller"
READ, READWRITE = "READ", "READWRITE"


@dataclass(frozen=True)
class Grant:
    """One permission of a role: `key` alone, or every key under it with `prefix`."""

    key: str
    prefix: bool
    perm: str

    def etcdctl(self, role: str) -> list[str]:
        """The `etcdctl role grant-permission` argv (after `etcdctl`) for this grant."""
        argv = ["role", "grant-permission", role]
        if self.prefix:
            argv.append("--prefix=true")
        return argv + [self.perm.lower(), self.key]


def _under(name: str) -> str:
    return f"{PREFIX}/{name}/"


# The VM-keyed ranges: begin_generation, update_pair, claim_live (and the stale-image
# mark in its transaction), image_current, and the start hook's reads.
AGENT_GRANTS = tuple(Grant(_under(name), True, READWRITE)
                     for name in ("generations", "pairs", "claims", "stale-images"))
# LeaderLease, and the CLI's read and discard of a stale-image mark.
POLLER_GRANTS = (Grant(_under("leaders"), True, READWRITE),
                 Grant(_under("stale-images"), True, READWRITE))


def host_role(host_id: str) -> str:
    """The role that lets one host's agent publish its own host record."""
    return f"vdsm-ft-host-{host_id}"


def agent_user(host_id: str) -> str:
    """The etcd user of one host's agent (and of its hooks, which share agent.conf)."""
    return f"ft-agent-{host_id}"


def host_grants(host_id: str) -> tuple[Grant, ...]:
    return (Grant(host_key(host_id), False, READWRITE),)


def roles(host_ids: list[str]) -> dict[str, tuple[Grant, ...]]:
    """Every role of a site with these hosts, and its grants."""
    out = {AGENT_ROLE: AGENT_GRANTS, POLLER_ROLE: POLLER_GRANTS}
    out.update({host_role(h): host_grants(h) for h in host_ids})
    return out


def users(host_ids: list[str]) -> dict[str, tuple[str, ...]]:
    """Every user of a site with these hosts, and the roles it holds."""
    out = {agent_user(h): (AGENT_ROLE, host_role(h)) for h in host_ids}
    out[POLLER_USER] = (POLLER_ROLE,)
    return out
