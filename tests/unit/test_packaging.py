"""The RPMs: built here with the real rpmbuild (packaging/build-rpms), then their file
lists, modes, scriptlets, units and shipped config templates checked, and the packaged
code run from the extracted payload."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from engine_plugin import config as poller_config
from vdsm_ft import hostconfig

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
SITELIB = "/usr/lib/python3.9/site-packages"
HOOKS_DIR = "/usr/libexec/vdsm/hooks"
HOST_RPM, ENGINE_RPM = "vdsm-hook-ft", "ovirt-ft-engine"
# The vdsm_ft modules engine_plugin imports, shipped in the engine package too.
ENGINE_VDSM_FT = {"__init__.py", "api.py", "agenterrors.py", "layout.py", "arbiter.py",
                  "etcd.py", "qemu_probe.py", "emulator.py", "imagestate.py", "ftvalue.py",
                  "hostconfig.py"}
TIMEOUT = 120


def _version() -> str:
    m = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text())
    assert m, "setup.py has no version"
    return m.group(1)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kw)


class Rpm:
    """One built package: its header facts and its payload extracted under `root`."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = path, root
        q = _run(["rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{ARCH}", str(path)])
        assert q.returncode == 0, q.stderr
        self.name, self.version, self.arch = q.stdout.split()
        q = _run(["rpm", "-qp", "--qf", "[%{FILEMODES} %{FILEUSERNAME} %{FILEGROUPNAME} "
                  "%{FILEFLAGS:fflags}. %{FILENAMES}\n]", str(path)])
        assert q.returncode == 0, q.stderr
        self.files: dict[str, tuple[int, str, str, str]] = {}
        for line in q.stdout.splitlines():
            mode, user, group, flags, name = line.split(" ", 4)
            self.files[name] = (int(mode), user, group, flags.rstrip("."))
        self.requires = _run(["rpm", "-qp", "--requires", str(path)]).stdout.splitlines()
        self.scripts = _run(["rpm", "-qp", "--scripts", str(path)]).stdout
        root.mkdir()
        cpio = subprocess.run(["rpm2cpio", str(path)], capture_output=True, timeout=TIMEOUT,
                              check=True).stdout
        subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=root, check=True,
                       timeout=TIMEOUT)

    def mode(self, name: str) -> int:
        return stat.S_IMODE(self.files[name][0])

    def regular(self) -> set[str]:
        return {n for n, (m, *_) in self.files.items() if stat.S_ISREG(m)}


@pytest.fixture(scope="module")
def rpms(tmp_path_factory) -> dict[str, Rpm]:
    for tool in ("rpmbuild", "rpm2cpio", "cpio", "git"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the RPMs cannot be built here "
                        "(.ci/run installs Debian's rpm package)")
    out = tmp_path_factory.mktemp("rpms")
    proc = _run([str(PACKAGING / "build-rpms"), str(out / "dist")])
    assert proc.returncode == 0, f"build-rpms failed:\n{proc.stderr}"
    paths = [Path(p) for p in proc.stdout.split()]
    assert sorted(p.name for p in paths) == sorted(
        f"{n}-{_version()}-1.noarch.rpm" for n in (HOST_RPM, ENGINE_RPM))
    built = {}
    for p in paths:
        rpm = Rpm(p, out / p.name.split("-0")[0])
        built[rpm.name] = rpm
    return built


def _repo_py(package: str) -> set[str]:
    return {f"{SITELIB}/{p.relative_to(REPO).as_posix()}"
            for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}


def test_two_noarch_packages_at_the_setup_py_version(rpms):
    assert set(rpms) == {HOST_RPM, ENGINE_RPM}
    for rpm in rpms.values():
        assert (rpm.version, rpm.arch) == (_version(), "noarch")


def test_host_package_file_list(rpms):
    rpm = rpms[HOST_RPM]
    hook_points = sorted(p.name for p in (REPO / "hooks").iterdir() if (p / "50_ft").is_file())
    assert len(hook_points) == 9
    expected = _repo_py("vdsm_ft") | {f"{HOOKS_DIR}/{p}/50_ft" for p in hook_points} | {
        "/usr/bin/vdsm-ft-agent",
        "/usr/lib/systemd/system/vdsm-ft-agent.service",
        "/usr/lib/firewalld/services/vdsm-ft.xml",
        "/usr/lib/tmpfiles.d/vdsm-ft.conf",
        "/etc/vdsm-ft/agent.conf",
    } | {f"/usr/share/doc/vdsm-hook-ft/{d}" for d in
         ("install.md", "security.md", "operations.md", "hooks.md", "agent-api.md",
          "arbiter.md", "engine-view.md")}
    assert rpm.regular() == expected
    assert not [n for n in rpm.files if "ftlab" in n or "/tests" in n or "engine_plugin" in n]
    for d in ("/run/vdsm-ft", "/run/vdsm-ft/vms", "/var/lib/vdsm-ft", "/etc/vdsm-ft"):
        assert stat.S_ISDIR(rpm.files[d][0]), d


def test_engine_package_file_list(rpms):
    rpm = rpms[ENGINE_RPM]
    expected = _repo_py("engine_plugin") | {f"{SITELIB}/vdsm_ft/{m}" for m in ENGINE_VDSM_FT} | {
        "/usr/bin/ovirt-ft", "/usr/bin/ovirt-ft-poller",
        "/usr/lib/systemd/system/ovirt-ft-poller.service",
        "/etc/ovirt-ft/poller.conf",
    } | {f"/usr/share/doc/ovirt-ft-engine/{d}" for d in
         ("install.md", "security.md", "operations.md", "hooks.md", "agent-api.md",
          "arbiter.md", "engine-view.md")}
    assert rpm.regular() == expected
    assert not [n for n in rpm.files if "ftlab" in n or "/tests" in n or "/hooks/" in n]


def test_shared_vdsm_ft_modules_are_byte_identical(rpms):
    """Both packages own these files; RPM accepts that only for identical files."""
    for m in ENGINE_VDSM_FT:
        rel = f".{SITELIB}/vdsm_ft/{m}"
        host = (rpms[HOST_RPM].root / rel).read_bytes()
        assert host == (rpms[ENGINE_RPM].root / rel).read_bytes() == \
            (REPO / "vdsm_ft" / m).read_bytes()


def test_modes_and_owners(rpms):
    host, engine = rpms[HOST_RPM], rpms[ENGINE_RPM]
    # agent.conf: the hooks (vdsm:kvm) read it; no secret goes in it (docs/security.md).
    assert host.files["/etc/vdsm-ft/agent.conf"][1:] == ("root", "kvm", "cn")
    assert host.mode("/etc/vdsm-ft/agent.conf") == 0o640
    # poller.conf holds the engine password.
    assert engine.files["/etc/ovirt-ft/poller.conf"][1:] == ("ovirt-ft", "ovirt-ft", "cn")
    assert engine.mode("/etc/ovirt-ft/poller.conf") == 0o600
    assert engine.mode("/etc/pki/ovirt-ft") == 0o700
    assert host.files["/run/vdsm-ft/vms"][1:3] == ("root", "kvm")
    assert host.mode("/run/vdsm-ft/vms") == 0o2770
    assert host.mode("/var/lib/vdsm-ft") == 0o711
    executables = [n for n in host.regular() if n.startswith(HOOKS_DIR)] + [
        "/usr/bin/vdsm-ft-agent"]
    for name in executables:
        assert host.mode(name) == 0o755, name
    for name in ("/usr/bin/ovirt-ft", "/usr/bin/ovirt-ft-poller"):
        assert engine.mode(name) == 0o755, name
    for rpm in (host, engine):
        for name in rpm.regular():
            if name.endswith((".py", ".service", ".xml", ".md")) or "tmpfiles" in name:
                assert rpm.mode(name) == 0o644, name
            assert rpm.files[name][1:3] in (("root", "root"), ("root", "kvm"),
                                            ("ovirt-ft", "ovirt-ft")), name


def test_hooks_are_the_repo_scripts(rpms):
    root = rpms[HOST_RPM].root
    for script in (REPO / "hooks").glob("*/50_ft"):
        shipped = root / f".{HOOKS_DIR}" / script.parent.name / "50_ft"
        assert shipped.read_bytes() == script.read_bytes()
        assert os.access(shipped, os.X_OK)


def test_requires_name_el9_packages(rpms):
    host, engine = set(rpms[HOST_RPM].requires), set(rpms[ENGINE_RPM].requires)
    for dep in ("vdsm", "python3-libvirt", "python3-lxml", "qemu-kvm", "qemu-img",
                "python3dist(etcd3gw) >= 2.1", "python3dist(qemu-qmp) >= 0.0.3",
                "firewalld-filesystem"):
        assert dep in host, dep
    for dep in ("python3-ovirt-engine-sdk4 >= 4.6.3", "python3dist(etcd3gw) >= 2.1"):
        assert dep in engine, dep
    assert not any("libvirt" in d or "qemu" in d for d in engine)


def test_scriptlets(rpms):
    host, engine = rpms[HOST_RPM].scripts, rpms[ENGINE_RPM].scripts
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/vdsm-ft.conf" in host
    assert "try-restart vdsm-ft-agent.service" in host
    assert "disable --now vdsm-ft-agent.service" in host
    assert re.search(r"useradd -r -g ovirt-ft .* ovirt-ft", engine)
    assert "try-restart ovirt-ft-poller.service" in engine


def _import_closure(root: Path, modules: list[str]) -> dict[str, str]:
    """Import `modules` from the extracted payload only, in a fresh interpreter; returns
    {module: file} of every vdsm_ft / engine_plugin / ftlab module loaded."""
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(root) + SITELIB!r})\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()"
        " if n.split('.')[0] in ('vdsm_ft', 'engine_plugin', 'ftlab')}))\n")
    proc = _run([sys.executable, "-c", code], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_engine_package_imports_from_its_own_files(rpms):
    root = rpms[ENGINE_RPM].root
    loaded = _import_closure(root, ["engine_plugin.cli", "engine_plugin.poller",
                                    "vdsm_ft.arbiter"])
    assert "engine_plugin.cli" in loaded and "vdsm_ft.api" in loaded
    for name, path in loaded.items():
        assert path and path.startswith(str(root)), (name, path)


def test_host_package_imports_from_its_own_files(rpms):
    root = rpms[HOST_RPM].root
    modules = sorted({p[len(SITELIB) + 1:-3].replace("/", ".").removesuffix(".__init__")
                      for p in _repo_py("vdsm_ft")})
    loaded = _import_closure(root, modules)
    assert set(modules) <= set(loaded)
    for name, path in loaded.items():
        assert path and path.startswith(str(root)), (name, path)


def test_installed_hooks_follow_vdsms_protocol(rpms, tmp_path):
    """The packaged scripts run as VDSM runs them: exec'd, env in, XML file in and out."""
    root = rpms[HOST_RPM].root
    xml = tmp_path / "dom.xml"
    original = "<domain type='kvm'><name>vm</name></domain>"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root) + SITELIB,
           "_hook_domxml": str(xml), "vmId": "2d1c5b64-7a0e-4a59-a1b8-1f2f5c3b9e10",
           "VDSM_FT_CONFIG": str(tmp_path / "absent.conf")}
    start = root / f".{HOOKS_DIR}/before_vm_start/50_ft"
    xml.write_text(original)
    proc = _run([str(start)], env=env)                 # no ft property: untouched
    assert (proc.returncode, xml.read_text()) == (0, original), proc.stderr
    proc = _run([str(start)], env=env | {"ft": "yes"})  # invalid value: refused, exit 2
    assert proc.returncode == 2
    assert "ft='yes' is not valid" in proc.stderr
    assert xml.read_text() == original
    migrate = root / f".{HOOKS_DIR}/before_vm_migrate_source/50_ft"
    proc = _run([str(migrate)], env=env | {"ft": "true"})
    assert proc.returncode == 2 and "migrate-secondary" in proc.stderr


# ---------------------------------------------------------------------------- units

def _unit(root: Path, name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read(root / f"usr/lib/systemd/system/{name}")
    return p


@pytest.mark.parametrize("pkg,unit,user,config_path", [
    (HOST_RPM, "vdsm-ft-agent.service", "root", hostconfig.DEFAULT_PATH),
    (ENGINE_RPM, "ovirt-ft-poller.service", "ovirt-ft", poller_config.DEFAULT_PATH),
])
def test_unit_fields(rpms, pkg, unit, user, config_path):
    rpm = rpms[pkg]
    u = _unit(rpm.root, unit)
    argv = u["Service"]["ExecStart"].split()
    assert argv[0] in rpm.regular(), "ExecStart names a packaged binary"
    assert os.access(rpm.root / f".{argv[0]}", os.X_OK)
    assert argv[1:] == ["--config", config_path]
    assert config_path in rpm.files
    assert u["Service"]["User"] == user
    assert u["Service"]["Restart"] in ("always", "on-failure")
    assert u["Install"]["WantedBy"] == "multi-user.target"
    assert u["Service"]["NoNewPrivileges"] == "yes"
    # Per-VM sockets must outlive an agent restart: never a RuntimeDirectory.
    assert "RuntimeDirectory" not in u["Service"]


def test_units_pass_systemd_analyze_verify(rpms, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; test_unit_fields parses the units")
    # A root holding both payloads and the host's own units (targets the ours name).
    root = tmp_path / "root"
    for rpm in rpms.values():
        shutil.copytree(rpm.root, root, dirs_exist_ok=True, symlinks=True)
    units = root / "usr/lib/systemd/system"
    for src in Path("/usr/lib/systemd/system").iterdir():
        if not (units / src.name).exists():
            if src.is_symlink():
                os.symlink(os.readlink(src), units / src.name)
            elif src.is_file():
                shutil.copy2(src, units / src.name)
    for unit in ("vdsm-ft-agent.service", "ovirt-ft-poller.service"):
        proc = _run(["systemd-analyze", f"--root={root}", "verify",
                     f"/usr/lib/systemd/system/{unit}"])
        # verify exits 0 on settings it ignores, so its output must be empty too.
        assert (proc.returncode, proc.stdout + proc.stderr) == (0, ""), unit


# -------------------------------------------------------------- firewalld and tmpfiles

def test_firewalld_service_opens_the_agent_and_colo_ports(rpms):
    tree = ET.parse(rpms[HOST_RPM].root / "usr/lib/firewalld/services/vdsm-ft.xml")
    ports = {(p.get("protocol"), p.get("port")) for p in tree.getroot().iter("port")}
    api = str(hostconfig.DEFAULT_API_PORT)
    first, last = hostconfig.HostConfig.colo_ports
    # The heartbeat is UDP on the API port (vdsm_ft.agent.daemon: Heartbeat(..., api_port)).
    assert ports == {("tcp", api), ("udp", api), ("tcp", f"{first}-{last}")}


def test_tmpfiles_make_the_run_dirs_the_hooks_need(rpms):
    lines = [line.split() for line in
             (rpms[HOST_RPM].root / "usr/lib/tmpfiles.d/vdsm-ft.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    run_dir = hostconfig.HostConfig.run_dir
    assert os.path.dirname(hostconfig.HostConfig.hook_socket) == run_dir
    assert ["d", run_dir, "0755", "root", "root", "-"] in lines
    assert ["d", f"{run_dir}/vms", "2770", "root", "kvm", "-"] in lines


# ---------------------------------------------------------------- config templates

EL_OS_RELEASE = 'NAME="CentOS Stream"\nID="centos"\nID_LIKE="rhel fedora"\n'


def _commented_defaults(text: str) -> dict[tuple[str, str], str]:
    section, found = "", {}
    for line in text.splitlines():
        m = re.fullmatch(r"\[(\w+)\]", line.strip())
        if m:
            section = m.group(1)
        m = re.fullmatch(r"# (\w+) = (\S.*)", line)
        if m and section:
            found[(section, m.group(1))] = m.group(2)
    return found


def test_agent_conf_template_is_refused_until_filled_in(rpms, tmp_path):
    shipped = (rpms[HOST_RPM].root / "etc/vdsm-ft/agent.conf").read_text()
    path = tmp_path / "agent.conf"
    path.write_text(shipped)
    with pytest.raises(hostconfig.ConfigError, match=r"\[host\] id"):
        hostconfig.load(str(path))
    filled = shipped.replace("id =\n", "id = host-a\n") \
        .replace("replication_address =\n", "replication_address = 192.0.2.11\n") \
        .replace("endpoints =\n", "endpoints = https://etcd1:2379, https://etcd2:2379\n")
    path.write_text(filled)
    cfg = hostconfig.load(str(path))
    assert (cfg.host_id, cfg.replication_address) == ("host-a", "192.0.2.11")


def test_agent_conf_template_shows_the_real_defaults(rpms, tmp_path):
    shipped = (rpms[HOST_RPM].root / "etc/vdsm-ft/agent.conf").read_text()
    os_release = tmp_path / "os-release"
    os_release.write_text(EL_OS_RELEASE)
    defaults = hostconfig.HostConfig(path="x", host_id="h", replication_address="192.0.2.1",
                                     etcd_endpoints=("http://e:2379",),
                                     qemu_user=hostconfig.default_qemu_user(str(os_release)))
    shown = _commented_defaults(shipped)
    assert len(shown) >= 15
    for (section, key), text in shown.items():
        field, parse = hostconfig._KEYS[(section, key)]
        if getattr(defaults, field) is None:
            continue                                # an example, not a default
        assert parse(text) == getattr(defaults, field), (section, key)


def test_poller_conf_template_loads_and_names_the_shipped_hook(rpms, tmp_path):
    shipped = rpms[ENGINE_RPM].root / "etc/ovirt-ft/poller.conf"
    path = tmp_path / "poller.conf"
    shutil.copy(shipped, path)
    os.chmod(path, 0o600)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    settings = poller_config.load(str(path), env={"OVIRT_FT_ENGINE_CA_FILE": str(ca)})
    hook = settings.poller.hook_name
    assert f"{HOOKS_DIR}/before_vm_start/{hook}" in rpms[HOST_RPM].files
    assert settings.agents is not None and settings.agents.port == hostconfig.DEFAULT_API_PORT
    assert len(settings.poller.etcd_endpoints) == 3


def test_pip_sites_can_build_without_the_python_library_requires(tmp_path):
    proc = _run([str(PACKAGING / "build-rpms"), str(tmp_path), "--without",
                 "python_deps_rpms"])
    assert proc.returncode == 0, proc.stderr
    requires = {Path(p).name.split("-0")[0]: _run(["rpm", "-qp", "--requires", p]).stdout
                for p in proc.stdout.split()}
    assert set(requires) == {HOST_RPM, ENGINE_RPM}
    assert not [r for r in requires.values() if "python3dist(" in r]
    assert "python3-libvirt" in requires[HOST_RPM]
    assert "python3-ovirt-engine-sdk4" in requires[ENGINE_RPM]
