"""Engine side of vdsm-ft: the poller, placement policy and the ovirt-ft CLI."""
