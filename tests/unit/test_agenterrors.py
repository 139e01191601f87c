"""The agent APIs' shared error vocabulary and id rule (vdsm_ft/agenterrors.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vdsm_ft import agenterrors, api, hookapi
from vdsm_ft.agenterrors import (AgentError, AgentRefused, AgentRejected, BadRequest,
                                 Conflict, NotFound, Unavailable, check_id, error_body,
                                 error_of, rejected)

REPO = Path(__file__).resolve().parents[2]
VM = "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b"


@pytest.mark.parametrize("value", ["a", "vm-1", "host_b.lab", "A" * 64, VM, VM.upper()])
def test_ids_of_the_rule_pass_unchanged(value):
    assert check_id(value, "vm_id") == value


@pytest.mark.parametrize("value", ["", "-vm", ".vm", "a" * 65, "../../etc", "vm 1", "vm/1",
                                   "host:1", "vm-1\n", None, 7, ["vm-1"]])
def test_anything_else_is_a_bad_request_naming_the_field(value):
    with pytest.raises(BadRequest) as e:
        check_id(value, "peer.host_id")
    assert (e.value.status, e.value.code) == (400, "bad_request")
    assert e.value.message == ("peer.host_id must be 1-64 characters of [A-Za-z0-9._-], "
                               f"got {value!r}")


def test_a_uuid_is_returned_in_lower_case():
    assert check_id(VM.upper(), "VM id", uuid=True) == VM


@pytest.mark.parametrize("value", ["vm-1", VM[:-1], VM + "0", VM.replace("-", ""),
                                   VM + "\n", "{" + VM + "}", None])
def test_a_uuid_id_must_be_a_canonical_uuid(value):
    with pytest.raises(BadRequest) as e:
        check_id(value, "VM id", uuid=True)
    assert e.value.message == f"VM id {value!r} is not a UUID"


def test_both_apis_check_ids_with_the_one_rule():
    with pytest.raises(BadRequest, match="must be 1-64 characters"):
        api.PeerSpec(host_id="host-b\n", agent_address="10.0.0.2", agent_port=54329,
                     replication_address="10.0.0.2")
    with pytest.raises(BadRequest, match="not a UUID"):
        hookapi.HookClient("/nonexistent").stopping("vm-1")


def test_both_apis_raise_the_same_classes():
    assert api.AgentError is hookapi.AgentError is AgentError
    assert api.AgentUnreachable is hookapi.AgentUnreachable
    assert api.BadRequest is hookapi.BadRequest is BadRequest
    assert issubclass(AgentRefused, AgentRejected) and issubclass(AgentRejected, AgentError)


@pytest.mark.parametrize("cls, status, code", [
    (AgentRejected, 500, "internal"), (BadRequest, 400, "bad_request"),
    (NotFound, 404, "unknown_vm"), (Conflict, 409, "conflict"),
    (Unavailable, 503, "unavailable"), (AgentRefused, 409, "refused")])
def test_each_class_has_its_status_and_code(cls, status, code):
    e = cls("why")
    assert (e.status, e.code, e.message, str(e)) == (status, code, "why", f"{status} {code}: why")


def test_a_refusal_keeps_the_code_it_is_given():
    e = AgentRefused("no COLO", code=agenterrors.QEMU_INCAPABLE)
    assert (e.status, e.code) == (409, "qemu_incapable")


@pytest.mark.parametrize("status, cls", [(400, BadRequest), (404, NotFound), (409, Conflict),
                                         (503, Unavailable), (405, AgentRejected),
                                         (500, AgentRejected), (418, AgentRejected)])
def test_an_error_answer_becomes_the_class_of_its_status(status, cls):
    e = rejected(status, "some_code", "why")
    assert type(e) is cls
    assert (e.status, e.code, e.message) == (status, "some_code", "why")


def test_error_bodies_round_trip():
    body = error_body(agenterrors.CONFLICT, "busy")
    assert body == {"error": {"code": "conflict", "message": "busy"}}
    assert error_of(body) == ("conflict", "busy")


@pytest.mark.parametrize("payload", [None, {}, [], "error", {"error": "x"},
                                     {"error": {"code": "c"}}, {"error": {"message": "m"}}])
def test_anything_but_an_error_body_is_none(payload):
    assert error_of(payload) is None


def test_the_wire_codes_do_not_change():
    assert (agenterrors.BAD_REQUEST, agenterrors.NOT_FOUND, agenterrors.METHOD_NOT_ALLOWED,
            agenterrors.INTERNAL, agenterrors.UNKNOWN_VM, agenterrors.CONFLICT,
            agenterrors.UNAVAILABLE, agenterrors.REFUSED, agenterrors.QEMU_INCAPABLE) == (
        "bad_request", "not_found", "method_not_allowed", "internal", "unknown_vm",
        "conflict", "unavailable", "refused", "qemu_incapable")


def test_the_module_imports_nothing_heavy():
    """The hooks load it at every VM start, through hookapi."""
    code = ("import sys, vdsm_ft.agenterrors\n"
            "print(sorted(m for m in ('logging', 'json', 'uuid', 'http.client')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=30, check=True)
    assert out.stdout.strip() == "[]", out.stderr
