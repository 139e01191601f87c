"""`ovirt-ft-poller`: the level-triggered reconcile loop of the engine side.

Each cycle: hold the etcd leader lease (only one poller instance acts), read the
engine's inventory (2 API calls), ask every agent for its status, plan one step per VM
(`reconcile.plan`), carry out the steps, post the events. A failure of the engine or of
an agent ends the cycle early or skips one step; it never ends the loop. Failover
itself is host-side, so an engine outage delays only re-protection.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from engine_plugin import config, reconcile
from engine_plugin.agents import Agents, AgentView
from engine_plugin.engine import (Engine, EngineAuthFailed, EngineConflict, EngineError,
                                  EngineNotFound, EngineRejected, EngineUnavailable)
from engine_plugin.events import Event, EventLog
from vdsm_ft.api import AgentError, Role, VmState

log = logging.getLogger("ovirt-ft-poller")

DUPLICATE_EVENT = "custom id already exists"
# How long a peer that refused a VM is passed over for it.
REFUSED_PEER_BACKOFF_S = 60.0


class Lease(Protocol):
    """`vdsm_ft.arbiter.LeaderLease`, as the poller uses it."""

    @property
    def is_leader(self) -> bool: ...

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


@dataclass
class CycleResult:
    leader: bool = False
    engine_ok: bool = False
    actions: list[str] = field(default_factory=list)     # what was done, one line each
    failures: list[str] = field(default_factory=list)    # what failed, one line each
    events_posted: list[Event] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0


class Poller:
    def __init__(self, settings: config.Settings, engine: Engine, agents: Agents,
                 lease: Lease | None = None):
        self.settings = settings
        self.engine = engine
        self.agents = agents
        self.lease = lease
        self.events = EventLog(settings.poller.max_events_per_cycle)
        self.failures = 0          # consecutive engine failures, for the backoff
        self._seeded = False
        self._first_cycle = True   # until one cycle completed with the engine reachable
        # vm id -> peer host id of the last protect an agent accepted, and
        # vm id -> {host id: (until, why)} for peers that then refused it.
        self._asked: dict[str, str] = {}
        self._refused: dict[str, dict[str, tuple[float, str]]] = {}

    def _leading(self) -> bool:
        if self.lease is None:
            return True
        try:
            return self.lease.acquire()
        except Exception as e:  # ArbiterUnavailable and friends: no lease, no action
            log.warning("leader lease: %s; standing by this cycle", e)
            return False

    def _still_leading(self) -> bool:
        return self.lease is None or self.lease.is_leader

    def cycle(self) -> CycleResult:
        t0, c0 = time.monotonic(), time.process_time()
        result = CycleResult()
        try:
            self._cycle(result)
        finally:
            result.wall_s = time.monotonic() - t0
            result.cpu_s = time.process_time() - c0
        return result

    def _cycle(self, result: CycleResult) -> None:
        result.leader = self._leading()
        if not result.leader:
            return
        self.events.new_cycle()
        try:
            if not self._seeded:
                self.events.seed(self.engine.recent_event_ids())
                self._seeded = True
            polling: list = []
            inv = self.engine.inventory(
                lambda partial: polling.append(self.agents.poll_async(partial.hosts.values())))
            view = polling[0].result()
            plan = reconcile.plan(inv, view, self.settings.poller.limits,
                                  self.engine.affinity_groups, self._avoid(view),
                                  now=time.time())
        except EngineError as e:
            self._engine_failed(e, result)
            return
        result.engine_ok = True
        result.reasons = plan.reasons
        for action in plan.actions:
            if not self._still_leading():
                result.failures.append("lost the leader lease; stopping this cycle")
                return
            self._act(action, view, result)
        self._post_events(plan.events, result)
        if result.engine_ok:
            self.failures = 0
            self._first_cycle = False

    def _avoid(self, view: AgentView) -> dict[str, dict[str, str]]:
        """Peers that refused a VM recently, so placement tries another host first.

        The agent drops a peer that failed (a full replica disk, an unreachable agent)
        and reports Need Secondary with no secondary and the reason.
        """
        now = time.monotonic()
        for hs in view.statuses.values():
            for st in hs.vms:
                asked = self._asked.get(st.vm_id)
                if asked is None or st.role is not Role.PRIMARY:
                    continue
                if st.state is VmState.NEED_SECONDARY and not st.secondary_host:
                    why = f"refused this VM recently: {st.reason or 'no reason given'}"
                    self._refused.setdefault(st.vm_id, {})[asked] = (
                        now + REFUSED_PEER_BACKOFF_S, why)
                    del self._asked[st.vm_id]
                elif st.state is VmState.PROTECTED:
                    del self._asked[st.vm_id]
        self._refused = {vm: kept for vm, hosts in self._refused.items()
                         if (kept := {h: v for h, v in hosts.items() if v[0] > now})}
        return {vm: {h: why for h, (_, why) in hosts.items()}
                for vm, hosts in self._refused.items()}

    def _engine_failed(self, e: EngineError, result: CycleResult) -> None:
        result.engine_ok = False
        result.failures.append(str(e))
        if isinstance(e, (EngineUnavailable, EngineAuthFailed)):
            self.failures += 1
        log.warning("engine: %s (attempt %d)", e, self.failures)

    def _act(self, action: reconcile.Action, view: AgentView, result: CycleResult) -> None:
        try:
            if isinstance(action, reconcile.Protect):
                st = self.agents.client(action.primary).protect(action.vm_id, action.peer_spec)
                self._asked[action.vm_id] = action.peer.id
                line = (f"{'re-' if action.reprotect else ''}protect {action.vm_name}: "
                        f"{action.primary.name} -> {action.peer.name} ({st.state.value})")
            elif isinstance(action, reconcile.Unprotect):
                st = self.agents.client(action.primary).unprotect(action.vm_id)
                line = f"unprotect {action.vm_name} on {action.primary.name} ({st.state.value})"
            elif isinstance(action, reconcile.RemoveExternal):
                self.engine.remove_vm(action.vm_id)
                line = f"remove {action.vm_name}: its domain is gone"
            else:
                self.engine.fence_manual(action.host.id)
                line = (f"fence manual {action.host.name} "
                        f"(covers {', '.join(action.vm_names)})")
        except AgentError as e:
            result.failures.append(f"{type(action).__name__} {_subject(action)}: {e}")
            log.warning("%s", result.failures[-1])
            return
        except (EngineNotFound, EngineConflict, EngineRejected) as e:
            result.failures.append(str(e))
            log.warning("%s", e)
            return
        except EngineError as e:
            self._engine_failed(e, result)
            return
        result.actions.append(line)
        log.info("%s", line)

    def _post_events(self, events: list[Event], result: CycleResult) -> None:
        for ev in events:
            if not result.engine_ok:
                return      # the engine went away mid-cycle: the rest waits for next cycle
            if not self.events.due(ev):
                continue
            if not self._still_leading():
                return
            if ev.informational and self._first_cycle:
                self.events.already_known(ev)
                continue
            self.events.attempt(ev)
            try:
                self.engine.add_event(ev, self.events.flood_rate)
            except EngineRejected as e:
                if DUPLICATE_EVENT in str(e):
                    self.events.already_known(ev)   # posted before, answer lost
                else:
                    result.failures.append(str(e))  # e.g. flood-dropped: retried next cycle
                continue
            except EngineNotFound:
                continue                            # the VM was removed meanwhile
            except EngineError as e:
                self._engine_failed(e, result)
                return
            self.events.posted(ev)
            result.events_posted.append(ev)
            log.info("event %d: %s", ev.custom_id, ev.description)

    def delay(self) -> float:
        """Seconds until the next cycle: the interval, or the backoff after failures."""
        p = self.settings.poller
        if self.failures == 0:
            return p.interval
        return min(p.backoff_max, p.interval * (2 ** min(self.failures, 10)))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                res = self.cycle()
            except Exception:  # a bug in one cycle must not stop re-protection for good
                log.exception("poller cycle failed")
                res = None
            if res and res.leader and res.engine_ok:
                log.debug("cycle: %.3f s wall, %.3f s CPU, %d actions",
                          res.wall_s, res.cpu_s, len(res.actions))
            stop.wait(self.delay())
        if self.lease is not None and self.lease.is_leader:
            self.lease.release()


def _subject(action: reconcile.Action) -> str:
    return getattr(action, "vm_name", None) or action.host.name  # type: ignore[union-attr]


def make_lease(settings: config.Settings) -> Lease | None:
    """The leader lease on the configured etcd; None without endpoints. ConfigError for a
    plain-http etcd the settings do not explicitly accept."""
    endpoints = settings.poller.etcd_endpoints
    if not endpoints:
        return None
    config.require_secure_etcd(settings)
    from vdsm_ft.arbiter import Arbiter, LeaderLease
    p = settings.poller
    arbiter = Arbiter(list(endpoints), ca_cert=p.etcd_ca, cert=p.etcd_cert, key=p.etcd_key,
                      username=p.etcd_username, password=p.etcd_password)
    return LeaderLease(arbiter, p.lease_name, p.holder, p.lease_ttl)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovirt-ft-poller", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help=f"settings file (default {config.DEFAULT_PATH}, "
                                         f"or ${config.ENV_CONFIG})")
    parser.add_argument("--once", action="store_true", help="run one cycle and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = config.load(args.config)
        lease = make_lease(settings)
    except config.ConfigError as e:
        print(f"ovirt-ft-poller: {e}", file=sys.stderr)
        return 1
    if settings.agents is None:
        print("ovirt-ft-poller: missing [agents] cert/key/ca: the poller needs a client "
              "certificate to reach the host agents", file=sys.stderr)
        return 1
    if not settings.poller.etcd_endpoints:
        log.warning("no [poller] etcd_endpoints: this instance acts without a leader lease; "
                    "run only one poller")
    poller = Poller(settings, Engine(settings.engine, settings.poller.hook_name),
                    Agents(settings.agents), lease)
    if args.once:
        res = poller.cycle()
        for line in res.actions + res.failures:
            print(line)
        return 0 if res.engine_ok else 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    poller.run(stop)
    return 0
