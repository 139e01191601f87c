"""Host side of vdsm-ft: domain XML roles, QMP and COLO sequences, the agent."""
