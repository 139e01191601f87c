"""Fixtures shared by the unit tests."""
import os

import pytest

from tests.unit.test_hooks_api import Recorder
from vdsm_ft.hookapi import serve_hooks


@pytest.fixture
def agent(tmp_path):
    """A real hook socket served by a recording agent backend: (backend, socket path)."""
    backend = Recorder()
    path = str(tmp_path / "agent.sock")
    server = serve_hooks(path, backend, owner_gid=os.getgid())
    yield backend, path
    backend.stall.set()
    server.close()
