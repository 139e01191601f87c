"""`ovirt-ft`: FT status and operations for admins, on the engine machine.

Connection settings come from the poller's settings file (mode 0600) or from the
environment (engine_plugin.config); there is deliberately no password option. Every
failure ends with exit code 1 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from engine_plugin import config
from engine_plugin.agents import Agents, AgentView
from engine_plugin.engine import (Engine, EngineAuthFailed, EngineError, EngineNotFound,
                                  EngineUnavailable)
from engine_plugin.inventory import Inventory, VmInfo
from engine_plugin.reconcile import RUNNING_VM_STATES, ft_wanted
from vdsm_ft import ftvalue
from vdsm_ft.api import AgentClient, AgentError, Role, VmState, VmStatus
from vdsm_ft.imagestate import when as imagestate_when

if TYPE_CHECKING:
    from vdsm_ft.arbiter import Arbiter

PROG = "ovirt-ft"


class CliError(Exception):
    """A failure to report as one line, exit code 1."""


def _primary(view: AgentView, vm_id: str) -> tuple[str, VmStatus] | None:
    live = [(h, s) for h, s in view.reports(vm_id)
            if s.role is Role.PRIMARY and s.state is not VmState.DOWN]
    return max(live, key=lambda r: r[1].generation) if live else None


def _row(vm: VmInfo, inv: Inventory, view: AgentView) -> dict:
    def name(host_id: str | None) -> str:
        h = inv.hosts.get(host_id or "")
        return h.name if h else (host_id or "")

    found = _primary(view, vm.id)
    row = {"vm": vm.name, "vm_id": vm.id, "ft": vm.ft}
    if found is not None:
        host_id, st = found
        return row | st.to_dict() | {
            "vm": vm.name, "primary_host": name(host_id),
            "secondary_host": name(st.secondary_host)}
    if ft_wanted(vm) is None:
        state, reason = VmState.NOT_PROTECTED.value, f"invalid ft value {ftvalue.shown(vm.ft)}"
    elif not ft_wanted(vm):
        state, reason = VmState.DISABLED.value, "ft is off"
    elif vm.status not in RUNNING_VM_STATES:
        state, reason = VmState.DOWN.value, f"the VM is {vm.status}"
    elif vm.ha_enabled or vm.has_lease:
        state, reason = VmState.NOT_PROTECTED.value, "refused: high availability or lease"
    elif vm.host_id in view.problems:
        state = VmState.NOT_PROTECTED.value
        reason = f"agent on {name(vm.host_id)} not usable: {view.problems[vm.host_id]}"
    else:
        state = VmState.NOT_PROTECTED.value
        reason = "started without the FT hook: restart the VM"
    return row | {"state": state, "reason": reason, "primary_host": name(vm.host_id),
                  "secondary_host": ""}


def _fmt(value: object, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return f"{value / scale:.{digits}f}{unit}"
    return str(value)


COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("VM", lambda r: r["vm"]),
    ("STATE", lambda r: r["state"]),
    ("PRIMARY", lambda r: r["primary_host"] or "-"),
    ("SECONDARY", lambda r: r["secondary_host"] or "-"),
    ("CKPT/MIN", lambda r: _fmt(r.get("checkpoints_per_minute"))),
    ("PAUSE", lambda r: _fmt(r.get("last_checkpoint_pause_ms"), " ms")),
    ("REPLICATION", lambda r: _fmt(r.get("replication_bytes_per_second"), " MiB/s",
                                   1 << 20, 2)),
    ("LAG", lambda r: _fmt(r.get("lag_seconds"), " s", digits=2)),
    ("REASON", lambda r: r.get("reason") or ""),
]


HOST_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("HOST", lambda r: r["host"]),
    ("COLO", lambda r: r["colo"]),
    ("QEMU", lambda r: r["qemu_version"] or "-"),
    ("EMULATOR", lambda r: r["qemu_path"] or "-"),
    ("REASON", lambda r: r["reason"]),
]


def table(rows: Sequence[dict], columns: list[tuple[str, Callable[[dict], str]]] = COLUMNS
          ) -> str:
    cells = [[h for h, _ in columns]] + [[f(r) for _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in cells)


def host_rows(inv: Inventory, view: AgentView) -> list[dict]:
    """Each host's QEMU as its agent probed it: can FT VMs run there, and if not, why."""
    rows = []
    for h in sorted(inv.hosts.values(), key=lambda h: h.name):
        hs = view.statuses.get(h.id)
        qemu = hs.qemu if hs is not None else None
        if hs is None:
            colo, reason = "unknown", f"agent not usable: {view.problems.get(h.id, '?')}"
        elif qemu is None:
            colo, reason = "unknown", "the agent reports no QEMU probe (an older agent?)"
        else:
            colo, reason = ("yes" if qemu.capable else "no"), qemu.reason
        rows.append({"host": h.name, "host_id": h.id, "colo": colo, "reason": reason,
                     "qemu_version": qemu.version if qemu else "",
                     "qemu_path": qemu.path if qemu else "",
                     "qemu_build": qemu.build if qemu else "",
                     "failed": list(qemu.failed) if qemu else []})
    return rows


class Cli:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.engine = Engine(settings.engine, settings.poller.hook_name)
        self._agents: Agents | None = None

    @property
    def agents(self) -> Agents:
        if self.settings.agents is None:
            raise CliError("no [agents] cert/key/ca in the settings: the CLI needs a client "
                           "certificate to talk to the host agents")
        if self._agents is None:
            self._agents = Agents(self.settings.agents)
        return self._agents

    def close(self) -> None:
        if self._agents is not None:
            self._agents.close()
        self.engine.close()

    def _state(self) -> tuple[Inventory, AgentView]:
        inv = self.engine.inventory()
        return inv, self.agents.poll(inv.hosts.values())

    def _vm(self, inv: Inventory, name: str) -> VmInfo:
        vm = inv.vm_by_name(name)
        if vm is None:
            raise CliError(f"no VM named {name!r} in the engine")
        return vm

    def status(self, name: str | None, as_json: bool) -> str:
        inv, view = self._state()
        if name is not None:
            vms = [self._vm(inv, name)]
        else:
            reported = view.vm_ids()
            vms = sorted((v for v in inv.vms.values() if v.ft is not None or v.id in reported),
                         key=lambda v: v.name)
        rows = [_row(vm, inv, view) for vm in vms]
        if as_json:
            return json.dumps(rows, indent=2)
        if name is not None:
            return table(rows)
        return table(rows) + "\n\n" + table(host_rows(inv, view), HOST_COLUMNS)

    def hosts(self, as_json: bool) -> str:
        rows = host_rows(*self._state())
        return json.dumps(rows, indent=2) if as_json else table(rows, HOST_COLUMNS)

    def set_ft(self, name: str, on: bool) -> str:
        vm = self.engine.find_vm(name)
        if on and (vm.ha_enabled or vm.has_lease):
            raise CliError(f"VM {name} has high availability or a VM lease; FT VMs must have "
                           f"neither (the engine would restart the VM beside its promoted "
                           f"secondary). Turn them off first.")
        self.engine.set_custom_property(vm.id, "ft", "true" if on else "false")
        if not on:
            return f"ft=false set on VM {name}; the poller turns protection off."
        note = (" It runs now without the FT hook's preparation unless it was started with "
                "ft=true: restart it if `ovirt-ft status` says so."
                if vm.status in RUNNING_VM_STATES else "")
        return f"ft=true set on VM {name}; the poller protects it.{note}"

    def accept_stale_image(self, name: str, confirmed: bool) -> str:
        """The admin's way out when a survivor's replica is lost for good: drop the
        arbiter's stale-image mark (vdsm_ft.imagestate), so the image as it is may start.
        Refused while the replica's host still reports the VM, and without the flag."""
        from vdsm_ft.arbiter import ArbiterError
        vm = self.engine.find_vm(name)
        arbiter = self._arbiter()
        try:
            mark = arbiter.stale_image(vm.id)
        except ArbiterError as e:
            raise CliError(f"cannot read VM {name}'s stale-image mark from etcd: {e}") from None
        if mark is None:
            return f"VM {name}: its storage-domain image is not marked behind; nothing to do."
        inv, view = self._state()
        host = inv.hosts.get(mark.host)
        where = host.name if host else mark.host
        held = [st for host_id, st in view.reports(vm.id) if host_id == mark.host]
        lost = (f"every write VM {name} made since {imagestate_when(mark.since)} (the "
                f"failover of generation {mark.generation}), which only host {where}'s "
                "replica holds")
        if held:
            raise CliError(f"VM {name}: host {where}'s agent still has its replica "
                           f"({held[0].state.value}: {held[0].reason or 'no reason'}); it "
                           "finishes the copy-back by itself once what that reason names "
                           "is fixed. Nothing was changed")
        if not confirmed:
            agent = view.problems.get(mark.host, "it does not report the VM")
            raise CliError(f"VM {name}: its storage-domain image is behind, and host "
                           f"{where}'s agent cannot finish the copy-back ({agent}). "
                           f"Accepting the image as it is gives up {lost}. If that host "
                           "and its replica are lost for good, run again with "
                           "--lose-writes-since-failover")
        try:
            arbiter.discard_stale_image(vm.id)
        except ArbiterError as e:
            raise CliError(f"VM {name}: the stale-image mark was not dropped: {e}") from None
        return (f"VM {name}: the storage-domain image is accepted as it is; {lost} are "
                "given up. The VM may be started again.")

    def _arbiter(self) -> "Arbiter":
        p = self.settings.poller
        if not p.etcd_endpoints:
            raise CliError("no [poller] etcd_endpoints in the settings: this command "
                           "needs the arbiter (etcd)")
        config.require_secure_etcd(self.settings)
        from vdsm_ft.arbiter import Arbiter
        return Arbiter(list(p.etcd_endpoints), ca_cert=p.etcd_ca, cert=p.etcd_cert,
                       key=p.etcd_key, username=p.etcd_username, password=p.etcd_password)

    def operate(self, name: str, op: str, to_host: str | None = None) -> str:
        inv, view = self._state()
        vm = self._vm(inv, name)
        found = _primary(view, vm.id)
        if found is None:
            raise CliError(f"VM {name}: no FT agent reports its primary "
                           f"({_row(vm, inv, view)['reason']})")
        host = inv.hosts[found[0]]
        client: AgentClient = self.agents.client(host)
        if op == "migrate-secondary":
            target = next((h for h in inv.hosts.values() if h.name == to_host), None)
            if target is None:
                raise CliError(f"no host named {to_host!r} in the engine")
            if target.id not in view.statuses:
                raise CliError(f"host {to_host}: its FT agent is not usable: "
                               f"{view.problems.get(target.id, 'no status')}")
            st = client.migrate_secondary(vm.id, view.peer_spec(target))
        else:
            st = getattr(client, op.replace("-", "_"))(vm.id)
        return f"{op} {name}: accepted by the agent on {host.name}; state now {st.state.value}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Fault tolerance (COLO) for oVirt VMs.")
    p.add_argument("--config", help=f"settings file (default ${config.ENV_CONFIG} or "
                                    f"{config.DEFAULT_PATH}; must be mode 0600)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("status", help="protection state of FT VMs, and whether each "
                                       "host's QEMU can do COLO")
    st.add_argument("vm", nargs="?")
    st.add_argument("--json", action="store_true")
    hosts = sub.add_parser("hosts", help="whether each host's QEMU can do COLO")
    hosts.add_argument("--json", action="store_true")
    for cmd, text in (("enable", "set ft=true"), ("disable", "set ft=false"),
                      ("suspend", "suspend protection"), ("resume", "resume protection"),
                      ("test-failover", "fail over to the secondary now"),
                      ("restart-secondary", "recreate the secondary")):
        sub.add_parser(cmd, help=text).add_argument("vm")
    mig = sub.add_parser("migrate-secondary", help="move the secondary to another host")
    mig.add_argument("vm")
    mig.add_argument("--to", required=True, metavar="HOST")
    acc = sub.add_parser("accept-stale-image", help="after a failover whose replica is "
                         "lost for good: let the VM start from its storage-domain image "
                         "as it is, giving up the writes since the failover")
    acc.add_argument("vm")
    acc.add_argument("--lose-writes-since-failover", action="store_true",
                     help="confirm that those writes are given up")
    return p


def run(args: argparse.Namespace) -> str:
    settings = config.load(args.config)
    cli = Cli(settings)
    try:
        if args.command == "status":
            return cli.status(args.vm, args.json)
        if args.command == "hosts":
            return cli.hosts(args.json)
        if args.command in ("enable", "disable"):
            return cli.set_ft(args.vm, args.command == "enable")
        if args.command == "accept-stale-image":
            return cli.accept_stale_image(args.vm, args.lose_writes_since_failover)
        return cli.operate(args.vm, args.command, getattr(args, "to", None))
    except EngineAuthFailed:
        raise CliError(f"the engine refused the credentials of {settings.engine.username}; "
                       f"check [engine] username and password") from None
    except EngineUnavailable as e:
        raise CliError(f"cannot reach the engine at {settings.engine.url}: "
                       f"{str(e).split('engine unreachable: ', 1)[-1]}") from None
    except EngineNotFound as e:
        raise CliError(str(e).replace("search VM ", "")) from None
    finally:
        cli.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(run(args))
    except (CliError, config.ConfigError, EngineError, AgentError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
