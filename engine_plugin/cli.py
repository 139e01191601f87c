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

from engine_plugin import config
from engine_plugin.agents import Agents, AgentView
from engine_plugin.engine import (Engine, EngineAuthFailed, EngineError, EngineNotFound,
                                  EngineUnavailable)
from engine_plugin.inventory import Inventory, VmInfo
from engine_plugin.reconcile import RUNNING_VM_STATES, ft_wanted
from vdsm_ft.api import AgentClient, AgentError, Role, VmState, VmStatus

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
        state, reason = VmState.NOT_PROTECTED.value, f"invalid ft value {vm.ft!r}"
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


def table(rows: Sequence[dict]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in cells)


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
        return json.dumps(rows, indent=2) if as_json else table(rows)

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
    st = sub.add_parser("status", help="protection state of FT VMs")
    st.add_argument("vm", nargs="?")
    st.add_argument("--json", action="store_true")
    for cmd, text in (("enable", "set ft=true"), ("disable", "set ft=false"),
                      ("suspend", "suspend protection"), ("resume", "resume protection"),
                      ("test-failover", "fail over to the secondary now"),
                      ("restart-secondary", "recreate the secondary")):
        sub.add_parser(cmd, help=text).add_argument("vm")
    mig = sub.add_parser("migrate-secondary", help="move the secondary to another host")
    mig.add_argument("vm")
    mig.add_argument("--to", required=True, metavar="HOST")
    return p


def run(args: argparse.Namespace) -> str:
    settings = config.load(args.config)
    cli = Cli(settings)
    try:
        if args.command == "status":
            return cli.status(args.vm, args.json)
        if args.command in ("enable", "disable"):
            return cli.set_ft(args.vm, args.command == "enable")
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
