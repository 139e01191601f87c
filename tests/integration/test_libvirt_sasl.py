"""The agent against a libvirtd that wants a SASL login, as VDSM sets one up on oVirt hosts
(`auth_unix_rw = "sasl"`, scram-sha-256, user `vdsm@ovirt`; docs/install.md).

Two lab hosts whose libvirtds want that login (`AgentLab(sasl=True)`), with real agents
configured with `[libvirt] username` and `password_file`: the module against a real
libvirtd (right login starts and destroys a domain; no login, a wrong password and a
password file others may read are each refused with a message naming the keys, never
the password), then a whole protect cycle through the agents, during which the stats
hook's read-only probe, with no login, still reads the primary.
"""
from __future__ import annotations

import os
import time
import uuid

import libvirt
import pytest

from ftlab import guest
from ftlab.agentlab import AgentLab, AgentLabError
from vdsm_ft import domains, hostconfig, libvirtconn, vmstats
from vdsm_ft.api import VmState

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

WRONG = "not-the-password-4711"


@pytest.fixture(scope="module")
def lab(kvm):
    with AgentLab("sl", hosts=2, sasl=True) as lab:
        yield lab


def _secret_file(path: str, text: str, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)
    return path


def _config(tmp_path, uri: str, login: str = "") -> hostconfig.HostConfig:
    path = tmp_path / "agent.conf"
    path.write_text("[host]\nid = sl-probe\nreplication_address = 192.0.2.1\n"
                    "[etcd]\nendpoints = https://192.0.2.1:2379\n"
                    f"[libvirt]\nuri = {uri}\n{login}")
    return hostconfig.load(str(path))


def _password(lab: AgentLab, host: str) -> str:
    with open(lab.host(host).password_file) as f:
        return f.readline().rstrip("\n")


def test_right_login_starts_and_destroys_a_domain(lab, tmp_path):
    host = lab.host("sl-b")
    config = _config(tmp_path, host.uri, f"username = {host.sasl_username}\n"
                                         f"password_file = {host.password_file}\n")
    vm_id = str(uuid.uuid4())
    name = f"sl-{vm_id[:8]}"
    xml = guest.idle_guest_xml(name, lab.new_disk("sl-b", vm_id), vm_id=vm_id,
                               serial_log=host.path("images", f"{vm_id}.serial"))
    conn = libvirtconn.connect(config)
    try:
        dom = domains.start(conn, xml)
        assert dom.isActive()
        assert domains.destroy(conn, name)
        assert name not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def test_no_login_is_refused_with_the_keys_to_set(lab, tmp_path):
    host = lab.host("sl-b")
    libvirt.registerErrorHandler(lambda *_: None, None)
    # What the agent did before it had a login: libvirt's plain open is refused.
    with pytest.raises(libvirt.libvirtError) as plain:
        libvirt.open(host.uri)
    assert plain.value.get_error_code() == libvirt.VIR_ERR_AUTH_FAILED
    config = _config(tmp_path, host.uri)
    with pytest.raises(libvirtconn.LibvirtConnectError) as exc:
        libvirtconn.connect(config)
    message = str(exc.value)
    assert host.uri in message and config.path in message
    assert "[libvirt] username and password_file" in message
    assert "vdsm@ovirt" in message and libvirtconn.OVIRT_PASSWORD_FILE in message


def test_wrong_password_is_refused_and_never_shown(lab, tmp_path):
    host = lab.host("sl-b")
    wrong = _secret_file(str(tmp_path / "libvirt_password"), WRONG)
    config = _config(tmp_path, host.uri, f"username = {host.sasl_username}\n"
                                         f"password_file = {wrong}\n")
    with pytest.raises(libvirtconn.LibvirtConnectError) as exc:
        libvirtconn.connect(config)
    message = str(exc.value)
    assert "refused the login" in message and host.uri in message
    assert f"[libvirt] username = {host.sasl_username}" in message and wrong in message
    assert WRONG not in message and _password(lab, "sl-b") not in message


def test_password_file_others_may_read_is_refused(lab, tmp_path):
    host = lab.host("sl-b")
    loose = _secret_file(str(tmp_path / "libvirt_password"), _password(lab, "sl-b"),
                         mode=0o644)
    login = f"username = {host.sasl_username}\npassword_file = {loose}\n"
    with pytest.raises(hostconfig.ConfigError) as at_load:
        _config(tmp_path, host.uri, login)
    assert f"chmod 600 {loose}" in str(at_load.value)
    # Loosened after the agent read its config: refused at the next connection.
    os.chmod(loose, 0o600)
    config = _config(tmp_path, host.uri, login)
    os.chmod(loose, 0o640)
    with pytest.raises(libvirtconn.LibvirtConnectError) as exc:
        libvirtconn.connect(config)
    assert f"chmod 600 {loose}" in str(exc.value)
    assert _password(lab, "sl-b") not in str(exc.value) + str(at_load.value)


def test_protect_cycle_through_agents_that_log_in(lab):
    vm = lab.start_vm("sl-a")           # the VDSM stand-in logs in too, as VDSM does
    secondary_password = lab.host("sl-b").password_file
    right = _password(lab, "sl-b")
    # The agent reads the password at every connection: a wrong one fails the
    # secondary's start, and the primary's reason says why.
    _secret_file(secondary_password, WRONG)
    try:
        with pytest.raises(AgentLabError):
            lab.protect(vm, "sl-a", "sl-b", timeout=30)
    finally:
        _secret_file(secondary_password, right)
    reason = lab.protect_failures[-1]
    assert "refused the login of [libvirt] username = vdsm@ovirt" in reason, \
        reason + "\n" + lab.agent_logs()
    assert WRONG not in reason and right not in reason

    lab.protect(vm, "sl-a", "sl-b")
    lab.wait_checkpoints("sl-a", vm.vm_id)
    assert lab.status("sl-b", vm.vm_id).state is VmState.PROTECTED

    # The after_get_all_vm_stats hook reads libvirt read-only with no login: on a host
    # where the read-write socket wants SASL it still sees the primary and its state.
    probe, close = vmstats.libvirt_probe(lab.host("sl-a").ro_uri)
    try:
        is_ft, state, _ = probe(vm.vm_id)
    finally:
        close()
    assert is_ft and state in (vmstats.RUNNING, vmstats.PAUSED), (is_ft, state)

    lab.vdsm["sl-a"].destroy_vm(vm.vm_id)     # the agents tear the pair down
    # The agent kills the secondary's QEMU and then destroys its domain: wait for both,
    # as libvirt may still list the domain just after its QEMU has gone.
    deadline = time.monotonic() + 15
    conn = lab.host("sl-b").connect()
    try:
        while lab.qemu_pid("sl-b", vm.secondary_name) is not None or \
                vm.secondary_name in [d.name() for d in conn.listAllDomains()]:
            assert time.monotonic() < deadline, "the secondary outlived the VM's stop"
            time.sleep(0.1)
    finally:
        conn.close()
    for agent in lab.agents:
        with open(agent.log_path) as f:
            log = f.read()
        assert right not in log and WRONG not in log
