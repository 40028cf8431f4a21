"""Shared fixtures: a real etcd per session (TLS with client certificates, as the
plane runs it), and a controller per test on its own key prefix (so tests are
independent yet share the etcd)."""

import os

# Before anything imports grpc: the hypervisor tests run libvirt's embedded QEMU
# driver in this process, which forks QEMU; gRPC's fork handlers would run in the
# child and crash it (see sfnode/__init__.py).
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import uuid  # noqa: E402

import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402

from sfcommon.pki import LocalPki  # noqa: E402
from sfcontrol import server  # noqa: E402
from sfup.etcd import EtcdServer  # noqa: E402
from tests.grpc_client import Client  # noqa: E402


@pytest.fixture(scope='session')
def pki(tmp_path_factory):
    """The certificates of the tests' planes (one cluster CA and one etcd CA)."""
    return LocalPki(tmp_path_factory.mktemp('pki')).ensure()


@pytest.fixture(scope='session')
def etcd(tmp_path_factory, pki):
    s = EtcdServer(tmp_path_factory.mktemp('etcd-shared') / 'data', pki=pki).start()
    yield s
    s.stop()


@pytest.fixture
def private_etcd(tmp_path, pki):
    """An etcd of the test's own, for tests that stop or restart it."""
    s = EtcdServer(tmp_path / 'etcd', pki=pki).start()
    yield s
    s.stop()


def controller_config(etcd, tmp_path, **overrides):
    return server.Config(etcd_endpoints=[etcd.endpoint], etcd_tls=etcd.client_tls,
                         pki=etcd.pki.controller(), state_dir=tmp_path / 'state',
                         store_prefix=f'/sftest/{uuid.uuid4().hex}', **overrides)


@pytest_asyncio.fixture
async def controller(etcd, tmp_path):
    ctl = await server.start(controller_config(etcd, tmp_path))
    yield ctl
    await ctl.stop(None)


def system_key(tmp_path) -> str:
    return (tmp_path / 'state' / 'system.key').read_text().strip()


@pytest_asyncio.fixture
async def system(controller, tmp_path):
    """A client logged in as the system namespace."""
    c = await Client(f'127.0.0.1:{controller.port}').login('system', system_key(tmp_path))
    yield c
    await c.close()


@pytest.fixture
def node_api(controller, pki):
    """Where nodes reach the test's controller, with the plane's certificates."""
    from tests.node_double import NodeApi
    return NodeApi.of(controller, pki)


@pytest_asyncio.fixture
async def node(node_api, system):
    """One healthy node, following its desired state."""
    from tests.node_double import NodeDouble
    n = await NodeDouble(node_api).start()
    yield n
    await n.stop()


@pytest_asyncio.fixture
async def tenant(system, controller):
    """A client of a fresh namespace "tenant" (key "tenant-key")."""
    from shakenfist.v1 import auth_service_pb2 as auth
    await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='tenant'))
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(
        namespace='tenant', key_name='k1', key='tenant-key'))
    c = await Client(f'127.0.0.1:{controller.port}').login('tenant', 'tenant-key')
    yield c
    await c.close()


@pytest_asyncio.fixture
async def gateway(controller):
    """The REST gateway in front of the test's controller."""
    from gateway.app import start_gateway
    runner, port = await start_gateway(f'127.0.0.1:{controller.port}', '127.0.0.1', 0)
    yield f'http://127.0.0.1:{port}'
    await runner.cleanup()


@pytest_asyncio.fixture
async def sf(gateway, tmp_path, node):
    """The real sf-client CLI, configured for the system namespace of this plane."""
    from tests.sfclient import SfClient
    home = tmp_path / 'home'
    home.mkdir()
    return SfClient(gateway, 'system', system_key(tmp_path), home)
