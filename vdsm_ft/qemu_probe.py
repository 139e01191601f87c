"""Can this host's QEMU do COLO? The agent asks at start and whenever the binary changes.

A QEMU may look complete and still fail COLO only when a VM is protected: EL9's qemu-kvm
is built with `--disable-replication` and a block driver allowlist without `quorum`,
which refuses a node only when it is opened (docs/qemu.md, "Why the distribution's
qemu-kvm cannot be used on EL9 oVirt hosts"). So every check here runs the real thing,
in throwaway QEMUs (`-machine none`, no guest, no KVM), over QMP (vdsm_ft.qmp):
- `x-colo` can be set (a QEMU without replication refuses it);
- a quorum of null-co children, a replication node and an NBD client node open (the NBD
  client in a second QEMU, exported by the first: QEMU cannot connect to itself without
  stalling its own main loop);
- the colo-compare, filter-mirror, filter-redirector, filter-rewriter and iothread object
  types exist;
- an i440fx machine type exists (COLO does not work on q35);
- the version is not one whose COLO is known broken (docs/qemu.md, "Which version").
Every step has its own timeout, and the throwaway QEMUs are killed whatever happens.

The result (`QemuCapability`) names, when the QEMU cannot do COLO, each cause and the
fix. The agent keeps it in its state dir (`save`/`load`, readable by the hooks), puts it
in its host status and in the host's arbiter record. The result type is imported by the
API and the engine side too: the QMP and lxml parts are imported only to probe.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from vdsm_ft import emulator

if TYPE_CHECKING:
    from vdsm_ft.qmp import Qmp

START_TIMEOUT = 10.0            # one throwaway QEMU: exec to QMP greeting
CONNECT_STEP = 0.5              # how often to see whether it exited meanwhile
COMMAND_TIMEOUT = 5.0           # one QMP command
EXIT_TIMEOUT = 5.0
RESULT_FILE = "qemu-probe.json"
FIX = ("install vdsm-ft-qemu and set [qemu] emulator to it "
       "(/usr/libexec/vdsm-ft/qemu-system-x86_64), see docs/qemu.md")
COLO_OBJECTS = ("colo-compare", "filter-mirror", "filter-redirector", "filter-rewriter",
                "iothread")
# (first, last, why) of releases whose COLO is known broken (docs/qemu.md,
# "Which version").
KNOWN_BROKEN = (
    ((10, 0, 0), (10, 0, 6), "COLO never leaves precopy on 10.0.0-10.0.6 (fixed in 10.0.7)"),
    ((10, 1, 0), (10, 1, 2), "COLO never leaves precopy on 10.1.0-10.1.2 (fixed in 10.1.3)"),
)


@dataclass(frozen=True)
class QemuCapability:
    """One probe of one binary. `reason` is empty exactly when `capable`."""

    capable: bool
    reason: str
    path: str
    version: str = ""
    build: str = ""               # vdsm_ft.emulator.Emulator.identity
    machine: str = ""             # its own i440fx type
    failed: tuple[str, ...] = ()  # the checks that failed: "x-colo", "quorum", ...
    file_key: tuple[int, ...] = ()
    probed_at: float = 0.0
    took_ms: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["failed"], data["file_key"] = list(self.failed), list(self.file_key)
        return data

    @classmethod
    def from_dict(cls, data: object) -> "QemuCapability":
        if not isinstance(data, dict):
            raise ValueError("a QEMU probe result must be an object")
        try:
            return cls(capable=bool(data["capable"]), reason=str(data["reason"]),
                       path=str(data["path"]), version=str(data.get("version", "")),
                       build=str(data.get("build", "")), machine=str(data.get("machine", "")),
                       failed=tuple(str(f) for f in data.get("failed", ())),
                       file_key=tuple(int(k) for k in data.get("file_key", ())),
                       probed_at=float(data.get("probed_at", 0.0)),
                       took_ms=float(data.get("took_ms", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a QEMU probe result is not valid: {e}") from None

    def current(self) -> bool:
        """True while the binary is the file this result was made from."""
        try:
            return tuple(emulator.file_key(self.path)) == self.file_key
        except OSError:
            return False


def broken_release(version: tuple[int, int, int]) -> str:
    """Why COLO is known broken on this release, or ""."""
    for first, last, why in KNOWN_BROKEN:
        if first <= version <= last:
            return why
    return ""


# --------------------------------------------------------------------- throwaway QEMUs

@dataclass
class _Scratch:
    binary: str
    directory: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    sessions: list["Qmp"] = field(default_factory=list)

    def qemu(self, name: str) -> "Qmp":
        """A QEMU with no machine, no devices and its QMP monitor on a private socket."""
        from vdsm_ft.domxml import qemu_escape
        from vdsm_ft.qmp import Qmp, QmpError
        sock = os.path.join(self.directory, f"{name}.qmp")
        argv = [self.binary, "-machine", "none", "-nodefaults", "-display", "none",
                "-S", "-chardev", f"socket,id=qmp,path={qemu_escape(sock)},server=on,"
                "wait=off", "-mon", "chardev=qmp,mode=control"]
        log = open(os.path.join(self.directory, f"{name}.log"), "wb")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)
        qmp = Qmp(sock, f"qemu-probe-{name}")
        self.sessions.append(qmp)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return qmp.connect(timeout=CONNECT_STEP)
            except QmpError as e:
                # A QEMU that exited is not waited for.
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise QmpError(f"{self.binary} did not start for the probe: {e}; it "
                                   f"said: {self.output(name)}") from None

    def output(self, name: str) -> str:
        try:
            with open(os.path.join(self.directory, f"{name}.log"), errors="replace") as f:
                return f.read(600).strip() or "(nothing)"
        except OSError:
            return "(no output)"

    def close(self) -> None:
        for qmp in self.sessions:
            qmp.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=EXIT_TIMEOUT)


@contextmanager
def _scratch(binary: str, workdir: str) -> Iterator[_Scratch]:
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="qemu-probe-", dir=workdir)
    s = _Scratch(binary, directory)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(directory, ignore_errors=True)


def _try(qmp: "Qmp", command: str, arguments: dict) -> str:
    """"" if QEMU accepted the command, else what it said."""
    from vdsm_ft.qmp import QmpCommandError
    try:
        qmp.execute(command, arguments, timeout=COMMAND_TIMEOUT)
    except QmpCommandError as e:
        return e.desc
    return ""


# ------------------------------------------------------------------------------ checks

def _qmp_checks(s: _Scratch) -> list[tuple[str, str]]:
    """(check, cause) of every failed QMP check."""
    failed: list[tuple[str, str]] = []
    a = s.qemu("a")
    said = _try(a, "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-colo", "state": True}]})
    if said:
        failed.append(("x-colo", f"x-colo cannot be set (QEMU said: {said}); QEMU was "
                                 "compiled without replication"))
    for node in ("probe-null0", "probe-null1", "probe-null2"):
        said = _try(a, "blockdev-add", {"driver": "null-co", "node-name": node})
        if said:
            failed.append(("null-co", f"a null-co node does not open (QEMU said: {said})"))
            return failed
    said = _try(a, "blockdev-add", {"driver": "quorum", "node-name": "probe-quorum",
                                    "vote-threshold": 1, "children": ["probe-null0"]})
    if said:
        failed.append(("quorum", f"a quorum node does not open (QEMU said: {said}); its "
                                 "block driver allowlist leaves quorum out"))
    said = _try(a, "blockdev-add", {"driver": "replication", "node-name": "probe-repl",
                                    "mode": "primary", "file": "probe-null1"})
    if said:
        failed.append(("replication", f"a replication node does not open (QEMU said: "
                                      f"{said})"))
    types = {t["name"] for t in a.execute("qom-list-types", {}, timeout=COMMAND_TIMEOUT)}
    missing = [t for t in COLO_OBJECTS if t not in types]
    if missing:
        failed.append(("objects", f"object types {', '.join(missing)} are missing (built "
                                  "without the COLO proxy?)"))
    nbd_sock = os.path.join(s.directory, "nbd.sock")
    said = (_try(a, "nbd-server-start", {"addr": {"type": "unix",
                                                  "data": {"path": nbd_sock}}})
            or _try(a, "block-export-add", {"type": "nbd", "id": "probe-export",
                                            "node-name": "probe-null2", "name": "probe",
                                            "writable": True}))
    if said:
        failed.append(("nbd", f"an NBD export does not start (QEMU said: {said})"))
        return failed
    b = s.qemu("b")
    said = _try(b, "blockdev-add", {"driver": "nbd", "node-name": "probe-nbd",
                                    "server": {"type": "unix", "path": nbd_sock},
                                    "export": "probe"})
    if said:
        failed.append(("nbd", f"an NBD client node does not open (QEMU said: {said})"))
    return failed


def probe(binary: str, workdir: str) -> QemuCapability:
    """Probe `binary` (throwaway QEMUs under `workdir`). Never raises for what the QEMU
    does: a QEMU that cannot be run or asked is not capable, and the reason says why."""
    start = time.monotonic()
    try:
        key = tuple(emulator.file_key(binary))
    except OSError:
        key = ()
    try:
        emu = emulator.identify(binary)
    except emulator.EmulatorError as e:
        return _result(binary, None, key, [("run", str(e))], start)
    from vdsm_ft.qmp import QmpError
    failed: list[tuple[str, str]] = []
    why = broken_release(emu.version)
    if why:
        failed.append(("version", f"QEMU {emu.version_text} is on the known-broken list: "
                                  f"{why}"))
    if emu.i440fx is None:
        failed.append(("i440fx", "it has no i440fx machine type (COLO does not work on q35)"))
    try:
        with _scratch(binary, workdir) as s:
            failed += _qmp_checks(s)
    except (QmpError, OSError) as e:
        failed.append(("qmp", f"the probe could not run it: {e}"))
    return _result(binary, emu, key, failed, start)


def _result(binary: str, emu: emulator.Emulator | None, key: tuple[int, ...],
            failed: list[tuple[str, str]], start: float) -> QemuCapability:
    version = emu.version_text if emu else ""
    reason = ""
    if failed:
        what = f"{binary} (QEMU {version})" if version else binary
        reason = (f"{what} cannot do COLO: {'; '.join(cause for _, cause in failed)}. "
                  f"Fix: {FIX}")
    return QemuCapability(capable=not failed, reason=reason, path=binary, version=version,
                          build=emu.identity if emu else "",
                          machine=(emu.i440fx or "") if emu else "",
                          failed=tuple(check for check, _ in failed), file_key=key,
                          probed_at=time.time(),
                          took_ms=round((time.monotonic() - start) * 1000, 1))


# ------------------------------------------------------------------------- persistence

def result_path(state_dir: str) -> str:
    return os.path.join(state_dir, RESULT_FILE)


def save(state_dir: str, result: QemuCapability) -> None:
    """Keep the result, mode 0644: the hooks (vdsm) read it when the agent is down; it
    holds nothing secret."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    path = result_path(state_dir)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".qemu-probe-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def load(state_dir: str) -> QemuCapability | None:
    """The kept result, or None when there is none (or it cannot be read)."""
    try:
        with open(result_path(state_dir)) as f:
            return QemuCapability.from_dict(json.load(f))
    except (OSError, ValueError):
        return None
