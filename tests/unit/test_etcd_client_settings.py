"""The etcd client settings: the poller's [poller] etcd_* keys and their environment
overrides, and what Arbiter accepts (no etcd needed here; tests/integration/
test_arbiter_auth.py runs them against a real one)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine_plugin import config
from vdsm_ft import hostconfig
from vdsm_ft.arbiter import Arbiter, InvalidArgument

SECRET = "etcd-Pa55word-x"


def _files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("engine-ca.pem", "etcd-ca.pem", "etcd.pem", "etcd.key"):
        (tmp_path / name).write_text("")
        paths[name] = str(tmp_path / name)
    return paths


def _load(tmp_path: Path, poller: dict[str, str], env: dict[str, str] | None = None
          ) -> config.Settings:
    path = str(tmp_path / "poller.conf")
    config.write(path, {
        "engine": {"url": "https://engine.example.com/ovirt-engine/api",
                   "username": "ft@internal", "password": "engine-pw",
                   "ca_file": _files(tmp_path)["engine-ca.pem"]},
        "poller": {"etcd_endpoints": "https://etcd1:2379", **poller}})
    return config.load(path, env=env or {})


def test_etcd_tls_and_auth_keys_are_read(tmp_path):
    f = _files(tmp_path)
    p = _load(tmp_path, {"etcd_ca": f["etcd-ca.pem"], "etcd_cert": f["etcd.pem"],
                         "etcd_key": f["etcd.key"], "etcd_username": "ovirt-ft-poller",
                         "etcd_password": SECRET}).poller
    assert (p.etcd_ca, p.etcd_cert, p.etcd_key, p.etcd_username, p.etcd_password) == \
        (f["etcd-ca.pem"], f["etcd.pem"], f["etcd.key"], "ovirt-ft-poller", SECRET)
    assert SECRET not in repr(p)


def test_etcd_keys_are_optional(tmp_path):
    p = _load(tmp_path, {}).poller
    assert (p.etcd_ca, p.etcd_cert, p.etcd_key, p.etcd_username, p.etcd_password) == \
        (None,) * 5


def test_etcd_keys_from_the_environment(tmp_path):
    f = _files(tmp_path)
    p = _load(tmp_path, {}, env={"OVIRT_FT_ETCD_CA": f["etcd-ca.pem"],
                                 "OVIRT_FT_ETCD_CERT": f["etcd.pem"],
                                 "OVIRT_FT_ETCD_KEY": f["etcd.key"],
                                 "OVIRT_FT_ETCD_USERNAME": "u",
                                 "OVIRT_FT_ETCD_PASSWORD": SECRET}).poller
    assert (p.etcd_ca, p.etcd_cert, p.etcd_key, p.etcd_username, p.etcd_password) == \
        (f["etcd-ca.pem"], f["etcd.pem"], f["etcd.key"], "u", SECRET)


@pytest.mark.parametrize("keys,message", [
    ({"etcd_cert": "etcd.pem"}, "etcd_cert and etcd_key .* go together"),
    ({"etcd_key": "etcd.key"}, "etcd_cert and etcd_key .* go together"),
    ({"etcd_username": "u"}, "etcd_username and etcd_password .* go together"),
    ({"etcd_password": SECRET}, "etcd_username and etcd_password .* go together"),
    ({"etcd_ca": "missing.pem"}, r"etcd_ca .*missing\.pem .*does not exist"),
    ({"etcd_cert": "missing.pem", "etcd_key": "etcd.key"}, "etcd_cert .* does not exist"),
])
def test_etcd_keys_checked(tmp_path, keys, message):
    _files(tmp_path)
    # File names are made absolute; etcd.pem and etcd.key exist, missing.pem does not.
    values = {k: str(tmp_path / v) if v.endswith((".pem", ".key")) else v
              for k, v in keys.items()}
    with pytest.raises(config.ConfigError, match=message) as err:
        _load(tmp_path, values)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("kw,message", [
    ({"cert": "/x.pem"}, "needs both cert and key"),
    ({"key": "/x.key"}, "needs both cert and key"),
    ({"username": "u"}, "needs both a username and a password"),
    ({"password": SECRET}, "needs both a username and a password"),
])
def test_arbiter_refuses_half_credentials(kw, message):
    with pytest.raises(InvalidArgument, match=message) as err:
        Arbiter(["https://127.0.0.1:2379"], **kw)
    assert SECRET not in str(err.value)


def test_arbiter_warns_of_a_password_over_http(caplog):
    caplog.set_level(logging.WARNING)
    a = Arbiter(["http://127.0.0.1:2379"], username="u", password=SECRET)
    assert "clear text" in caplog.text
    assert SECRET not in caplog.text + repr(a) + repr(a.transport)


def test_hooks_pass_the_host_etcd_credentials(tmp_path):
    from vdsm_ft import hostconfig
    from vdsm_ft.hooks import HookContext
    path = tmp_path / "agent.conf"
    path.write_text("[host]\nid = host-a\nreplication_address = 192.0.2.11\n"
                    "[etcd]\nendpoints = https://127.0.0.1:2379\n"
                    f"username = ft-agent\npassword = {SECRET}\n")
    path.chmod(0o600)
    t = HookContext({}, config=hostconfig.load(str(path))).arbiter.transport
    assert (t.username, t.password) == ("ft-agent", SECRET)


def _agent_conf(tmp_path, etcd: str) -> str:
    path = tmp_path / "agent.conf"
    path.write_text("[host]\nid = host-a\nreplication_address = 192.0.2.11\n"
                    f"[etcd]\n{etcd}\n")
    path.chmod(0o600)
    return str(path)


def test_the_agent_refuses_a_plain_http_etcd_and_says_why_and_what_to_do(tmp_path):
    from vdsm_ft.agent.daemon import Agent
    from vdsm_ft.agent.main import main
    path = _agent_conf(tmp_path, "endpoints = https://e1:2379, http://e2:2379")
    with pytest.raises(hostconfig.ConfigError) as refused:
        Agent(hostconfig.load(path))
    message = str(refused.value)
    assert "http://e2:2379 are plain http" in message and "https://e1" not in message
    assert "plant or delete arbiter claims" in message
    assert "[etcd] allow_plain_http = yes" in message
    assert main(["--config", path]) == 2


@pytest.mark.parametrize("etcd, allowed", [
    ("endpoints = https://e1:2379", True),
    ("endpoints = http://e1:2379\nallow_plain_http = yes", True),
    ("endpoints = http://e1:2379\nallow_plain_http = no", False),
    ("endpoints = http://e1:2379", False),
])
def test_plain_http_etcd_needs_the_explicit_setting(tmp_path, etcd, allowed):
    config = hostconfig.load(_agent_conf(tmp_path, etcd))
    if allowed:
        hostconfig.require_secure_etcd(config)
    else:
        with pytest.raises(hostconfig.ConfigError, match="allow_plain_http"):
            hostconfig.require_secure_etcd(config)


def test_a_misspelt_allow_plain_http_is_refused(tmp_path):
    with pytest.raises(hostconfig.ConfigError, match=r"allow_plain_http = 'maybe'.*yes or no"):
        hostconfig.load(_agent_conf(tmp_path, "endpoints = http://e1:2379\n"
                                               "allow_plain_http = maybe"))


def test_the_poller_refuses_a_plain_http_etcd_and_says_why_and_what_to_do(tmp_path, capsys):
    from engine_plugin.poller import main, make_lease
    settings = _load(tmp_path, {"etcd_endpoints": "https://e1:2379,http://e2:2379"})
    with pytest.raises(config.ConfigError) as refused:
        make_lease(settings)
    message = str(refused.value)
    assert message.startswith(str(tmp_path / "poller.conf"))
    assert "[poller] etcd_endpoints http://e2:2379 are plain http" in message
    assert "https://e1" not in message and "plant or delete arbiter claims" in message
    assert "[poller] etcd_ca, etcd_cert and etcd_key" in message
    assert "[poller] etcd_allow_plain_http = yes" in message
    assert main(["--config", str(tmp_path / "poller.conf"), "--once"]) == 1
    assert "are plain http" in capsys.readouterr().err


def test_the_agent_and_the_poller_give_the_same_reason(tmp_path):
    agent = hostconfig.load(_agent_conf(tmp_path, "endpoints = http://e1:2379"))
    poller = _load(tmp_path, {"etcd_endpoints": "http://e1:2379"})
    with pytest.raises(hostconfig.ConfigError) as a:
        hostconfig.require_secure_etcd(agent)
    with pytest.raises(config.ConfigError) as p:
        config.require_secure_etcd(poller)
    why = "are plain http: anyone who reaches them can plant or delete arbiter claims"
    assert why in str(a.value) and why in str(p.value)


@pytest.mark.parametrize("poller, env, allowed", [
    ({}, {}, True),                                                   # https://etcd1:2379
    ({"etcd_endpoints": "http://e1:2379", "etcd_allow_plain_http": "yes"}, {}, True),
    ({"etcd_endpoints": "http://e1:2379"}, {"OVIRT_FT_ETCD_ALLOW_PLAIN_HTTP": "on"}, True),
    ({"etcd_endpoints": "http://e1:2379", "etcd_allow_plain_http": "no"}, {}, False),
    ({"etcd_endpoints": "http://e1:2379"}, {}, False),
])
def test_poller_plain_http_etcd_needs_the_explicit_setting(tmp_path, poller, env, allowed):
    from engine_plugin.cli import Cli
    from engine_plugin.poller import make_lease
    settings = _load(tmp_path, poller, env=env)
    if allowed:
        assert make_lease(settings) is not None
        Cli(settings)._arbiter()
    else:
        with pytest.raises(config.ConfigError, match="etcd_allow_plain_http"):
            make_lease(settings)
        with pytest.raises(config.ConfigError, match="etcd_allow_plain_http"):
            Cli(settings)._arbiter()


def test_a_misspelt_poller_allow_plain_http_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="etcd_allow_plain_http .* must be yes or no"):
        _load(tmp_path, {"etcd_endpoints": "http://e1:2379", "etcd_allow_plain_http": "maybe"})
