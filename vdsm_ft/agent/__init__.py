"""The per-host vdsm-ft agent (systemd unit `vdsm-ft-agent`)."""


def main() -> int:
    from vdsm_ft.agent.daemon import main as run

    return run()
