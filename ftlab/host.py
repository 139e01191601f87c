"""A lab host: a network namespace with its own libvirtd and virtlogd.

Each host runs in `ftlab-<name>` (see `ftlab.netns`) and in a private mount namespace
held open by a `sleep infinity` process (the *holder*). In that mount namespace the
per-host directories under `<base_dir>/<name>/` are bind-mounted over libvirt's state
directories, so several libvirtds share one machine without seeing each other:

    run/      -> /run/libvirt        (sockets, pid files; reachable from the root namespace)
    lib/      -> /var/lib/libvirt
    cache/    -> /var/cache/libvirt
    log/      -> /var/log/libvirt
    etc-qemu/ -> /etc/libvirt/qemu   (no shared persistent domains or autostarted networks)

A host made with `sasl=True` stands for an oVirt host: its libvirtd wants a SASL login on
the read-write socket, as VDSM configures it (`auth_unix_rw = "sasl"`, mechanism
scram-sha-256, user `vdsm@ovirt` in a sasldb), with a per-host `etc-sasl2/` over
/etc/sasl2 and the password in `<dir>/libvirt_password` (0600), like VDSM's
/etc/pki/vdsm/keys/libvirt_password.

Hosts join a *wire* (`ftlab.netns`): the lab's default one, or a private one so tests can
run beside a lab. From the root namespace the host's libvirtd is `LabHost.uri`. `crash()` SIGKILLs every
process of the host (everything in its network namespace); `down()` also removes the
namespace and the host's directory.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid

import libvirt

from ftlab import netns
from vdsm_ft import libvirtconn

GUEST_BRIDGE = "ovirtmgmt"   # the engine's default VM network, as a bridge in each host
START_TIMEOUT = 30.0
BIND_MOUNTS = (("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
               ("cache", "/var/cache/libvirt"), ("log", "/var/log/libvirt"),
               ("etc-qemu", "/etc/libvirt/qemu"))
SASL_MOUNT = ("etc-sasl2", "/etc/sasl2")
# What VDSM writes (vdsm: lib/vdsm/tool/configurators/passwd.py), the sasldb moved into
# the host's own /etc/sasl2.
SASL_CONF = "mech_list: scram-sha-256\nsasldb_path: /etc/sasl2/passwd.db\n"
SOCKET_PATH_MAX = 107
SYSTEM_CAPS_CACHE = "/var/cache/libvirt/qemu/capabilities"


class LabHostError(RuntimeError):
    """A lab host could not be brought up, reached or removed."""


class LabHostDown(LabHostError):
    """The host has no running holder process (never up, crashed or removed)."""


class LabHost:
    def __init__(self, name: str, index: int, base_dir: str, wire: str = "wire",
                 sasl: bool = False):
        if not 1 <= index <= 99:
            raise LabHostError(f"host index {index} out of range 1..99 (address plan)")
        self.name = name
        self.index = index
        self.netns = netns.netns_name(name)
        self.wire = netns.netns_name(wire)
        self.dir = os.path.join(os.path.abspath(base_dir), name)
        self.address = f"{netns.REP_NET}.{10 + index}"
        self.socket = os.path.join(self.dir, "run", "libvirt-sock")
        if len(self.socket) > SOCKET_PATH_MAX:
            raise LabHostError(f"{self.socket} is too long for a unix socket; "
                               "use a shorter base_dir")
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        # A `socket=` URI names one socket: read-only clients need the read-only one
        # (qemu:///system picks it by itself on a real host).
        self.ro_uri = f"qemu+unix:///system?socket={self.socket}-ro"
        self.host_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ftlab/host/{name}"))
        self.sasl = sasl
        # The login for connect() and the agent's [libvirt] keys; None: plain libvirtd.
        self.sasl_username = libvirtconn.OVIRT_USERNAME if sasl else None
        self.password_file = self.path("libvirt_password") if sasl else None
        self.bind_mounts = BIND_MOUNTS + ((SASL_MOUNT,) if sasl else ())

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, {self.index}, address={self.address})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    # --- lifecycle ------------------------------------------------------------------

    def up(self, timeout: float = START_TIMEOUT) -> "LabHost":
        """Bring the host up (idempotent; also restarts a crashed host's daemons)."""
        netns.wire_up(self.wire)
        netns.create(self.netns)
        netns.join_rep(self.netns, self.index, self.wire)
        netns.join_guest_bridge(self.netns, self.index, GUEST_BRIDGE, self.wire)
        if self.holder_pid() is None:
            self._start_holder(timeout)
        self._start_daemons(timeout)
        return self

    def crash(self) -> None:
        """A host crash: SIGKILL every process of the host, nothing cleaned up."""
        netns.kill_all(self.netns)

    def down(self, keep_files: bool = False) -> None:
        """Remove everything this host made: processes, namespace, links, directory."""
        netns.delete(self.netns)
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- running things inside the host ---------------------------------------------

    def holder_pid(self) -> int | None:
        """The pid holding the host's mount namespace, if it is alive in the host's netns."""
        try:
            with open(self.path("holder.pid")) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            return None
        return pid if pid in netns.pids(self.netns) else None

    def nsenter(self, argv: list[str]) -> list[str]:
        """`argv` wrapped to run inside the host's network and mount namespaces."""
        pid = self.holder_pid()
        if pid is None:
            raise LabHostDown(f"lab host {self.name} is not running (crashed or not up)")
        return ["nsenter", "-t", str(pid), "-m", "-n", "--"] + list(argv)

    def run(self, argv: list[str], timeout: float = 60.0, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside the host and wait for it (output captured as text)."""
        proc = subprocess.run(self.nsenter(argv), capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise LabHostError(f"{self.name}: {' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a long-running process (an agent, a client) inside the host."""
        return subprocess.Popen(self.nsenter(argv), **kwargs)

    def connect(self) -> libvirt.virConnect:
        """A connection to the host's libvirtd, logged in if it wants SASL."""
        if not self.sasl:
            return libvirt.open(self.uri)
        return libvirtconn.open_libvirt(self.uri, self.sasl_username, self.password_file)

    def set_sasl_password(self, username: str, password: str) -> None:
        """Create or change a SASL user of the host's libvirtd, as VDSM does (password on
        stdin, never on a command line)."""
        self.run(["saslpasswd2", "-p", "-c", "-a", "libvirt", "-f", "/etc/sasl2/passwd.db",
                  username], input=password + "\n")

    def pids(self) -> list[int]:
        return netns.pids(self.netns)

    # --- internals ------------------------------------------------------------------

    def _start_holder(self, timeout: float) -> None:
        for sub, _ in self.bind_mounts:
            os.makedirs(self.path(sub), mode=0o755, exist_ok=True)
        os.makedirs(self.path("etc-qemu", "networks", "autostart"), exist_ok=True)
        self._seed_capabilities()
        with open(self.path("libvirtd.conf"), "w") as f:
            # Distinct host UUIDs: libvirt refuses to treat two hosts with one UUID as peers.
            f.write(f'host_uuid = "{self.host_uuid}"\n'
                    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
                    + ('auth_unix_rw = "sasl"\n' if self.sasl else ""))
        if self.sasl:
            with open(self.path(SASL_MOUNT[0], "libvirt.conf"), "w") as f:
                f.write(SASL_CONF)
        # `ip netns exec` remounts /sys for the namespace; unshare then gives the host a
        # private mount namespace; both exec, so the pid is sleep's.
        holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation",
             "private", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        root_mnt = os.stat("/proc/self/ns/mnt").st_ino
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(f"/proc/{holder.pid}/comm") as f:
                    ready = (f.read().strip() == "sleep"
                             and os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino != root_mnt)
            except OSError:
                ready = False
            if ready:
                break
            if holder.poll() is not None:
                raise LabHostError(f"{self.name}: namespace holder exited: "
                                   f"{holder.stderr.read().decode().strip()}")
            if time.monotonic() > deadline:
                holder.kill()
                raise LabHostError(f"{self.name}: namespace holder not ready in {timeout}s")
            time.sleep(0.02)
        holder.stderr.close()
        with open(self.path("holder.pid"), "w") as f:
            f.write(str(holder.pid))
        for sub, target in self.bind_mounts:
            # Without systemd nothing creates /run/libvirt (issue 10): make every mount
            # point first. The host's mount namespace shares the machine's filesystems, so
            # this is the same directory the machine's libvirt would use.
            os.makedirs(target, mode=0o755, exist_ok=True)
            self.run(["mount", "--bind", self.path(sub), target])
        if self.sasl and not os.path.exists(self.password_file):
            password = secrets.token_urlsafe(18)
            self.set_sasl_password(self.sasl_username, password)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")

    def _seed_capabilities(self) -> None:
        """Start from the system libvirtd's QEMU capability cache: probing QEMU costs each
        new libvirtd seconds of CPU. libvirtd revalidates the cache against the binaries,
        so a stale copy is only re-probed, never trusted."""
        target = self.path("cache", "qemu", "capabilities")
        if os.path.isdir(SYSTEM_CAPS_CACHE) and not os.path.isdir(target):
            shutil.copytree(SYSTEM_CAPS_CACHE, target)

    def _daemon_alive(self, pidfile: str) -> bool:
        try:
            with open(self.path("run", pidfile)) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            return False
        return pid in self.pids()

    def _start_daemons(self, timeout: float) -> None:
        if not self._daemon_alive("virtlogd.pid"):
            self.run(["virtlogd", "-d", "-p", "/run/libvirt/virtlogd.pid"], timeout=timeout)
        if not self._daemon_alive("libvirtd.pid"):
            self.run(["libvirtd", "-d", "-f", self.path("libvirtd.conf"),
                      "-p", "/run/libvirt/libvirtd.pid"], timeout=timeout)
        libvirt.registerErrorHandler(lambda *_: None, None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect().close()
                return
            except (libvirt.libvirtError, libvirtconn.LibvirtConnectError) as e:
                if time.monotonic() > deadline:
                    raise LabHostError(f"{self.name}: libvirtd not reachable at {self.uri} "
                                       f"within {timeout}s ({e}); see "
                                       f"{self.path('log', 'libvirtd.log')}") from e
            time.sleep(0.1)


def remove_lab(base_dir: str | None = None) -> list[str]:
    """Remove every lab namespace, process and root link, even after a crash of the lab;
    also `base_dir` when given. Returns what was removed."""
    removed = netns.cleanup()
    if base_dir and os.path.isdir(base_dir):
        shutil.rmtree(base_dir)
        removed.append(base_dir)
    return removed
