"""The lab CA: a throw-away CA with agent (server+client), poller (client) and engine
(server) certificates, for mutual TLS in the lab, the tests and the benchmarks. Made
with the openssl CLI, argv only."""
from __future__ import annotations

import base64
import grp
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from vdsm_ft.api import TlsFiles

OPENSSL_TIMEOUT = 60


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, timeout=OPENSSL_TIMEOUT)
    if proc.returncode:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace')}")


def heartbeat_key(directory: Path) -> str:
    """The lab's shared heartbeat key (`[agent] heartbeat_key_file`), made once."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "heartbeat.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(os.urandom(32)) + b"\n")
    return str(path)


def make_ca(directory: Path, name: str = "vdsm-ft lab CA") -> tuple[Path, Path]:
    """A self-signed EC CA; returns (cert, key). Keys are written under umask 077."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    old = os.umask(0o077)
    try:
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                 "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    finally:
        os.umask(old)
    return cert, key


def issue(directory: Path, ca: tuple[Path, Path], name: str,
          addresses: Sequence[str] = (), hostnames: Sequence[str] = (),
          common_name: bool = True) -> TlsFiles:
    """A leaf cert for `name`, usable as TLS server and client, SAN = hostnames+addresses.

    ``common_name=False`` leaves CN out of the subject (O=vdsm-ft lab, OU=name): etcd's JSON
    gateway refuses a client certificate with a CN when it also checks passwords."""
    ca_cert, ca_key = ca
    cert, key, csr = (directory / f"{name}.pem", directory / f"{name}.key",
                      directory / f"{name}.csr")
    ext = directory / f"{name}.ext"
    san = ",".join([f"DNS:{h}" for h in hostnames] + [f"IP:{a}" for a in addresses])
    ext.write_text("basicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   + (f"subjectAltName={san}\n" if san else ""))
    old = os.umask(0o077)
    try:
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={name}" if common_name else f"/O=vdsm-ft lab/OU={name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    finally:
        os.umask(old)
    return TlsFiles(cert=str(cert), key=str(key), ca=str(ca_cert))


def qemu_creds_dir(directory: Path, leaf: TlsFiles, qemu_group: str) -> str:
    """A QEMU `tls-creds-x509` dir from a leaf made by `issue` (it serves as both server
    and client certificate), readable by the QEMU user through its group."""
    directory.mkdir(parents=True, exist_ok=True)
    gid = grp.getgrnam(qemu_group).gr_gid
    os.chown(directory, -1, gid)
    os.chmod(directory, 0o750)
    for name, src in (("ca-cert.pem", leaf.ca), ("server-cert.pem", leaf.cert),
                      ("server-key.pem", leaf.key), ("client-cert.pem", leaf.cert),
                      ("client-key.pem", leaf.key)):
        dst = directory / name
        shutil.copyfile(src, dst)
        os.chown(dst, -1, gid)
        os.chmod(dst, 0o640)
    return str(directory)
