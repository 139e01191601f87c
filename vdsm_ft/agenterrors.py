"""The error vocabulary of the agent's two APIs: the HTTPS API (vdsm_ft/api.py) and the
hooks' unix-socket API (vdsm_ft/hookapi.py).

Both send errors as `{"error": {"code", "message"}}` with the codes below, both raise
the exceptions below, and both check ids with `check_id`. The hooks import this module
at every VM start (through hookapi), so it imports nothing but `re`.
"""
from __future__ import annotations

import re
from typing import Any

# The codes of error answers on the wire.
BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"                 # no such endpoint
METHOD_NOT_ALLOWED = "method_not_allowed"
INTERNAL = "internal"
UNKNOWN_VM = "unknown_vm"               # HTTPS API: the agent does not know this VM
CONFLICT = "conflict"                   # HTTPS API: the VM's state forbids it now
UNAVAILABLE = "unavailable"             # HTTPS API: retry later
REFUSED = "refused"                     # hook API: the agent refuses this VM's request
FORBIDDEN = "forbidden"                 # the caller may not make this request at all
# Hook API: prepare refused because this host's QEMU cannot do COLO; the hook applies
# `[hooks] qemu_incapable` (vdsm_ft/hooks.py).
QEMU_INCAPABLE = "qemu_incapable"
# Not sent: what api.py's client calls an error answer without a JSON error body.
HTTP_ERROR = "http_error"

INTERNAL_MESSAGE = "internal error; see the agent log"

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 characters of [A-Za-z0-9._-]"
# A UUID in its canonical form (a regex, not the uuid module: faster to import).
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class AgentError(Exception):
    """Base of every failure of either agent API."""


class AgentUnreachable(AgentError):
    """No usable answer from the agent: no connection, no TLS session, or (hook API) a
    timeout, an internal error or an answer that is not the protocol."""


class AgentTimeout(AgentError):
    """HTTPS API: the agent did not answer within the caller's bound."""


class AgentProtocolError(AgentError):
    """HTTPS API: the agent answered something that is not the protocol."""


class AgentRejected(AgentError):
    """An error answer, or a refusal a server turns into one.

    `code` is one of the codes above, `message` the human explanation.
    """

    status = 500
    code = INTERNAL

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class BadRequest(AgentRejected):
    """The request does not follow the schema (raised locally before sending, too)."""

    status = 400
    code = BAD_REQUEST


class NotFound(AgentRejected):
    """HTTPS API: the agent does not know this VM (or the path does not exist)."""

    status = 404
    code = UNKNOWN_VM


class Conflict(AgentRejected):
    """HTTPS API: the VM's current state does not allow this operation now."""

    status = 409
    code = CONFLICT


class Forbidden(AgentRejected):
    """The caller is not one that may cross this boundary (docs/security.md)."""

    status = 403
    code = FORBIDDEN


class Unavailable(AgentRejected):
    """HTTPS API: the agent cannot do this right now (e.g. the arbiter is unreachable)."""

    status = 503
    code = UNAVAILABLE


class AgentRefused(AgentRejected):
    """Hook API: the agent refused the request; the hook shows `message`. Its client
    raises this for every 4xx answer, with the answer's status and code."""

    status = 409
    code = REFUSED


_REJECTED_BY_STATUS: dict[int, type[AgentRejected]] = {
    400: BadRequest, 403: Forbidden, 404: NotFound, 409: Conflict, 503: Unavailable}


def rejected(status: int, code: str, message: str) -> AgentRejected:
    """The HTTPS API client's exception for an error answer."""
    cls = _REJECTED_BY_STATUS.get(status, AgentRejected)
    return cls(message, status=status, code=code)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_of(payload: Any) -> tuple[str, str] | None:
    """(code, message) of an error body, or None if `payload` is not one."""
    try:
        err = payload["error"]
        return str(err["code"]), str(err["message"])
    except (KeyError, TypeError):
        return None


def check_id(value: Any, what: str, *, uuid: bool = False) -> str:
    """`value` if it is an id: 1-64 characters of [A-Za-z0-9._-]; with `uuid`, a UUID
    (VDSM's vmId is the engine's VM UUID), returned in lower case. Else BadRequest."""
    if uuid:
        if isinstance(value, str) and _UUID_RE.fullmatch(value.lower()):
            return value.lower()
        raise BadRequest(f"{what} {value!r} is not a UUID")
    if is_id(value):
        return value
    raise BadRequest(f"{what} must be {ID_RULE}, got {value!r}")


def is_id(value: Any) -> bool:
    """True for an id that check_id accepts (without `uuid`)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None
