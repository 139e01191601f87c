"""Settings of the poller and the `ovirt-ft` CLI: an INI file, overridden by environment.

The file holds the engine password, so it must be mode 0600 (no group or other bits);
a looser file is refused. The password never comes from a command line and is never
printed (`EngineSettings.__repr__` hides it).

    [engine]
    url = https://engine.example.com/ovirt-engine/api
    username = ft-poller@internal
    password = ...
    ca_file = /etc/pki/ovirt-engine/ca.pem
    timeout = 30

    [agents]
    port = 54329
    cert = /etc/pki/ovirt-ft/poller.pem
    key = /etc/pki/ovirt-ft/poller.key
    ca = /etc/pki/ovirt-engine/ca.pem
    timeout = 5

    [placement]
    max_vms_per_host = 4
    max_vcpus_per_host = 8
    hook_name = 50_ft

    [poller]
    interval = 10
    etcd_endpoints = https://etcd1:2379,https://etcd2:2379,https://etcd3:2379
    lease_ttl = 15
    etcd_ca = /etc/pki/ovirt-ft/etcd-ca.pem
    etcd_cert = /etc/pki/ovirt-ft/etcd-client.pem
    etcd_key = /etc/pki/ovirt-ft/etcd-client.key
    etcd_username = ovirt-ft-poller
    etcd_password = ...

cert and key go together, and so do username and password (docs/install.md, "etcd").
The poller and the CLI refuse plain-http etcd endpoints unless `[poller]
etcd_allow_plain_http = yes` accepts the risk (`require_secure_etcd`).
"""
from __future__ import annotations

import configparser
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine_plugin.placement import Limits
from vdsm_ft import hostconfig
from vdsm_ft.api import DEFAULT_PORT, TlsFiles

DEFAULT_PATH = "/etc/ovirt-ft/poller.conf"
ENV_CONFIG = "OVIRT_FT_CONFIG"
# Environment variable -> (section, key).
ENV_KEYS = {
    "OVIRT_FT_ENGINE_URL": ("engine", "url"),
    "OVIRT_FT_ENGINE_USERNAME": ("engine", "username"),
    "OVIRT_FT_ENGINE_PASSWORD": ("engine", "password"),
    "OVIRT_FT_ENGINE_CA_FILE": ("engine", "ca_file"),
    "OVIRT_FT_ENGINE_TIMEOUT": ("engine", "timeout"),
    "OVIRT_FT_AGENT_PORT": ("agents", "port"),
    "OVIRT_FT_AGENT_CERT": ("agents", "cert"),
    "OVIRT_FT_AGENT_KEY": ("agents", "key"),
    "OVIRT_FT_AGENT_CA": ("agents", "ca"),
    "OVIRT_FT_AGENT_TIMEOUT": ("agents", "timeout"),
    "OVIRT_FT_ETCD_ENDPOINTS": ("poller", "etcd_endpoints"),
    "OVIRT_FT_ETCD_CA": ("poller", "etcd_ca"),
    "OVIRT_FT_ETCD_CERT": ("poller", "etcd_cert"),
    "OVIRT_FT_ETCD_KEY": ("poller", "etcd_key"),
    "OVIRT_FT_ETCD_USERNAME": ("poller", "etcd_username"),
    "OVIRT_FT_ETCD_PASSWORD": ("poller", "etcd_password"),
    "OVIRT_FT_ETCD_ALLOW_PLAIN_HTTP": ("poller", "etcd_allow_plain_http"),
    "OVIRT_FT_POLLER_INTERVAL": ("poller", "interval"),
}


class ConfigError(Exception):
    """The settings are missing, malformed, or the file is not private."""


@dataclass(frozen=True)
class EngineSettings:
    url: str
    username: str
    password: str = field(repr=False)
    ca_file: str
    timeout: float = 30.0


@dataclass(frozen=True)
class AgentSettings:
    tls: TlsFiles
    port: int = DEFAULT_PORT
    timeout: float = 5.0
    workers: int = 32          # parallel status calls per cycle


@dataclass(frozen=True)
class PollerSettings:
    interval: float = 10.0
    hook_name: str = "50_ft"
    limits: Limits = Limits()
    etcd_endpoints: tuple[str, ...] = ()
    etcd_ca: str | None = None             # CA of etcd's server certificates (https://)
    etcd_cert: str | None = None           # client certificate for etcd --client-cert-auth
    etcd_key: str | None = None
    etcd_username: str | None = None       # etcd authentication (etcdctl user add)
    etcd_password: str | None = field(default=None, repr=False)
    # Plain-http etcd: whoever reaches it rewrites the arbiter (docs/security.md, etcd).
    etcd_allow_plain_http: bool = False
    lease_ttl: int = 15
    lease_name: str = "ovirt-ft-poller"
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_events_per_cycle: int = 100
    backoff_max: float = 60.0


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings
    agents: AgentSettings | None      # None: no agent TLS configured (engine-only CLI use)
    poller: PollerSettings
    source: str = ""                  # the file (or "the environment") these came from


def require_secure_etcd(settings: Settings) -> None:
    """The poller's and the CLI's check before they use etcd, as the agent's
    (`vdsm_ft.hostconfig.require_secure_etcd`): every endpoint https, unless `[poller]
    etcd_allow_plain_http` accepts the risk."""
    p = settings.poller
    why = hostconfig.plain_http_refusal(p.etcd_endpoints, "[poller] etcd_endpoints",
                                        "[poller] etcd_ca, etcd_cert and etcd_key",
                                        "[poller] etcd_allow_plain_http")
    if why and not p.etcd_allow_plain_http:
        raise ConfigError(f"{settings.source}: {why}")


def check_private(path: str) -> None:
    """Refuse a settings file that others can read or write."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} is mode {mode:04o}; it holds the engine password, so it "
                          f"must be readable by its owner only: chmod 600 {path}")


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (else $OVIRT_FT_CONFIG, else /etc/ovirt-ft/poller.conf if present),
    then apply the environment variables in ENV_KEYS on top."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG) or None
    explicit = path is not None
    path = path or DEFAULT_PATH
    parser = configparser.ConfigParser(interpolation=None)
    if explicit or os.path.exists(path):
        check_private(path)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except configparser.Error as e:
            raise ConfigError(f"{path}: {e.message}") from None
    for var, (section, key) in ENV_KEYS.items():
        if env.get(var):
            if not parser.has_section(section):
                parser.add_section(section)
            parser.set(section, key, env[var])
    where = path if explicit or os.path.exists(path) else "the environment"
    return _settings(parser, where)


def _get(p: configparser.ConfigParser, section: str, key: str, where: str,
         default: str | None = None) -> str:
    value = p.get(section, key, fallback=None)
    if value is None or not value.strip():
        if default is not None:
            return default
        var = next((v for v, sk in ENV_KEYS.items() if sk == (section, key)), None)
        hint = f" or set {var}" if var else ""
        raise ConfigError(f"missing setting [{section}] {key} in {where}{hint}")
    return value.strip()


def _number(p: configparser.ConfigParser, section: str, key: str, where: str,
            default: float, kind: type = float, minimum: float = 0) -> float:
    raw = _get(p, section, key, where, str(default))
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"[{section}] {key} in {where} must be "
                          f"{'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"[{section}] {key} in {where} must be >= {minimum}, got {value}")
    return value


def _settings(p: configparser.ConfigParser, where: str) -> Settings:
    url = _get(p, "engine", "url", where)
    if not url.startswith("https://"):
        raise ConfigError(f"[engine] url in {where} must be an https:// URL, got {url!r}")
    ca_file = _get(p, "engine", "ca_file", where)
    if not os.path.isfile(ca_file):
        raise ConfigError(f"[engine] ca_file {ca_file} does not exist")
    engine = EngineSettings(url=url, username=_get(p, "engine", "username", where),
                            password=_get(p, "engine", "password", where), ca_file=ca_file,
                            timeout=_number(p, "engine", "timeout", where, 30.0, minimum=1))
    agents = None
    if p.get("agents", "cert", fallback=None):
        agents = AgentSettings(
            tls=TlsFiles(cert=_get(p, "agents", "cert", where),
                         key=_get(p, "agents", "key", where),
                         ca=_get(p, "agents", "ca", where)),
            port=int(_number(p, "agents", "port", where, DEFAULT_PORT, int, 1)),
            timeout=_number(p, "agents", "timeout", where, 5.0, minimum=0.1),
            workers=int(_number(p, "agents", "workers", where, 32, int, 1)))
    limits = Limits(
        max_vms_per_host=int(_number(p, "placement", "max_vms_per_host", where, 4, int, 1)),
        max_vcpus_per_host=int(_number(p, "placement", "max_vcpus_per_host", where, 8, int, 1)))
    endpoints = tuple(e.strip() for e in
                      _get(p, "poller", "etcd_endpoints", where, "").split(",") if e.strip())
    etcd_files = {"etcd_ca": _get(p, "poller", "etcd_ca", where, "") or None,
                  "etcd_cert": _get(p, "poller", "etcd_cert", where, "") or None,
                  "etcd_key": _get(p, "poller", "etcd_key", where, "") or None}
    for name, value in etcd_files.items():
        if value is not None and not os.path.isfile(value):
            raise ConfigError(f"[poller] {name} {value} in {where} does not exist")
    if bool(etcd_files["etcd_cert"]) != bool(etcd_files["etcd_key"]):
        raise ConfigError(f"[poller] etcd_cert and etcd_key in {where} go together; set both "
                          "or neither")
    etcd_username = _get(p, "poller", "etcd_username", where, "") or None
    etcd_password = _get(p, "poller", "etcd_password", where, "") or None
    if bool(etcd_username) != bool(etcd_password):
        raise ConfigError(f"[poller] etcd_username and etcd_password in {where} go together; "
                          "set both or neither")
    raw_allow = _get(p, "poller", "etcd_allow_plain_http", where, "no")
    try:
        allow_plain_http = hostconfig.parse_flag(raw_allow)
    except ValueError:
        raise ConfigError(f"[poller] etcd_allow_plain_http in {where} must be yes or no, got "
                          f"{raw_allow!r}") from None
    poller = PollerSettings(
        interval=_number(p, "poller", "interval", where, 10.0, minimum=0.1),
        hook_name=_get(p, "placement", "hook_name", where, PollerSettings.hook_name),
        limits=limits, etcd_endpoints=endpoints, **etcd_files,
        etcd_username=etcd_username, etcd_password=etcd_password,
        etcd_allow_plain_http=allow_plain_http,
        lease_ttl=int(_number(p, "poller", "lease_ttl", where, 15, int, 1)),
        max_events_per_cycle=int(_number(p, "poller", "max_events_per_cycle", where, 100,
                                         int, 1)))
    return Settings(engine=engine, agents=agents, poller=poller, source=where)


def write(path: str, sections: Mapping[str, Mapping[str, object]]) -> None:
    """Write a settings file created 0600 from the start (for installers and the lab)."""
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in sections.items():
        parser[section] = {k: str(v) for k, v in values.items()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        parser.write(f)
