"""A hostile tenant on a real plane (sf-up: etcd, controller, gateway, a real sfnode
with a TCG guest of another namespace) tries every way around the API's checks:
host files and internal services as images, the node's port, the node API,
another tenant's console, etcd, replayed and forged tokens, uploads that fill the
disk. It gets nothing, and the plane's data files are the plane's alone."""

import asyncio
import json
import os
import socket
import ssl
import stat

import aiohttp
import grpc
import jwt
import pytest
import pytest_asyncio

from sfcommon import pki as pkilib
from shakenfist.node.v1alpha1 import node_pb2 as npb, node_pb2_grpc
from shakenfist.v1 import auth_service_pb2 as auth, blob_service_pb2 as b
from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api, specs_pb2
from tests.grpc_client import Client
from tests.helpers import raises
from tests.plane import Plane
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
C = grpc.StatusCode
BOOT = 90


@pytest.fixture(scope='module')
def plane():
    p = Plane(nodes=1).start()
    yield p
    p.stop()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def system(plane):
    c = await plane.client()
    yield c
    await c.close()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def victim(plane, system):
    """system's guest, running: what the tenant is after."""
    await system.instances.CreateInstance(api.CreateInstanceRequest(
        name='victim', cpus=1, memory=256, disk=[specs_pb2.DiskSpec(size=1, base='sftest')],
        video=specs_pb2.VideoSpec(model=specs_pb2.VIDEO_MODEL_VGA, memory=16384, vdi=specs_pb2.VDI_TYPE_VNC)))

    async def created():
        i = (await system.instances.GetInstance(api.GetInstanceRequest(instance_ref='victim'))).instance
        return i if i.state == pb.INSTANCE_STATE_CREATED and i.vdi_port else None
    inst = await eventually(created, BOOT, interval=0.25, what='the victim created')
    await eventually(lambda: 'SFTEST init: ready' in plane.console(inst.node, inst.uuid), BOOT,
                     interval=0.25, what='the victim booted')
    return inst


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def mallory(plane, system):
    await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='mallory'))
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(
        namespace='mallory', key_name='k', key='mallory-key'))
    c = await Client(plane.endpoints['grpc']).login('mallory', 'mallory-key')
    yield c
    await c.close()


def node_port(plane, name='node0') -> int:
    for line in (plane.state / f'{name}.log').read_text().splitlines():
        entry = json.loads(line) if line.startswith('{') else {}
        if entry.get('message') == 'node started':
            port = entry['port']
    return port


def etcd_port(plane) -> int:
    return json.loads((plane.state / 'etcd-ports.json').read_text())[0]


async def test_images_cannot_read_host_files_or_internal_services(plane, mallory, victim):
    system_key = plane.state / 'system.key'
    for base in (system_key.as_uri(), 'file:///etc/shadow', f'http://127.0.0.1:{etcd_port(plane)}/',
                 f'http://[::1]:{plane.endpoints["rest"].rsplit(":", 1)[1]}/', 'http://169.254.169.254/'):
        async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'disk[0].base'):
            await mallory.instances.CreateInstance(api.CreateInstanceRequest(
                name='thief', cpus=1, memory=64, disk=[specs_pb2.DiskSpec(size=1, base=base)]))
    # A name that resolves inward passes the controller, which cannot know; the node,
    # where the fetch happens, refuses it and the instance fails to build.
    rest_port = plane.endpoints['rest'].rsplit(':', 1)[1]
    sneaky = f'http://{socket.gethostname()}:{rest_port}/openapi.json'
    inst = (await mallory.instances.CreateInstance(api.CreateInstanceRequest(
        name='sneaky', cpus=1, memory=64, disk=[specs_pb2.DiskSpec(size=1, base=sneaky)]))).instance

    async def failed():
        i = (await mallory.instances.GetInstance(api.GetInstanceRequest(instance_ref=inst.uuid))).instance
        return i if i.state in (pb.INSTANCE_STATE_ERROR, pb.INSTANCE_STATE_PREFLIGHT_ERROR) else None
    gone = await eventually(failed, 60, interval=0.25, what='the sneaky instance refused by the node')
    assert 'internal addresses' in gone.error_message
    cache = plane.state / 'nodes' / 'node0' / 'images' / 'content'
    assert not any(b'openapi' in f.read_bytes()[:4096] for f in cache.iterdir() if f.is_file())


async def test_the_node_port_takes_no_call_but_the_controllers(plane, mallory, victim):
    target = f'127.0.0.1:{node_port(plane)}'
    reboot = npb.RebootInstanceRequest(instance_uuid=victim.uuid, hard=True)
    plain = grpc.aio.insecure_channel(target)
    try:
        async with raises(C.UNAVAILABLE):
            await node_pb2_grpc.NodeServiceStub(plain).RebootInstance(
                reboot, timeout=5, metadata=(('authorization', f'Bearer {mallory.token}'),))
    finally:
        await plain.close()
    # Even with a real node certificate of this plane (a stolen one), no.
    ca, cert, key = pkilib.LocalPki(plane.state / 'pki').node('node0').read()
    tls = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=[
        ('grpc.ssl_target_name_override', pkilib.node_server_name('node0'))])
    try:
        async with raises(C.PERMISSION_DENIED):
            await node_pb2_grpc.NodeServiceStub(tls).RebootInstance(reboot, timeout=5)
        # ... and that certificate is not a way into the public API either.
        listing = tls.unary_unary('/shakenfist.v1.InstanceService/ListInstances',
                                  request_serializer=api.ListInstancesRequest.SerializeToString,
                                  response_deserializer=api.ListInstancesResponse.FromString)
        async with raises(C.UNIMPLEMENTED):     # that port is the node's: it serves no public API
            await listing(api.ListInstancesRequest(), timeout=5)
    finally:
        await tls.close()
    # The controller's node API takes no token.
    async with raises(C.UNAUTHENTICATED, 'UNAUTHENTICATED', 'node certificate'):
        await mallory.node_control.ReportInstanceStatus(npb.ReportInstanceStatusRequest(
            node='node0', instance_uuid=victim.uuid, power_state=pb.POWER_STATE_OFF))
    assert (await mallory_cannot_see(mallory, victim))


async def mallory_cannot_see(mallory, victim) -> bool:
    async with raises(C.NOT_FOUND):
        await mallory.instances.GetInstance(api.GetInstanceRequest(instance_ref=victim.uuid))
    return True


async def test_consoles_of_others_are_closed(plane, mallory, victim):
    reader, writer = await asyncio.open_connection('127.0.0.1', victim.console_port)
    try:
        await asyncio.wait_for(reader.readuntil(b'Token: '), 10)
        writer.write(mallory.token.encode() + b'\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert b'may not use this console' in answer and b'SFTEST' not in answer
    finally:
        writer.close()
    # VNC asks for the instance's password: "None" is not among the security types.
    reader, writer = await asyncio.open_connection('127.0.0.1', victim.vdi_port)
    try:
        version = await asyncio.wait_for(reader.readexactly(12), 10)
        assert version.startswith(b'RFB ')
        writer.write(b'RFB 003.008\n')
        await writer.drain()
        count = (await asyncio.wait_for(reader.readexactly(1), 10))[0]
        types = set(await reader.readexactly(count))
        assert 1 not in types and 2 in types        # 1: None, 2: VNC authentication
    finally:
        writer.close()
    # The .vv helper carries the password, for the instance's owner only.
    async with raises(C.NOT_FOUND):
        await mallory.instances.GetVdiConsoleHelper(api.GetVdiConsoleHelperRequest(instance_ref=victim.uuid))


async def test_etcd_is_closed_to_everybody_but_the_controller(plane):
    port = etcd_port(plane)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.post(f'http://127.0.0.1:{port}/v3/kv/range', json={'key': 'Lw=='}) as r:
                await r.read()
                assert r.status != 200
        context = ssl.create_default_context(cafile=str(plane.state / 'pki' / 'ca' / 'etcd-ca.pem'))
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            async with http.post(f'https://127.0.0.1:{port}/v3/kv/range', json={'key': 'Lw=='},
                                 ssl=context) as r:
                await r.read()


async def test_tokens_cannot_be_replayed_or_forged(plane, system, mallory):
    old = mallory.token
    await system.auth.DeleteNamespaceKey(auth.DeleteNamespaceKeyRequest(namespace='mallory', key_name='k'))
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(
        namespace='mallory', key_name='k', key='mallory-key'))     # the same name and secret again
    async with raises(C.UNAUTHENTICATED):
        await mallory.instances.ListInstances(api.ListInstancesRequest())
    claims = jwt.decode(old, options={'verify_signature': False})
    for forged in (jwt.encode({**claims, 'sub': 'system:deploy'}, 'guess', 'HS256',
                              headers={'kid': jwt.get_unverified_header(old)['kid']}),
                   jwt.encode({**claims, 'sub': 'system:deploy'}, None, 'none'),
                   jwt.encode({**claims, 'exp': claims['iat'] + 10 ** 8}, 'x', 'HS256')):
        mallory.token = forged
        async with raises(C.UNAUTHENTICATED):
            await mallory.instances.ListInstances(api.ListInstancesRequest())
    await mallory.login('mallory', 'mallory-key')


async def test_uploads_cannot_fill_the_disk(plane, mallory):
    up = (await mallory.uploads.CreateUpload(b.CreateUploadRequest())).upload.uuid
    for offset in (2 ** 40, 2 ** 63 - 2):
        async with raises(C.INVALID_ARGUMENT):
            await mallory.uploads.TruncateUpload(b.TruncateUploadRequest(upload_uuid=up, offset=offset))
    path = plane.state / 'blobs' / 'uploads' / up
    assert path.stat().st_size == 0 and path.stat().st_blocks == 0


async def test_the_planes_files_are_its_own(plane, victim):
    """Keys, disks, consoles, blobs and the image cache: no access for group or others."""
    roots = [plane.state / 'system.key', plane.state / 'blobs', plane.state / 'pki',
             plane.state / 'nodes' / 'node0' / 'instances' / victim.uuid,
             plane.state / 'nodes' / 'node0' / 'images']
    exposed = []
    for root in roots:
        for path in [root, *(root.rglob('*') if root.is_dir() else [])]:
            if path.is_symlink() or path.is_socket():
                continue
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077 and not path.name.endswith('.pem'):       # certificates are public
                exposed.append(f'{path}: {oct(mode)}')
    assert not exposed, exposed
    assert os.stat(plane.state).st_mode & 0o077 == 0
