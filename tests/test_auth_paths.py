"""Auth on every REST path: expired, forged and missing tokens are 401 everywhere
but the two public calls; another namespace's objects are 404 (exactly as a
missing object), never 403; keys never reach a log line or etcd in clear."""

import dataclasses
import json
import logging
import secrets
import time
import urllib.parse
import uuid

import jwt
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pool

from gateway.app import start_gateway
from sfcommon.clock import SystemClock
from sfcommon.logs import JsonFormatter
from sfcontrol import server
from shakenfist.v1 import agent_operation_service_pb2 as aop, auth_service_pb2 as auth
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api, wire_pb2
from tests import schema_index
from tests.conftest import controller_config, system_key
from tests.grpc_client import Client
from tests.helpers import create_created
from tests.test_bad_input import (differences, error_model_problems, fill, login,
                                  make_world, report, send, snapshot, variables)

PUBLIC = {('GET', '/'), ('POST', '/auth')}
# Path variables that name an object (the others are a metadata key, an offset
# and the name of an artifact to create).
OBJECTS = {'instance_ref', 'network_ref', 'network_uuid', 'interface_uuid', 'agent_operation_uuid',
           'blob_uuid', 'sha512', 'upload_uuid', 'namespace', 'key_name'}


def routes():
    """(verb, template, access) of every binding; access from the schema's option."""
    from tests.test_bad_input import load_generated_modules
    load_generated_modules()
    pool = descriptor_pool.Default()
    out = []
    for verb, template, name in schema_index.routes():
        access = pool.FindMethodByName(name).GetOptions().Extensions[wire_pb2.access]
        out.append((verb, template, access or wire_pb2.ACCESS_NAMESPACE))
    return out


def body_for(verb, template, values):
    """A body that gets a request past parsing to the object lookup."""
    if template == '/upload/{upload_uuid}':
        return b'some bytes'
    body = {
        ('POST', '/instances/{instance_ref}/agent/execute'): {'command_line': 'id'},
        ('POST', '/instances/{instance_ref}/agent/exec'): {'command_line': 'id'},
        ('POST', '/instances/{instance_ref}/agent/put'): {'blob_uuid': values['blob_uuid'][0], 'path': '/x'},
        ('POST', '/instances/{instance_ref}/agent/get'): {'path': '/x'},
        ('POST', '/instances/{instance_ref}/interfaces'): {'network': {'network_uuid': values['network_uuid'][0]}},
        ('POST', '/artifacts/upload/{name}'): {'upload_uuid': values['upload_uuid'][0]},
        ('POST', '/auth'): {'namespace': 'system', 'key': values['system_key'][0]},
    }.get((verb, template))
    if verb == 'PUT' and template.endswith('/metadata/{key}'):
        body = {'value': 'x'}
    elif verb == 'POST' and template.endswith('/metadata'):
        body = {'key': 'k', 'value': 'x'}
    return json.dumps(body).encode() if body is not None else None


# --------------------------------------------------------------------- fixtures

@pytest.fixture
def config(etcd, tmp_path):
    return controller_config(etcd, tmp_path, heartbeat_timeout=3600)


@pytest_asyncio.fixture
async def controller(config):
    """As conftest's, with its config at hand to start a second controller on the
    same state."""
    ctl = await server.start(config)
    yield ctl
    await ctl.stop(None)


@pytest_asyncio.fixture
async def http():
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest_asyncio.fixture
async def world(controller, gateway, system, tenant, node, http, tmp_path):
    w = await make_world(controller, gateway, system, tenant, node, http, tmp_path, agentop=True)
    w.values['system_key'] = [system_key(tmp_path)]
    return w


@pytest_asyncio.fixture
async def expiring_gateway(config, controller):
    """A second controller on the same etcd prefix whose clock is behind by more than
    its tokens live (their expiry has passed for everybody else), and a gateway in front."""
    ctl = await server.start(dataclasses.replace(config, token_ttl=60, clock=SystemClock(skew=-120)))
    runner, port = await start_gateway(f'127.0.0.1:{ctl.port}', '127.0.0.1', 0)
    yield f'http://127.0.0.1:{port}'
    await runner.cleanup()
    await ctl.stop(None)


# ------------------------------------------------------------------ 401 paths

async def every_path_with(http, base, world, token, words, headers=None):
    """Problems with the answers of every binding to a bad token."""
    found = []
    for verb, template, _ in routes():
        path = world.path(template)
        body = body_for(verb, template, world.values)
        status, h, raw = await send(http, base, verb, path, body=body, token=token, headers=headers)
        where = f'{verb} {template}'
        text = raw.decode('utf-8', 'replace')
        if (verb, template) in PUBLIC:
            if status != 200:
                found.append(f'{where}: public, yet {status}: {text[:200]}')
            continue
        if status != 401:
            found.append(f'{where}: {status}, not 401: {text[:200]}')
            continue
        found += error_model_problems(status, h, raw, where)
        message = json.loads(raw)['error']
        if not any(w in message for w in words):
            found.append(f'{where}: message {message!r} does not say {words}')
        if 'Traceback' in text:
            found.append(f'{where}: a traceback')
    return found


async def test_the_public_calls_are_exactly_capabilities_and_login():
    assert {(v, t) for v, t, a in routes() if a == wire_pb2.ACCESS_PUBLIC} == PUBLIC


async def test_an_expired_token_is_401_on_every_path(world, http, expiring_gateway):
    token = await login(http, expiring_gateway, 'system', world.values['system_key'][0])
    claims = jwt.decode(token, options={'verify_signature': False})
    assert claims['exp'] <= time.time()
    # The controllers share the signing keys: the other one checks the token.
    found = await every_path_with(http, world.base, world, token, ['expired'])
    assert not found, report(found)


async def test_a_forged_or_missing_token_is_401_on_every_path(world, http):
    claims = {'sub': 'system:deploy', 'iss': 'shakenfist', 'iat': int(time.time()),
              'exp': int(time.time()) + 600}
    forged = jwt.encode(claims, 'not-the-secret-' + secrets.token_hex(16), 'HS256')
    found = await every_path_with(http, world.base, world, forged, ['not valid'])
    unsigned = jwt.encode(claims, None, 'none')  # alg "none": no signature at all
    found += await every_path_with(http, world.base, world, unsigned, ['not valid'])
    found += await every_path_with(http, world.base, world, None, ['needs a token'])
    found += await every_path_with(http, world.base, world, None, ['Bearer <token>'],
                                   headers={'Authorization': f'Basic {world.token}'})
    assert not found, report(found)
    # The genuine token still works: the 401s were about the tokens.
    status, _, _ = await send(http, world.base, 'GET', '/instances', token=world.token)
    assert status == 200


# -------------------------------------------------------- foreign namespace

def foreign_requests(world):
    """(verb, template, path with system's objects, path with missing ones, query, body)."""
    missing = {k: ([str(uuid.uuid4())] if k in OBJECTS else v) for k, v in world.values.items()}
    missing['sha512'] = ['00' * 64]
    out = []
    for verb, template, access in routes():
        if access == wire_pb2.ACCESS_SYSTEM or (verb, template) in PUBLIC:
            continue
        names = variables(template)
        refers = [n for n in names if n in OBJECTS]
        if not refers and template != '/artifacts/upload/{name}':
            continue  # lists and creates: the caller's own namespace, checked below
        for pick in (0, 1):  # by UUID, and by name where objects have one
            if pick and not any(len(world.values.get(n, ())) > 1 for n in refers):
                continue
            out.append((verb, template, fill(template, world.values, pick), fill(template, missing),
                        '', body_for(verb, template, world.values), body_for(verb, template, missing)))
    ref = world.values['instance_ref'][0]
    for verb, template, query in [
            ('GET', '/events:watch', f'object_type=instance&object_ref={ref}'),
            ('GET', '/instances/{instance_ref}', 'namespace=system'),
            ('GET', '/networks/{network_ref}', 'namespace=system')]:
        out.append((verb, template, fill(template, world.values), fill(template, missing, 0), query,
                    None, None))
    out[-3:] = [(v, t, p, m, q.replace(ref, missing['instance_ref'][0]) if 'object_ref' in q else q, b, mb)
                for v, t, p, m, q, b, mb in out[-3:]]
    return out


async def test_another_namespaces_objects_are_404_never_403(world, http):
    tenant_token = await login(http, world.base, 'tenant', 'tenant-key')
    before = await snapshot(http, world)
    found, checked = [], set()
    for verb, template, path, missing_path, query, body, missing_body in foreign_requests(world):
        where = f'{verb} {path}?{query}'
        status, h, raw = await send(http, world.base, verb, path, body=body, query=query,
                                    token=tenant_token)
        m_query = query
        m_status, m_h, m_raw = await send(http, world.base, verb, missing_path, body=missing_body,
                                          query=m_query, token=tenant_token)
        checked.add((verb, template))
        if template == '/blob_checksums/sha512/{sha512}':
            # A lookup by hash answers null for what the caller may not see.
            if (status, raw) != (200, b'null') or (m_status, m_raw) != (200, b'null'):
                found.append(f'{where}: {status} {raw[:200]!r} (missing: {m_status} {m_raw[:100]!r})')
            continue
        if status != 404:
            found.append(f'{where}: {status}, not 404: {raw[:200]!r}')
            continue
        found += error_model_problems(status, h, raw, where)
        message = json.loads(raw)['error']
        if 'permission' in message.lower() or 'system' in message:
            found.append(f'{where}: message {message!r} hints at the owner')
        # Indistinguishable from an object that does not exist at all.
        same = message
        for p, q in zip(path.split('/'), missing_path.split('/')):
            same = same.replace(urllib.parse.unquote(p), urllib.parse.unquote(q)) if p != q else same
        if m_status != 404 or json.loads(m_raw)['error'] != same:
            found.append(f'{where}: {message!r}; a missing object: {m_status} {m_raw[:200]!r}')
    assert not found, report(found)
    # Every binding that names an object was tried.
    object_bindings = {(v, t) for v, t, a in routes() if a != wire_pb2.ACCESS_SYSTEM
                       and (v, t) not in PUBLIC and set(variables(t)) & OBJECTS}
    assert object_bindings <= checked
    # Lists show the tenant nothing of system's, and nothing of system's changed.
    for path in ('/instances?all=true', '/networks?all=true'):
        status, _, raw = await send(http, world.base, 'GET', path, token=tenant_token)
        assert status == 200 and json.loads(raw) == []
    changed = differences(before, await snapshot(http, world))
    assert not changed, report(changed)


async def test_another_namespaces_blob_cannot_be_put_into_my_instance(world, http, tenant, node):
    """PutFile names a blob in its body: one of another namespace is NOT_FOUND,
    as a missing one, and not copied into the caller's own instance."""
    mine = await create_created(tenant, 'mine')
    await node.report(mine.uuid, agent_state=instance_pb2.AGENT_STATE_READY)
    tenant_token = await login(http, world.base, 'tenant', 'tenant-key')
    answers = []
    for blob_uuid in (world.values['blob_uuid'][0], str(uuid.uuid4())):
        status, _, raw = await send(http, world.base, 'POST', f'/instances/{mine.uuid}/agent/put',
                                    body=json.dumps({'blob_uuid': blob_uuid, 'path': '/x'}).encode(),
                                    token=tenant_token)
        answers.append((status, json.loads(raw)))
    assert answers[0] == answers[1] == (404, {'error': 'blob not found', 'status': 404})
    ops = await tenant.agentops.ListInstanceAgentOperations(aop.ListInstanceAgentOperationsRequest(
        instance_ref=mine.uuid, all=True))
    assert not ops.agent_operations
    # The tenant's own blob works (its instance's screenshot).
    shot = (await tenant.instances.GetScreenshot(api.GetScreenshotRequest(instance_ref=mine.uuid))).blob_uuid
    status, _, raw = await send(http, world.base, 'POST', f'/instances/{mine.uuid}/agent/put',
                                body=json.dumps({'blob_uuid': shot, 'path': '/x'}).encode(),
                                token=tenant_token)
    assert status == 200, raw


async def test_namespace_management_is_403_for_other_namespaces(world, http):
    tenant_token = await login(http, world.base, 'tenant', 'tenant-key')
    found = []
    for verb, template, access in routes():
        if access != wire_pb2.ACCESS_SYSTEM:
            continue
        path = fill(template, {'namespace': ['tenant'], 'key_name': ['k1']})
        body = {'/auth/namespaces': {'namespace': 'x'},
                '/auth/namespaces/{namespace}/keys': {'key_name': 'k1', 'key': 'v'}}.get(template) \
            if verb in ('POST', 'PUT') else None
        body = json.dumps(body).encode() if body is not None else None
        status, h, raw = await send(http, world.base, verb, path, body=body, token=tenant_token)
        if status != 403:
            found.append(f'{verb} {template}: {status}: {raw[:200]!r}')
        found += error_model_problems(status, h, raw, f'{verb} {template}')
    assert not found, report(found)


# ------------------------------------------------------------------- secrets

def log_text(record):
    """Everything a handler could write for a record: message, extras, exception."""
    return JsonFormatter('test').format(record) + record.getMessage() + repr(record.args)


async def test_keys_are_never_logged_and_stored_only_hashed(etcd, tmp_path, caplog, http):
    caplog.set_level(logging.DEBUG)
    tenant_secret = 'tenant-' + secrets.token_urlsafe(24)
    rotated = 'rotated-' + secrets.token_urlsafe(24)
    ctl = await server.start(controller_config(etcd, tmp_path))
    runner, port = await start_gateway(f'127.0.0.1:{ctl.port}', '127.0.0.1', 0)
    base = f'http://127.0.0.1:{port}'
    grpc_client = Client(f'127.0.0.1:{ctl.port}')
    try:
        key = system_key(tmp_path)
        token = await login(http, base, 'system', key)
        # REST: a namespace and its key (idempotent, with a request_id), logins
        # right and wrong, a rotation, and a use of each token.
        for verb, path, body in [
                ('POST', '/auth/namespaces', {'namespace': 'logs'}),
                ('POST', '/auth/namespaces/logs/keys',
                 {'key_name': 'k1', 'key': tenant_secret, 'request_id': 'r-1'}),
                ('POST', '/auth/namespaces/logs/keys',
                 {'key_name': 'k1', 'key': tenant_secret, 'request_id': 'r-1'}),
                ('POST', '/auth/namespaces/logs/keys', {'key_name': 'k1', 'key': tenant_secret}),
                ('POST', '/auth/namespaces/logs/keys', {'key_name': 'bad name!', 'key': tenant_secret}),
                ('GET', '/auth/namespaces/logs/keys', None)]:
            await send(http, base, verb, path, body=json.dumps(body).encode() if body else None, token=token)
        tenant_token = await login(http, base, 'logs', tenant_secret)
        for namespace, wrong in [('logs', tenant_secret + 'x'), ('system', tenant_secret),
                                 ('nope', key), ('logs', key)]:
            status, _, _ = await send(http, base, 'POST', '/auth',
                                      body=json.dumps({'namespace': namespace, 'key': wrong}).encode())
            assert status == 401
        status, _, _ = await send(http, base, 'POST', '/auth', body=b'{"namespace": "logs", "key": 5}')
        assert status == 400
        status, _, _ = await send(http, base, 'GET', '/instances', token=tenant_token)
        assert status == 200
        status, _, _ = await send(http, base, 'PUT', '/auth/namespaces/logs/keys', token=token,
                                  body=json.dumps({'key_name': 'k1', 'key': rotated}).encode())
        assert status == 200
        # gRPC: the same, directly.
        await grpc_client.login('system', key)
        await grpc_client.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(
            namespace='logs', key_name='k2', key=tenant_secret, request_id='r-2'))
        rotated_client = await Client(f'127.0.0.1:{ctl.port}').login('logs', rotated)
        await rotated_client.close()
        await grpc_client.auth.UpdateNamespaceKey(auth.UpdateNamespaceKeyRequest(
            namespace='logs', key_name='k2', key=rotated))

        stored = await ctl.core.store.get_prefix('')
        assert any(k.startswith('namespace-keys/logs/') for k, _, _ in stored)
        assert any(k.startswith('requests/') for k, _, _ in stored)  # the request_id record
        for k, value, _ in stored:
            for s in (tenant_secret, rotated, key):
                if s.encode() in value or s in k:
                    pytest.fail(f'a key in clear in etcd, at {k}')
    finally:
        await grpc_client.close()
        await runner.cleanup()
        await ctl.stop(None)
    assert len(caplog.records) > 0
    for record in caplog.records:
        text = log_text(record)
        for s in (tenant_secret, rotated, key):
            if s in text:  # (pytest.fail: an assert would print the key)
                pytest.fail(f'a key in a {record.levelname} log record of {record.name}')
