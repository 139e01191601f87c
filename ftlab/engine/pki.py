"""A throw-away lab CA and a TLS server certificate for the fake engine.

Made with the `openssl` CLI (argv lists, no shell) so the lab needs nothing beyond the
distribution's openssl. The CA file is what clients pass to ovirtsdk4 as `ca_file`.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

OPENSSL_TIMEOUT = 60


class PkiError(RuntimeError):
    """openssl failed to make the lab CA or the server certificate."""


@dataclass(frozen=True)
class ServerPki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(args: Sequence[str], cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                       timeout=OPENSSL_TIMEOUT)
    except FileNotFoundError as e:
        raise PkiError("openssl is not installed (apt-get install openssl)") from e
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip()
        raise PkiError("openssl %s failed: %s" % (args[0], err)) from e
    except subprocess.TimeoutExpired as e:
        raise PkiError("openssl %s took more than %ss" % (args[0], OPENSSL_TIMEOUT)) from e


def make_server_pki(directory: Path, hostnames: Sequence[str] = ("localhost",),
                    addresses: Sequence[str] = ("127.0.0.1",), days: int = 30) -> ServerPki:
    """Create `ca.pem` (lab CA) and a server cert whose SAN covers hostnames and addresses."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    # Keys are written with umask 077 so no other user can read them, even briefly.
    old_umask = os.umask(0o077)
    try:
        _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", str(ca_key), "-out", str(ca_pem), "-days", str(days),
                  "-subj", "/O=vdsm-ft lab/CN=vdsm-ft lab engine CA",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], directory)
        san = ",".join(["DNS:%s" % h for h in hostnames] + ["IP:%s" % a for a in addresses])
        ext.write_text("basicConstraints=CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\nsubjectAltName=%s\n" % san)
        cn = hostnames[0] if hostnames else addresses[0]
        _openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", str(key), "-out", str(csr), "-subj", "/O=vdsm-ft lab/CN=%s" % cn],
                 directory)
        _openssl(["x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key),
                  "-CAcreateserial", "-out", str(cert), "-days", str(days),
                  "-extfile", str(ext)], directory)
    finally:
        os.umask(old_umask)
    os.chmod(ca_pem, 0o644)
    return ServerPki(ca_file=ca_pem, cert_file=cert, key_file=key)
