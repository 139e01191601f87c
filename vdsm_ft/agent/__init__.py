"""The per-host vdsm-ft agent (systemd unit `vdsm-ft-agent`, entry `vdsm_ft.agent.main`)."""
