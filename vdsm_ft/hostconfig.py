"""The host's vdsm-ft settings: `/etc/vdsm-ft/agent.conf` (INI), read by the agent and the hooks.

`VDSM_FT_CONFIG` names another file (the lab runs several hosts on one machine).
Every key is checked when the file is read; a mistake raises `ConfigError` naming the
file, section and key and saying what is accepted. Unknown sections and keys are
refused too, so a typo never silently falls back to a default.

Example (only `[host] id`, `[host] replication_address` and `[etcd] endpoints` are
required)::

    [host]
    id = host-a
    replication_address = 192.0.2.11

    [etcd]
    endpoints = https://etcd1:2379, https://etcd2:2379, https://etcd3:2379

    [qemu]
    emulator = /usr/libexec/vdsm-ft/qemu-system-x86_64

    [hooks]
    agent_unreachable = start_unprotected
"""
from __future__ import annotations

import configparser
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from vdsm_ft.agenterrors import ID_RULE, is_id
from vdsm_ft.layout import run_dir_refusal

DEFAULT_PATH = "/etc/vdsm-ft/agent.conf"
PATH_ENV = "VDSM_FT_CONFIG"
DEFAULT_API_PORT = 54329      # vdsm_ft.api.DEFAULT_PORT; repeated so hooks need not import it
DEFAULT_POLLER_IDENTITY = "ovirt-ft-poller"     # vdsm_ft.api.DEFAULT_POLLER_IDENTITY, likewise
# The project's COLO QEMU, as packaging/qemu/vdsm-ft-qemu.spec installs it (docs/qemu.md).
DEFAULT_EMULATOR = "/usr/libexec/vdsm-ft/qemu-system-x86_64"
START_UNPROTECTED = "start_unprotected"
REFUSE = "refuse"
AGENT_UNREACHABLE_POLICIES = (START_UNPROTECTED, REFUSE)
# Keys whose value is a secret: a file holding one must be mode 0600 (or stricter).
SECRET_KEYS = frozenset({"password"})

_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(Exception):
    """The host config cannot be used; the message names the file, section and key."""


class LooseModeError(Exception):
    """A secret file that group or other may access."""

    def __init__(self, path: str, mode: int) -> None:
        super().__init__(f"{path} is mode {mode:04o}")
        self.path, self.mode = path, mode


def read_private(path: str) -> bytes:
    """The bytes of a secret file the config names (a key, a password): LooseModeError if
    group or other have any access, checked on the open file; OSError if unreadable."""
    with open(path, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise LooseModeError(path, mode)
        return f.read()


def default_qemu_user(os_release: str = "/etc/os-release") -> str:
    """The user libvirt runs QEMU as: `libvirt-qemu` on Debian and Ubuntu, `qemu` elsewhere (EL)."""
    try:
        with open(os_release) as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return "qemu"
    family = " ".join(fields.get(k, "").strip('"') for k in ("ID", "ID_LIKE")).split()
    return "libvirt-qemu" if {"debian", "ubuntu"} & set(family) else "qemu"


@dataclass(frozen=True)
class HostConfig:
    """One host's settings. Paths are absolute; durations are in seconds."""

    path: str                                   # the file these came from
    host_id: str                                # this host's name in the arbiter and the pair records
    replication_address: str                    # IP on the replication network (COLO, NBD, heartbeat)
    etcd_endpoints: tuple[str, ...]             # http(s)://host:port of each etcd member
    api_port: int = DEFAULT_API_PORT            # the agent's HTTPS API (mutual TLS)
    # Where the API listens: the poller dials the engine's address for the host, peers
    # the replication address, so by default every address (mutual TLS guards it).
    api_address: str = "0.0.0.0"
    # The Common Name of the poller's client certificate: the one identity the API takes
    # admin operations from (docs/security.md); docs/install.md enrols it under this name.
    poller_identity: str = DEFAULT_POLLER_IDENTITY
    tls_ca: str = "/etc/pki/vdsm/certs/cacert.pem"      # the engine CA (VDSM's copy)
    tls_cert: str = "/etc/pki/vdsm/certs/vdsmcert.pem"
    tls_key: str = "/etc/pki/vdsm/keys/vdsmkey.pem"
    hook_socket: str = "/run/vdsm-ft/agent.sock"        # the agent's unix socket for the hooks
    run_dir: str = "/run/vdsm-ft"                       # per-VM sockets under vms/<vm id>/
    state_dir: str = "/var/lib/vdsm-ft"                 # the agent's persisted state
    # The secondary's disk copies (docs/decisions.md, D2).
    replica_dir: str = "/var/lib/vdsm-ft/replicas"
    overlay_dir: str = "/dev/shm/vdsm-ft"               # active/hidden overlays, on tmpfs
    overlay_size_cap: int = 4 << 30                     # bytes of overlays allowed on this host
    # Copy-back after a failover (vdsm_ft.copyback), bytes/s; 0: unlimited. The default
    # leaves the guest and the next resync most of a storage link.
    copyback_rate: int = 64 << 20
    qemu_user: str = field(default_factory=default_qemu_user)
    libvirt_uri: str = "qemu:///system"
    # SASL login to libvirtd (oVirt: vdsm@ovirt, /etc/pki/vdsm/keys/libvirt_password);
    # None: libvirtd asks for none (plain libvirt). The password is read when connecting.
    libvirt_username: str | None = None
    libvirt_password_file: str | None = None
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    # Plain-http etcd lets anyone on its network plant or delete claims and image marks
    # (docs/arbiter.md); the agent refuses it unless this says the risk is accepted.
    etcd_allow_plain_http: bool = False
    colo_ports: tuple[int, int] = (49300, 49599)        # inclusive range for COLO/NBD/migration
    heartbeat_interval: float = 0.05
    heartbeat_timeout: float = 0.2
    heartbeat_key_file: str | None = None               # shared HMAC key; None: unsigned
    # A primary whose domain libvirt does not run this long after its `prepare` is
    # removed. VDSM bounds no start of its own; 600 s is the longest it waits for another
    # host's VM creation (migration_create_timeout, max_migration_listener_timeout).
    launch_timeout: float = 600.0
    # QEMU x509 creds dir for COLO's migration, NBD and mirror/compare sockets; None:
    # plain TCP. Both hosts of a pair must agree (prepare-secondary checks).
    colo_tls_dir: str | None = None
    # The QEMU that runs FT VMs (both roles): the <emulator> of the primary and secondary.
    qemu_emulator: str = DEFAULT_EMULATOR
    agent_unreachable: str = START_UNPROTECTED          # before_vm_start policy (docs/hooks.md)
    # before_vm_start on a host whose QEMU cannot do COLO (vdsm_ft.qemu_probe): refuse, so
    # that the engine starts the VM on another host, or start it as an ordinary VM.
    qemu_incapable: str = REFUSE
    agent_timeout: float = 2.0                          # total bound of one hook -> agent call

    def vm_run_dir(self, vm_id: str) -> str:
        """The directory of one VM's QMP and compare sockets (owned by the QEMU user)."""
        return os.path.join(self.run_dir, "vms", vm_id)


# --------------------------------------------------------------------------- parsers

def _path(v: str) -> str:
    if not os.path.isabs(v):
        raise ValueError("an absolute path")
    return os.path.normpath(v)


def _host_id(v: str) -> str:
    # The agents' API names hosts by this id (agenterrors.check_id); the arbiter's
    # name rule is wider, so an id the API takes is always a valid arbiter name.
    if not is_id(v):
        raise ValueError(f"{ID_RULE}, starting with a letter or digit (the agents' API "
                         "names hosts by it)")
    return v


def _address(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError("an IPv4 or IPv6 address") from None


def _port(v: str) -> int:
    n = int(v) if v.isdigit() else -1
    if not 1 <= n <= 65535:
        raise ValueError("a TCP port, 1-65535")
    return n


def _port_range(v: str) -> tuple[int, int]:
    lo, sep, hi = v.partition("-")
    try:
        first, last = _port(lo.strip()), _port(hi.strip())
    except ValueError:
        first = last = 0
    if not sep or not 0 < first <= last:
        raise ValueError("a port range FIRST-LAST, e.g. 49300-49599")
    return (first, last)


def _endpoints(v: str) -> tuple[str, ...]:
    items = tuple(e.strip() for e in v.split(",") if e.strip())
    for e in items:
        u = urlsplit(e)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("a comma-separated list of http(s)://host:port URLs")
    if not items:
        raise ValueError("at least one http(s)://host:port URL")
    return items


def _seconds(v: str) -> float:
    try:
        n = float(v)
    except ValueError:
        n = -1.0
    if not 0 < n <= 3600:
        raise ValueError("a duration in seconds, greater than 0 (e.g. 0.5)")
    return n


def _size(v: str) -> int:
    m = _SIZE_RE.fullmatch(v.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError("a size greater than 0 in bytes, or with K, M, G or T (e.g. 4G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def _rate(v: str) -> int:
    if v.strip() == "0":
        return 0
    try:
        return _size(v)
    except ValueError:
        raise ValueError("bytes per second, with K, M or G (e.g. 64M), or 0 for "
                         "unlimited") from None


def _policy(v: str) -> str:
    if v not in AGENT_UNREACHABLE_POLICIES:
        raise ValueError(" or ".join(AGENT_UNREACHABLE_POLICIES))
    return v


def _user(v: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v):
        raise ValueError("a user name")
    return v


def _uri(v: str) -> str:
    if "://" not in v:
        raise ValueError("a libvirt URI such as qemu:///system")
    return v


def _text(v: str) -> str:
    if not v:
        raise ValueError("a non-empty value")
    return v


_FLAGS = {"yes": True, "true": True, "on": True, "1": True,
          "no": False, "false": False, "off": False, "0": False}


def parse_flag(v: str) -> bool:
    """A yes/no setting (yes, true, on, 1 / no, false, off, 0); ValueError otherwise."""
    if v.lower() not in _FLAGS:
        raise ValueError("yes or no")
    return _FLAGS[v.lower()]


# (section, key) -> (HostConfig field, parser)
_KEYS: dict[tuple[str, str], tuple[str, Callable[[str], object]]] = {
    ("host", "id"): ("host_id", _host_id),
    ("host", "replication_address"): ("replication_address", _address),
    ("agent", "api_port"): ("api_port", _port),
    ("agent", "api_address"): ("api_address", _address),
    ("agent", "poller_identity"): ("poller_identity", _text),
    ("agent", "hook_socket"): ("hook_socket", _path),
    ("agent", "run_dir"): ("run_dir", _path),
    ("agent", "state_dir"): ("state_dir", _path),
    ("agent", "colo_ports"): ("colo_ports", _port_range),
    ("agent", "heartbeat_interval"): ("heartbeat_interval", _seconds),
    ("agent", "heartbeat_timeout"): ("heartbeat_timeout", _seconds),
    ("agent", "heartbeat_key_file"): ("heartbeat_key_file", _path),
    ("agent", "launch_timeout"): ("launch_timeout", _seconds),
    ("agent", "colo_tls_dir"): ("colo_tls_dir", _path),
    ("tls", "ca"): ("tls_ca", _path),
    ("tls", "cert"): ("tls_cert", _path),
    ("tls", "key"): ("tls_key", _path),
    ("storage", "replica_dir"): ("replica_dir", _path),
    ("storage", "overlay_dir"): ("overlay_dir", _path),
    ("storage", "overlay_size_cap"): ("overlay_size_cap", _size),
    ("storage", "copyback_rate"): ("copyback_rate", _rate),
    ("libvirt", "uri"): ("libvirt_uri", _uri),
    ("libvirt", "qemu_user"): ("qemu_user", _user),
    ("libvirt", "username"): ("libvirt_username", _text),
    ("libvirt", "password_file"): ("libvirt_password_file", _path),
    ("etcd", "endpoints"): ("etcd_endpoints", _endpoints),
    ("etcd", "ca"): ("etcd_ca", _path),
    ("etcd", "cert"): ("etcd_cert", _path),
    ("etcd", "key"): ("etcd_key", _path),
    ("etcd", "username"): ("etcd_username", _text),
    ("etcd", "password"): ("etcd_password", _text),
    ("etcd", "allow_plain_http"): ("etcd_allow_plain_http", parse_flag),
    ("qemu", "emulator"): ("qemu_emulator", _path),
    ("hooks", "agent_unreachable"): ("agent_unreachable", _policy),
    ("hooks", "agent_timeout"): ("agent_timeout", _seconds),
    ("hooks", "qemu_incapable"): ("qemu_incapable", _policy),
}
_REQUIRED = (("host", "id"), ("host", "replication_address"), ("etcd", "endpoints"))


def plain_http(endpoints: Iterable[str]) -> list[str]:
    """The endpoints among `endpoints` that are plain http."""
    return [e for e in endpoints if urlsplit(e).scheme == "http"]


def plain_http_refusal(endpoints: Iterable[str], setting: str, tls_keys: str,
                       allow_key: str) -> str | None:
    """Why an etcd client of vdsm-ft refuses plain-http `endpoints` (docs/security.md,
    etcd), in words that name its own keys; None when every endpoint is https. Shared by
    the agent and the poller so that both say the same."""
    plain = plain_http(endpoints)
    if not plain:
        return None
    return (f"{setting} {', '.join(plain)} are plain http: anyone who reaches them can "
            "plant or delete arbiter claims and stale-image marks, which fences healthy VMs "
            "or starts one from a stale image (docs/arbiter.md, \"A claim that no member "
            f"wrote\"). Use https endpoints with {tls_keys} and an etcd user "
            f"(docs/install.md, \"etcd\"), or set {allow_key} = yes to accept that risk")


def require_secure_etcd(config: HostConfig) -> None:
    """The agent's check before it trusts etcd as its arbiter (docs/security.md, etcd):
    every endpoint https, unless `[etcd] allow_plain_http` accepts the risk."""
    why = plain_http_refusal(config.etcd_endpoints, "[etcd] endpoints",
                             "[etcd] ca, cert and key", "[etcd] allow_plain_http")
    if why and not config.etcd_allow_plain_http:
        raise ConfigError(f"{config.path}: {why}")


def require_socket_room(config: HostConfig) -> None:
    """The agent's check before it serves VMs: their sockets fit under `run_dir` (checked
    by the agent, not at load: the hooks and tests read configs with any run_dir)."""
    too_long = run_dir_refusal(config.run_dir)
    if too_long:
        raise ConfigError(f"{config.path}: [agent] run_dir = {too_long}")


def config_path(env: dict[str, str] | None = None) -> str:
    """The file to read: `$VDSM_FT_CONFIG`, else /etc/vdsm-ft/agent.conf."""
    return (os.environ if env is None else env).get(PATH_ENV) or DEFAULT_PATH


def _check_secret_mode(path: str, st: os.stat_result, section: str, key: str) -> None:
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"{path}: [{section}] {key} holds a secret, but the file is mode "
            f"{stat.S_IMODE(st.st_mode):04o}; run `chmod 600 {path}` (owner root, or vdsm "
            "when the hooks must read it)")


def _check_password_file(path: str, secret: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(secret).st_mode)
    except FileNotFoundError:
        raise ConfigError(f"{path}: [libvirt] password_file = {secret}: no such file (on an "
                          "oVirt host VDSM keeps it at /etc/pki/vdsm/keys/libvirt_password)"
                          ) from None
    except PermissionError:
        # The hooks (user vdsm) read this config too and never open libvirt; the agent,
        # root, always gets past here and checks.
        return
    if mode & 0o077:
        raise ConfigError(f"{path}: [libvirt] password_file = {secret} is mode {mode:04o}: "
                          f"group or other may read the password; run `chmod 600 {secret}`")


def load(path: str | None = None) -> HostConfig:
    """Read and check the host config (see the module docstring)."""
    path = path or config_path()
    try:
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; create it (see docs/hooks.md) or set "
                          f"{PATH_ENV}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError(f"{path}: not a valid INI file: {e}") from None
    values: dict[str, object] = {}
    sections = {s for s, _ in _KEYS}
    for section in parser.sections():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section [{section}]; accepted: "
                              f"{', '.join(sorted(sections))}")
        for key, raw in parser.items(section):
            if (section, key) not in _KEYS:
                known = sorted(k for s, k in _KEYS if s == section)
                raise ConfigError(f"{path}: [{section}] {key} is not a known key; accepted: "
                                  f"{', '.join(known)}")
            if key in SECRET_KEYS:
                _check_secret_mode(path, st, section, key)
            name, parse = _KEYS[(section, key)]
            try:
                values[name] = parse(raw.strip())
            except ValueError as e:
                shown = "(hidden)" if key in SECRET_KEYS else repr(raw.strip())
                raise ConfigError(f"{path}: [{section}] {key} = {shown} is not valid; "
                                  f"accepted: {e}") from None
    for section, key in _REQUIRED:
        if _KEYS[(section, key)][0] not in values:
            raise ConfigError(f"{path}: [{section}] {key} is required")
    if values.get("heartbeat_timeout", HostConfig.heartbeat_timeout) <= \
            values.get("heartbeat_interval", HostConfig.heartbeat_interval):
        raise ConfigError(f"{path}: [agent] heartbeat_timeout must be greater than "
                          "heartbeat_interval")
    tls = [values.get(k) for k in ("etcd_cert", "etcd_key")]
    if any(tls) and not all(tls):
        raise ConfigError(f"{path}: [etcd] cert and key go together; set both or neither")
    if ("etcd_username" in values) != ("etcd_password" in values):
        raise ConfigError(f"{path}: [etcd] username and password go together; set both or "
                          "neither")
    if ("libvirt_username" in values) != ("libvirt_password_file" in values):
        raise ConfigError(f"{path}: [libvirt] username and password_file go together; set "
                          "both or neither")
    if "libvirt_password_file" in values:
        _check_password_file(path, str(values["libvirt_password_file"]))
    return HostConfig(path=path, **values)
