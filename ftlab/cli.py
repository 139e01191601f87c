"""`vdsm-ft lab`: a whole oVirt data centre with FT on one machine.

    vdsm-ft lab up         pre-flight checks, then hosts, etcd, agents, engine, poller
    vdsm-ft lab demo       the story: protect, crash, fail over, re-protect, crash again
    vdsm-ft lab status     hosts, agents, VMs and their FT state
    vdsm-ft lab fault ...  inject a fault by hand
    vdsm-ft lab down       remove everything the lab made (also after a crash)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ftlab import labcontrol, preflight, teardown
from ftlab.labstate import (DEFAULT_ENGINE_PORT, DEFAULT_HOSTS, LabPaths, LabStateError,
                            lab_dir, pid_alive, read_state)
from ftlab.vdsmdriver import REPO

UP_TIMEOUT = 600.0


class CliError(RuntimeError):
    """A lab command failed; the message says what to do."""


def cmd_up(args: argparse.Namespace) -> int:
    root = lab_dir(args.lab_dir)
    preflight.run(root, args.engine_port, args.hosts)
    paths = LabPaths(root)
    os.makedirs(paths.logs, mode=0o755)
    os.chmod(root, 0o755)                  # QEMU (libvirt-qemu) traverses into host dirs
    log_path = os.path.join(paths.logs, "supervisor.log")
    print(f"lab dir {root}; building the lab (log: {log_path})", flush=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftlab.supervisor", "--lab-dir", root,
             "--hosts", str(args.hosts), "--engine-port", str(args.engine_port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=REPO), cwd="/", start_new_session=True)
    shown = 0
    while True:
        shown = _show_progress(log_path, shown)
        try:
            state = read_state(root)
        except LabStateError:
            state = None
        if state is not None and state.state == "ready":
            break
        if state is not None and state.state == "failed" or proc.poll() is not None:
            reason = state.error if state is not None and state.error else \
                f"the supervisor exited with {proc.returncode}"
            raise CliError(f"lab up failed: {reason}\n  see {log_path}\n  then run "
                           f"`vdsm-ft lab down{_dir_arg(args)}` to remove what was made")
        if time.monotonic() - t0 > UP_TIMEOUT:
            raise CliError(f"lab up did not finish within {UP_TIMEOUT:.0f}s; see {log_path}")
        time.sleep(0.5)
    print(f"lab up in {time.monotonic() - t0:.1f}s")
    print(f"  hosts:   {', '.join(f'{h.name} ({h.address})' for h in state.hosts)}")
    print(f"  engine:  {state.engine_url}  user {state.engine_user}, password in "
          f"{state.password_file} (mode 0600), CA {state.engine_ca}")
    print(f"  etcd:    {', '.join(state.etcd_endpoints)} (client certificates and users; "
          f"passwords in {os.path.join(paths.pki, 'etcd')})")
    print(f"  poller:  pid {state.poller_pid}, settings {paths.poller_conf}")
    print(f"  ovirt-ft CLI: OVIRT_FT_CONFIG={paths.poller_conf} ovirt-ft status")
    print(f"next: vdsm-ft lab demo{_dir_arg(args)}")
    return 0


def _show_progress(log_path: str, shown: int) -> int:
    """Print the supervisor's new "building X" lines, so a slow step is visible."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return shown
    for line in lines[shown:]:
        if " INFO ftlab.supervisor: " in line:
            print("  " + line.split(" INFO ftlab.supervisor: ", 1)[1], flush=True)
    return len(lines)


def _dir_arg(args: argparse.Namespace) -> str:
    return f" --lab-dir {args.lab_dir}" if args.lab_dir else ""


def cmd_down(args: argparse.Namespace) -> int:
    removed = teardown.lab_down(lab_dir(args.lab_dir))
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to remove: no lab here")
    return 0


def _control(args: argparse.Namespace, op: str, **kw: object) -> object:
    state = read_state(lab_dir(args.lab_dir))
    if state.state != "ready":
        raise CliError(f"the lab is {state.state}{': ' + state.error if state.error else ''};"
                       f" run `vdsm-ft lab down{_dir_arg(args)}` and `lab up` again")
    if not pid_alive(state.supervisor_pid):
        raise CliError(f"the lab supervisor (pid {state.supervisor_pid}) is gone; run "
                       f"`vdsm-ft lab down{_dir_arg(args)}` and `vdsm-ft lab up` again")
    return labcontrol.call(state.control_socket, op, **kw)


def cmd_status(args: argparse.Namespace) -> int:
    st = _control(args, "status")
    assert isinstance(st, dict)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"poller: {st['poller']}   engine: {'OUTAGE' if st['engine_outage'] else 'up'}")
    _table(["HOST", "PROCESSES", "ENGINE", "QEMU", "AGENT"],
           [[h["name"], "running" if h["running"] else "down", h["engine_status"],
             h.get("qemu") or "-", h["agent"]] for h in st["hosts"]])
    print()
    rows = []
    for vm in st["vms"]:
        ft = [f"{h['name']}: {v['role']} {v['state']}"
              + (f" ({v['reason']})" if v["reason"] else "")
              for h in st["hosts"] for v in h["vms"] if v["vm_id"] == vm["id"]]
        rows.append([vm["name"], vm["status"], vm["host"] or "-", "; ".join(ft) or "-"])
    _table(["VM", "ENGINE", "ON", "FT (as the agents report it)"], rows)
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def cmd_fault(args: argparse.Namespace) -> int:
    kind = args.fault
    if kind == "host-crash" and args.revive:
        result = _control(args, "host-revive", host=args.host)
    elif kind == "host-crash":
        _control(args, "host-crash", host=args.host)
        result = (f"{args.host} crashed: every process of the host SIGKILLed; the engine "
                  "sees it stop answering")
    elif kind == "qemu-crash":
        result = _control(args, "qemu-crash", vm=args.vm, host=args.host)
    elif kind == "agent-crash":
        result = _control(args, "agent-crash", host=args.host, restart=args.restart)
    elif kind == "etcd-crash":
        result = _control(args, "etcd-crash", host=args.host, restart=args.restart)
    elif kind == "vdsm-restart":
        result = _control(args, "vdsm-restart", host=args.host)
    elif kind == "partition":
        result = _control(args, "partition", a=args.host_a, b=args.host_b, heal=args.heal)
    elif kind == "slow-link":
        if not args.clear and not (args.delay or args.loss or args.rate):
            raise CliError("slow-link needs --delay, --loss and/or --rate (or --clear)")
        result = _control(args, "slow-link", host=args.host, delay=args.delay or "",
                          loss=args.loss or "", rate=args.rate or "", clear=args.clear)
    elif kind == "engine-down":
        result = _control(args, "engine-down", up=args.up)
    else:
        result = _control(args, "disk-full", host=args.host, undo=args.undo)
    print(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ftlab import demo
    root = lab_dir(args.lab_dir)
    _control(args, "status")               # the lab is up and its supervisor answers
    if args.guest == "linux":
        return demo.linux_guest(read_state(root))
    return demo.run(read_state(root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdsm-ft", description=__doc__.split("\n")[0])
    top = parser.add_subparsers(dest="command", required=True)
    lab = top.add_parser("lab", help="the one-machine lab")
    lab.add_argument("--lab-dir", help="where the lab keeps its files (default "
                     "$VDSM_FT_LAB_DIR or /var/lib/vdsm-ft-lab)")
    sub = lab.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="pre-flight checks, then build the lab")
    up.add_argument("--hosts", type=int, default=DEFAULT_HOSTS)
    up.add_argument("--engine-port", type=int, default=DEFAULT_ENGINE_PORT)
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="remove everything the lab made").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="hosts, agents, VMs and their FT state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    demo = sub.add_parser("demo", help="protect a VM, crash its host twice, check its data")
    demo.add_argument("--guest", choices=("idle", "linux"), default="idle",
                      help="idle: the idle KVM guest (default); linux: tier 3, needs a "
                      "host where KVM runs a Linux guest at speed")
    demo.set_defaults(func=cmd_demo)
    fault = sub.add_parser("fault", help="inject a fault by hand")
    faults = fault.add_subparsers(dest="fault", required=True)
    f = faults.add_parser("host-crash", help="SIGKILL every process of a host")
    f.add_argument("host")
    f.add_argument("--revive", action="store_true", help="bring the host back instead")
    f = faults.add_parser("qemu-crash", help="SIGKILL a VM's QEMU (its primary by default)")
    f.add_argument("vm", help="VM name or id")
    f.add_argument("--host", help="the host whose copy to kill")
    f = faults.add_parser("agent-crash", help="SIGKILL a host's agent")
    f.add_argument("host")
    f.add_argument("--restart", action="store_true", help="start the agent again instead")
    f = faults.add_parser("etcd-crash", help="SIGKILL a host's etcd member alone (one "
                          "member at most: a second would risk the cluster's quorum)")
    f.add_argument("host")
    f.add_argument("--restart", action="store_true", help="start the member again instead")
    f = faults.add_parser("vdsm-restart", help="restart a host's VDSM stand-in: it recovers "
                          "the host's domains and kills those with metadata it cannot recover")
    f.add_argument("host")
    f = faults.add_parser("partition", help="cut the link between two hosts")
    f.add_argument("host_a", metavar="HOST-A")
    f.add_argument("host_b", metavar="HOST-B")
    f.add_argument("--heal", action="store_true")
    f = faults.add_parser("slow-link", help="netem delay/loss/rate on a host's replication "
                          "link (without sch_netem: loss by iptables, rate by tbf, no delay)")
    f.add_argument("host")
    f.add_argument("--delay", help="e.g. 5ms (needs the kernel's sch_netem)")
    f.add_argument("--loss", help="e.g. 1%%")
    f.add_argument("--rate", help="e.g. 20mbit")
    f.add_argument("--clear", action="store_true")
    f = faults.add_parser("engine-down", help="the engine stops answering")
    f.add_argument("--up", action="store_true", help="bring it back")
    f = faults.add_parser("disk-full", help="fill a host's replica directory")
    f.add_argument("host")
    f.add_argument("--undo", action="store_true")
    fault.set_defaults(func=cmd_fault)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, preflight.PreflightFailed, LabStateError, labcontrol.ControlError,
            teardown.NotALabDir) as e:
        print(f"vdsm-ft lab {args.action}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
