"""Failures the fake engine reports the way ovirt-engine's REST layer does.

The REST layer turns a failed validation into a `<fault>` whose reason is "Operation
Failed" and whose detail is the localized message list, with the HTTP status chosen by
the message's ErrorType (`ErrorMessageHelper.getErrorStatus`): BAD_PARAMETERS -> 400,
CONFLICT -> 409. A missing entity is 404.
"""
from __future__ import annotations


class EngineFault(Exception):
    """An engine-side refusal: HTTP `status` with a `<fault>` reason and detail."""

    status = 400
    reason = "Operation Failed"

    def __init__(self, detail: str, status: int = 0, reason: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        if status:
            self.status = status
        if reason:
            self.reason = reason


class BadRequest(EngineFault):
    status = 400


class Conflict(EngineFault):
    status = 409


class NotFound(EngineFault):
    status = 404

    def __init__(self, identifier: str) -> None:
        super().__init__("Entity not found: %s" % identifier)


class IncompleteParameters(EngineFault):
    """`CompletenessAssertor`: a required element is missing from the request body."""

    status = 400
    reason = "Incomplete parameters"


class LabError(RuntimeError):
    """The lab drove the fake engine wrongly (unknown host, report from a dead host...)."""
