"""`[libvirt] username` and `password_file`, and reading the password (the login itself
against a real SASL libvirtd: tests/integration/test_libvirt_sasl.py)."""
from __future__ import annotations

import os

import pytest

from vdsm_ft import hostconfig, libvirtconn
from vdsm_ft.hostconfig import ConfigError

MINIMAL = """\
[host]
id = host-a
replication_address = 192.0.2.11

[etcd]
endpoints = http://10.0.0.1:2379
"""
SECRET = "s3cret-libvirt"


def _conf(tmp_path, libvirt_lines: str) -> str:
    path = tmp_path / "agent.conf"
    path.write_text(MINIMAL + "[libvirt]\n" + libvirt_lines)
    return str(path)


def _secret(tmp_path, mode: int = 0o600, text: str = SECRET + "\n") -> str:
    path = tmp_path / "libvirt_password"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_default_is_no_login(tmp_path):
    cfg = hostconfig.load(_conf(tmp_path, ""))
    assert cfg.libvirt_username is None and cfg.libvirt_password_file is None


def test_login_is_read_and_the_password_stays_in_its_file(tmp_path):
    secret = _secret(tmp_path)
    cfg = hostconfig.load(_conf(tmp_path, f"username = vdsm@ovirt\npassword_file = {secret}\n"))
    assert (cfg.libvirt_username, cfg.libvirt_password_file) == ("vdsm@ovirt", secret)
    assert SECRET not in repr(cfg)
    assert libvirtconn.read_password(secret) == SECRET


@pytest.mark.parametrize("lines", ["username = vdsm@ovirt\n",
                                   "password_file = /etc/pki/vdsm/keys/libvirt_password\n"])
def test_username_and_password_file_go_together(tmp_path, lines):
    with pytest.raises(ConfigError, match=r"\[libvirt\] username and password_file go "
                                          "together"):
        hostconfig.load(_conf(tmp_path, lines))


def test_missing_password_file_is_refused(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as e:
        hostconfig.load(_conf(tmp_path, f"username = u\npassword_file = {missing}\n"))
    assert f"[libvirt] password_file = {missing}: no such file" in str(e.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_password_file_others_may_read_is_refused(tmp_path, mode):
    secret = _secret(tmp_path, mode)
    with pytest.raises(ConfigError) as e:
        hostconfig.load(_conf(tmp_path, f"username = u\npassword_file = {secret}\n"))
    assert f"chmod 600 {secret}" in str(e.value) and f"{mode:04o}" in str(e.value)
    with pytest.raises(libvirtconn.LibvirtConnectError) as at_connect:
        libvirtconn.read_password(secret)
    assert f"chmod 600 {secret}" in str(at_connect.value)
    assert SECRET not in str(e.value) + str(at_connect.value)


def test_relative_password_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="an absolute path"):
        hostconfig.load(_conf(tmp_path, "username = u\npassword_file = libvirt_password\n"))


def test_empty_password_file_is_refused(tmp_path):
    with pytest.raises(libvirtconn.LibvirtConnectError, match="is empty"):
        libvirtconn.read_password(_secret(tmp_path, text="\n"))
