"""The agent's Prometheus text endpoint: one series per VM and measure."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from vdsm_ft.api import VmState

if TYPE_CHECKING:
    from vdsm_ft.agent.controller import VmController

_HELP = (
    ("vdsm_ft_vm_state", "gauge", "1 for the VM's current protection state"),
    ("vdsm_ft_checkpoints_total", "counter", "completed COLO checkpoints seen"),
    ("vdsm_ft_checkpoints_per_minute", "gauge", "checkpoints in the last minute"),
    ("vdsm_ft_checkpoint_pause_ms", "gauge", "guest pause per checkpoint (quantile)"),
    ("vdsm_ft_seconds_since_checkpoint", "gauge", "age of the last completed checkpoint"),
    ("vdsm_ft_failovers_total", "counter", "failovers this VM survived"),
    ("vdsm_ft_arbiter_corrupt_claims_total", "counter",
     "corrupt live claims in the arbiter met in this VM's failovers (each an ALERT)"),
    ("vdsm_ft_replication_bytes", "counter",
     "bytes the primary's COLO and NBD connections delivered to the secondary"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(host_id: str, controllers: Iterable["VmController"]) -> str:
    lines = []
    for name, kind, text in _HELP:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    for ctl in controllers:
        rec = ctl.record
        labels = f'host="{_escape(host_id)}",vm="{rec.vm_id}",name="{_escape(rec.name)}",' \
                 f'role="{rec.role.value}"'
        for state in VmState:
            value = 1 if state is rec.state else 0
            lines.append(f'vdsm_ft_vm_state{{{labels},state="{state.value}"}} {value}')
        lines.append(f"vdsm_ft_checkpoints_total{{{labels}}} {ctl.stats.total}")
        lines.append(f"vdsm_ft_checkpoints_per_minute{{{labels}}} "
                     f"{ctl.stats.per_minute():.1f}")
        for q in (0.5, 0.99):
            pause = ctl.stats.pause_quantile_ms(q)
            if pause is not None:
                lines.append(f'vdsm_ft_checkpoint_pause_ms{{{labels},quantile="{q}"}} '
                             f"{pause:.3f}")
        lag = ctl.stats.lag_seconds()
        if lag is not None:
            lines.append(f"vdsm_ft_seconds_since_checkpoint{{{labels}}} {lag:.3f}")
        lines.append(f"vdsm_ft_failovers_total{{{labels}}} {rec.failovers}")
        lines.append(f"vdsm_ft_arbiter_corrupt_claims_total{{{labels}}} "
                     f"{ctl.corrupt_claims}")
        if rec.role.value == "primary":
            lines.append(f"vdsm_ft_replication_bytes{{{labels}}} "
                         f"{ctl.status().replication_bytes}")
    return "\n".join(lines) + "\n"
