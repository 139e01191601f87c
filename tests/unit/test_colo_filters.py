"""The primary's COLO network objects, as `colo.add_network_filters` asks QEMU for them.

Every object on the packet path must parse the tap's virtio-net header: without
`vnet_hdr_support` colo-compare takes a virtio NIC's frames for non-IP and releases the
primary's output uncompared (docs/qemu.md, experiment 13).
"""
from __future__ import annotations

from typing import Any

import pytest

from vdsm_ft import colo
from vdsm_ft.layout import Endpoints, Nic, VmLayout

PATH_OBJECTS = ("filter-mirror", "filter-redirector", "colo-compare")


class RecordingQmp:
    """Answers every command with {} and keeps what was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        self.calls.append((command, arguments or {}))
        return {}


def _objects(before_rewriter: bool) -> list[dict[str, Any]]:
    q = RecordingQmp()
    layout = VmLayout(vm_id="v", name="vm", run_dir="/run/x",
                      nics=(Nic(index=0, netdev="net0", mac="56:6f:00:00:00:01"),
                            Nic(index=1, netdev="net1", mac="56:6f:00:00:00:02")))
    ep = Endpoints("192.0.2.1", "192.0.2.2", 1, 2, (3, 5), (4, 6))
    colo.add_network_filters(q, layout, ep, before_rewriter=before_rewriter)
    return [args for command, args in q.calls
            if command == "object-add" and args["qom-type"] in PATH_OBJECTS]


@pytest.mark.parametrize("before_rewriter", [False, True])
def test_every_filter_and_compare_parses_the_vnet_header(before_rewriter):
    objects = _objects(before_rewriter)
    assert sorted(o["qom-type"] for o in objects) == sorted(
        ["filter-mirror", "filter-redirector", "filter-redirector", "colo-compare"] * 2)
    assert [o["id"] for o in objects if o.get("vnet_hdr_support") is not True] == []
