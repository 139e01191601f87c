"""The `ft` custom property's value, read by one rule everywhere: the hooks, the agent's
start checks and the poller.

Standard library only: the hooks read it before anything heavy is imported.
"""
from __future__ import annotations

TRUE = "true"
FALSE = "false"


class InvalidFtValue(ValueError):
    """An `ft` value other than `true`, `false` or unset."""


def parse(value: str | None) -> bool:
    """`true` -> True; `false` or unset -> False; anything else raises InvalidFtValue."""
    if value is None or value == FALSE:
        return False
    if value == TRUE:
        return True
    raise InvalidFtValue(f"custom property ft={value!r} is not valid: use ft=true or "
                         "ft=false (lower case), or leave it unset")


def wanted(value: str | None) -> bool | None:
    """`parse`, with None for an invalid value: the poller reports it and acts on nothing."""
    try:
        return parse(value)
    except InvalidFtValue:
        return None
