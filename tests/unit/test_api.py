"""The agent API over real mutual TLS: the real `AgentServer` with a small in-memory backend,
the real `AgentClient`, certificates made by openssl in the test."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time

import pytest

from ftlab.pki import issue, make_ca
from vdsm_ft import api
from vdsm_ft.api import (AgentClient, AgentServer, AgentTimeout, AgentUnreachable, Backend,
                         BadRequest, Conflict, Failover, HostStatus, NotFound, PeerSpec,
                         PrepareSecondary, Role, SecondaryReady, VmState, VmStatus)

PEER = PeerSpec(host_id="host-b", agent_address="10.0.0.2", agent_port=54329,
                replication_address="192.168.100.2")


class MemoryBackend(Backend):
    """Keeps VMs in a dict and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.delay = 0.0
        self.vms = {"vm-1": VmStatus(vm_id="vm-1", name="web", state=VmState.NEED_SECONDARY,
                                     role=Role.PRIMARY, primary_host="host-a", generation=3)}

    def _get(self, vm_id: str) -> VmStatus:
        time.sleep(self.delay)
        if vm_id not in self.vms:
            raise NotFound(f"VM {vm_id} is not known to this agent")
        return self.vms[vm_id]

    def _set(self, vm_id: str, **changes) -> VmStatus:
        cur = self._get(vm_id)
        new = VmStatus(**{**cur.__dict__, **changes})
        self.vms[vm_id] = new
        return new

    def host_status(self) -> HostStatus:
        self.calls.append(("host_status",))
        time.sleep(self.delay)
        return HostStatus(host_id="host-a", replication_address="192.168.100.1",
                          agent_version="test", vms=tuple(self.vms.values()))

    def vm_status(self, vm_id):
        self.calls.append(("vm_status", vm_id))
        return self._get(vm_id)

    def protect(self, vm_id, peer):
        self.calls.append(("protect", vm_id, peer))
        cur = self._get(vm_id)
        if cur.state is VmState.PROTECTED and cur.secondary_host != peer.host_id:
            raise Conflict(f"VM {vm_id} is protected onto {cur.secondary_host}")
        return self._set(vm_id, state=VmState.SYNCING, secondary_host=peer.host_id)

    def unprotect(self, vm_id):
        self.calls.append(("unprotect", vm_id))
        return self._set(vm_id, state=VmState.DISABLED, secondary_host=None)

    def suspend(self, vm_id):
        self.calls.append(("suspend", vm_id))
        return self._set(vm_id, state=VmState.DISABLED, suspended=True)

    def resume(self, vm_id):
        self.calls.append(("resume", vm_id))
        return self._set(vm_id, state=VmState.NEED_SECONDARY, suspended=False)

    def test_failover(self, vm_id):
        self.calls.append(("test_failover", vm_id))
        return self._set(vm_id, state=VmState.FAILING_OVER)

    def restart_secondary(self, vm_id):
        self.calls.append(("restart_secondary", vm_id))
        return self._set(vm_id, state=VmState.SYNCING)

    def migrate_secondary(self, vm_id, to):
        self.calls.append(("migrate_secondary", vm_id, to))
        return self._set(vm_id, state=VmState.SYNCING, secondary_host=to.host_id)

    def prepare_secondary(self, request):
        self.calls.append(("prepare_secondary", request))
        if request.vm_id == "boom":
            raise RuntimeError("secret internal detail /var/lib/x")
        return SecondaryReady(vm_id=request.vm_id, generation=request.generation,
                              migration_port=49152, nbd_port=49153)

    def metrics(self):
        self.calls.append(("metrics",))
        return 'vdsm_ft_vm_state{vm="vm-1",state="Need Secondary"} 1\n'

    def pairing(self, vm_id):
        # Unpaired: prepare-secondary is checked against the primary it names alone.
        return None


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca")
    other = make_ca(d / "other", "another CA")
    return {
        "agent": issue(d / "ca", ca, "agent", addresses=["127.0.0.1"], hostnames=["localhost"]),
        "poller": issue(d / "ca", ca, api.DEFAULT_POLLER_IDENTITY),
        # host-b's agent, as PEER names it: the primary of the prepare-secondary tests.
        "peer": issue(d / "ca", ca, "host-b", addresses=[PEER.agent_address]),
        "wrong_name": issue(d / "ca", ca, "wrongname", addresses=["127.0.0.9"]),
        "foreign": issue(d / "other", other, "intruder", addresses=["127.0.0.1"]),
    }


@pytest.fixture
def backend():
    return MemoryBackend()


@pytest.fixture
def server(pki, backend):
    srv = AgentServer(("127.0.0.1", 0), backend, pki["agent"])
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(pki, server):
    c = AgentClient("127.0.0.1", server.port, api.client_context(pki["poller"]), timeout=2)
    yield c
    c.close()


@pytest.fixture
def peer_client(pki, server):
    """host-b's agent calling this one, with its own host certificate."""
    c = AgentClient("127.0.0.1", server.port, api.client_context(pki["peer"]), timeout=2)
    yield c
    c.close()


def test_host_and_vm_status_round_trip(client, backend):
    host = client.host_status()
    assert host.host_id == "host-a" and host.replication_address == "192.168.100.1"
    assert host.vms == (backend.vms["vm-1"],)
    assert client.vm_status("vm-1") == backend.vms["vm-1"]


def test_every_action_reaches_the_backend_with_its_arguments(client, peer_client, backend):
    assert client.protect("vm-1", PEER).state is VmState.SYNCING
    assert backend.calls[-1] == ("protect", "vm-1", PEER)
    assert client.suspend("vm-1").suspended is True
    assert client.resume("vm-1").state is VmState.NEED_SECONDARY
    assert client.test_failover("vm-1").state is VmState.FAILING_OVER
    assert client.restart_secondary("vm-1").state is VmState.SYNCING
    assert client.migrate_secondary("vm-1", PEER).secondary_host == "host-b"
    assert backend.calls[-1] == ("migrate_secondary", "vm-1", PEER)
    assert client.unprotect("vm-1").state is VmState.DISABLED
    req = PrepareSecondary(vm_id="vm-1", name="web", generation=4, primary=PEER,
                           domain_xml="<domain/>", disks=((0, 1 << 30),),
                           nics=((0, "net0", "52:54:00:00:00:01"),),
                           mirror_ports=(50001,), compare_ports=(50002,))
    ready = peer_client.prepare_secondary(req)
    assert backend.calls[-1] == ("prepare_secondary", req)
    assert (ready.migration_port, ready.nbd_port, ready.generation) == (49152, 49153, 4)
    assert 'state="Need Secondary"' in client.metrics()
    assert [c[0] for c in backend.calls] == [
        "protect", "suspend", "resume", "test_failover", "restart_secondary",
        "migrate_secondary", "unprotect", "prepare_secondary", "metrics"]


def test_unknown_vm_is_a_typed_404(client):
    with pytest.raises(NotFound) as e:
        client.vm_status("nope")
    assert (e.value.status, e.value.code) == (404, "unknown_vm")
    assert "nope" in e.value.message


def test_conflict_maps_to_409(client, backend):
    backend.vms["vm-1"] = VmStatus(vm_id="vm-1", name="web", state=VmState.PROTECTED,
                                   role=Role.PRIMARY, secondary_host="host-c")
    with pytest.raises(Conflict) as e:
        client.protect("vm-1", PEER)
    assert e.value.status == 409 and "host-c" in e.value.message


def test_internal_errors_are_500_without_details(peer_client):
    req = PrepareSecondary(vm_id="boom", name="x", generation=1, primary=PEER,
                           domain_xml="<domain/>", disks=())
    with pytest.raises(api.AgentRejected) as e:
        peer_client.prepare_secondary(req)
    assert e.value.status == 500 and "secret" not in str(e.value)


def _raw(pki, server, method, path, body: bytes | None, ctype="application/json"):
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=2,
                                       context=api.client_context(pki["poller"]))
    headers = {"Content-Type": ctype} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_malformed_json_is_400_with_a_clear_message(pki, server, backend):
    status, data = _raw(pki, server, "POST", "/v1/vms/vm-1/protect", b"{not json")
    assert status == 400
    assert data["error"]["code"] == "bad_request"
    assert "not valid JSON" in data["error"]["message"]
    assert not any(c[0] == "protect" for c in backend.calls)


@pytest.mark.parametrize("body, words", [
    (b'{}', "missing field 'peer'"),
    (b'{"peer": {"host_id": "h", "agent_address": "a", "agent_port": "54329", '
     b'"replication_address": "r"}}', "agent_port must be an integer"),
    (b'{"peer": {"host_id": "h", "agent_address": "a", "agent_port": 70000, '
     b'"replication_address": "r"}}', "TCP port"),
    (b'{"peer": {"host_id": "h/../x", "agent_address": "a", "agent_port": 1, '
     b'"replication_address": "r"}}', "host_id"),
    (b'[1, 2]', "must be a JSON object"),
])
def test_schema_violations_are_400_naming_the_field(pki, server, backend, body, words):
    status, data = _raw(pki, server, "POST", "/v1/vms/vm-1/protect", body)
    assert status == 400 and words in data["error"]["message"], data
    assert backend.vms["vm-1"].state is VmState.NEED_SECONDARY


def test_wrong_content_type_and_unknown_paths(pki, server):
    status, data = _raw(pki, server, "POST", "/v1/vms/vm-1/protect", b"peer=x",
                        ctype="application/x-www-form-urlencoded")
    assert status == 400 and "Content-Type" in data["error"]["message"]
    status, data = _raw(pki, server, "GET", "/v2/status", None)
    assert status == 404 and data["error"]["code"] == "not_found"
    status, data = _raw(pki, server, "GET", "/v1/vms/vm-1/protect", None)
    assert status == 405


def test_client_validates_before_sending(client, backend):
    with pytest.raises(BadRequest):
        client.vm_status("../../etc")
    with pytest.raises(BadRequest, match="needs a reason"):
        VmStatus(vm_id="v", name="v", state=VmState.NOT_PROTECTED, role=Role.PRIMARY)
    assert backend.calls == []


def test_status_schema_round_trip_and_validation():
    st = VmStatus(vm_id="v1", name="db", state=VmState.NOT_PROTECTED, role=Role.PRIMARY,
                  reason="q35 is not supported by COLO on this QEMU", generation=2,
                  checkpoints_per_minute=12.5, last_checkpoint_pause_ms=3.2,
                  replication_bytes=10, lag_seconds=0.4, failovers=1,
                  last_failover=Failover(at=1.5, from_host="a", to_host="b",
                                         duration_ms=17, arbitration_ms=9.5,
                                         old_primary_cannot_run=True))
    assert VmStatus.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    older = st.to_dict()
    del older["last_failover"]["arbitration_ms"]       # an agent from before the field
    assert VmStatus.from_dict(older).last_failover.arbitration_ms is None
    bad = st.to_dict() | {"state": "Protecting"}
    with pytest.raises(BadRequest, match="state must be one of"):
        VmStatus.from_dict(bad)
    with pytest.raises(BadRequest, match="failovers must be an integer"):
        VmStatus.from_dict(st.to_dict() | {"failovers": True})


def test_missing_client_certificate_is_refused(pki, server, backend):
    ctx = ssl.create_default_context(cafile=pki["agent"].ca)  # verifies server, no cert
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=2)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/v1/status")
        conn.getresponse().read()
    conn.close()
    assert backend.calls == []


def test_certificate_from_another_ca_is_refused(pki, server, backend):
    # The intruder trusts our CA (so it would accept the agent) but its cert is foreign.
    foreign = api.TlsFiles(cert=pki["foreign"].cert, key=pki["foreign"].key,
                           ca=pki["agent"].ca)
    c = AgentClient("127.0.0.1", server.port, api.client_context(foreign), timeout=2)
    with pytest.raises(AgentUnreachable):
        c.host_status()
    assert backend.calls == []


def test_agent_cert_for_another_name_is_refused_by_the_client(pki, backend):
    srv = AgentServer(("127.0.0.1", 0), backend, pki["wrong_name"])
    srv.start()
    try:
        c = AgentClient("127.0.0.1", srv.port, api.client_context(pki["poller"]), timeout=2)
        with pytest.raises(AgentUnreachable, match="TLS"):
            c.host_status()
    finally:
        srv.shutdown()
        srv.server_close()
    assert backend.calls == []


def test_slow_backend_gives_agent_timeout(pki, server, backend):
    backend.delay = 1.5
    c = AgentClient("127.0.0.1", server.port, api.client_context(pki["poller"]), timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout):
        c.host_status()
    assert time.monotonic() - t0 < 1.4


def test_silent_listener_gives_agent_timeout(pki):
    # Accepts TCP, never speaks TLS: the handshake must be bounded too.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        c = AgentClient("127.0.0.1", s.getsockname()[1], api.client_context(pki["poller"]),
                        timeout=0.5)
        with pytest.raises(AgentTimeout):
            c.host_status()


def test_nobody_listening_is_unreachable(pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = AgentClient("127.0.0.1", port, api.client_context(pki["poller"]), timeout=1)
    with pytest.raises(AgentUnreachable):
        c.host_status()


def test_keepalive_survives_a_server_side_close(pki, server, client, backend):
    client.host_status()
    # Drop the server's side of the kept-alive connection: the next call reconnects.
    client._conn.sock.shutdown(socket.SHUT_RDWR)
    assert client.host_status().host_id == "host-a"
    assert [c[0] for c in backend.calls] == ["host_status", "host_status"]


def test_concurrent_clients(pki, server):
    errors = []

    def worker():
        c = AgentClient("127.0.0.1", server.port, api.client_context(pki["poller"]), timeout=3)
        try:
            for _ in range(5):
                c.vm_status("vm-1")
        except Exception as e:  # collected and asserted below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_prepare_secondary_carries_the_colo_transport():
    req = PrepareSecondary(vm_id="vm-1", name="web", generation=4, primary=PEER,
                           domain_xml="<domain/>", disks=((0, 1 << 30),), colo_tls=True)
    assert PrepareSecondary.from_dict("vm-1", req.to_dict()) == req
    older = req.to_dict()
    del older["colo_tls"]       # an agent from before TLS: plain TCP
    assert PrepareSecondary.from_dict("vm-1", older).colo_tls is False
    with pytest.raises(BadRequest, match="colo_tls"):
        PrepareSecondary.from_dict("vm-1", {**older, "colo_tls": "yes"})
