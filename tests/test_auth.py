"""Namespaces, keys and tokens."""

import os
import stat

import grpc
import jwt

from sfcontrol.caller import SYSTEM
from shakenfist.v1 import auth_service_pb2 as auth, instance_service_pb2 as api
from shakenfist.v1 import server_service_pb2
from tests.conftest import controller_config, system_key
from tests.grpc_client import Client
from tests.helpers import ManualClock, raises

C = grpc.StatusCode


def test_system_key_is_written_readable_only_by_its_owner(controller, tmp_path):
    path = tmp_path / 'state' / 'system.key'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(system_key(tmp_path)) >= 32


async def test_a_token_needs_the_right_key(controller, tmp_path):
    c = Client(f'127.0.0.1:{controller.port}')
    try:
        async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED'):
            await c.login(SYSTEM, 'wrong')
        async with raises(C.UNAUTHENTICATED):
            await c.login('nope', system_key(tmp_path))
        r = await c.auth.CreateToken(auth.CreateTokenRequest(namespace=SYSTEM, key=system_key(tmp_path)))
        assert r.token_type == 'Bearer' and r.expires_in == 900
        claims = jwt.decode(r.access_token, options={'verify_signature': False})
        assert claims['sub'] == 'system:deploy' and claims['exp'] - claims['iat'] == 900
    finally:
        await c.close()


async def test_calls_without_or_with_a_bad_token_are_unauthenticated(controller, system):
    c = Client(f'127.0.0.1:{controller.port}')
    try:
        async with raises(C.UNAUTHENTICATED, match='needs a token'):
            await c.instances.ListInstances(api.ListInstancesRequest())
        forged = jwt.encode({'sub': 'system:deploy', 'iss': 'shakenfist', 'exp': 2**40}, 'guess', 'HS256')
        c.token = forged
        async with raises(C.UNAUTHENTICATED, match='not valid'):
            await c.instances.ListInstances(api.ListInstancesRequest())
        # Public calls need no token.
        c.token = None
        r = await c.server.GetCapabilities(server_service_pb2.GetCapabilitiesRequest())
        assert 'instance-execute' in r.capabilities
    finally:
        await c.close()


async def test_expired_tokens_are_unauthenticated(etcd, tmp_path):
    from sfcontrol import server
    clock = ManualClock()
    ctl = await server.start(controller_config(etcd, tmp_path, token_ttl=60, clock=clock))
    c = Client(f'127.0.0.1:{ctl.port}')
    try:
        await c.login(SYSTEM, system_key(tmp_path))
        clock.advance(59)
        await c.instances.ListInstances(api.ListInstancesRequest())
        clock.advance(1)
        async with raises(C.UNAUTHENTICATED, match='expired'):
            await c.instances.ListInstances(api.ListInstancesRequest())
    finally:
        await c.close()
        await ctl.stop(None)


async def test_namespace_and_key_management(system, controller):
    await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='team'))
    async with raises(C.ALREADY_EXISTS):
        await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='team'))
    async with raises(C.INVALID_ARGUMENT):
        await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='bad name'))
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='team', key_name='k1', key='s1'))
    async with raises(C.ALREADY_EXISTS):
        await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='team', key_name='k1', key='x'))
    keys = await system.auth.ListNamespaceKeys(auth.ListNamespaceKeysRequest(namespace='team'))
    assert list(keys.key_names) == ['k1']
    names = [n.name for n in (await system.auth.ListNamespaces(auth.ListNamespacesRequest())).namespaces]
    assert names == ['system', 'team']

    team = await Client(f'127.0.0.1:{controller.port}').login('team', 's1')
    try:
        await team.instances.ListInstances(api.ListInstancesRequest())
        await system.auth.UpdateNamespaceKey(auth.UpdateNamespaceKeyRequest(namespace='team', key_name='k1', key='s2'))
        async with raises(C.UNAUTHENTICATED):
            await Client(f'127.0.0.1:{controller.port}').login('team', 's1')
        # Setting the key again ends the tokens of its earlier generation.
        async with raises(C.UNAUTHENTICATED, match='deleted or set again'):
            await team.instances.ListInstances(api.ListInstancesRequest())
        await team.login('team', 's2')
        # Only system manages namespaces.
        async with raises(C.PERMISSION_DENIED, 'PERMISSION_DENIED'):
            await team.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='other'))
        # Deleting the key ends the tokens issued for it.
        await team.instances.ListInstances(api.ListInstancesRequest())
        await system.auth.DeleteNamespaceKey(auth.DeleteNamespaceKeyRequest(namespace='team', key_name='k1'))
        async with raises(C.UNAUTHENTICATED, match='deleted or set again'):
            await team.instances.ListInstances(api.ListInstancesRequest())
    finally:
        await team.close()
    await system.auth.DeleteNamespace(auth.DeleteNamespaceRequest(namespace='team'))
    async with raises(C.NOT_FOUND):
        await system.auth.GetNamespace(auth.GetNamespaceRequest(namespace='team'))
    async with raises(C.PERMISSION_DENIED):
        await system.auth.DeleteNamespace(auth.DeleteNamespaceRequest(namespace='system'))


async def test_keys_are_stored_only_hashed(system, controller):
    await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='team'))
    secret = 'a-very-recognisable-secret-1234'
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='team', key_name='k', key=secret))
    everything = await controller.core.store.get_prefix('')
    assert everything and all(secret.encode() not in value for _, value, _ in everything)
