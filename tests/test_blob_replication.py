"""Nothing acknowledged is lost with one controller: blob bytes are on two controllers
before a blob is acknowledged, any controller serves any blob, and when a controller
dies the others copy what it held again (sfcontrol/replicas.py).

Every controller here is real and shares one etcd prefix; each has a state directory
of its own. A controller is killed as a crashed one would leave: its server stops
with no grace, its holder lease is not revoked (it expires), and its state directory
is removed, so nothing can be read from it afterwards."""

import contextlib
import dataclasses
import hashlib
import os
import shutil

import grpc
import pytest_asyncio

from sfcommon import pki as pkilib
from sfcontrol import server
from sfcontrol.store import keys
from sfcontrol.store.etcd import StoreError
from shakenfist.peer.v1alpha1 import blob_peer_pb2 as peer
from shakenfist.peer.v1alpha1 import blob_peer_pb2_grpc
from shakenfist.v1 import blob_service_pb2 as b
from shakenfist.v1 import instance_service_pb2 as api
from tests.conftest import controller_config
from tests.grpc_client import Client
from tests.helpers import create_created, raises, wait_state
from tests.node_double import NodeApi, NodeDouble
from tests.test_blobs import read, upload
from tests.waiting import eventually

TTL = 2     # seconds a killed controller still counts as a holder


class Plane:
    """Controllers on one etcd prefix, started and killed by name."""

    def __init__(self, etcd, tmp_path):
        self.etcd, self.tmp_path = etcd, tmp_path
        self.prefix = controller_config(etcd, tmp_path).store_prefix
        self.controllers: dict[str, server.Controller] = {}
        self.clients: dict[str, Client] = {}
        self.system_key = ''     # written by the first controller
        self.killed_leases: list[int] = []

    def state(self, name):
        return self.tmp_path / name / 'state'

    def bytes_on(self, name, blob_uuid) -> bytes | None:
        """The blob's bytes in controller name's state directory, if it has them."""
        path = self.state(name) / 'blobs' / 'blobs' / blob_uuid
        return path.read_bytes() if path.exists() else None

    async def start(self, name, **overrides) -> Client:
        config = dataclasses.replace(controller_config(self.etcd, self.tmp_path / name),
                                     store_prefix=self.prefix, blob_holder_ttl=TTL, **overrides)
        ctl = self.controllers[name] = await server.start(config)
        self.system_key = self.system_key or (self.state(name) / 'system.key').read_text().strip()
        self.clients[name] = await Client(f'127.0.0.1:{ctl.port}').login('system', self.system_key)
        return self.clients[name]

    async def kill(self, name):
        await self.clients.pop(name).close()
        ctl = self.controllers.pop(name)
        self.killed_leases.append(ctl.blobs.replicas.lease)
        await ctl.stop(None, hand_off=False)
        shutil.rmtree(self.tmp_path / name)

    def holders_of(self, name, blob_uuid) -> set[str]:
        """The holders etcd lists for the blob, as controller name sees them."""
        cache = self.controllers[name].core.cache
        return {e.value.holder for e in cache.range(keys.blob_locations(blob_uuid))[0]}

    def holder_id(self, name) -> str:
        return self.controllers[name].blobs.replicas.id

    async def close(self):
        # A killed controller's lease would expire after the test, a write to the shared
        # etcd that later tests' controllers would see the revision of but no event for.
        for lease in self.killed_leases:
            with contextlib.suppress(StoreError):
                await next(iter(self.controllers.values())).core.store.revoke(lease)
        for client in self.clients.values():
            await client.close()
        for ctl in self.controllers.values():
            await ctl.stop(None)


@pytest_asyncio.fixture
async def plane(etcd, tmp_path):
    p = Plane(etcd, tmp_path)
    yield p
    await p.close()


async def test_blobs_taken_by_a_controller_that_dies_are_read_byte_exact_through_another(plane, pki):
    a = await plane.start('a')
    b_client = await plane.start('b')
    node = await NodeDouble(NodeApi.of(plane.controllers['a'], pki)).start()
    try:
        await create_created(a)
        screenshot = (await a.instances.GetScreenshot(api.GetScreenshotRequest(instance_ref='inst1'))).blob_uuid
    finally:
        await node.stop()
    data = os.urandom(3 * 1024 * 1024 + 5)
    art = await upload(a, data)

    # Acknowledged means on both: the taker pushed its copy before answering.
    for blob_uuid, content in ((art.blob_uuid, data), (screenshot, node.screen)):
        assert plane.bytes_on('b', blob_uuid) == content
        blob = (await b_client.blobs.GetBlob(b.GetBlobRequest(blob_uuid=blob_uuid))).blob
        assert set(blob.locations) == {plane.holder_id('a'), plane.holder_id('b')}
    # Copies are not usage: each blob counts once against its namespace.
    assert plane.controllers['b'].blobs.usage('system') == len(data) + len(node.screen)

    await plane.kill('a')
    assert await read(b_client, art.blob_uuid) == data
    assert await read(b_client, screenshot) == node.screen
    assert await read(b_client, art.blob_uuid, offset=1000, limit=5000) == data[1000:6000]


async def test_a_controller_without_a_blob_streams_it_from_a_holder_and_keeps_a_copy(plane):
    clients = {name: await plane.start(name) for name in 'abc'}
    data = os.urandom(2 * 1024 * 1024 + 11)
    art = await upload(clients['a'], data)
    holders = plane.holders_of('a', art.blob_uuid)
    assert len(holders) == 2 and plane.holder_id('a') in holders     # two copies, not three
    (other,) = [n for n in 'bc' if plane.holder_id(n) not in holders]
    assert plane.bytes_on(other, art.blob_uuid) is None

    # A range is read through, and not kept.
    assert await read(clients[other], art.blob_uuid, offset=7, limit=100_000) == data[7:100_007]
    assert plane.bytes_on(other, art.blob_uuid) is None
    # A whole read keeps a copy, which etcd then lists.
    assert await read(clients[other], art.blob_uuid) == data
    assert plane.bytes_on(other, art.blob_uuid) == data
    await eventually(lambda: plane.holder_id(other) in plane.holders_of('a', art.blob_uuid),
                     what='the new copy recorded')


async def test_deleting_a_blob_removes_its_bytes_and_locations_on_every_holder(plane, pki):
    a = await plane.start('a')
    b_client = await plane.start('b')
    node = await NodeDouble(NodeApi.of(plane.controllers['a'], pki)).start()
    try:
        inst = await create_created(a)
        blob_uuid = (await a.instances.GetScreenshot(api.GetScreenshotRequest(instance_ref='inst1'))).blob_uuid
        assert plane.bytes_on('a', blob_uuid) == plane.bytes_on('b', blob_uuid) == node.screen
        await b_client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='inst1'))
        await wait_state(b_client, inst.uuid, 6)
    finally:
        await node.stop()
    async with raises(grpc.StatusCode.NOT_FOUND):
        await b_client.blobs.GetBlob(b.GetBlobRequest(blob_uuid=blob_uuid))
    await eventually(lambda: plane.bytes_on('a', blob_uuid) is plane.bytes_on('b', blob_uuid) is None,
                     what='the bytes removed on both')
    assert plane.holders_of('a', blob_uuid) == plane.holders_of('b', blob_uuid) == set()


async def test_a_controller_joining_after_one_died_gets_a_copy_of_what_it_left(plane):
    a = await plane.start('a')
    await plane.start('b')
    data = os.urandom(1024 * 1024 + 1)
    art = await upload(a, data)
    await plane.kill('a')
    # Once the dead controller's lease expires, one copy is left, on b.
    await eventually(lambda: plane.holders_of('b', art.blob_uuid) == {plane.holder_id('b')},
                     timeout=TTL * 10, what="the dead controller's location gone")

    await plane.start('c')
    await eventually(lambda: plane.bytes_on('c', art.blob_uuid) == data, timeout=15,
                     what='a copy made on the new controller')
    await eventually(lambda: plane.holders_of('c', art.blob_uuid) == {plane.holder_id('b'),
                                                                    plane.holder_id('c')},
                     what='the copy recorded')
    # And it is a copy that counts: b can go too.
    await plane.kill('b')
    assert await read(plane.clients['c'], art.blob_uuid) == data


async def test_only_a_controller_certificate_may_call_the_peer_service(plane, pki):
    await plane.start('a')
    ctl = plane.controllers['a']
    request = peer.PullBlobRequest(blob_uuid='00000000-0000-0000-0000-000000000000')

    async def pull(channel):
        async with channel:
            async for _ in blob_peer_pb2_grpc.BlobPeerServiceStub(channel).PullBlob(request):
                pass
    ca, cert, key = pki.node('node1').read()
    as_node = grpc.aio.secure_channel(f'127.0.0.1:{ctl.node_port}', grpc.ssl_channel_credentials(ca, key, cert),
                                      options=[('grpc.ssl_target_name_override', pkilib.CONTROLLER_SERVER_NAME)])
    async with raises(grpc.StatusCode.PERMISSION_DENIED):
        await pull(as_node)
    async with raises(grpc.StatusCode.UNAUTHENTICATED):
        await pull(grpc.aio.insecure_channel(f'127.0.0.1:{ctl.port}'))
    ca, cert, key = pki.controller().read()
    as_controller = grpc.aio.secure_channel(
        f'127.0.0.1:{ctl.node_port}', grpc.ssl_channel_credentials(ca, key, cert),
        options=[('grpc.ssl_target_name_override', pkilib.CONTROLLER_SERVER_NAME)])
    async with raises(grpc.StatusCode.NOT_FOUND):
        await pull(as_controller)


async def test_a_push_whose_bytes_are_not_its_header_keeps_nothing(plane, pki):
    await plane.start('a')
    ctl = plane.controllers['a']
    ca, cert, key = pki.controller().read()
    blob_uuid = '11111111-2222-3333-4444-555555555555'

    async def messages():
        yield peer.PushBlobRequest(header=peer.PushBlobHeader(
            blob_uuid=blob_uuid, size=5, sha512=hashlib.sha512(b'right').hexdigest()))
        yield peer.PushBlobRequest(data=b'wrong')
    channel = grpc.aio.secure_channel(
        f'127.0.0.1:{ctl.node_port}', grpc.ssl_channel_credentials(ca, key, cert),
        options=[('grpc.ssl_target_name_override', pkilib.CONTROLLER_SERVER_NAME)])
    async with channel, raises(grpc.StatusCode.INVALID_ARGUMENT):
        await blob_peer_pb2_grpc.BlobPeerServiceStub(channel).PushBlob(messages())
    assert plane.bytes_on('a', blob_uuid) is None
    assert list((plane.state('a') / 'blobs' / 'partial').iterdir()) == []


async def test_an_open_upload_is_written_only_through_the_controller_that_holds_it(plane):
    a = await plane.start('a')
    b_client = await plane.start('b')
    up = (await a.uploads.CreateUpload(b.CreateUploadRequest())).upload

    async def chunk(data):
        m = b.WriteUploadRequest(upload_uuid=up.uuid)
        m.data.data = data
        yield m
    assert (await a.uploads.WriteUpload(chunk(b'first'))).size == 5
    async with raises(grpc.StatusCode.UNAVAILABLE, match='held by another controller'):
        await b_client.uploads.WriteUpload(chunk(b'second'))
    async with raises(grpc.StatusCode.UNAVAILABLE):
        await b_client.artifacts.UploadArtifact(b.UploadArtifactRequest(name='u', upload_uuid=up.uuid))
    art = (await a.artifacts.UploadArtifact(b.UploadArtifactRequest(name='u', upload_uuid=up.uuid))).artifact
    assert await read(b_client, art.blob_uuid) == b'first'
