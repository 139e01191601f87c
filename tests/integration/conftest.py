"""Fixtures shared by the integration tests (other test files may add theirs here)."""
import pytest

from ftlab.etcd import EtcdCluster


@pytest.fixture(scope="session")
def etcd_cluster():
    """A real 3-member etcd cluster for the session. Tests must leave every member running
    (restart what they stop); tests that break the cluster use ``fresh_etcd_cluster``."""
    cluster = EtcdCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_etcd_cluster():
    """A private real 3-member etcd cluster, for tests that stop members."""
    cluster = EtcdCluster().start()
    yield cluster
    cluster.stop()
