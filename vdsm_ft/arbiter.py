"""The arbiter client: pair records, generations and the per-generation live claim in etcd v3.

The FT rules on top of etcd: which keys hold what, which transaction wins a generation or
a claim, the leader lease. Every call has an explicit total bound; vdsm_ft.etcd carries it
to the cluster (endpoints, TLS, authentication) and raises the transport errors re-exported
here. Key layout, rules and the timing rule: docs/arbiter.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from vdsm_ft import etcd
from vdsm_ft.etcd import (ArbiterAuthError, ArbiterError, ArbiterRejected, ArbiterTlsError,
                          ArbiterUnavailable, InvalidArgument, check_timeout)
from vdsm_ft.qemu_probe import QemuCapability

if TYPE_CHECKING:
    from vdsm_ft.hostconfig import HostConfig

# The transport's errors are part of this module's API: callers of Arbiter catch them here.
__all__ = [
    "ARBITER_BOUND_MS", "ARBITER_BOUND_S", "KILL_MARGIN_MS", "PREFIX", "PAIR_STATES", "DOWN",
    "MAX_REASON", "HOSTS_PREFIX",
    "ArbiterError", "InvalidArgument", "ArbiterUnavailable", "ArbiterRejected",
    "ArbiterAuthError", "ArbiterTlsError", "StaleGeneration", "NoSuchPair", "NotAPairMember",
    "PairConflict", "CorruptRecord", "TimingRuleViolation",
    "check_fencing_budget", "PairRecord", "StaleImage", "HostRecord",
    "pair_key", "generation_key", "claims_prefix", "claim_key", "host_key", "stale_image_key",
    "leader_key", "Arbiter", "LeaderLease",
]

log = logging.getLogger(__name__)

# THE TIMING RULE (docs/arbiter.md). A side that has not won the claim within
# ARBITER_BOUND_MS kills its own QEMU. Detection + this bound + the kill must end before
# colo-compare's compare_timeout (vdsm_ft.colo.COMPARE_TIMEOUT_MS, 3000 ms), so that a
# partitioned old primary is dead before any held packet could be released.
ARBITER_BOUND_MS = 1500
ARBITER_BOUND_S = ARBITER_BOUND_MS / 1000
# Time allowed between "lost" (or no answer) and the QEMU process being gone.
KILL_MARGIN_MS = 500

PREFIX = "/vdsm-ft"
PAIR_STATES = ("Starting", "Syncing", "Protected", "Not Protected", "Need Secondary",
               "Failing Over", "Taking Identity", "Disabled", "Down")
# A pair in this state has no live copy anywhere (stopped on purpose, or lost).
DOWN = "Down"
MAX_REASON = 1024

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_KEEP: Any = object()  # "leave this field as it is"


class StaleGeneration(ArbiterError):
    """The generation named is not the VM's current one: the caller lost that pairing."""

    def __init__(self, vm_id: str, generation: int, current: int) -> None:
        super().__init__(f"VM {vm_id}: generation {generation} is not current "
                         f"(current is {current}); this side must not act as live")
        self.vm_id, self.generation, self.current = vm_id, generation, current


class NoSuchPair(ArbiterError):
    """The VM has no pair record: it was never paired, or the pair was deleted."""


class NotAPairMember(ArbiterError):
    """The host is neither primary nor secondary of the VM's current generation."""


class PairConflict(ArbiterError):
    """The pair record changed since it was read (compare-and-swap on mod_revision failed)."""

    def __init__(self, vm_id: str, current: "PairRecord | None") -> None:
        super().__init__(f"VM {vm_id}: pair record changed concurrently "
                         f"(now at mod_revision {current.mod_revision if current else 0})")
        self.current = current


class CorruptRecord(ArbiterError):
    """A value read from etcd is not what this module writes."""


class CorruptClaim(CorruptRecord):
    """A live claim that no member of the pair can have written: it does not parse, or
    its holder is not in the pair. Only a writer outside the FT rules (a careless admin,
    an attacker with etcd access) makes one; nobody may win the generation after it."""


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{what} must be 1-128 characters of letters, digits and "
                              f"'._:@-', starting with a letter or digit; got {value!r}")
    return value


def _check_generation(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"generation must be an integer >= 1; got {value!r}")
    return value


class TimingRuleViolation(ArbiterError, ValueError):
    """The configured timeouts break the fencing rule of docs/arbiter.md."""


def check_fencing_budget(detection_ms: int, compare_timeout_ms: int,
                         bound_ms: int = ARBITER_BOUND_MS) -> None:
    """Raise TimingRuleViolation unless detection + arbiter bound + kill < compare_timeout."""
    total = detection_ms + bound_ms + KILL_MARGIN_MS
    if total >= compare_timeout_ms:
        raise TimingRuleViolation(
            f"failure detection {detection_ms} ms + arbiter bound {bound_ms} ms + kill margin "
            f"{KILL_MARGIN_MS} ms = {total} ms is not below colo-compare compare_timeout "
            f"{compare_timeout_ms} ms: a partitioned primary could release output; shorten "
            "detection or raise compare_timeout")


def _check_fields(state: str = _KEEP, reason: str = _KEEP, primary: str = _KEEP,
                  secondary: str | None = _KEEP) -> None:
    if state is not _KEEP and state not in PAIR_STATES:
        raise InvalidArgument(f"state must be one of {', '.join(PAIR_STATES)}; got {state!r}")
    if reason is not _KEEP and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise InvalidArgument(f"reason must be a string of at most {MAX_REASON} characters")
    if primary is not _KEEP:
        _check_name("primary host", primary)
    if secondary is not _KEEP and secondary is not None:
        _check_name("secondary host", secondary)


@dataclass(frozen=True)
class PairRecord:
    """What etcd holds for one FT VM. ``mod_revision`` is etcd's, never encoded."""

    vm_id: str
    generation: int
    primary: str
    secondary: str | None
    state: str
    reason: str = ""
    updated_at: float = 0.0
    mod_revision: int = 0

    def __post_init__(self) -> None:
        _check_name("vm id", self.vm_id)
        _check_generation(self.generation)
        _check_name("primary host", self.primary)
        if self.secondary is not None:
            _check_name("secondary host", self.secondary)
            if self.secondary == self.primary:
                raise InvalidArgument(f"VM {self.vm_id}: primary and secondary are both "
                                      f"{self.primary!r}; a pair needs two hosts")
        _check_fields(state=self.state, reason=self.reason)

    @property
    def members(self) -> tuple[str, ...]:
        return (self.primary,) if self.secondary is None else (self.primary, self.secondary)

    def encode(self) -> bytes:
        body = dataclasses.asdict(self)
        del body["mod_revision"]
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, mod_revision: int = 0) -> "PairRecord":
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise TypeError("not an object")
            return cls(mod_revision=mod_revision, **body)
        except (ValueError, TypeError) as e:
            raise CorruptRecord(f"pair record is not valid: {e}: {data[:200]!r}") from e


# --- keys -------------------------------------------------------------------------------

def pair_key(vm_id: str) -> str:
    return f"{PREFIX}/pairs/{_check_name('vm id', vm_id)}"


def generation_key(vm_id: str) -> str:
    return f"{PREFIX}/generations/{_check_name('vm id', vm_id)}"


def claims_prefix(vm_id: str) -> str:
    return f"{PREFIX}/claims/{_check_name('vm id', vm_id)}/"


def claim_key(vm_id: str, generation: int) -> str:
    # Zero-padded so that key order is generation order (used to prune old claims).
    return f"{claims_prefix(vm_id)}{_check_generation(generation):012d}"


def host_key(host_id: str) -> str:
    return f"{PREFIX}/hosts/{_check_name('host id', host_id)}"


HOSTS_PREFIX = f"{PREFIX}/hosts/"


def stale_image_key(vm_id: str) -> str:
    # Not under pairs/ or claims/: delete_pair must not forget that the image is behind.
    return f"{PREFIX}/stale-images/{_check_name('vm id', vm_id)}"


@dataclass(frozen=True)
class StaleImage:
    """The VM's storage-domain image is behind (docs/decisions.md, D2): ``host`` won
    ``generation`` as its secondary at ``since`` (wall clock) and runs, or ran, the VM on
    its replica; the copy-back onto the image has not finished. Written in the claim's own
    transaction, so no write can reach the replica alone before the arbiter knows
    (vdsm_ft.imagestate)."""

    vm_id: str
    generation: int
    host: str
    since: float

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "StaleImage":
        try:
            body = json.loads(data)
            mark = cls(vm_id=_check_name("vm id", body["vm_id"]),
                       generation=_check_generation(body["generation"]),
                       host=_check_name("host", body["host"]), since=float(body["since"]))
        except (ValueError, TypeError, KeyError, InvalidArgument) as e:
            raise CorruptRecord(f"stale-image mark is not valid: {e}: {data[:200]!r}") from e
        return mark


@dataclass(frozen=True)
class HostRecord:
    """What a host's agent publishes about the host; only that agent writes it."""

    host_id: str
    agent_version: str
    qemu: QemuCapability | None       # can its QEMU do COLO (vdsm_ft.qemu_probe)
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        _check_name("host id", self.host_id)

    def encode(self) -> bytes:
        return json.dumps({"host_id": self.host_id, "agent_version": self.agent_version,
                           "qemu": self.qemu.to_dict() if self.qemu else None,
                           "updated_at": self.updated_at}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> "HostRecord":
        try:
            body = json.loads(data)
            qemu = body.get("qemu")
            return cls(host_id=body["host_id"], agent_version=str(body["agent_version"]),
                       qemu=QemuCapability.from_dict(qemu) if qemu is not None else None,
                       updated_at=float(body.get("updated_at", 0.0)))
        except (ValueError, TypeError, KeyError, AttributeError, InvalidArgument) as e:
            raise CorruptRecord(f"host record is not valid: {e}: {data[:200]!r}") from e


def leader_key(name: str) -> str:
    return f"{PREFIX}/leaders/{_check_name('leader name', name)}"


def _int_value(kv: etcd.Kv | None, what: str) -> int:
    if kv is None:
        return 0
    try:
        return int(kv.value)
    except ValueError as e:
        raise CorruptRecord(f"{what} holds {kv.value[:50]!r}, not a number") from e


def _claim_holder(kv: etcd.Kv | None) -> str | None:
    if kv is None:
        return None
    try:
        return _check_name("claim holder", json.loads(kv.value)["host"])
    except (ValueError, TypeError, KeyError, InvalidArgument) as e:
        raise CorruptClaim(f"live claim is not valid: {kv.value[:200]!r}") from e


# --- the arbiter ------------------------------------------------------------------------


class Arbiter:
    """Pair records, generations and live claims for FT VMs, kept in an etcd cluster.

    ``bound`` (seconds) is the default total time of every call, across all endpoints.
    ``ca_cert``/``cert``/``key``/``username``/``password``: how to reach the cluster, as
    vdsm_ft.etcd.Transport takes them.
    """

    def __init__(self, endpoints: Sequence[str], bound: float = ARBITER_BOUND_S, *,
                 ca_cert: str | None = None, cert: str | None = None,
                 key: str | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.bound = check_timeout(bound)
        self._t = etcd.Transport(endpoints, key_prefix=PREFIX, ca_cert=ca_cert, cert=cert,
                                 key=key, username=username, password=password)

    @property
    def transport(self) -> etcd.Transport:
        """The etcd transport under these rules; LeaderLease shares it."""
        return self._t

    def _timeout(self, timeout: float | None) -> float:
        return self.bound if timeout is None else check_timeout(timeout)

    # pair records

    def get_pair(self, vm_id: str, timeout: float | None = None) -> PairRecord | None:
        key = pair_key(vm_id)
        _, result = self._t.txn(f"read of {key}", [], [etcd.get(key)], [], self._timeout(timeout))
        kv = etcd.ranges(result)[0]
        return None if kv is None else PairRecord.decode(kv.value, kv.mod_revision)

    def current_generation(self, vm_id: str, timeout: float | None = None) -> int:
        """The VM's current generation; 0 if it was never paired."""
        key = generation_key(vm_id)
        _, result = self._t.txn(f"read of {key}", [], [etcd.get(key)], [], self._timeout(timeout))
        return _int_value(etcd.ranges(result)[0], key)

    def put_pair(self, record: PairRecord, timeout: float | None = None) -> PairRecord:
        """Store ``record`` if the stored one still has ``record.mod_revision`` (0: absent).

        The record's generation must be the current one. Returns the record as stored, with
        its new mod_revision. Raises PairConflict or StaleGeneration.
        """
        key, gkey = pair_key(record.vm_id), generation_key(record.vm_id)
        stored = dataclasses.replace(record, updated_at=time.time(), mod_revision=0)
        data = stored.encode()
        ok, result = self._t.txn(
            f"write of {key}",
            [etcd.cmp_unchanged(key, record.mod_revision),
             etcd.cmp_value(gkey, str(record.generation))],
            [etcd.put(key, data)], [etcd.get(key), etcd.get(gkey)], self._timeout(timeout))
        if ok:
            return dataclasses.replace(stored, mod_revision=int(result["header"]["revision"]))
        kv, gkv = etcd.ranges(result)
        # A retry on another endpoint after a lost answer finds its own write: success.
        if kv is not None and kv.value == data:
            return dataclasses.replace(stored, mod_revision=kv.mod_revision)
        current = _int_value(gkv, gkey)
        if current != record.generation:
            raise StaleGeneration(record.vm_id, record.generation, current)
        raise PairConflict(record.vm_id, None if kv is None
                           else PairRecord.decode(kv.value, kv.mod_revision))

    def update_pair(self, vm_id: str, generation: int, *, state: str = _KEEP,
                    reason: str = _KEEP, primary: str = _KEEP, secondary: str | None = _KEEP,
                    timeout: float | None = None) -> PairRecord:
        """Change fields of the pair record of ``generation``, retrying on concurrent writes.

        Raises StaleGeneration if the record belongs to another generation, NoSuchPair if
        there is none.
        """
        _check_generation(generation)
        changes = {k: v for k, v in (("state", state), ("reason", reason),
                                     ("primary", primary), ("secondary", secondary))
                   if v is not _KEEP}
        _check_name("vm id", vm_id)
        _check_fields(**changes)  # before any I/O
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            left = max(0.001, deadline - time.monotonic())
            record = self.get_pair(vm_id, timeout=left)
            if record is None:
                raise NoSuchPair(f"VM {vm_id} has no pair record")
            if record.generation != generation:
                raise StaleGeneration(vm_id, generation, record.generation)
            new = dataclasses.replace(record, **changes)
            try:
                return self.put_pair(new, timeout=max(0.001, deadline - time.monotonic()))
            except PairConflict:
                if time.monotonic() >= deadline:
                    raise

    def delete_pair(self, vm_id: str, timeout: float | None = None) -> None:
        """Forget the pair and its claims. The generation counter stays, so a later
        pairing never reuses a generation."""
        prefix = claims_prefix(vm_id)
        self._t.txn(f"delete of pair {vm_id}", [],
                    [etcd.delete(pair_key(vm_id)), etcd.delete(prefix, etcd.range_end(prefix))],
                    [], self._timeout(timeout))

    # host records

    def put_host(self, record: HostRecord, timeout: float | None = None) -> HostRecord:
        """Publish the host's record (its own agent is the only writer: no compare)."""
        stored = dataclasses.replace(record, updated_at=time.time())
        key = host_key(record.host_id)
        self._t.txn(f"write of {key}", [], [etcd.put(key, stored.encode())], [],
                    self._timeout(timeout))
        return stored

    def get_host(self, host_id: str, timeout: float | None = None) -> HostRecord | None:
        key = host_key(host_id)
        _, result = self._t.txn(f"read of {key}", [], [etcd.get(key)], [], self._timeout(timeout))
        kv = etcd.ranges(result)[0]
        return None if kv is None else HostRecord.decode(kv.value)

    def hosts(self, timeout: float | None = None) -> list[HostRecord]:
        """Every published host record, by host id."""
        _, result = self._t.txn(f"read of {HOSTS_PREFIX}", [],
                                [etcd.get(HOSTS_PREFIX, prefix=True)], [],
                                self._timeout(timeout))
        return sorted((HostRecord.decode(kv.value) for kv in etcd.kvs(result)),
                      key=lambda r: r.host_id)

    # generations

    def begin_generation(self, vm_id: str, primary: str, secondary: str | None,
                         state: str | None = None, timeout: float | None = None) -> int:
        """Start a new pairing: bump the VM's generation and write its pair record, atomically.

        Returns the new generation (strictly greater than every earlier one of this VM).
        """
        gkey, key, prefix = generation_key(vm_id), pair_key(vm_id), claims_prefix(vm_id)
        if state is None:
            state = "Syncing" if secondary is not None else "Need Secondary"
        PairRecord(vm_id, 1, primary, secondary, state)  # validate before any I/O
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            left = max(0.001, deadline - time.monotonic())
            _, result = self._t.txn(f"read of {gkey}", [], [etcd.get(gkey)], [], left)
            gkv = etcd.ranges(result)[0]
            generation = _int_value(gkv, gkey) + 1
            record = PairRecord(vm_id, generation, primary, secondary, state,
                                updated_at=time.time())
            success = [etcd.put(gkey, str(generation)), etcd.put(key, record.encode())]
            if generation > 2:
                # Keep the previous generation's claim for the record; older ones go.
                success.append(etcd.delete(prefix, etcd.b64(claim_key(vm_id, generation - 1))))
            ok, _ = self._t.txn(f"new generation of {vm_id}",
                                [etcd.cmp_unchanged(gkey, gkv.mod_revision if gkv else 0)],
                                success, [], max(0.001, deadline - time.monotonic()))
            if ok:
                log.info("VM %s: generation %d, primary %s, secondary %s", vm_id, generation,
                         primary, secondary)
                return generation
            if time.monotonic() >= deadline:
                raise ArbiterUnavailable(f"VM {vm_id}: generation kept changing under "
                                         f"concurrent writers for {self._timeout(timeout)} s")

    # the live claim

    def claim_live(self, vm_id: str, generation: int, host: str,
                   timeout: float | None = None) -> bool:
        """Atomically claim "``host`` is live in ``generation``". True only for the one winner.

        The first claim of a generation wins forever; asking again answers the same. Raises
        StaleGeneration if ``generation`` is not current, NotAPairMember if ``host`` is not
        in the pair, CorruptClaim if the claim found names no member, ArbiterUnavailable
        when etcd does not answer within the bound (the timing rule: the caller must then
        kill its own QEMU).
        """
        _check_generation(generation)
        _check_name("host", host)
        key, gkey, ckey = pair_key(vm_id), generation_key(vm_id), claim_key(vm_id, generation)
        claimed_at = time.time()
        claim = json.dumps({"host": host, "claimed_at": claimed_at}).encode()
        deadline = time.monotonic() + self._timeout(timeout)
        reads = [etcd.get(key), etcd.get(gkey), etcd.get(ckey)]
        _, result = self._t.txn(f"read of claim {ckey}", [], reads, [],
                                max(0.001, deadline - time.monotonic()))
        while True:
            kv, gkv, ckv = etcd.ranges(result)
            current = _int_value(gkv, gkey)
            if current != generation:
                raise StaleGeneration(vm_id, generation, current)
            holder = _claim_holder(ckv)
            if holder is not None:
                if kv is not None:
                    members = PairRecord.decode(kv.value, kv.mod_revision).members
                    if holder not in members:
                        raise CorruptClaim(f"VM {vm_id}: generation {generation} is "
                                           f"claimed by {holder!r}, which is not in its "
                                           f"pair ({', '.join(members)}); someone outside "
                                           f"vdsm-ft wrote {ckey}")
                return holder == host
            if kv is None:
                raise NoSuchPair(f"VM {vm_id} has no pair record for generation {generation}")
            record = PairRecord.decode(kv.value, kv.mod_revision)
            if host not in record.members:
                raise NotAPairMember(f"host {host} is not a member of VM {vm_id}'s pair in "
                                     f"generation {generation} ({', '.join(record.members)})")
            # Succeeds only if nobody claimed this generation, the generation is still
            # current and the membership just checked still holds.
            success = [etcd.put(ckey, claim)]
            if host == record.secondary:
                # A secondary that wins runs on its replica from now on
                # (docs/decisions.md, D2).
                success.append(etcd.put(stale_image_key(vm_id), StaleImage(
                    vm_id, generation, host, claimed_at).encode()))
            ok, result = self._t.txn(
                f"claim {ckey}",
                [etcd.cmp_value(gkey, str(generation)), etcd.cmp_create(ckey, 0),
                 etcd.cmp_mod(key, kv.mod_revision)],
                success, reads, max(0.001, deadline - time.monotonic()))
            if ok:
                log.info("VM %s: %s won generation %d", vm_id, host, generation)
                return True
            if time.monotonic() >= deadline:
                raise ArbiterUnavailable(f"VM {vm_id}: claim of generation {generation} kept "
                                         "conflicting with concurrent writers")

    # the storage-domain image

    def stale_image(self, vm_id: str, timeout: float | None = None) -> StaleImage | None:
        """The mark saying the VM's storage-domain image is behind, or None if it is
        current (a linearizable read: None is an answer, not a guess)."""
        key = stale_image_key(vm_id)
        _, result = self._t.txn(f"read of {key}", [], [etcd.get(key)], [], self._timeout(timeout))
        kv = etcd.ranges(result)[0]
        return None if kv is None else StaleImage.decode(kv.value)

    def image_current(self, vm_id: str, generation: int, host: str,
                      timeout: float | None = None) -> None:
        """``host``'s copy-back made the image current in ``generation``: drop its mark of
        that generation or an earlier one (a later pairing began from a current image).
        Another host's mark, or one of a later failover, stays (compare-and-delete on the
        mark's revision)."""
        _check_generation(generation)
        _check_name("host", host)
        key = stale_image_key(vm_id)
        deadline = time.monotonic() + self._timeout(timeout)
        while True:
            _, result = self._t.txn(f"read of {key}", [], [etcd.get(key)], [],
                                    max(0.001, deadline - time.monotonic()))
            kv = etcd.ranges(result)[0]
            mark = None if kv is None else StaleImage.decode(kv.value)
            if mark is None or mark.host != host or mark.generation > generation:
                return
            ok, _ = self._t.txn(f"delete of {key}", [etcd.cmp_mod(key, kv.mod_revision)],
                                [etcd.delete(key)], [], max(0.001, deadline - time.monotonic()))
            if ok:
                log.info("VM %s: storage-domain image current (generation %d)", vm_id,
                         generation)
                return
            if time.monotonic() >= deadline:
                raise ArbiterUnavailable(f"VM {vm_id}: stale-image mark kept changing")

    def discard_stale_image(self, vm_id: str, timeout: float | None = None
                            ) -> StaleImage | None:
        """The admin's override (`ovirt-ft accept-stale-image`): forget the mark, so the
        image as it is may start. Returns the mark that was dropped, or None."""
        key = stale_image_key(vm_id)
        _, result = self._t.txn(f"discard of {key}", [], [etcd.get(key), etcd.delete(key)], [],
                                self._timeout(timeout))
        kv = etcd.ranges(result)[0]
        mark = None if kv is None else StaleImage.decode(kv.value)
        if mark is not None:
            log.warning("VM %s: stale-image mark of generation %d (replica on %s) "
                        "discarded by an admin", vm_id, mark.generation, mark.host)
        return mark

    def live_holder(self, vm_id: str, generation: int,
                    timeout: float | None = None) -> str | None:
        """The host that won ``generation``, or None if nobody claimed it (or it was pruned)."""
        ckey = claim_key(vm_id, generation)
        _, result = self._t.txn(f"read of {ckey}", [], [etcd.get(ckey)], [],
                                self._timeout(timeout))
        return _claim_holder(etcd.ranges(result)[0])

    def live_claim(self, vm_id: str, generation: int,
                   timeout: float | None = None) -> tuple[str, float] | None:
        """(winner, claimed_at wall-clock seconds) of ``generation``, or None if unclaimed.

        `claimed_at` is the winner's own clock, so only the winner may compare it with now
        (the copy-back's fencing proof, vdsm_ft.copyback).
        """
        ckey = claim_key(vm_id, generation)
        _, result = self._t.txn(f"read of {ckey}", [], [etcd.get(ckey)], [],
                                self._timeout(timeout))
        kv = etcd.ranges(result)[0]
        holder = _claim_holder(kv)
        if holder is None:
            return None
        try:
            return holder, float(json.loads(kv.value)["claimed_at"])
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptRecord(f"live claim has no claimed_at: {kv.value[:200]!r}") from e

    def other_member_live(self, vm_id: str, host: str,
                          timeout: float | None = None) -> str | None:
        """The host other than ``host`` that runs this VM's live copy, if the arbiter knows one.

        Live is the winner of the current generation's claim, or else the primary of the
        current generation; a pair in state Down has no live copy. For the start hook: a
        non-None answer means starting a live copy on ``host`` would make a second one. (The
        secondary of the current generation is a standby, not a live copy: its start must
        not be refused by this check.)
        """
        return self.start_check(vm_id, host, timeout)[0]

    def start_check(self, vm_id: str, host: str, timeout: float | None = None
                    ) -> tuple[str | None, StaleImage | None]:
        """What the start hook asks, in one read: (`other_member_live`, `stale_image`)."""
        _check_name("host", host)
        key, prefix = pair_key(vm_id), claims_prefix(vm_id)
        _, result = self._t.txn(f"read of pair {vm_id}", [],
                                [etcd.get(key), etcd.get(prefix, prefix=True, last=True),
                                 etcd.get(stale_image_key(vm_id))], [], self._timeout(timeout))
        kv, ckv, skv = etcd.ranges(result)
        mark = None if skv is None else StaleImage.decode(skv.value)
        return _live_other(vm_id, host, kv, ckv), mark


def host_arbiter(config: "HostConfig") -> Arbiter:
    """The arbiter as a host's agent and hooks reach it, from their agent.conf."""
    return Arbiter(config.etcd_endpoints, ca_cert=config.etcd_ca, cert=config.etcd_cert,
                   key=config.etcd_key, username=config.etcd_username,
                   password=config.etcd_password)


def _live_other(vm_id: str, host: str, kv: etcd.Kv | None, ckv: etcd.Kv | None) -> str | None:
    """`Arbiter.other_member_live` from the pair record and the last claim as read."""
    if kv is None:
        return None
    record = PairRecord.decode(kv.value, kv.mod_revision)
    if record.state == DOWN:
        return None
    live = record.primary
    # The last claim key is the highest generation's; it counts only if current.
    if ckv is not None and ckv.key == claim_key(vm_id, record.generation).encode():
        live = _claim_holder(ckv) or live
    return live if live != host else None


class LeaderLease:
    """Leadership of ``name`` for one ``holder`` at a time, on an etcd lease of ``ttl`` s.

    The holder counts itself leader only until ``ttl`` after the last successful grant or
    keepalive was sent, which is never later than etcd expires the lease: two holders can
    never both see ``is_leader`` true. acquire/refresh/release raise ArbiterUnavailable
    when etcd does not answer within the arbiter's bound.
    """

    def __init__(self, arbiter: Arbiter, name: str, holder: str, ttl: int = 5) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise InvalidArgument(f"lease ttl must be an integer >= 1 second; got {ttl!r}")
        self._t = arbiter.transport
        self._bound = arbiter.bound
        self.key = leader_key(name)
        self.holder = _check_name("leader holder", holder)
        self.ttl = ttl
        self._lease: int | None = None
        self._valid_until = 0.0

    @property
    def is_leader(self) -> bool:
        return self._lease is not None and time.monotonic() < self._valid_until

    def _drop(self) -> None:
        self._lease = None
        self._valid_until = 0.0

    def acquire(self) -> bool:
        """Become leader if nobody is; refresh if already leader. Returns is_leader."""
        if self._lease is not None:
            return self.refresh()
        sent = time.monotonic()
        lease = self._t.lease_grant(f"lease grant for {self.key}", self.ttl, self._bound)
        ok, result = self._t.txn(f"leader claim {self.key}", [etcd.cmp_create(self.key, 0)],
                                 [etcd.put(self.key, self.holder, lease)], [etcd.get(self.key)],
                                 self._bound)
        if not ok:
            kv = etcd.ranges(result)[0]
            ok = kv is not None and kv.lease == lease  # our own write, answered twice
        if ok:
            self._lease, self._valid_until = lease, sent + self.ttl
            log.info("%s: %s is leader", self.key, self.holder)
            return True
        self._revoke(lease)
        return False

    def refresh(self) -> bool:
        """Keep the lease alive. Returns False (and stops leading) if it was lost."""
        if self._lease is None:
            return False
        lease, sent = self._lease, time.monotonic()
        try:
            ttl = self._t.lease_keepalive(f"lease keepalive for {self.key}", lease, self._bound)
        except ArbiterRejected:
            ttl = 0  # "requested lease not found": it expired
        if ttl <= 0:
            log.warning("%s: lease of %s expired; no longer leader", self.key, self.holder)
            self._drop()
            return False
        _, result = self._t.txn(f"read of {self.key}", [], [etcd.get(self.key)], [], self._bound)
        kv = etcd.ranges(result)[0]
        if kv is None or kv.lease != lease:
            self._drop()
            self._revoke(lease)
            return False
        self._valid_until = sent + self.ttl
        return True

    def release(self) -> None:
        """Stop leading at once; revoking the lease deletes the leader key for the others."""
        lease = self._lease
        self._drop()
        if lease is not None:
            self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        try:
            self._t.lease_revoke(f"lease revoke for {self.key}", lease, self._bound)
        except ArbiterRejected as e:
            # An expired lease is already gone: nothing left to release.
            log.debug("%s: revoke of lease %x: %s", self.key, lease, e)
