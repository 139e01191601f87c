"""The security rules vdsm-ft enforces (docs/security.md), each against the real part:
settings files with secrets refused unless private, the hook socket's mode and who can
connect, QEMU option escaping checked by QEMU's own parser, and mutual TLS on the agent
API refusing certificates from another CA, and who may call which of its routes."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from engine_plugin import cli, config as poller_config
from ftlab.pki import issue, make_ca
from vdsm_ft import api, domxml, hookapi, hostconfig
from vdsm_ft.agent.store import Store, VmRecord
from vdsm_ft.api import (AgentClient, AgentServer, AgentUnreachable, Backend, Forbidden, NotFound,
                         PeerSpec, PrepareSecondary, Role)

SECRET = "s3cr3t-Pa55word"
TIMEOUT = 30


# ------------------------------------------------------------ files holding secrets

def _poller_conf(tmp_path: Path, mode: int) -> Path:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    path = tmp_path / "poller.conf"
    path.write_text("[engine]\nurl = https://engine.example.com/ovirt-engine/api\n"
                    f"username = ft@internal\npassword = {SECRET}\nca_file = {ca}\n")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_poller_conf_refused_unless_0600(tmp_path, mode):
    path = _poller_conf(tmp_path, mode)
    with pytest.raises(poller_config.ConfigError, match=f"chmod 600 {path}") as err:
        poller_config.load(str(path), env={})
    assert SECRET not in str(err.value)


def test_poller_conf_0600_is_accepted_and_the_password_never_shown(tmp_path):
    settings = poller_config.load(str(_poller_conf(tmp_path, 0o600)), env={})
    assert settings.engine.password == SECRET
    assert SECRET not in repr(settings)


def test_cli_has_no_password_option():
    """Secrets never go on a command line, where `ps` shows them."""
    def options(p):
        for action in p._actions:
            yield from action.option_strings
            for sub in (getattr(action, "choices", None) or {}).values():
                if hasattr(sub, "_actions"):
                    yield from options(sub)
    found = list(options(cli.parser()))
    assert "--config" in found and "--to" in found
    assert not [o for o in found if "pass" in o or "secret" in o or "token" in o]


def _agent_conf(tmp_path: Path, mode: int, password: bool) -> Path:
    path = tmp_path / "agent.conf"
    text = ("[host]\nid = host-a\nreplication_address = 192.0.2.11\n"
            "[etcd]\nendpoints = https://etcd1:2379\n")
    if password:
        text += f"username = vdsm-ft\npassword = {SECRET}\n"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o660, 0o604])
def test_agent_conf_with_an_etcd_password_refused_unless_0600(tmp_path, mode):
    path = _agent_conf(tmp_path, mode, password=True)
    with pytest.raises(hostconfig.ConfigError, match=r"\[etcd\] password.*chmod 600") as err:
        hostconfig.load(str(path))
    assert SECRET not in str(err.value)


def test_agent_conf_0600_with_password_and_0640_without_are_accepted(tmp_path):
    cfg = hostconfig.load(str(_agent_conf(tmp_path, 0o600, password=True)))
    assert cfg.etcd_password == SECRET and SECRET not in repr(cfg)
    # The shipped mode: root:kvm 0640 so the hooks (vdsm:kvm) can read it, no secret in it.
    assert hostconfig.load(str(_agent_conf(tmp_path, 0o640, password=False))).host_id == "host-a"


def test_agent_records_are_private(tmp_path):
    """The persisted records hold each VM's engine XML (disks, networks)."""
    store = Store(str(tmp_path / "vms"))
    vm_id = str(uuid.uuid4())
    store.save(VmRecord(vm_id=vm_id, name="vm", role=Role.PRIMARY, engine_xml="<domain/>"))
    assert stat.S_IMODE(os.stat(tmp_path / "vms").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "vms" / f"{vm_id}.json").st_mode) == 0o600


# --------------------------------------------------------------------- hook socket

class _NoHooks(hookapi.HookBackend):
    def prepare(self, vm_id, engine_xml):
        raise hookapi.AgentRefused("test")

    def started(self, vm_id, live_xml):
        pass

    def image(self, vm_id, ft):
        return ""

    def stopping(self, vm_id):
        pass

    def destroyed(self, vm_id):
        pass


CONNECT = ("import socket, sys\n"
           "s = socket.socket(socket.AF_UNIX)\n"
           "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
           "s.sendall(b'POST /v1/hooks/vms/' + sys.argv[2].encode() + b'/destroyed HTTP/1.1"
           "\\r\\nContent-Length: 0\\r\\n\\r\\n')\n"
           "sys.stdout.write(s.makefile('rb').read().decode())\n")
VM = "0b6c1a43-8a47-4a53-9d6c-2c1fd1d4d9b1"


class _Destroys(_NoHooks):
    def __init__(self):
        self.destroyed_vms: list[str] = []

    def destroyed(self, vm_id):
        self.destroyed_vms.append(vm_id)


def test_hook_socket_is_open_to_root_and_vdsm_only_not_to_the_qemu_user():
    """Issue 16: as the QEMU user (group kvm), `stopping` and `destroyed` tore pairs down."""
    if os.geteuid() != 0:
        pytest.fail("this test switches users to connect, so it must run as root")
    qemu_user = "libvirt-qemu"
    assert pwd.getpwnam(qemu_user).pw_gid == grp.getgrnam("kvm").gr_gid   # as on EL hosts
    directory = tempfile.mkdtemp(prefix="vdsm-ft-sock-", dir="/tmp")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "agent.sock")
    backend = _Destroys()
    server = hookapi.serve_hooks(path, backend)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == hookapi.SOCKET_MODE == 0o660
        assert (st.st_uid, st.st_gid) == (hookapi.hook_uid() or 0, 0)

        def connect_as(user: str, group: str) -> subprocess.CompletedProcess:
            return subprocess.run(["/usr/bin/python3", "-I", "-c", CONNECT, path, VM],
                                  user=user, group=group, extra_groups=[],
                                  capture_output=True, text=True, timeout=TIMEOUT)

        assert connect_as("nobody", "nogroup").returncode == 13
        assert connect_as(qemu_user, "kvm").returncode == 13    # group kvm opens nothing
        assert backend.destroyed_vms == []
        os.chmod(path, 0o666)            # a careless chmod: the uid check still holds
        refused = connect_as(qemu_user, "kvm")
        assert refused.stdout.startswith("HTTP/1.1 403 "), refused
        assert "may not use the hook socket: only root and vdsm" in refused.stdout
        assert backend.destroyed_vms == []
        allowed = connect_as("root", "root")
        assert allowed.stdout.startswith("HTTP/1.1 200 "), allowed
        assert backend.destroyed_vms == [VM]
    finally:
        server.close()
        shutil.rmtree(directory)


# ------------------------------------------------------------- QEMU option escaping

def test_escaped_path_cannot_inject_options_qemu_parses_it_back(tmp_path):
    """A comma in a path must not start a new option: QEMU's own keyval parser (through
    qemu-img --image-opts) opens exactly the file named."""
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is not installed (.ci/run installs qemu-utils)")
    evil = tmp_path / "disk,driver=null-co,size=1G"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(evil), "3M"], check=True,
                   timeout=TIMEOUT)
    opts = f"driver=file,filename={domxml.qemu_escape(str(evil))}"
    assert opts.count(",,") == 2
    proc = subprocess.run(["qemu-img", "info", "--output=json", "--image-opts", opts],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert '"virtual-size": 3145728' in proc.stdout and '"format": "file"' in proc.stdout
    # Unescaped, the same path would have been three options (the control).
    raw = subprocess.run(["qemu-img", "info", "--output=json", "--image-opts",
                          f"driver=file,filename={evil}"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert raw.returncode != 0 or '"virtual-size": 3145728' not in raw.stdout


# ------------------------------------------------------------------- mutual TLS

# Hosts by their certificates' addresses; the agent under test is 127.0.0.1 ("agent").
HOSTS = {"host1": "127.0.0.11", "host2": "127.0.0.12", "host3": "127.0.0.13"}


def _spec(host: str) -> PeerSpec:
    return PeerSpec(host, HOSTS[host], 54329, HOSTS[host])

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    engine_ca = make_ca(d / "engine", "engine CA")
    rogue_ca = make_ca(d / "rogue", "rogue CA")
    return {
        "agent": issue(d / "engine", engine_ca, "agent", addresses=["127.0.0.1"]),
        "poller": issue(d / "engine", engine_ca, api.DEFAULT_POLLER_IDENTITY),
        # Other hypervisors: every one holds a certificate from the engine CA.
        **{h: issue(d / "engine", engine_ca, h, addresses=[a]) for h, a in HOSTS.items()},
        # Same names as the real ones, signed by another CA.
        "rogue_poller": issue(d / "rogue", rogue_ca, api.DEFAULT_POLLER_IDENTITY),
        "rogue_agent": issue(d / "rogue", rogue_ca, "agent", addresses=["127.0.0.1"]),
    }


class _Recorder(Backend):
    """Every endpoint records the call and answers 404: enough to see who got through.
    `pairs` is what `pairing` answers: the VMs this host knows, with role and peer."""

    def __init__(self):
        self.calls: list[str] = []
        self.pairs: dict[str, tuple[Role, PeerSpec | None]] = {}

    def pairing(self, vm_id):
        return self.pairs.get(vm_id)


for _name in Backend.__abstractmethods__ - {"pairing"}:
    def _method(self, *args, _name=_name):
        self.calls.append(_name)
        raise NotFound("nothing here")
    setattr(_Recorder, _name, _method)
_Recorder.__abstractmethods__ = frozenset()


@pytest.fixture
def agent(pki):
    backend = _Recorder()
    server = AgentServer(("127.0.0.1", 0), backend, pki["agent"])
    server.start()
    yield server, backend
    server.shutdown()
    server.server_close()


def _client(files: api.TlsFiles, port: int, ca: str | None = None) -> AgentClient:
    tls = api.TlsFiles(cert=files.cert, key=files.key, ca=ca or files.ca)
    return AgentClient("127.0.0.1", port, api.client_context(tls), timeout=3)


def test_engine_signed_client_reaches_the_backend(pki, agent):
    server, backend = agent
    with pytest.raises(api.NotFound):
        _client(pki["poller"], server.port).host_status()
    assert backend.calls == ["host_status"]


def test_client_cert_from_another_ca_is_rejected_by_the_agent(pki, agent):
    server, backend = agent
    # The intruder trusts the engine CA, so only the agent's check can stop it.
    client = _client(pki["rogue_poller"], server.port, ca=pki["agent"].ca)
    with pytest.raises(AgentUnreachable):
        client.host_status()
    with pytest.raises(AgentUnreachable):
        client.protect("vm-1", api.PeerSpec("host-b", "127.0.0.2", 54329, "127.0.0.2"))
    assert backend.calls == []


def test_agent_cert_from_another_ca_is_rejected_by_the_client(pki):
    backend = _Recorder()
    impostor = AgentServer(("127.0.0.1", 0), backend,
                           api.TlsFiles(cert=pki["rogue_agent"].cert, key=pki["rogue_agent"].key,
                                        ca=pki["agent"].ca))
    impostor.start()
    try:
        with pytest.raises(AgentUnreachable, match="TLS"):
            _client(pki["poller"], impostor.port).host_status()
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert backend.calls == []


def test_a_body_longer_than_its_content_length_closes_the_connection(pki, agent, caplog):
    """Issue 16: the rest of the body was parsed as a second request, with a traceback."""
    server, backend = agent
    vm = "0b6c1a43-8a47-4a53-9d6c-2c1fd1d4d9b1"
    body = b'{"host_id": "host-b"}'
    request = (f"POST /v1/vms/{vm}/unprotect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/json\r\nContent-Length: 5\r\n\r\n").encode() + body
    answer = _raw_exchange(server.port, pki["poller"], request)
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"check that Content-Length (5) counts the whole body" in answer
    assert backend.calls == []
    assert not [r for r in caplog.records if r.exc_info]


# ------------------------------------------------- who may call which agent route

VM = "0b6c1a43-8a47-4a53-9d6c-2c1fd1d4d9b1"
ADMIN = {
    "protect": lambda c: c.protect(VM, _spec("host3")),
    "unprotect": lambda c: c.unprotect(VM),
    "suspend": lambda c: c.suspend(VM),
    "resume": lambda c: c.resume(VM),
    "test_failover": lambda c: c.test_failover(VM),
    "restart_secondary": lambda c: c.restart_secondary(VM),
    "migrate_secondary": lambda c: c.migrate_secondary(VM, _spec("host2")),
}


def _prepare(primary: str) -> PrepareSecondary:
    return PrepareSecondary(vm_id=VM, name="web", generation=2, primary=_spec(primary),
                            domain_xml="<domain/>", disks=((0, 1 << 30),))


def test_a_host_certificate_cannot_suspend_a_vm_of_another_pair(pki, agent):
    """Issue 16: host2's certificate suspended a VM whose pair is host1 and host3."""
    server, backend = agent
    backend.pairs[VM] = (Role.PRIMARY, _spec("host3"))
    with pytest.raises(Forbidden) as e:
        _client(pki["host2"], server.port).suspend(VM)
    assert (e.value.status, e.value.code) == (403, "forbidden")
    assert "suspend is an admin operation" in e.value.message
    assert f"CN={api.DEFAULT_POLLER_IDENTITY}" in e.value.message
    assert "CN=host2" in e.value.message
    assert backend.calls == []


@pytest.mark.parametrize("host", ["host2", "host3"])
@pytest.mark.parametrize("op", sorted(ADMIN))
def test_no_host_certificate_may_call_an_admin_operation(pki, agent, op, host):
    """Neither a stranger to the pair (host2) nor the primary's own peer (host3)."""
    server, backend = agent
    backend.pairs[VM] = (Role.PRIMARY, _spec("host3"))
    with pytest.raises(Forbidden):
        ADMIN[op](_client(pki[host], server.port))
    assert backend.calls == []


@pytest.mark.parametrize("op", sorted(ADMIN))
def test_the_poller_certificate_reaches_every_admin_operation(pki, agent, op):
    server, backend = agent
    backend.pairs[VM] = (Role.PRIMARY, _spec("host3"))
    with pytest.raises(NotFound):          # the recorder's answer: the call got through
        ADMIN[op](_client(pki["poller"], server.port))
    assert backend.calls == [op]


def test_reads_stay_open_to_every_engine_signed_certificate(pki, agent):
    server, backend = agent
    client = _client(pki["host2"], server.port)
    for read in (client.host_status, lambda: client.vm_status(VM)):
        with pytest.raises(NotFound):
            read()
    with pytest.raises(api.AgentRejected):     # the recorder's metrics fail: 500
        client.metrics()
    assert backend.calls == ["host_status", "vm_status", "metrics"]


def test_prepare_secondary_from_a_host_that_is_not_the_primary_it_names(pki, agent):
    server, backend = agent
    with pytest.raises(Forbidden) as e:
        _client(pki["host2"], server.port).prepare_secondary(_prepare("host1"))
    assert "names primary host1 at 127.0.0.11" in e.value.message
    assert "does not name that address" in e.value.message
    # The poller is no pair member either: its certificate names no host.
    with pytest.raises(Forbidden):
        _client(pki["poller"], server.port).prepare_secondary(_prepare("host1"))
    assert backend.calls == []


def test_prepare_secondary_of_a_paired_vm_comes_from_its_peer_on_record(pki, agent):
    """host2 names itself honestly, but this host holds VM's secondary for host1."""
    server, backend = agent
    backend.pairs[VM] = (Role.SECONDARY, _spec("host1"))
    with pytest.raises(Forbidden) as e:
        _client(pki["host2"], server.port).prepare_secondary(_prepare("host2"))
    assert "is paired with host1 at 127.0.0.11" in e.value.message
    # Nor may host2 borrow host1's id beside its own address.
    spoofed = PrepareSecondary(vm_id=VM, name="web", generation=2,
                               primary=PeerSpec("host1", HOSTS["host2"], 54329,
                                                HOSTS["host2"]),
                               domain_xml="<domain/>", disks=((0, 1 << 30),))
    with pytest.raises(Forbidden):
        _client(pki["host2"], server.port).prepare_secondary(spoofed)
    assert backend.calls == []


@pytest.mark.parametrize("known", [None, (Role.SECONDARY, "host1"), (Role.PRIMARY, None)])
def test_a_pair_member_still_prepares_its_secondary(pki, agent, known):
    """A new VM here, a secondary of an older generation for the same primary, or a
    primary that died here and was never paired."""
    server, backend = agent
    if known is not None:
        role, peer = known
        backend.pairs[VM] = (role, _spec(peer) if peer else None)
    with pytest.raises(NotFound):          # reached the backend
        _client(pki["host1"], server.port).prepare_secondary(_prepare("host1"))
    assert backend.calls == ["prepare_secondary"]


def test_the_primary_drops_its_secondary_here_and_no_other_host_can(pki, agent):
    """unprotect on a secondary is the pair protocol (the primary's _drop_peer_secondary)."""
    server, backend = agent
    backend.pairs[VM] = (Role.SECONDARY, _spec("host1"))
    with pytest.raises(Forbidden) as e:
        _client(pki["host2"], server.port).unprotect(VM)
    assert "from its primary when this host holds its secondary" in e.value.message
    assert backend.calls == []
    with pytest.raises(NotFound):
        _client(pki["host1"], server.port).unprotect(VM)
    assert backend.calls == ["unprotect"]


def test_a_refusal_is_an_http_403_with_the_forbidden_code(pki, agent):
    """On the wire, as any client sees it."""
    import json
    server, backend = agent
    request = (f"POST /v1/vms/{VM}/test-failover HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
    answer = _raw_exchange(server.port, pki["host2"], request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), answer
    assert json.loads(body)["error"]["code"] == "forbidden"
    assert backend.calls == []


def test_a_caller_is_known_by_its_certificate_names():
    cert = {"subject": ((("organizationName", "Example"),), (("commonName", "h1.example"),)),
            "subjectAltName": (("DNS", "H1.Example"), ("IP Address", "2001:DB8:0:0:0:0:0:1\n"),
                               ("email", "root@h1.example"))}
    caller = api.Caller.from_cert(cert)
    assert caller.common_name == "h1.example"
    assert caller.holds("h1.example") and caller.holds("2001:db8::1")
    assert not caller.holds("root@h1.example")
    assert api.Caller.from_cert({}) == api.Caller("", frozenset())


def test_the_poller_identity_is_a_host_setting(tmp_path):
    conf = tmp_path / "agent.conf"
    base = "[host]\nid = host-a\nreplication_address = 192.0.2.1\n" \
           "[etcd]\nendpoints = http://127.0.0.1:2379\n"
    conf.write_text(base)
    assert hostconfig.load(str(conf)).poller_identity == api.DEFAULT_POLLER_IDENTITY
    conf.write_text(base + "[agent]\npoller_identity = ft-poller.example.com\n")
    assert hostconfig.load(str(conf)).poller_identity == "ft-poller.example.com"


def _raw_exchange(port: int, tls: api.TlsFiles, request: bytes) -> bytes:
    """Bytes on a TLS socket with `tls`'s certificate, then all the server answers until
    it closes: what any client sees, below AgentClient."""
    import socket
    ctx = api.client_context(tls)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer
