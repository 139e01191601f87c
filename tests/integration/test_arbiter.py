"""The arbiter against a REAL 3-member etcd 3.4 cluster (ftlab.etcd)."""
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from ftlab.etcd import EtcdCluster, MemberSpec
from vdsm_ft.arbiter import (ARBITER_BOUND_S, Arbiter, ArbiterUnavailable, HostRecord,
                             LeaderLease, NoSuchPair, NotAPairMember, PairConflict,
                             StaleGeneration, StaleImage)
from vdsm_ft.qemu_probe import QemuCapability

# What "within the bound" may overshoot by: the last attempt's socket timeout and the
# pause between rounds.
SLACK = 0.1
RACE_ROUNDS = 50


def new_vm() -> str:
    return f"vm-{uuid.uuid4()}"


@pytest.fixture
def arbiter(etcd_cluster):
    return Arbiter(etcd_cluster.endpoints)


def test_host_records_are_published_and_read_back(arbiter):
    names = [f"host-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    bad = QemuCapability(capable=False, reason="cannot do COLO: x-colo cannot be set",
                         path="/usr/libexec/qemu-kvm", version="10.1.0", failed=("x-colo",))
    before = time.time()
    stored = arbiter.put_host(HostRecord(names[0], "0.1.0", bad))
    arbiter.put_host(HostRecord(names[1], "0.1.0", None))
    assert stored.updated_at >= before
    assert arbiter.get_host(names[0]) == stored
    assert arbiter.get_host(names[0]).qemu.failed == ("x-colo",)
    assert arbiter.get_host("host-never-published") is None
    mine = [r for r in arbiter.hosts() if r.host_id in names]
    assert [r.host_id for r in mine] == sorted(names)
    assert {r.host_id: r.qemu for r in mine} == {names[0]: bad, names[1]: None}


def test_generations_strictly_increase(arbiter):
    vm = new_vm()
    assert arbiter.current_generation(vm) == 0
    seen = [arbiter.begin_generation(vm, "hostA", "hostB") for _ in range(10)]
    assert seen == sorted(set(seen)) and seen[0] == 1
    assert arbiter.current_generation(vm) == seen[-1]
    record = arbiter.get_pair(vm)
    assert (record.generation, record.primary, record.secondary, record.state) == \
        (seen[-1], "hostA", "hostB", "Syncing")


def test_concurrent_pairings_never_share_a_generation(etcd_cluster):
    vm = new_vm()
    results, errors = [], []
    start = threading.Barrier(4)

    def pair(i):
        a = Arbiter(etcd_cluster.endpoints, bound=10)
        start.wait()
        for _ in range(5):
            try:
                results.append(a.begin_generation(vm, f"host{i}", "hostZ"))
            except Exception as e:  # collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=pair, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 20 and len(set(results)) == 20
    assert max(results) == Arbiter(etcd_cluster.endpoints).current_generation(vm)


def _race(arbiters, vm, generation, hosts):
    start = threading.Barrier(len(hosts))
    answers = {}

    def contend(a, host):
        start.wait()
        answers[host] = a.claim_live(vm, generation, host)

    threads = [threading.Thread(target=contend, args=(a, h)) for a, h in zip(arbiters, hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_claim_race_between_threads_has_exactly_one_winner(etcd_cluster):
    # One Arbiter per contender, as on two hosts; each prefers a different member.
    eps = etcd_cluster.endpoints
    arbiters = [Arbiter(eps), Arbiter(eps[1:] + eps[:1])]
    vm = new_vm()
    winners = []
    for _ in range(RACE_ROUNDS):
        g = arbiters[0].begin_generation(vm, "hostA", "hostB")
        answers = _race(arbiters, vm, g, ["hostA", "hostB"])
        assert sorted(answers.values()) == [False, True], answers
        winner = next(h for h, won in answers.items() if won)
        assert arbiters[1].live_holder(vm, g) == winner
        # Asking again never changes the outcome.
        assert arbiters[0].claim_live(vm, g, winner) is True
        loser = "hostB" if winner == "hostA" else "hostA"
        assert arbiters[1].claim_live(vm, g, loser) is False
        winners.append(winner)
    print("thread race winners:", {h: winners.count(h) for h in set(winners)})


def _contender(endpoints, vm, host, rounds, barrier, generations, out):
    a = Arbiter(endpoints)
    for i in range(rounds):
        g = generations.get()
        barrier.wait(timeout=30)
        out.put((i, host, a.claim_live(vm, g, host)))


def test_claim_race_between_processes_has_exactly_one_winner(etcd_cluster):
    ctx = multiprocessing.get_context("spawn")
    a = Arbiter(etcd_cluster.endpoints)
    vm = new_vm()
    barrier, out = ctx.Barrier(2), ctx.Queue()
    queues = {h: ctx.Queue() for h in ("hostA", "hostB")}
    procs = [ctx.Process(target=_contender,
                         args=(etcd_cluster.endpoints, vm, h, RACE_ROUNDS, barrier, q, out))
             for h, q in queues.items()]
    for p in procs:
        p.start()
    try:
        for i in range(RACE_ROUNDS):
            g = a.begin_generation(vm, "hostA", "hostB")
            for q in queues.values():
                q.put(g)
            answers = [out.get(timeout=30) for _ in range(2)]
            assert {r for r, _, _ in answers} == {i}
            won = [h for _, h, ok in answers if ok]
            assert len(won) == 1, answers
            assert a.live_holder(vm, g) == won[0]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def test_stale_generation_is_refused(arbiter):
    vm = new_vm()
    g1 = arbiter.begin_generation(vm, "hostA", "hostB")
    assert arbiter.claim_live(vm, g1, "hostA") is True
    g2 = arbiter.begin_generation(vm, "hostA", "hostC")
    for host in ("hostA", "hostB"):
        with pytest.raises(StaleGeneration) as e:
            arbiter.claim_live(vm, g1, host)
        assert (e.value.generation, e.value.current) == (g1, g2)
    with pytest.raises(StaleGeneration):
        arbiter.claim_live(vm, g2 + 1, "hostA")
    assert arbiter.live_holder(vm, g2) is None
    with pytest.raises(NotAPairMember):
        arbiter.claim_live(vm, g2, "hostB")
    assert arbiter.claim_live(vm, g2, "hostC") is True
    # An old-generation writer cannot overwrite the record either.
    with pytest.raises(StaleGeneration):
        arbiter.update_pair(vm, g1, state="Protected")


def test_claim_needs_a_pair(arbiter):
    vm = new_vm()
    with pytest.raises(StaleGeneration):
        arbiter.claim_live(vm, 1, "hostA")
    g = arbiter.begin_generation(vm, "hostA", "hostB")
    arbiter.delete_pair(vm)
    with pytest.raises(NoSuchPair):
        arbiter.claim_live(vm, g, "hostA")
    assert arbiter.begin_generation(vm, "hostA", "hostB") == g + 1


def test_pair_record_compare_and_swap(arbiter):
    vm = new_vm()
    g = arbiter.begin_generation(vm, "hostA", "hostB")
    first = arbiter.get_pair(vm)
    updated = arbiter.put_pair(first.__class__(vm, g, "hostA", "hostB", "Protected",
                                               mod_revision=first.mod_revision))
    assert updated.mod_revision > first.mod_revision
    assert arbiter.get_pair(vm) == updated
    # A writer holding the old revision loses and is told the current record.
    with pytest.raises(PairConflict) as e:
        arbiter.put_pair(first.__class__(vm, g, "hostA", "hostB", "Failing Over",
                                         mod_revision=first.mod_revision))
    assert e.value.current == updated
    after = arbiter.update_pair(vm, g, state="Not Protected", reason="secondary lost",
                                secondary=None)
    assert (after.state, after.reason, after.secondary) == \
        ("Not Protected", "secondary lost", None)
    with pytest.raises(NoSuchPair):
        arbiter.update_pair(new_vm(), 1, state="Protected")


def test_concurrent_updates_all_land(etcd_cluster):
    vm = new_vm()
    a = Arbiter(etcd_cluster.endpoints)
    g = a.begin_generation(vm, "hostA", "hostB")
    reasons = [f"r{i}" for i in range(8)]
    start = threading.Barrier(len(reasons))
    revisions = []

    def update(reason):
        start.wait()
        revisions.append(Arbiter(etcd_cluster.endpoints, bound=10).update_pair(
            vm, g, reason=reason).mod_revision)

    threads = [threading.Thread(target=update, args=(r,)) for r in reasons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each CAS write got its own revision: none overwrote another unseen.
    assert len(set(revisions)) == len(reasons)
    assert a.get_pair(vm).reason in reasons


def test_a_secondary_that_wins_marks_the_image_stale_until_it_is_current(arbiter):
    vm = new_vm()
    g1 = arbiter.begin_generation(vm, "hostA", "hostB")
    assert arbiter.claim_live(vm, g1, "hostA")          # the primary: its image is current
    assert arbiter.stale_image(vm) is None
    g2 = arbiter.begin_generation(vm, "hostA", "hostB")
    before = time.time()
    assert arbiter.claim_live(vm, g2, "hostB")          # the secondary: on its replica
    mark = arbiter.stale_image(vm)
    assert (mark.vm_id, mark.generation, mark.host) == (vm, g2, "hostB")
    assert before <= mark.since <= time.time()
    assert arbiter.live_claim(vm, g2) == ("hostB", mark.since)
    assert arbiter.start_check(vm, "hostC") == ("hostB", mark)   # the start hook's one read
    assert arbiter.claim_live(vm, g2, "hostB") and arbiter.stale_image(vm) == mark
    arbiter.delete_pair(vm)                             # forgetting the pair keeps it
    assert arbiter.stale_image(vm) == mark
    arbiter.image_current(vm, g2 - 1, "hostB")          # an older copy-back: not this one
    arbiter.image_current(vm, g2, "hostA")              # another host's: not its mark
    assert arbiter.stale_image(vm) == mark
    arbiter.image_current(vm, g2, "hostB")
    assert arbiter.stale_image(vm) is None
    arbiter.image_current(vm, g2, "hostB")              # again: nothing left, no error


def test_a_later_failovers_mark_outlives_an_earlier_copy_back(arbiter):
    vm = new_vm()
    g1 = arbiter.begin_generation(vm, "hostA", "hostB")
    assert arbiter.claim_live(vm, g1, "hostB")
    g2 = arbiter.begin_generation(vm, "hostB", "hostC")
    assert arbiter.stale_image(vm).generation == g1     # a new pairing alone clears nothing
    arbiter.image_current(vm, g2, "hostB")              # hostB's copy-back, told late
    assert arbiter.stale_image(vm) is None
    g3 = arbiter.begin_generation(vm, "hostB", "hostC")
    assert arbiter.claim_live(vm, g3, "hostC")
    arbiter.image_current(vm, g3, "hostB")              # hostB again: not hostC's mark
    assert arbiter.stale_image(vm) == StaleImage(vm, g3, "hostC",
                                                 arbiter.live_claim(vm, g3)[1])
    assert arbiter.discard_stale_image(vm).generation == g3
    assert arbiter.stale_image(vm) is None and arbiter.discard_stale_image(vm) is None


def test_other_member_live(arbiter):
    vm = new_vm()
    assert arbiter.other_member_live(vm, "hostA") is None
    g = arbiter.begin_generation(vm, "hostA", "hostB")
    assert arbiter.other_member_live(vm, "hostA") is None
    assert arbiter.other_member_live(vm, "hostB") == "hostA"
    assert arbiter.other_member_live(vm, "hostC") == "hostA"
    # The secondary won the failover: it is now the live one.
    assert arbiter.claim_live(vm, g, "hostB") is True
    assert arbiter.other_member_live(vm, "hostA") == "hostB"
    assert arbiter.other_member_live(vm, "hostB") is None
    # Re-protected onto C: a new generation, B primary, no claim yet.
    arbiter.begin_generation(vm, "hostB", "hostC")
    assert arbiter.other_member_live(vm, "hostA") == "hostB"
    assert arbiter.other_member_live(vm, "hostC") == "hostB"
    g3 = arbiter.begin_generation(vm, "hostB", "hostC")
    assert arbiter.claim_live(vm, g3, "hostC") is True
    assert arbiter.other_member_live(vm, "hostB") == "hostC"
    arbiter.update_pair(vm, g3, state="Down", reason="stopped by admin")
    for host in ("hostA", "hostB", "hostC"):
        assert arbiter.other_member_live(vm, host) is None


def _exercise(a: Arbiter) -> None:
    vm = new_vm()
    g = a.begin_generation(vm, "hostA", "hostB")
    assert a.claim_live(vm, g, "hostB") is True
    assert a.claim_live(vm, g, "hostA") is False
    assert a.other_member_live(vm, "hostA") == "hostB"
    assert a.update_pair(vm, g, state="Need Secondary").state == "Need Secondary"


def test_losing_one_member_changes_nothing(fresh_etcd_cluster):
    c = fresh_etcd_cluster
    a = Arbiter(c.endpoints)
    _exercise(a)
    # Worst case first: the leader goes, calls made at once still succeed within the bound.
    leader = c.leader()
    assert leader is not None
    c.stop_member(leader, kill=True)
    t0 = time.monotonic()
    _exercise(a)
    print(f"first calls after killing the leader took {time.monotonic() - t0:.3f}s")
    c.start_member(leader)
    follower = next(i for i in range(3) if i != c.leader())
    c.stop_member(follower, kill=True)
    _exercise(a)
    # An arbiter whose first endpoint is the dead member still answers.
    first_dead = Arbiter([c.endpoints[follower]] + [e for i, e in enumerate(c.endpoints)
                                                    if i != follower])
    _exercise(first_dead)


def test_a_silent_first_member_costs_at_most_the_first_round_attempt(etcd_cluster):
    """A member on a powered-off host accepts nothing and resets nothing; here: a
    listener on loopback that never answers. The call moves on after the first-round
    attempt, not after its share of the bound (1.5 s of 6 s here)."""
    import socket
    from vdsm_ft.etcd import FIRST_ROUND_ATTEMPT_S
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)                     # the kernel completes handshakes; no reply
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        a = Arbiter([url] + list(etcd_cluster.endpoints), bound=6.0)
        vm = new_vm()
        t0 = time.monotonic()
        g = a.begin_generation(vm, "hostA", "hostB")
        elapsed = time.monotonic() - t0
    assert a.get_pair(vm).generation == g
    assert elapsed < FIRST_ROUND_ATTEMPT_S + 0.5, f"took {elapsed:.3f}s"


def _assert_unavailable_within(bound, call):
    t0 = time.monotonic()
    with pytest.raises(ArbiterUnavailable):
        call()
    elapsed = time.monotonic() - t0
    assert elapsed <= bound + SLACK, f"took {elapsed:.3f}s, bound {bound}s"
    return elapsed


def test_all_members_stopped_fails_within_the_bound(fresh_etcd_cluster):
    c = fresh_etcd_cluster
    a = Arbiter(c.endpoints)
    vm = new_vm()
    g = a.begin_generation(vm, "hostA", "hostB")
    for i in range(3):
        c.stop_member(i, kill=True)
    calls = {
        "claim_live": lambda: a.claim_live(vm, g, "hostA"),
        "get_pair": lambda: a.get_pair(vm),
        "other_member_live": lambda: a.other_member_live(vm, "hostB"),
        "begin_generation": lambda: a.begin_generation(vm, "hostA", "hostB"),
        "update_pair": lambda: a.update_pair(vm, g, state="Protected"),
    }
    for name, call in calls.items():
        elapsed = _assert_unavailable_within(ARBITER_BOUND_S, call)
        print(f"{name}: ArbiterUnavailable after {elapsed * 1000:.0f} ms "
              f"(bound {ARBITER_BOUND_S * 1000:.0f} ms)")
    short = Arbiter(c.endpoints, bound=0.3)
    _assert_unavailable_within(0.3, lambda: short.claim_live(vm, g, "hostA"))
    _assert_unavailable_within(0.2, lambda: a.claim_live(vm, g, "hostA", timeout=0.2))


def test_member_without_quorum_fails_within_the_bound(fresh_etcd_cluster):
    # The partition case: the member that still runs accepts connections but cannot
    # answer (linearizable reads and writes need the quorum).
    c = fresh_etcd_cluster
    a = Arbiter(c.endpoints)
    vm = new_vm()
    g = a.begin_generation(vm, "hostA", "hostB")
    c.stop_member(1, kill=True)
    c.stop_member(2, kill=True)
    lone = Arbiter([c.endpoints[0]])
    for arb in (a, lone):
        elapsed = _assert_unavailable_within(ARBITER_BOUND_S,
                                             lambda: arb.claim_live(vm, g, "hostA"))
        print(f"claim without quorum: ArbiterUnavailable after {elapsed * 1000:.0f} ms")
        _assert_unavailable_within(ARBITER_BOUND_S, lambda: arb.get_pair(vm))
    # Quorum back: nothing was claimed meanwhile, and the claim now works.
    c.start_member(1)
    assert a.live_holder(vm, g) is None
    assert a.claim_live(vm, g, "hostA") is True


def test_leader_lease_single_leader_and_release(arbiter):
    name = f"poller-{uuid.uuid4().hex[:8]}"
    one, two = LeaderLease(arbiter, name, "p1", ttl=3), LeaderLease(arbiter, name, "p2", ttl=3)
    assert one.acquire() is True
    assert two.acquire() is False
    assert one.is_leader and not two.is_leader
    assert one.refresh() is True and one.acquire() is True
    assert two.acquire() is False
    one.release()
    assert not one.is_leader
    assert two.acquire() is True
    assert one.acquire() is False
    two.release()


def test_leader_lease_refresh_keeps_and_expiry_hands_over(arbiter):
    name = f"poller-{uuid.uuid4().hex[:8]}"
    ttl = 2
    one, two = LeaderLease(arbiter, name, "p1", ttl=ttl), LeaderLease(arbiter, name, "p2",
                                                                      ttl=ttl)
    assert one.acquire() is True
    # Refreshing past twice the TTL keeps the lead.
    end = time.monotonic() + 2 * ttl + 0.5
    while time.monotonic() < end:
        assert one.refresh() is True
        assert two.acquire() is False
        time.sleep(0.5)
    # The leader stops refreshing (a hung poller): the other takes over after expiry,
    # and the two never both believe they lead.
    stopped = time.monotonic()
    while not two.acquire():
        assert not (one.is_leader and two.is_leader)
        assert time.monotonic() - stopped < ttl + 3, "lease never expired"
        time.sleep(0.1)
    took_over = time.monotonic() - stopped
    assert not one.is_leader
    assert took_over >= ttl - 0.5, f"took over after {took_over:.2f}s, before the TTL"
    assert one.refresh() is False
    assert two.is_leader
    two.release()


# --- members in network namespaces, as in the lab: a real partition ---------------------

SUBNET = "10.213.77"


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def three_netns_hosts():
    """Three network namespaces on a bridge, one etcd member each; yields (cluster, links)."""
    tag = f"{os.getpid() % 100000}"
    bridge, names = f"fab{tag}", [f"fab{tag}n{i}" for i in range(3)]
    links = [f"fab{tag}h{i}" for i in range(3)]
    made = []
    cluster = None
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, (ns, link) in enumerate(zip(names, links)):
            _ip("netns", "add", ns)
            made.append(("netns", ns))
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            made.append(("link", link))
            _ip("link", "set", link, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{11 + i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        cluster = EtcdCluster([MemberSpec(host=f"{SUBNET}.{11 + i}", netns=ns)
                               for i, ns in enumerate(names)]).start()
        yield cluster, names, links
    finally:
        if cluster is not None:
            cluster.stop()
        for kind, name in reversed(made):
            subprocess.run(["ip", kind, "del", name], capture_output=True, timeout=10)


CLAIM_IN_NETNS = """
import json, sys, time
from vdsm_ft.arbiter import Arbiter, ArbiterError
endpoints, vm, g, host = json.loads(sys.argv[1])
a = Arbiter(endpoints)
t0 = time.monotonic()
try:
    out = {"won": a.claim_live(vm, g, host)}
except ArbiterError as e:
    out = {"error": type(e).__name__}
out["elapsed"] = time.monotonic() - t0
print(json.dumps(out))
"""


def _claim_from(ns, endpoints, vm, g, host):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLAIM_IN_NETNS,
                           json.dumps([endpoints, vm, g, host])],
                          capture_output=True, text=True, timeout=60, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_partitioned_side_fails_within_the_bound_and_the_other_wins(three_netns_hosts):
    cluster, names, links = three_netns_hosts
    eps = cluster.endpoints
    a = Arbiter(eps)  # the root namespace reaches every member through the bridge
    vm = new_vm()
    g = a.begin_generation(vm, "hostA", "hostB")
    # Host A (namespace 0) loses its link: its own etcd member is now a minority of one.
    _ip("link", "set", links[0], "down")
    try:
        cut_off = _claim_from(names[0], eps, vm, g, "hostA")
        assert cut_off["error"] == "ArbiterUnavailable", cut_off
        assert cut_off["elapsed"] <= ARBITER_BOUND_S + SLACK, cut_off
        print(f"partitioned side: ArbiterUnavailable after {cut_off['elapsed'] * 1000:.0f} ms")
        assert _claim_from(names[1], eps, vm, g, "hostB") == \
            {"won": True, "elapsed": pytest.approx(0, abs=ARBITER_BOUND_S)}
    finally:
        _ip("link", "set", links[0], "up")
    # Healed: A's member catches up and A learns it lost.
    deadline = time.monotonic() + 20
    while True:
        answer = _claim_from(names[0], eps, vm, g, "hostA")
        if "won" in answer or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answer["won"] is False, answer
    assert a.live_holder(vm, g) == "hostB"


def _plant(arbiter: Arbiter, vm: str, generation: int, value: bytes) -> None:
    from vdsm_ft import etcd
    from vdsm_ft.arbiter import claim_key
    arbiter.transport.txn("planted claim", [], [etcd.put(claim_key(vm, generation), value)],
                          [], 2.0)


@pytest.mark.parametrize("value", [b'{"host": "evil", "claimed_at": 1}', b"not json"])
def test_a_claim_no_member_wrote_is_corrupt_for_both_members(arbiter, value):
    """Issue 16: one unauthenticated write of a claim for "evil" made the healthy primary
    lose its generation and fence itself at the next ordinary fault."""
    from vdsm_ft.arbiter import CorruptClaim
    vm = new_vm()
    g = arbiter.begin_generation(vm, "hostA", "hostB")
    _plant(arbiter, vm, g, value)
    for host in ("hostA", "hostB"):
        with pytest.raises(CorruptClaim):
            arbiter.claim_live(vm, g, host)
