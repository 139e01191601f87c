"""An Ansible playbook with the oVirt collection (ovirt.ovirt, bundled in the `ansible`
package) sets ft=true on a VM, starts it and reads the property back, against the lab's
fake engine over HTTPS, with a stand-in host that accepts the start. The playbook is the
one a user would write: tests/data/ansible-ft-vm.yml."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import ovirtsdk4 as sdk
import pytest

from ftlab.engine import EngineTiming, FakeEngine, StartRequest

PLAYBOOK = os.path.join(os.path.dirname(__file__), "..", "data", "ansible-ft-vm.yml")
USER = "admin@internal"
PASSWORD = "ansible-lab-7c1d"
PLAYBOOK_TIMEOUT = 300


class AcceptingHost:
    """The engine's host side: every start succeeds (the VM goes Up)."""

    def __init__(self) -> None:
        self.starts: list[StartRequest] = []

    def start_vm(self, request: StartRequest) -> None:
        self.starts.append(request)

    def stop_vm(self, host_id: str, vm_id: str, graceful: bool) -> None:
        pass

    def destroy_vm(self, host_id: str, vm_id: str) -> None:
        pass


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="ftlab-ansible-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_playbook_sets_ft_starts_the_vm_and_reads_it_back(workdir):
    playbook_bin = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    assert os.access(playbook_bin, os.X_OK), \
        "ansible-playbook is missing: pip install -e '.[test]' brings the ansible package"
    host = AcceptingHost()
    engine = FakeEngine(users={USER: PASSWORD}, driver=host, timing=EngineTiming(refresh=0.1))
    info = engine.start()
    try:
        engine.add_host("host1")
        result = os.path.join(workdir, "vm.json")
        extra = os.path.join(workdir, "vars.json")      # the password stays off argv
        fd = os.open(extra, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"engine_url": info.url, "engine_user": USER,
                       "engine_password": PASSWORD, "engine_ca": str(info.ca_file),
                       "vm_name": "web-ft", "result_file": result,
                       "ansible_python_interpreter": sys.executable}, f)
        env = dict(os.environ, ANSIBLE_LOCAL_TEMP=os.path.join(workdir, "tmp"),
                   ANSIBLE_HOME=os.path.join(workdir, "home"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
                   ANSIBLE_LOCALHOST_WARNING="False")
        proc = subprocess.run([playbook_bin, "-i", "localhost,", "-e", f"@{extra}", PLAYBOOK],
                              capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT,
                              env=env, cwd=workdir)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        with open(result) as f:
            (vm,) = json.load(f)
        assert vm["name"] == "web-ft" and vm["status"] == "up"
        assert {p["name"]: p["value"] for p in vm["custom_properties"]} == {"ft": "true"}
        # What the engine holds, through the SDK, and what the host was asked to run.
        conn = sdk.Connection(url=info.url, username=USER, password=PASSWORD,
                              ca_file=str(info.ca_file))
        try:
            (got,) = conn.system_service().vms_service().list(search="name=web-ft")
            assert got.status == sdk.types.VmStatus.UP
            assert {p.name: p.value for p in got.custom_properties} == {"ft": "true"}
        finally:
            conn.close()
        assert [r.custom_properties for r in host.starts] == [{"ft": "true"}]
    finally:
        engine.stop()
