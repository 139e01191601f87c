"""Lab hosts and idle-guest COLO pairs for the benchmarks, with cleanup on every exit.

A `BenchLab` owns a private wire and its hosts (`ftlab.host.LabHost`), so a benchmark
runs beside the tests and a lab without touching them. Leaving the `with` block, by
return, exception, Ctrl-C or SIGTERM, destroys every domain, host, namespace and file
it made.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ftlab import counterclient, guest, netns, pki  # noqa: E402
from ftlab.colopair import QEMU_USER, ColoPair, Member  # noqa: E402
from ftlab.host import LabHost  # noqa: E402

MiB = 1 << 20
FILL_PATTERN = 0x5A
QEMU_IO_TIMEOUT = 600.0


class BenchError(RuntimeError):
    """The benchmark could not set up or observed something wrong (never a number)."""


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(f"benchmark stopped by signal {signum}")


def wait_serving(serial_log: str, client_ns: str, address: str,
                 timeout: float) -> float | None:
    """Seconds until the Linux guest printed its READY line and its counter answered
    a client in `client_ns`; None if that did not happen within `timeout`."""
    t0 = time.monotonic()
    ready = False
    while time.monotonic() - t0 < timeout:
        if not ready and os.path.exists(serial_log):
            with open(serial_log, "rb") as f:
                ready = guest.READY_LINE.encode() in f.read()
        if ready and counterclient.ask_once(client_ns, address).value is not None:
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


class BenchLab:
    """`hosts` lab hosts named `<prefix>-a`, `<prefix>-b`, ... on wire `<prefix>-wire`."""

    def __init__(self, prefix: str, hosts: int = 2):
        self.prefix = prefix
        self.count = hosts
        self.base = ""
        self.hosts: list[LabHost] = []
        self.wire = f"{prefix}-wire"
        self._pairs: dict[int, tuple[ColoPair, str]] = {}
        self._templates: dict[tuple[int, int], str] = {}
        # Host name -> COLO TLS creds dir (`enable_colo_tls`); empty: plain TCP.
        self.tls_dirs: dict[str, str] = {}

    def __enter__(self) -> "BenchLab":
        signal.signal(signal.SIGTERM, _terminate)
        self.base = tempfile.mkdtemp(prefix=f"ftlab-{self.prefix}-", dir="/tmp")
        os.chmod(self.base, 0o755)
        try:
            for i in range(self.count):
                host = LabHost(f"{self.prefix}-{chr(ord('a') + i)}", i + 1, self.base,
                               wire=self.wire)
                self.hosts.append(host)
                host.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pair, disk in list(self._pairs.values()):
            self._drop(pair, disk)
        for host in self.hosts:
            host.down()
            # ColoPair puts the secondary's overlays on tmpfs, per host.
            shutil.rmtree(os.path.join("/dev/shm", f"ftlab-{host.name}"), ignore_errors=True)
        netns.delete(netns.netns_name(self.wire))
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)

    def enable_colo_tls(self) -> None:
        """Give every host QEMU creds from one lab CA: later pairs run COLO over TLS."""
        pkidir = Path(self.base) / "colo-pki"
        ca = pki.make_ca(pkidir / "ca")
        for host in self.hosts:
            leaf = pki.issue(pkidir / "ca", ca, host.name, addresses=[host.address])
            self.tls_dirs[host.name] = pki.qemu_creds_dir(pkidir / host.name, leaf,
                                                          QEMU_USER)

    # -- pairs ---------------------------------------------------------------------------

    def _template(self, size: int, fill: int) -> str:
        """The idle guest's blank disk with its first `fill` bytes written (cached)."""
        key = (size, fill)
        if key not in self._templates:
            path = os.path.join(self.base, f"template-{size // MiB}M-{fill // MiB}M.qcow2")
            shutil.copyfile(guest.build_idle_disk(size), path)
            if fill:
                proc = subprocess.run(
                    ["qemu-io", "-f", "qcow2", "-c",
                     f"write -P {FILL_PATTERN:#x} 0 {fill}", path],
                    capture_output=True, text=True, timeout=QEMU_IO_TIMEOUT)
                if proc.returncode != 0 or "error" in proc.stdout.lower():
                    raise BenchError(f"qemu-io fill of {path} failed: "
                                     f"{proc.stderr.strip() or proc.stdout.strip()}")
            self._templates[key] = path
        return self._templates[key]

    def new_pair(self, disk_size: int = 64 * MiB, fill: int = 0) -> ColoPair:
        """A fresh idle VM (one disk, one NIC) whose XML is what the engine would send."""
        vm_id = str(uuid.uuid4())
        disk = guest.install_disk(self._template(disk_size, fill),
                                  self.hosts[0].path("images", f"{vm_id}.qcow2"))
        xml = guest.idle_guest_xml(f"{self.prefix}-{vm_id[:8]}", disk,
                                   mac=guest.guest_mac(1),
                                   serial_log=self.hosts[0].path("images", f"{vm_id}.serial"),
                                   vm_id=vm_id)
        pair = ColoPair(xml)
        pair.tls_dirs = dict(self.tls_dirs)
        self._pairs[id(pair)] = (pair, disk)
        return pair

    def new_linux_pair(self, address: str, nic_model: str = "virtio",
                       qemu: str | None = None) -> tuple[ColoPair, str]:
        """A fresh Linux test guest (TCG, serving at `address`) and its serial log;
        each secondary logs to its own file (`console_log`)."""
        vm_id = str(uuid.uuid4())
        disk = guest.install_disk(guest.build_linux_disk(guest.GuestNet(address)),
                                  self.hosts[0].path("images", f"{vm_id}.qcow2"))
        serial_log = self.hosts[0].path("images", f"{vm_id}.serial")
        xml = guest.linux_guest_xml(f"{self.prefix}-{vm_id[:8]}", disk, guest.guest_mac(1),
                                    serial_log, nic_model=nic_model, vm_id=vm_id)
        pair = ColoPair(xml, qemu=qemu)
        self._pairs[id(pair)] = (pair, disk)
        return pair, serial_log

    def drop_pair(self, pair: ColoPair) -> None:
        entry = self._pairs.get(id(pair))
        if entry:
            self._drop(*entry)

    def _drop(self, pair: ColoPair, disk: str) -> None:
        self._pairs.pop(id(pair), None)
        pair.destroy_all()
        logs = [pair.console_log(m) for m in pair.members]
        for path in {disk, disk.removesuffix(".qcow2") + ".serial", *filter(None, logs)}:
            if os.path.exists(path):
                os.unlink(path)

    def protected(self, generation: int, delay_ms: int = 2000,
                  disk_size: int = 64 * MiB) -> tuple[ColoPair, Member, Member]:
        """A fresh pair protected from host a onto host b, through `vdsm_ft.colo`."""
        pair = self.new_pair(disk_size)
        primary = pair.start_primary(self.hosts[0])
        secondary, ep = pair.start_secondary(self.hosts[1], primary, generation)
        pair.protect(primary, secondary, ep, checkpoint_delay_ms=delay_ms)
        return pair, primary, secondary
