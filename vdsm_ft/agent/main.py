"""`vdsm-ft-agent`: the agent process, from its command line to a signal that stops it."""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from vdsm_ft import hostconfig
from vdsm_ft.agent.daemon import Agent
from vdsm_ft.agent.heartbeat import HeartbeatKeyError

log = logging.getLogger("vdsm_ft.agent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdsm-ft-agent",
                                     description="vdsm-ft per-host agent")
    parser.add_argument("--config", help="host config file (default: $VDSM_FT_CONFIG "
                        f"or {hostconfig.DEFAULT_PATH})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # qemu.qmp logs every refused connect as an error; vdsm_ft.qmp reports the outcome.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        config = hostconfig.load(args.config)
        hostconfig.require_socket_room(config)
        agent = Agent(config)
    except (hostconfig.ConfigError, HeartbeatKeyError) as exc:
        log.error("%s", exc)
        return 2
    agent.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    agent.stop()
    return 0
