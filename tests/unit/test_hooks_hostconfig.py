"""The host config file: defaults, every checked key, secrets and their file mode."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

from vdsm_ft import hostconfig
from vdsm_ft.agent import main as agent_main
from vdsm_ft.hostconfig import ConfigError, HostConfig
from vdsm_ft.layout import longest_socket

MINIMAL = """\
[host]
id = host-a
replication_address = 192.0.2.11

[etcd]
endpoints = http://10.0.0.1:2379, http://10.0.0.2:2379
"""


def _write(tmp_path, text: str, mode: int = 0o644) -> str:
    path = tmp_path / "agent.conf"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_minimal_file_gets_the_documented_defaults(tmp_path):
    cfg = hostconfig.load(_write(tmp_path, MINIMAL))
    assert cfg.host_id == "host-a"
    assert cfg.replication_address == "192.0.2.11"
    assert cfg.etcd_endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert cfg.hook_socket == "/run/vdsm-ft/agent.sock"
    assert cfg.run_dir == "/run/vdsm-ft"
    assert cfg.state_dir == "/var/lib/vdsm-ft"
    assert cfg.agent_unreachable == hostconfig.START_UNPROTECTED
    assert cfg.agent_timeout == 2.0
    assert cfg.api_port == 54329
    assert cfg.qemu_user == "libvirt-qemu"       # this machine is Debian
    assert cfg.colo_tls_dir is None              # COLO over plain TCP unless asked
    assert cfg.launch_timeout == 600.0           # VDSM's longest wait for a VM creation
    assert cfg.vm_run_dir("abc") == "/run/vdsm-ft/vms/abc"


def test_every_key_is_read(tmp_path):
    text = MINIMAL + """
[agent]
api_port = 12345
hook_socket = /tmp/x/agent.sock
run_dir = /tmp/x/run
state_dir = /tmp/x/state
colo_ports = 50000-50099
heartbeat_interval = 0.05
heartbeat_timeout = 0.3
launch_timeout = 900
colo_tls_dir = /etc/pki/qemu/vdsm-ft-colo/
[tls]
ca = /pki/ca.pem
cert = /pki/cert.pem
key = /pki/key.pem
[storage]
replica_dir = /data/replicas
overlay_dir = /dev/shm/ft
overlay_size_cap = 512M
[libvirt]
uri = qemu+unix:///system?socket=/tmp/x/libvirt-sock
qemu_user = qemu
[hooks]
agent_unreachable = refuse
agent_timeout = 1.5
"""
    cfg = hostconfig.load(_write(tmp_path, text))
    assert (cfg.api_port, cfg.colo_ports, cfg.heartbeat_interval, cfg.heartbeat_timeout) == \
        (12345, (50000, 50099), 0.05, 0.3)
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == ("/pki/ca.pem", "/pki/cert.pem",
                                                       "/pki/key.pem")
    assert (cfg.replica_dir, cfg.overlay_dir, cfg.overlay_size_cap) == \
        ("/data/replicas", "/dev/shm/ft", 512 << 20)
    assert cfg.libvirt_uri.startswith("qemu+unix://") and cfg.qemu_user == "qemu"
    assert (cfg.agent_unreachable, cfg.agent_timeout) == ("refuse", 1.5)
    assert cfg.hook_socket == "/tmp/x/agent.sock"
    assert cfg.colo_tls_dir == "/etc/pki/qemu/vdsm-ft-colo"
    assert cfg.launch_timeout == 900.0


@pytest.mark.parametrize("section, line, words", [
    ("host", "replication_address = host-b.example", "[host] replication_address"),
    ("hooks", "agent_unreachable = maybe", "start_unprotected or refuse"),
    ("agent", "api_port = 70000", "a TCP port"),
    ("agent", "colo_ports = 50100-50000", "FIRST-LAST"),
    ("agent", "run_dir = relative/dir", "an absolute path"),
    ("agent", "heartbeat_interval = 0", "greater than 0"),
    ("storage", "overlay_size_cap = lots", "K, M, G or T"),
    ("agent", "hearbeat_timeout = 1", "not a known key"),
    ("libvirt", "uri = system", "libvirt URI"),
    # The arbiter would take these, the agents' API would not: refused at load.
    ("host", "id = host:1", "[A-Za-z0-9._-]"),
    ("host", "id = h@dc", "[A-Za-z0-9._-]"),
    ("host", "id = " + "h" * 65, "1-64 characters"),
])
def test_bad_values_name_file_section_key_and_what_is_accepted(tmp_path, section, line, words):
    if section == "host":
        key = line.split(" = ")[0]
        current = "id = host-a" if key == "id" else "replication_address = 192.0.2.11"
        text = MINIMAL.replace(current, line)
    else:
        text = MINIMAL + f"\n[{section}]\n{line}\n"
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        hostconfig.load(path)
    assert path in str(e.value) and words in str(e.value)
    assert f"[{section}]" in str(e.value)


def test_unknown_section_and_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[agnet\]"):
        hostconfig.load(_write(tmp_path, MINIMAL + "[agnet]\nx = 1\n"))
    with pytest.raises(ConfigError, match=r"\[etcd\] endpoints is required"):
        hostconfig.load(_write(tmp_path, "[host]\nid = a\nreplication_address = 10.0.0.1\n"))
    with pytest.raises(ConfigError, match="not a valid INI"):
        hostconfig.load(_write(tmp_path, "id = a\n"))
    with pytest.raises(ConfigError, match="no such file"):
        hostconfig.load(str(tmp_path / "missing.conf"))


def test_heartbeat_timeout_must_exceed_interval(tmp_path):
    with pytest.raises(ConfigError, match="heartbeat_timeout must be greater"):
        hostconfig.load(_write(tmp_path, MINIMAL + "[agent]\nheartbeat_interval = 1\n"
                               "heartbeat_timeout = 0.5\n"))


def test_a_secret_needs_mode_0600_and_never_shows(tmp_path):
    text = MINIMAL.replace("[etcd]\n", "[etcd]\nusername = ft\npassword = s3cret,x\n")
    path = _write(tmp_path, text, 0o640)
    with pytest.raises(ConfigError) as e:
        hostconfig.load(path)
    assert "chmod 600" in str(e.value) and "0640" in str(e.value)
    assert "s3cret" not in str(e.value)
    os.chmod(path, 0o600)
    cfg = hostconfig.load(path)
    assert cfg.etcd_password == "s3cret,x"
    assert "s3cret" not in repr(cfg)


def test_username_without_password_is_refused(tmp_path):
    path = _write(tmp_path, MINIMAL.replace("[etcd]\n", "[etcd]\nusername = ft\n"), 0o600)
    with pytest.raises(ConfigError, match="username and password go together"):
        hostconfig.load(path)


def test_path_from_env(tmp_path, monkeypatch):
    path = _write(tmp_path, MINIMAL)
    monkeypatch.setenv(hostconfig.PATH_ENV, path)
    assert hostconfig.load().path == path
    assert hostconfig.config_path({}) == hostconfig.DEFAULT_PATH


def test_default_qemu_user_by_distribution(tmp_path):
    el = tmp_path / "el"
    el.write_text('ID="rhel"\nID_LIKE="fedora"\n')
    deb = tmp_path / "deb"
    deb.write_text('ID=ubuntu\nID_LIKE=debian\n')
    assert hostconfig.default_qemu_user(str(el)) == "qemu"
    assert hostconfig.default_qemu_user(str(deb)) == "libvirt-qemu"


def test_config_is_frozen(tmp_path):
    cfg = hostconfig.load(_write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        cfg.host_id = "other"            # type: ignore[misc]
    assert isinstance(cfg, HostConfig)


def test_a_run_dir_too_long_for_the_vms_sockets_is_refused_with_the_room_left(tmp_path):
    """A VM's sockets live under run_dir; past 107 bytes QEMU cannot bind them and the
    agent saw only a QMP socket that never answered (the nemesis soak's lab did)."""
    base = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    try:
        fits = os.path.join(base, "x" * (49 - len(base) - 1))    # 49 bytes exactly
        cfg = hostconfig.load(_write(tmp_path, MINIMAL + f"\n[agent]\nrun_dir = {fits}\n"))
        hostconfig.require_socket_room(cfg)
        sock_path = longest_socket(fits)
        os.makedirs(os.path.dirname(sock_path))
        with socket.socket(socket.AF_UNIX) as s:             # the longest one binds
            s.bind(sock_path)
        cfg = hostconfig.load(_write(tmp_path, MINIMAL + f"\n[agent]\nrun_dir = {fits}y\n"))
        with pytest.raises(ConfigError, match=r"\[agent\] run_dir = .* is too long: .* "
                                              r"holds at most 107; use a directory of at "
                                              r"most 49 bytes"):
            hostconfig.require_socket_room(cfg)
    finally:
        shutil.rmtree(base)


def test_the_agent_exits_2_naming_a_run_dir_too_long(tmp_path, caplog):
    path = _write(tmp_path, MINIMAL + f"\n[agent]\nrun_dir = /{'r' * 60}\n")
    assert agent_main.main(["--config", path]) == 2
    assert "run_dir = /rrr" in caplog.text and "is too long" in caplog.text
