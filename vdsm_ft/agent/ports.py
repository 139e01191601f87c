"""The COLO port plan: each protected VM gets its own ports from a configured range.

Ports in use are the ones the persisted records hold, so allocations survive an agent
restart and never collide; a port something else has bound is skipped.
"""
from __future__ import annotations

import socket
from collections.abc import Iterable


class PortsExhausted(RuntimeError):
    """No free port is left in the configured range."""


def _bindable(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def allocate(count: int, port_range: tuple[int, int], held: Iterable[int],
             address: str) -> list[int]:
    """`count` free ports from `port_range` (inclusive), none of them in `held`."""
    taken = set(held)
    chosen: list[int] = []
    for port in range(port_range[0], port_range[1] + 1):
        if len(chosen) == count:
            break
        if port not in taken and _bindable(address, port):
            chosen.append(port)
    if len(chosen) < count:
        raise PortsExhausted(f"no {count} free COLO ports left in {port_range[0]}-"
                             f"{port_range[1]} on {address}; widen the agent's port "
                             "range or protect fewer VMs on this host")
    return chosen
