"""Who may do what between controllers, nodes and etcd (sfcommon/pki.py):

- the node API takes only node certificates of the cluster CA, and a node acts
  only as itself, on the instances placed on it;
- a node's NodeService takes only a controller's certificate;
- etcd takes only clients of the etcd CA;
- tokens: signed by the newest of several keys (rotated without downtime),
  capped in lifetime, bound to the generation of the key that issued them.
"""

import ssl

import grpc
import jwt
import pytest

from sfcommon import pki as pkilib
from sfcontrol.store import keys
from sfcontrol.auth import MAX_TOKEN_TTL
from sfcontrol.store.etcd import Store, StoreError
from shakenfist.node.v1alpha1 import node_pb2 as pb, node_pb2_grpc
from shakenfist.v1 import auth_service_pb2 as auth, event_pb2, instance_pb2
from shakenfist.v1 import instance_service_pb2 as api
from sfcommon.events import make_event
from tests.grpc_client import Client
from tests.helpers import create_created, raises
from tests.node_double import NodeDouble

C = grpc.StatusCode


# -- the node API -----------------------------------------------------------------------------

async def test_the_node_api_refuses_tokens_and_callers_without_a_node_certificate(system, controller, node_api):
    # A system token on the public port is not a node.
    async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED', 'node certificate'):
        await system.node_control.RegisterNode(pb.RegisterNodeRequest(name='rogue', address='127.0.0.1:1'))
    # On the node port, TLS without a client certificate does not even connect.
    ca = node_api.pki.cluster.cert_path.read_bytes()
    channel = grpc.aio.secure_channel(node_api.target, grpc.ssl_channel_credentials(ca), options=[
        ('grpc.ssl_target_name_override', pkilib.CONTROLLER_SERVER_NAME)])
    try:
        async with raises(C.UNAVAILABLE):
            await node_pb2_grpc.NodeControlServiceStub(channel).Heartbeat(
                pb.HeartbeatRequest(name='node1'), timeout=5)
    finally:
        await channel.close()


async def test_a_certificate_of_another_ca_is_refused(node_api, tmp_path):
    stranger = pkilib.LocalPki(tmp_path / 'other-plane').ensure()
    ca, cert, key = stranger.node('node1').read()
    channel = grpc.aio.secure_channel(node_api.target, grpc.ssl_channel_credentials(ca, key, cert), options=[
        ('grpc.ssl_target_name_override', pkilib.CONTROLLER_SERVER_NAME)])
    try:
        async with raises(C.UNAVAILABLE):
            await node_pb2_grpc.NodeControlServiceStub(channel).Heartbeat(
                pb.HeartbeatRequest(name='node1'), timeout=5)
    finally:
        await channel.close()


async def test_a_node_cannot_claim_to_be_another(node, node_api):
    intruder = NodeDouble(node_api, 'node2')
    try:
        for call, request in [
                ('RegisterNode', pb.RegisterNodeRequest(name='node1', address='127.0.0.1:1')),
                ('Heartbeat', pb.HeartbeatRequest(name='node1')),
                ('ReportInstanceStatus', pb.ReportInstanceStatusRequest(node='node1', instance_uuid='x')),
                ('RecordEvents', pb.RecordEventsRequest(node='node1')),
                ('UpdateAgentOperation', pb.UpdateAgentOperationRequest(node='node1', uuid='x')),
                ('AuthorizeConsole', pb.AuthorizeConsoleRequest(node='node1', instance_uuid='x'))]:
            async with raises(C.PERMISSION_DENIED, 'PERMISSION_DENIED', "node2's"):
                await getattr(intruder.node_control, call)(request)
        async with raises(C.PERMISSION_DENIED, 'PERMISSION_DENIED'):
            async for _ in intruder.node_control.WatchDesiredInstances(pb.WatchDesiredInstancesRequest(name='node1')):
                pass
    finally:
        await intruder.channel.close()


async def test_a_node_acts_only_on_the_instances_placed_on_it(system, node, node_api):
    other = await NodeDouble(node_api, 'node2').start()
    try:
        inst = await create_created(system, placed_on='node1')
        async with raises(C.NOT_FOUND, 'NOT_FOUND', 'not placed on node node2'):
            await other.report(inst.uuid, power_state=instance_pb2.POWER_STATE_OFF)
        assert (await system.instances.GetInstance(api.GetInstanceRequest(
            instance_ref=inst.uuid))).instance.power_state == instance_pb2.POWER_STATE_ON
        event = make_event('forged-fqdn', event_pb2.OBJECT_TYPE_INSTANCE, inst.uuid,
                           event_pb2.EVENT_TYPE_STATUS, 'planted by another node')
        async with raises(C.NOT_FOUND, 'NOT_FOUND', 'not placed on node node2'):
            await other.node_control.RecordEvents(pb.RecordEventsRequest(
                node='node2', events=[pb.NodeEvent(event=event)]))
        about_a_node = make_event('x', event_pb2.OBJECT_TYPE_NODE, 'node1', event_pb2.EVENT_TYPE_STATUS, 'hi')
        async with raises(C.PERMISSION_DENIED, 'PERMISSION_DENIED', 'its instances and itself'):
            await other.node_control.RecordEvents(pb.RecordEventsRequest(
                node='node2', events=[pb.NodeEvent(event=about_a_node)]))

        async def parts():
            yield pb.PutBlobRequest(header=pb.PutBlobHeader(node='node2', instance_uuid=inst.uuid))
            yield pb.PutBlobRequest(data=b'junk')
        async with raises(C.NOT_FOUND, 'NOT_FOUND', 'not placed on node node2'):
            await other.node_control.PutBlob(parts())

        # The instance's own node may, and what it says of who observed it is not trusted.
        await node.node_control.RecordEvents(pb.RecordEventsRequest(node='node1', events=[
            pb.NodeEvent(event=make_event('forged-fqdn', event_pb2.OBJECT_TYPE_INSTANCE, inst.uuid,
                                          event_pb2.EVENT_TYPE_STATUS, 'seen by its node'))]))
        events = (await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
            instance_ref=inst.uuid))).events
        mine = [e for e in events if e.message == 'seen by its node']
        assert [e.fqdn for e in mine] == ['node1']
        assert not [e for e in events if e.message == 'planted by another node']
    finally:
        await other.stop()


async def test_a_node_certificate_reaches_nothing_of_the_public_api(node):
    for call in (node.channel.unary_unary('/shakenfist.v1.InstanceService/ListInstances',
                                          request_serializer=api.ListInstancesRequest.SerializeToString,
                                          response_deserializer=api.ListInstancesResponse.FromString),):
        async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED', 'needs a token'):
            await call(api.ListInstancesRequest())


async def test_nodes_take_calls_from_controllers_only(system, node, node_api):
    """The controller reaches the node (a console read goes through); another node's
    certificate, or none, does not."""
    inst = await create_created(system)
    node.console = b'hello'
    got = await system.instances.GetConsoleData(api.GetConsoleDataRequest(instance_ref=inst.uuid))
    assert got.console.data == b'hello'
    target = f'127.0.0.1:{node.port}'
    ca, cert, key = node_api.pki.node('node2').read()
    channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=[
        ('grpc.ssl_target_name_override', pkilib.node_server_name('node1'))])
    try:
        async with raises(C.PERMISSION_DENIED):
            await node_pb2_grpc.NodeServiceStub(channel).RebootInstance(
                pb.RebootInstanceRequest(instance_uuid=inst.uuid, hard=True), timeout=5)
    finally:
        await channel.close()
    plain = grpc.aio.insecure_channel(target)
    try:
        async with raises(C.UNAVAILABLE):
            await node_pb2_grpc.NodeServiceStub(plain).RebootInstance(
                pb.RebootInstanceRequest(instance_uuid=inst.uuid, hard=True), timeout=5)
    finally:
        await plain.close()
    assert [name for name, _ in node.calls if name == 'RebootInstance'] == []


async def test_a_console_token_is_checked_by_the_instances_node(system, tenant, node, controller):
    inst = await create_created(tenant)
    tenant_token, system_token = tenant.token, system.token
    ok = await node.node_control.AuthorizeConsole(pb.AuthorizeConsoleRequest(
        node='node1', instance_uuid=inst.uuid, token=tenant_token))
    assert ok.namespace == 'tenant'
    assert (await node.node_control.AuthorizeConsole(pb.AuthorizeConsoleRequest(
        node='node1', instance_uuid=inst.uuid, token=system_token))).namespace == 'system'
    # Another tenant's token sees nothing there.
    await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='other'))
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='other', key_name='k', key='other-key'))
    other = await Client(f'127.0.0.1:{controller.port}').login('other', 'other-key')
    try:
        async with raises(C.NOT_FOUND, 'NOT_FOUND'):
            await node.node_control.AuthorizeConsole(pb.AuthorizeConsoleRequest(
                node='node1', instance_uuid=inst.uuid, token=other.token))
    finally:
        await other.close()
    async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED'):
        await node.node_control.AuthorizeConsole(pb.AuthorizeConsoleRequest(
            node='node1', instance_uuid=inst.uuid, token='not-a-token'))


# -- etcd ----------------------------------------------------------------------------------------

async def test_etcd_takes_only_clients_of_the_etcd_ca(etcd, pki):
    good = await Store.connect([etcd.endpoint], prefix='/trust', tls=etcd.client_tls)
    try:
        assert await good.count('nothing/') == 0
    finally:
        await good.close()
    with pytest.raises(StoreError):
        plain = await Store.connect([etcd.endpoint], prefix='/trust', timeout=2)
        await plain.count('nothing/')
    # A node's certificate (the cluster CA) is not an etcd client.
    node = pki.node('node1')
    as_node = pkilib.EtcdTls(pki.etcd_client().ca, node.cert, node.key)
    with pytest.raises(StoreError):
        store = await Store.connect([etcd.endpoint], prefix='/trust', timeout=2, tls=as_node)
        await store.count('nothing/')
    # And by plain HTTPS with no client certificate, etcd's gateway answers nothing either.
    import http.client
    context = ssl.create_default_context(cafile=str(pki.etcd_client().ca))
    conn = http.client.HTTPSConnection('127.0.0.1', etcd.client_port, timeout=3, context=context)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        conn.request('POST', '/v3/kv/range', body='{"key": "Lw=="}')
        conn.getresponse().read()


# -- tokens ----------------------------------------------------------------------------------------

def _signing(controller):
    return {e.value.kid: e.value for e in controller.core.cache.range(keys.TOKEN_KEYS)[0]}


async def test_signing_keys_rotate_without_downtime(system, controller, tmp_path):
    before = system.token
    old_kid = jwt.get_unverified_header(before)['kid']
    new = await system.auth.RotateSigningKey(auth.RotateSigningKeyRequest())
    assert set(_signing(controller)) == {old_kid, new.kid} and new.earlier_keys == 1
    fresh = await Client(f'127.0.0.1:{controller.port}').login('system', (tmp_path / 'state' / 'system.key').read_text().strip())
    try:
        assert jwt.get_unverified_header(fresh.token)['kid'] == new.kid
        await fresh.instances.ListInstances(api.ListInstancesRequest())
        await system.instances.ListInstances(api.ListInstancesRequest())    # the old token still works
    finally:
        await fresh.close()


async def test_retired_signing_keys_go_once_no_token_they_signed_can_live(etcd, tmp_path):
    from sfcontrol import server
    from tests.conftest import controller_config, system_key
    from tests.helpers import ManualClock
    clock = ManualClock()
    ctl = await server.start(controller_config(etcd, tmp_path, clock=clock))
    c = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    try:
        first = jwt.get_unverified_header(c.token)['kid']
        clock.advance(10)
        second = await c.auth.RotateSigningKey(auth.RotateSigningKeyRequest())
        clock.advance(MAX_TOKEN_TTL + 1)
        third = await ctl.auth.rotate_signing_key(auth.RotateSigningKeyRequest())
        # first was retired when second was made, over MAX_TOKEN_TTL ago: gone. second
        # was retired just now: it stays to verify what it signed.
        assert set(_signing(ctl)) == {second.kid, third.kid}
        assert first not in _signing(ctl)
    finally:
        await c.close()
        await ctl.stop(None)


async def test_a_token_living_longer_than_the_cap_is_refused_even_if_well_signed(system, controller):
    signer = max(_signing(controller).values(), key=lambda k: k.created_at)
    claims = jwt.decode(system.token, options={'verify_signature': False})
    claims['exp'] = claims['iat'] + MAX_TOKEN_TTL + 1
    system.token = jwt.encode(claims, signer.secret, 'HS256', headers={'kid': signer.kid})
    async with raises(C.UNAUTHENTICATED, match='lives over'):
        await system.instances.ListInstances(api.ListInstancesRequest())


async def test_a_token_dies_with_its_namespace_even_if_one_of_that_name_comes_back(system, controller, node):
    target = f'127.0.0.1:{controller.port}'

    async def make():
        await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='again'))
        await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='again', key_name='k', key='same-key'))
    await make()
    old = await Client(target).login('again', 'same-key')
    try:
        await old.instances.ListInstances(api.ListInstancesRequest())
        await system.auth.DeleteNamespace(auth.DeleteNamespaceRequest(namespace='again'))
        await make()        # same namespace, same key name, same secret
        async with raises(C.UNAUTHENTICATED, match='deleted or set again'):
            await old.instances.ListInstances(api.ListInstancesRequest())
        await old.login('again', 'same-key')
        await old.instances.ListInstances(api.ListInstancesRequest())
    finally:
        await old.close()


async def test_revoking_earlier_keys_ends_every_token_at_once(system, tenant):
    rotated = await system.auth.RotateSigningKey(auth.RotateSigningKeyRequest(revoke_earlier=True))
    assert rotated.earlier_keys == 0
    for client in (system, tenant):
        async with raises(C.UNAUTHENTICATED, match='signing key'):
            await client.instances.ListInstances(api.ListInstancesRequest())
    await tenant.login('tenant', 'tenant-key')
    assert jwt.get_unverified_header(tenant.token)['kid'] == rotated.kid
    await tenant.instances.ListInstances(api.ListInstancesRequest())


async def test_only_system_rotates_signing_keys(tenant):
    async with raises(C.PERMISSION_DENIED, 'PERMISSION_DENIED'):
        await tenant.auth.RotateSigningKey(auth.RotateSigningKeyRequest())


def test_token_lifetimes_over_the_cap_are_refused_at_start():
    from sfcontrol.auth import Auth
    with pytest.raises(ValueError, match='token_ttl'):
        Auth(core=None, token_ttl=MAX_TOKEN_TTL + 1)
    with pytest.raises(ValueError, match='token_ttl'):
        Auth(core=None, token_ttl=0)


# -- logins ----------------------------------------------------------------------------------------

async def test_wrong_keys_are_limited_per_client_and_cost_no_scrypt_once_limited(controller, monkeypatch):
    from sfcontrol import auth as authlib
    calls = []
    real = authlib.hash_key
    monkeypatch.setattr(authlib, 'hash_key', lambda *a: calls.append(1) or real(*a))
    attacker = Client(f'127.0.0.1:{controller.port}')
    try:
        for _ in range(authlib.FAILURE_BURST):
            async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED', 'not recognised'):
                await attacker.login('system', 'wrong')
        spent = len(calls)
        async with raises(C.RESOURCE_EXHAUSTED, 'TOO_MANY_REQUESTS', 'retry in'):
            await attacker.login('system', 'wrong')
        assert len(calls) == spent              # refused before any scrypt
    finally:
        await attacker.close()


async def test_scrypt_runs_off_the_event_loop(system, controller, monkeypatch):
    """While a login's key hashing is stuck, other calls are served."""
    import asyncio
    import threading
    from sfcontrol import auth as authlib
    release = threading.Event()
    real = authlib.hash_key

    def slow(*a):
        release.wait(10)
        return real(*a)
    monkeypatch.setattr(authlib, 'hash_key', slow)
    other = Client(f'127.0.0.1:{controller.port}')
    login = asyncio.ensure_future(other.login('system', 'wrong'))
    try:
        await asyncio.wait_for(system.instances.ListInstances(api.ListInstancesRequest()), 5)
        assert not login.done()
    finally:
        release.set()
        await asyncio.gather(login, return_exceptions=True)
        await other.close()


# -- TLS for the public API and the gateway ---------------------------------------------------

def _server_bundle(pki, tmp_path):
    return pki.cluster.write_bundle(tmp_path / 'api', 'server', 'server:api', dns=['api.test'],
                                    ips=['127.0.0.1'])


async def test_the_public_api_and_gateway_speak_tls_and_plaintext_stays_on_loopback(etcd, pki, tmp_path):
    import dataclasses
    import aiohttp
    from gateway.app import start_gateway
    from sfcontrol import server
    from tests.conftest import controller_config, system_key
    bundle = _server_bundle(pki, tmp_path)
    config = controller_config(etcd, tmp_path, tls_cert=bundle.cert, tls_key=bundle.key)
    with pytest.raises(ValueError, match='plaintext'):
        await server.start(dataclasses.replace(config, tls_cert=None, tls_key=None, listen='0.0.0.0:0'))
    with pytest.raises(ValueError, match='plaintext'):
        await start_gateway('127.0.0.1:1', '0.0.0.0', 0)
    ctl = await server.start(config)
    try:
        target = f'127.0.0.1:{ctl.port}'
        tls = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(bundle.ca.read_bytes()))
        plain = grpc.aio.insecure_channel(target)
        try:
            health = tls.unary_unary('/grpc.health.v1.Health/Check',
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=lambda b: b)
            from grpc_health.v1 import health_pb2
            await health(health_pb2.HealthCheckRequest(), timeout=5)
            async with raises(C.UNAVAILABLE):
                await plain.unary_unary('/grpc.health.v1.Health/Check',
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=lambda b: b)(
                    health_pb2.HealthCheckRequest(), timeout=3)
        finally:
            await tls.close()
            await plain.close()
        runner, port = await start_gateway(target, '127.0.0.1', 0, tls_cert=str(bundle.cert),
                                           tls_key=str(bundle.key), grpc_ca=str(bundle.ca))
        try:
            context = ssl.create_default_context(cafile=str(bundle.ca))
            async with aiohttp.ClientSession() as http:
                async with http.post(f'https://127.0.0.1:{port}/auth', ssl=context, json={
                        'namespace': 'system', 'key': system_key(tmp_path)}) as r:
                    assert r.status == 200 and (await r.json())['access_token']
                with pytest.raises(aiohttp.ClientError):
                    async with http.get(f'http://127.0.0.1:{port}/') as r:
                        await r.read()
        finally:
            await runner.cleanup()
    finally:
        await ctl.stop(None)
