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
    raise InvalidFtValue(f"custom property ft={shown(value)} is not valid: use ft=true or "
                         "ft=false (lower case), or leave it unset")


# An engine event, a hook's message and a status line quote a bad value this long at most
# (a 10 KB value used to be copied whole into two engine events, issue 16).
SHOWN_CHARS = 40


def shown(value: str | None) -> str:
    """`value` quoted for a message, cut to SHOWN_CHARS with its full length said."""
    if value is None or len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"


def wanted(value: str | None) -> bool | None:
    """`parse`, with None for an invalid value: the poller reports it and acts on nothing."""
    try:
        return parse(value)
    except InvalidFtValue:
        return None
