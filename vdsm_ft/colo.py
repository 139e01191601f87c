"""COLO sequences for QEMU 7.2, as functions over two QMP sessions.

Every step checks its result. `protect` either ends with both sides in COLO and the
block graph verified, or undoes what it did and leaves the primary running alone:
a VM is never left half-protected (QEMU happily starts COLO without disk replication,
docs/colo-facts.md, "QEMU does not check the disk graph"; so nothing here trusts a
step it has not verified).
"""
from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vdsm_ft import migsocket
from vdsm_ft.layout import TLS_CLIENT_ID, TLS_SERVER_ID, Disk, Endpoints, VmLayout
from vdsm_ft.qmp import Qmp, QmpCommandError, QmpError, QmpTimeout

log = logging.getLogger(__name__)

# colo-compare holds a primary packet at most this long waiting for its secondary
# twin. Set explicitly: the arbiter bound (vdsm_ft.arbiter) must stay below it so a
# partitioned old primary never releases output (docs/arbiter.md).
COMPARE_TIMEOUT_MS = 3000
EXPIRED_SCAN_CYCLE_MS = 1000
DEFAULT_CHECKPOINT_DELAY_MS = 2000
# A secondary that stops answering is cut off after this; its output is never released.
FAILOVER_STEP_TIMEOUT = 2.0


class ColoError(Exception):
    """A COLO sequence failed; the message names the step and QEMU's answer."""


class VerificationFailed(ColoError):
    """A step returned but QEMU's state is not what the step promised."""


class Cancelled(ColoError):
    """`protect` was told to stop: what it was doing became moot (an admin turned FT
    off, the VM is stopping)."""


# How often a resync's wait looks at its `cancelled` callable.
CANCEL_POLL_S = 0.2


# Files each x509 creds endpoint reads from the dir.
TLS_SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
TLS_CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


@dataclass(frozen=True)
class ColoTls:
    """TLS for migration, NBD and the mirror/compare sockets: QEMU's x509 creds dir,
    read by QEMU itself."""

    dir: str            # ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem
    qemu_user: str      # the user QEMU runs as: it, not the agent, opens these files


@dataclass(frozen=True)
class Timeouts:
    resync: float = 600.0        # full copy of every disk to the secondary
    migrate: float = 120.0       # first RAM copy until COLO runs
    step: float = 10.0           # any single QMP command


def _inet(host: str, port: int) -> dict[str, Any]:
    """SocketAddressLegacy, as nbd-server-start and chardev-add take it."""
    return {"type": "inet", "data": {"host": host, "port": str(port)}}


def _inet_flat(host: str, port: int) -> dict[str, Any]:
    """SocketAddress, as blockdev-add takes it."""
    return {"type": "inet", "host": host, "port": str(port)}


@contextlib.contextmanager
def _socket_step() -> Iterator[None]:
    """A socket vdsm-ft opens for QEMU (vdsm_ft/migsocket.py) fails as a COLO step does:
    `protect` and the secondary's bring-up catch ColoError."""
    try:
        yield
    except migsocket.MigSocketError as exc:
        raise ColoError(str(exc)) from None


def _resync_job(disk: Disk) -> str:
    return f"ft-resync{disk.index}"


def colo_status(q: Qmp) -> dict[str, str]:
    """`query-colo-status`: mode, last-mode and reason (the ground truth,
    docs/colo-facts.md "What reports the state")."""
    return q.execute("query-colo-status")


def run_state(q: Qmp) -> str:
    return q.execute("query-status")["status"]


def quorum_children(q: Qmp, quorum: str) -> dict[str, str]:
    """Edge name (children.N) -> child node name, read from the live block graph."""
    graph = q.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    parents = [n["id"] for n in graph["nodes"] if n["name"] == quorum]
    if not parents:
        raise VerificationFailed(f"quorum node {quorum} is not in the block graph")
    return {e["name"]: names[e["child"]] for e in graph["edges"]
            if e["parent"] == parents[0]}


def _wait(what: str, probe: Callable[[], bool], timeout: float,
          interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise VerificationFailed(f"{what} not reached within {timeout:.1f}s")
        time.sleep(interval)


def _quietly(q: Qmp, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = FAILOVER_STEP_TIMEOUT) -> None:
    """Run a cleanup command whose object may already be gone."""
    try:
        q.execute(command, arguments, timeout)
    except QmpCommandError as exc:
        log.debug("%s: %s", command, exc)


# -- TLS credentials -------------------------------------------------------------------

def _readable_by(path: str, st: os.stat_result, uid: int, gids: set[int],
                 need: int) -> bool:
    """Unix permission check for another user (`need`: 4 read, 1 search)."""
    if uid == 0:
        return True
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return bool(mode & (need << 6))
    if st.st_gid in gids:
        return bool(mode & (need << 3))
    return bool(mode & need)


def check_tls_dir(tls: ColoTls, files: tuple[str, ...]) -> None:
    """Refuse a creds dir QEMU could not read: libvirt neither chowns nor relabels
    files that only QMP names, so a root-only copy fails deep inside `object-add`."""
    try:
        user = pwd.getpwnam(tls.qemu_user)
    except KeyError:
        raise ColoError(f"TLS: QEMU user {tls.qemu_user!r} does not exist") from None
    gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall()
                            if tls.qemu_user in g.gr_mem}
    group = grp.getgrgid(user.pw_gid).gr_name
    fix = (f"make it readable by {tls.qemu_user}, e.g. chgrp -R {group} {tls.dir}; "
           f"chmod 0750 {tls.dir}; chmod 0640 {tls.dir}/*-key.pem (docs/install.md)")
    directory = os.path.abspath(tls.dir)

    def require(path: str, shown: str, need: int, verb: str) -> None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ColoError(f"TLS creds dir {directory}: {shown}: {exc.strerror}") from None
        if not _readable_by(path, st, user.pw_uid, gids, need):
            raise ColoError(f"TLS creds dir {directory}: {tls.qemu_user} cannot {verb} "
                            f"{shown}; {fix}")

    parts = directory.split(os.sep)
    for i in range(1, len(parts) + 1):
        path = os.sep.join(parts[:i]) or os.sep
        require(path, path, 1, "enter")
    for name in files:
        require(os.path.join(directory, name), name, 4, "read")


def _add_tls_creds(q: Qmp, tls: ColoTls, server: bool) -> str:
    """Add this side's x509 creds (replacing a leftover) and return their id.

    verify-peer on both ends: the server demands a client certificate from the same CA,
    the client checks the server's certificate and its name (the address it dials).
    """
    obj_id, files = ((TLS_SERVER_ID, TLS_SERVER_FILES) if server
                     else (TLS_CLIENT_ID, TLS_CLIENT_FILES))
    check_tls_dir(tls, files)
    _quietly(q, "object-del", {"id": obj_id})
    q.execute("object-add", {"qom-type": "tls-creds-x509", "id": obj_id,
                             "dir": os.path.abspath(tls.dir),
                             "endpoint": "server" if server else "client",
                             "verify-peer": True})
    return obj_id


def _remove_tls_creds(q: Qmp) -> None:
    """Drop the creds and migration's reference to them, so a later protection (or a
    plain libvirt migration) starts clean. Harmless when TLS was never used."""
    _quietly(q, "migrate-set-parameters", {"tls-creds": ""})
    for obj_id in (TLS_SERVER_ID, TLS_CLIENT_ID):
        _quietly(q, "object-del", {"id": obj_id})


# -- protection ------------------------------------------------------------------------

def prepare_secondary(sec: Qmp, layout: VmLayout, ep: Endpoints,
                      checkpoint_delay_ms: int = DEFAULT_CHECKPOINT_DELAY_MS,
                      tls: ColoTls | None = None, timeouts: Timeouts = Timeouts(),
                      opener: migsocket.Opener = migsocket.here) -> None:
    """Export the replica disks and wait for the incoming COLO migration.

    The migration and NBD ports are this process's listeners, handed to QEMU with
    TCP_NODELAY (vdsm_ft/migsocket.py). With `tls`, both listeners (NBD,
    migration) accept only TLS clients whose certificate the creds dir's CA signed.
    """
    state = run_state(sec)
    if state != "inmigrate":
        raise ColoError(f"secondary {layout.name} is {state!r}, not waiting in inmigrate; "
                        "was it started from the secondary XML (-incoming defer)?")
    sec.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-colo", "state": True}]})
    params: dict[str, Any] = {"x-checkpoint-delay": checkpoint_delay_ms}
    with _socket_step():
        nbd: dict[str, Any] = {"addr": migsocket.listen_nbd(sec, ep.secondary_host,
                                                            ep.nbd_port, opener)}
    if tls is not None:
        params["tls-creds"] = nbd["tls-creds"] = _add_tls_creds(sec, tls, server=True)
    sec.execute("migrate-set-parameters", params)
    sec.execute("nbd-server-start", nbd)
    for disk in layout.disks:
        sec.execute("block-export-add", {"type": "nbd", "id": disk.export,
                                         "node-name": disk.parent, "name": disk.export,
                                         "writable": True})
    with _socket_step():
        migsocket.Incoming(sec, ep.secondary_host, ep.migration_port,
                           timeouts.resync + timeouts.migrate, opener)


def resync(pri: Qmp, layout: VmLayout, ep: Endpoints, timeout: float,
           tls: ColoTls | None = None,
           cancelled: Callable[[], bool] = lambda: False) -> None:
    """Copy every disk to the secondary's export; returns when all mirrors are READY.
    Raises Cancelled, within CANCEL_POLL_S, once `cancelled()` is true."""
    cursor = pri.cursor()
    extra = {} if tls is None else {"tls-creds": _add_tls_creds(pri, tls, server=False)}
    for disk in layout.disks:
        pri.execute("blockdev-add", {"driver": "nbd", "node-name": disk.nbd_node,
                                     "server": _inet_flat(ep.secondary_host, ep.nbd_port),
                                     "export": disk.export, "detect-zeroes": "on",
                                     **extra})
    for disk in layout.disks:
        pri.execute("blockdev-mirror", {"job-id": _resync_job(disk), "device": disk.quorum,
                                        "target": disk.nbd_node, "sync": "full",
                                        "auto-dismiss": False,
                                        "on-target-error": "report"})
    deadline = time.monotonic() + timeout
    for disk in layout.disks:
        job = _resync_job(disk)
        while True:
            if cancelled():
                raise Cancelled(f"resync of {disk.quorum} cancelled")
            left = max(0.0, deadline - time.monotonic())
            try:
                event = pri.wait_event("JOB_STATUS_CHANGE", min(CANCEL_POLL_S, left),
                                       since=cursor,
                                       match=lambda d, j=job: d["id"] == j and
                                       d["status"] in ("ready", "concluded"))
                break
            except QmpTimeout:
                if left <= CANCEL_POLL_S:
                    raise
        if event.data["status"] != "ready":
            raise ColoError(f"resync of {disk.quorum} ended before it was in sync: "
                            f"{_job_error(pri, job)}")


def _job_error(q: Qmp, job: str) -> str:
    for info in q.execute("query-jobs"):
        if info["id"] == job:
            return info.get("error", info["status"])
    return "job vanished"


def attach_replication(pri: Qmp, layout: VmLayout, timeout: float) -> None:
    """Cut over from the resync mirrors to quorum children, then verify the graph.

    The guest is paused only between `stop` and `cont`, so that no write lands after a
    mirror stops and before its NBD node joins the quorum.
    """
    was_running = run_state(pri) == "running"
    cursor = pri.cursor()
    pri.execute("stop")
    for disk in layout.disks:
        pri.execute("block-job-cancel", {"device": _resync_job(disk)})
    for disk in layout.disks:
        job = _resync_job(disk)
        pri.wait_event("JOB_STATUS_CHANGE", timeout, since=cursor,
                       match=lambda d, j=job: d["id"] == j and d["status"] == "concluded")
        error = _job_error(pri, job)
        pri.execute("block-job-dismiss", {"id": job})
        if error != "concluded":
            raise ColoError(f"resync of {disk.quorum} failed at cut-over: {error}")
        pri.execute("x-blockdev-change", {"parent": disk.quorum, "node": disk.nbd_node})
    verify_replication_graph(pri, layout)
    if was_running:
        pri.execute("cont")


def verify_replication_graph(pri: Qmp, layout: VmLayout) -> None:
    for disk in layout.disks:
        children = quorum_children(pri, disk.quorum)
        if disk.nbd_node not in children.values():
            raise VerificationFailed(f"quorum {disk.quorum} has no NBD child "
                                     f"{disk.nbd_node} (children: {children})")


def add_network_filters(pri: Qmp, layout: VmLayout, ep: Endpoints,
                        before_rewriter: bool, tls: ColoTls | None = None) -> None:
    """Mirror client traffic to the secondary and compare both sides' output.

    An ex-secondary keeps its filter-rewriter; the new filters must sit before it
    (docs/colo-facts.md, "An ex-secondary keeps its filter-rewriter"). With `tls` the
    two sockets the secondary dials are TLS servers.
    """
    creds = None
    if tls is not None and layout.nics:
        creds = _add_tls_creds(pri, tls, server=True)
    for nic, mirror_port, compare_port in zip(layout.nics, ep.mirror_ports,
                                              ep.compare_ports):
        position = ({"position": f"id={nic.rewriter}", "insert": "before"}
                    if before_rewriter else {})
        # The same on every filter of the path, as on the secondary's (vdsm_ft/domxml.py):
        # without it a virtio NIC's output is never compared (docs/qemu.md).
        vnet = {"vnet_hdr_support": True}
        _add_socket(pri, nic.mirror_chardev, _inet(ep.primary_host, mirror_port), True,
                    creds)
        _add_socket(pri, nic.compare_sec_chardev, _inet(ep.primary_host, compare_port),
                    True, creds)
        for server, client in (nic.compare_pri_chardevs, nic.compare_out_chardevs):
            addr = {"type": "unix", "data": {"path": layout.unix_socket(server)}}
            _add_socket(pri, server, addr, True)
            _add_socket(pri, client, addr, False)
        pri.execute("object-add", {"qom-type": "filter-mirror", "id": nic.filter_mirror,
                                   "netdev": nic.netdev, "queue": "tx",
                                   "outdev": nic.mirror_chardev, **vnet, **position})
        pri.execute("object-add", {"qom-type": "filter-redirector",
                                   "id": nic.filter_redirect_in, "netdev": nic.netdev,
                                   "queue": "rx", "indev": nic.compare_out_chardevs[0],
                                   **vnet, **position})
        pri.execute("object-add", {"qom-type": "filter-redirector",
                                   "id": nic.filter_redirect_out, "netdev": nic.netdev,
                                   "queue": "rx", "outdev": nic.compare_pri_chardevs[0],
                                   **vnet, **position})
        pri.execute("object-add", {"qom-type": "iothread", "id": nic.iothread})
        pri.execute("object-add", {"qom-type": "colo-compare", "id": nic.compare,
                                   "primary_in": nic.compare_pri_chardevs[1],
                                   "secondary_in": nic.compare_sec_chardev,
                                   "outdev": nic.compare_out_chardevs[1],
                                   "iothread": nic.iothread, **vnet,
                                   "compare_timeout": COMPARE_TIMEOUT_MS,
                                   "expired_scan_cycle": EXPIRED_SCAN_CYCLE_MS})


def _add_socket(q: Qmp, chardev: str, addr: dict[str, Any], server: bool,
                tls_creds: str | None = None) -> None:
    data: dict[str, Any] = {"addr": addr, "server": server}
    if tls_creds is not None:
        data["tls-creds"] = tls_creds
    if server:
        data["wait"] = False
    if addr["type"] == "inet":
        data["nodelay"] = True
    q.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": data}})


def start_colo(pri: Qmp, secondary: "SecondarySide", ep: Endpoints,
               checkpoint_delay_ms: int, timeout: float, tls: bool = False,
               opener: migsocket.Opener = migsocket.here) -> None:
    """Run the COLO migration and verify both roles (`tls`: over the client creds
    that `resync` added)."""
    pri.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-colo", "state": True},
        {"capability": "events", "state": True}]})
    # The client checks the secondary's certificate against the address it dials; an
    # fd: migration has no address of its own, so it is named.
    pri.execute("migrate-set-parameters", {
        "x-checkpoint-delay": checkpoint_delay_ms,
        "tls-creds": TLS_CLIENT_ID if tls else "",
        "tls-hostname": ep.secondary_host if tls else ""})
    cursor = pri.cursor()
    with _socket_step():
        migsocket.dial(pri, ep.secondary_host, ep.migration_port, timeout, opener)
    pri.execute("migrate", {"uri": migsocket.URI})
    event = pri.wait_event("MIGRATION", timeout, since=cursor,
                           match=lambda d: d["status"] in ("colo", "failed", "cancelled",
                                                           "completed"))
    if event.data["status"] != "colo":
        info = pri.execute("query-migrate")
        raise ColoError(f"COLO migration ended {event.data['status']}: "
                        f"{info.get('error-desc', 'no error given')}")
    # The primary enters COLO first; the secondary follows once it has loaded the
    # first checkpoint.
    _wait("secondary in COLO", lambda: secondary.mode() == "secondary", timeout)
    mode = colo_status(pri)["mode"]
    if mode != "primary":
        raise VerificationFailed(f"primary left COLO right after it began (mode {mode})")


class SecondarySide(Protocol):
    """The secondary as the primary's side sees it: local QMP, or the peer agent."""

    def prepare(self, ep: Endpoints, checkpoint_delay_ms: int) -> None:
        """Export the replicas and wait for the incoming migration."""

    def mode(self) -> str:
        """The secondary's `query-colo-status` mode."""


@dataclass
class LocalSecondary:
    """A secondary whose QMP socket this process can reach."""

    qmp: Qmp
    layout: VmLayout
    tls: ColoTls | None = None
    opener: migsocket.Opener = migsocket.here

    def prepare(self, ep: Endpoints, checkpoint_delay_ms: int) -> None:
        prepare_secondary(self.qmp, self.layout, ep, checkpoint_delay_ms, self.tls,
                          opener=self.opener)

    def mode(self) -> str:
        return colo_status(self.qmp)["mode"]


def set_checkpoint_delay(pri: Qmp, delay_ms: int) -> None:
    pri.execute("migrate-set-parameters", {"x-checkpoint-delay": delay_ms})


def protect(pri: Qmp, pri_layout: VmLayout, secondary: SecondarySide,
            ep: Endpoints, *, before_rewriter: bool = False,
            checkpoint_delay_ms: int = DEFAULT_CHECKPOINT_DELAY_MS,
            timeouts: Timeouts = Timeouts(), tls: ColoTls | None = None,
            on_step: Callable[[str], None] = lambda step: None,
            opener: migsocket.Opener = migsocket.here,
            cancelled: Callable[[], bool] = lambda: False) -> None:
    """Bring a running primary and a waiting secondary to Protected.

    `tls` is the primary's creds dir; the secondary must have been given its own.
    On any failure the primary is returned to running alone (see `abandon`) and the
    error is raised; the caller destroys the secondary. Once `cancelled()` is true,
    before a step or during the resync, that failure is Cancelled.
    """
    steps: list[tuple[str, Callable[[], None]]] = [
        ("prepare-secondary", lambda: secondary.prepare(ep, checkpoint_delay_ms)),
        ("resync", lambda: resync(pri, pri_layout, ep, timeouts.resync, tls, cancelled)),
        ("attach", lambda: attach_replication(pri, pri_layout, timeouts.step)),
        ("filters", lambda: add_network_filters(pri, pri_layout, ep, before_rewriter,
                                                tls)),
        ("migrate", lambda: start_colo(pri, secondary, ep, checkpoint_delay_ms,
                                       timeouts.migrate, tls is not None, opener)),
    ]
    for name, step in steps:
        on_step(name)
        try:
            if cancelled():
                raise Cancelled("cancelled")
            step()
        except (QmpError, ColoError) as exc:
            log.warning("protect %s failed at %s: %s", pri_layout.name, name, exc)
            abandon(pri, pri_layout)
            if isinstance(exc, Cancelled):
                raise Cancelled(f"protection of {pri_layout.name} cancelled at {name}") \
                    from exc
            raise ColoError(f"protection of {pri_layout.name} failed at {name}: {exc}") \
                from exc


def abandon(pri: Qmp, layout: VmLayout) -> None:
    """Undo any part of `protect` on the primary and leave it running alone."""
    if colo_status(pri)["mode"] == "primary":
        failover_primary(pri, layout)
        return
    _quietly(pri, "migrate_cancel")
    _teardown_primary_objects(pri, layout)
    for disk in layout.disks:
        _quietly(pri, "block-job-cancel", {"device": _resync_job(disk), "force": True})
    for disk in layout.disks:
        _quietly(pri, "block-job-dismiss", {"id": _resync_job(disk)})
        _quietly(pri, "blockdev-del", {"node-name": disk.nbd_node})
    _remove_tls_creds(pri)
    if run_state(pri) == "paused":
        pri.execute("cont")


# -- failover ----------------------------------------------------------------------------

def _primary_yank_instances(layout: VmLayout) -> list[dict[str, Any]]:
    instances: list[dict[str, Any]] = [{"type": "migration"}]
    instances += [{"type": "block-node", "node-name": d.nbd_node} for d in layout.disks]
    for nic in layout.nics:
        instances += [{"type": "chardev", "id": nic.mirror_chardev},
                      {"type": "chardev", "id": nic.compare_sec_chardev}]
    return instances


def _teardown_primary_objects(pri: Qmp, layout: VmLayout) -> None:
    for disk in layout.disks:
        children = quorum_children(pri, disk.quorum)
        for edge, node in children.items():
            if node == disk.nbd_node:
                pri.execute("x-blockdev-change", {"parent": disk.quorum, "child": edge},
                            FAILOVER_STEP_TIMEOUT)
        if disk.nbd_node in _node_names(pri):
            pri.execute("blockdev-del", {"node-name": disk.nbd_node},
                        FAILOVER_STEP_TIMEOUT)
    for nic in layout.nics:
        # colo-compare flushes the packets it holds when it goes (patch 0007 holds each
        # new connection's SYN-ACK until a checkpoint that a lost secondary never
        # gives): stop feeding it first, and keep the redirector that carries its
        # output into the NIC until it has gone, or those packets are dropped and the
        # clients wait for TCP's retransmission, a second or more.
        for obj in (nic.filter_mirror, nic.filter_redirect_out, nic.compare,
                    nic.filter_redirect_in, nic.iothread):
            _quietly(pri, "object-del", {"id": obj})


def _remove_primary_chardevs(pri: Qmp, layout: VmLayout) -> None:
    for nic in layout.nics:
        for chardev in (nic.mirror_chardev, nic.compare_sec_chardev,
                        *nic.compare_pri_chardevs, *nic.compare_out_chardevs):
            _quietly(pri, "chardev-remove", {"id": chardev})


def _node_names(q: Qmp) -> set[str]:
    return {n["node-name"] for n in q.execute("query-named-block-nodes", {"flat": True})}


def failover_primary(pri: Qmp, layout: VmLayout) -> None:
    """The secondary is gone: leave COLO and run alone (also used to unprotect).

    Yank first, so nothing below can block on a hung peer (docs/colo-facts.md, "Yank
    first").
    """
    pri.yank(_primary_yank_instances(layout))
    _teardown_primary_objects(pri, layout)
    if colo_status(pri)["mode"] == "primary":
        pri.execute("x-colo-lost-heartbeat", timeout=FAILOVER_STEP_TIMEOUT)
    _remove_primary_chardevs(pri, layout)
    _remove_tls_creds(pri)
    _wait("primary out of COLO", lambda: colo_status(pri)["mode"] == "none",
          FAILOVER_STEP_TIMEOUT)
    _ensure_running(pri)


def failover_secondary(sec: Qmp, layout: VmLayout) -> None:
    """The primary is gone: take over as the live VM, then announce the MACs."""
    instances: list[dict[str, Any]] = [{"type": "migration"}]
    for nic in layout.nics:
        instances += [{"type": "chardev", "id": nic.red_in_chardev},
                      {"type": "chardev", "id": nic.red_out_chardev}]
    sec.yank(instances)
    _quietly(sec, "nbd-server-stop")
    sec.execute("x-colo-lost-heartbeat", timeout=FAILOVER_STEP_TIMEOUT)
    _wait("secondary out of COLO", lambda: colo_status(sec)["mode"] == "none",
          FAILOVER_STEP_TIMEOUT)
    for nic in layout.nics:
        for obj in (nic.filter_sec_in, nic.filter_sec_out):
            _quietly(sec, "object-del", {"id": obj})
        for chardev in (nic.red_in_chardev, nic.red_out_chardev):
            _quietly(sec, "chardev-remove", {"id": chardev})
    # A later protection from here dials out: it adds client creds of its own.
    _remove_tls_creds(sec)
    _ensure_running(sec)
    if layout.nics:
        # The guest's MACs now live behind this host's taps: tell the switches.
        sec.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5,
                                      "step": 100})


def _ensure_running(q: Qmp) -> None:
    """After COLO, a VM caught mid-checkpoint may still read `colo` briefly."""
    try:
        _wait("VM running", lambda: run_state(q) == "running", FAILOVER_STEP_TIMEOUT)
    except VerificationFailed:
        state = run_state(q)
        if state != "paused":
            raise
        q.execute("cont")


def unprotect(pri: Qmp, layout: VmLayout) -> None:
    """Intentional end of protection; the caller then destroys the secondary."""
    failover_primary(pri, layout)
