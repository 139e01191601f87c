"""Open libvirt connections, with SASL credentials where libvirtd asks for them.

On oVirt hosts VDSM sets `auth_unix_rw = "sasl"` in libvirtd.conf, so even root must
log in to `qemu:///system`; VDSM itself logs in as `vdsm@ovirt` with the password in
/etc/pki/vdsm/keys/libvirt_password (docs/install.md). Plain libvirt (Debian, the lab)
asks for nothing, and then no credentials are needed.

The password is read from its file at every connection (so a changed password is picked
up without a restart) and never leaves this module: no log line, no error message and
no command line carries it.
"""
from __future__ import annotations

import libvirt

from vdsm_ft.domains import DomainError
from vdsm_ft.hostconfig import DEFAULT_PATH, HostConfig, LooseModeError, read_private

# VDSM's own values (vdsm: lib/vdsm/common/libvirtconnection.py), named in the hints.
OVIRT_USERNAME = "vdsm@ovirt"
OVIRT_PASSWORD_FILE = "/etc/pki/vdsm/keys/libvirt_password"
_AUTH_ERRORS = frozenset({libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED,
                          libvirt.VIR_ERR_AUTH_UNAVAILABLE})


class LibvirtConnectError(DomainError):
    """No libvirt connection; the message names the URI and the config keys to fix.

    A DomainError, so that the agent answers a secondary it cannot start for this
    reason with the message (a Conflict), which the primary shows as its reason."""


def read_password(path: str) -> str:
    """The first line of `path`, refused if group or other have any access to it."""
    try:
        # VDSM writes the password as one line and reads it the same way.
        password = read_private(path).split(b"\n", 1)[0].decode("utf-8")
    except LooseModeError as e:
        raise LibvirtConnectError(
            f"libvirt password file {path} is mode {e.mode:04o}: group or other "
            f"may read it; run `chmod 600 {path}`") from None
    except OSError as e:
        raise LibvirtConnectError(f"cannot read the libvirt password file {path}: "
                                  f"{e.strerror}") from None
    except UnicodeDecodeError:
        raise LibvirtConnectError(f"libvirt password file {path} is not UTF-8 text") \
            from None
    if not password:
        raise LibvirtConnectError(f"libvirt password file {path} is empty")
    return password


def open_libvirt(uri: str, username: str | None = None, password_file: str | None = None,
                 config_path: str = DEFAULT_PATH) -> libvirt.virConnect:
    """A read-write connection to `uri`, logging in as `username` if libvirtd asks.

    `config_path` only names the file to fix in the error messages.
    """
    password = read_password(password_file) if username and password_file else None

    def answer(credentials: list[list], _data: object) -> int:
        if password is None:
            return -1            # nothing to offer: libvirt reports the login as failed
        for cred in credentials:
            if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                cred[4] = username
            elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                cred[4] = password
        return 0

    auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None]
    try:
        return libvirt.openAuth(uri, auth, 0)
    except libvirt.libvirtError as e:
        reason = e.get_error_message() or str(e)
        if e.get_error_code() not in _AUTH_ERRORS:
            raise LibvirtConnectError(f"cannot connect to libvirt at {uri} ([libvirt] uri "
                                      f"in {config_path}): {reason}") from None
        if password is None:
            raise LibvirtConnectError(
                f"libvirt at {uri} asks for a login ({reason}): set [libvirt] username and "
                f"password_file in {config_path} (on an oVirt host VDSM's: username = "
                f"{OVIRT_USERNAME}, password_file = {OVIRT_PASSWORD_FILE})") from None
        raise LibvirtConnectError(
            f"libvirt at {uri} refused the login of [libvirt] username = {username} with "
            f"the password in [libvirt] password_file = {password_file} ({reason}); check "
            f"both in {config_path} against libvirtd's SASL database (on an oVirt host "
            f"VDSM's: {OVIRT_USERNAME}, {OVIRT_PASSWORD_FILE})") from None


def connect(config: HostConfig) -> libvirt.virConnect:
    """A connection to this host's libvirtd, as the host config says."""
    return open_libvirt(config.libvirt_uri, config.libvirt_username,
                        config.libvirt_password_file, config.path)
