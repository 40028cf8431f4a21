"""Blobs, uploads and artifacts; blobs stored by nodes and by screenshots; references."""

import hashlib
import os

import grpc

from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import agent_operation_service_pb2 as aop
from shakenfist.v1 import blob_service_pb2 as b, instance_pb2, instance_service_pb2 as api
from tests.helpers import create_created, raises, wait_state


async def upload(client, data: bytes, name='file', chunk=100_000):
    up = (await client.uploads.CreateUpload(b.CreateUploadRequest())).upload

    async def messages():
        for i in range(0, len(data), chunk):
            m = b.WriteUploadRequest(upload_uuid=up.uuid)
            m.data.data = data[i:i + chunk]
            yield m
    r = await client.uploads.WriteUpload(messages())
    assert r.size == len(data)
    art = await client.artifacts.UploadArtifact(b.UploadArtifactRequest(name=name, upload_uuid=up.uuid))
    return art.artifact


async def read(client, blob_uuid, **kw):
    out = b''
    async for part in client.blobs.ReadBlobData(b.ReadBlobDataRequest(blob_uuid=blob_uuid, **kw)):
        out += part.data.data
    return out


async def test_an_upload_becomes_a_blob_readable_by_offset_and_limit(system):
    data = os.urandom(3 * 1024 * 1024 + 17)
    art = await upload(system, data)
    assert art.blob_uuid and art.name == 'file' and art.index == 1
    blob = (await system.blobs.GetBlob(b.GetBlobRequest(blob_uuid=art.blob_uuid))).blob
    assert blob.size == len(data) and blob.sha512 == hashlib.sha512(data).hexdigest()
    assert blob.reference_count == 1
    assert await read(system, art.blob_uuid) == data
    assert await read(system, art.blob_uuid, offset=1000, limit=5000) == data[1000:6000]
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        await read(system, art.blob_uuid, offset=-1)


async def test_sha512_lookup_finds_a_blob_or_answers_null(system):
    data = b'hello blob'
    art = await upload(system, data)
    found = await system.blobs.GetBlobBySha512(b.GetBlobBySha512Request(sha512=hashlib.sha512(data).hexdigest()))
    assert found.blob.uuid == art.blob_uuid
    missing = await system.blobs.GetBlobBySha512(b.GetBlobBySha512Request(sha512='00' * 64))
    assert not missing.HasField('blob')


async def test_identical_content_is_stored_once(system, controller, tmp_path):
    first = await upload(system, b'same bytes', 'one')
    second = await upload(system, b'same bytes', 'two')
    assert first.blob_uuid == second.blob_uuid
    blob = (await system.blobs.GetBlob(b.GetBlobRequest(blob_uuid=first.blob_uuid))).blob
    assert blob.reference_count == 2
    assert len(os.listdir(tmp_path / 'state' / 'blobs' / 'blobs')) == 1


async def test_truncate_lets_a_client_retry_a_chunk(system):
    up = (await system.uploads.CreateUpload(b.CreateUploadRequest())).upload

    async def one(data):
        m = b.WriteUploadRequest(upload_uuid=up.uuid)
        m.data.data = data
        yield m
    assert (await system.uploads.WriteUpload(one(b'abcdef'))).size == 6
    await system.uploads.TruncateUpload(b.TruncateUploadRequest(upload_uuid=up.uuid, offset=3))
    assert (await system.uploads.WriteUpload(one(b'XYZ'))).size == 6
    art = await system.artifacts.UploadArtifact(b.UploadArtifactRequest(name='t', upload_uuid=up.uuid))
    assert await read(system, art.artifact.blob_uuid) == b'abcXYZ'


async def test_a_screenshot_is_a_blob_released_with_its_instance(system, node, controller, tmp_path):
    inst = await create_created(system)
    r = await system.instances.GetScreenshot(api.GetScreenshotRequest(instance_ref='inst1'))
    assert await read(system, r.blob_uuid) == node.screen
    blob = (await system.blobs.GetBlob(b.GetBlobRequest(blob_uuid=r.blob_uuid))).blob
    assert list(blob.instances) == [inst.uuid]
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='inst1'))
    await wait_state(system, inst.uuid, 6)
    async with raises(grpc.StatusCode.NOT_FOUND):
        await system.blobs.GetBlob(b.GetBlobRequest(blob_uuid=r.blob_uuid))
    from tests.waiting import eventually
    await eventually(lambda: not (tmp_path / 'state' / 'blobs' / 'blobs' / r.blob_uuid).exists(),
                     what='the blob bytes removed')


async def test_nodes_store_and_fetch_blobs_over_grpc_streams(system, node):
    inst = await create_created(system)
    await node.report(inst.uuid, agent_state=instance_pb2.AGENT_STATE_READY)
    data = os.urandom(2 * 1024 * 1024 + 3)

    async def parts():
        yield node_pb2.PutBlobRequest(header=node_pb2.PutBlobHeader(
            node=node.name, namespace='system', instance_uuid=inst.uuid))
        for i in range(0, len(data), 65536):
            yield node_pb2.PutBlobRequest(data=data[i:i + 65536])
    stored = await node.node_control.PutBlob(parts())
    assert stored.size == len(data) and stored.sha512 == hashlib.sha512(data).hexdigest()

    async def fetch():
        got = b''
        async for part in node.node_control.GetBlob(node_pb2.GetBlobRequest(blob_uuid=stored.blob_uuid)):
            got += part.data
        return got
    # A node reads only the blobs that an agent operation of its instances puts.
    async with raises(grpc.StatusCode.NOT_FOUND, match='not for node node1'):
        await fetch()
    art = await system.artifacts.UploadArtifact(b.UploadArtifactRequest(name='f', blob_uuid=stored.blob_uuid))
    await system.agentops.PutFile(aop.PutFileRequest(
        instance_ref=inst.uuid, blob_uuid=art.artifact.blob_uuid, path='/tmp/f', mode=0o644))
    assert await fetch() == data


async def test_foreign_blobs_and_uploads_are_not_found(system, tenant):
    art = await upload(system, b'secret')
    async with raises(grpc.StatusCode.NOT_FOUND):
        await tenant.blobs.GetBlob(b.GetBlobRequest(blob_uuid=art.blob_uuid))
    async with raises(grpc.StatusCode.NOT_FOUND):
        await read(tenant, art.blob_uuid)
    found = await tenant.blobs.GetBlobBySha512(b.GetBlobBySha512Request(sha512=hashlib.sha512(b'secret').hexdigest()))
    assert not found.HasField('blob')
    up = (await system.uploads.CreateUpload(b.CreateUploadRequest())).upload
    async with raises(grpc.StatusCode.NOT_FOUND):
        await tenant.uploads.TruncateUpload(b.TruncateUploadRequest(upload_uuid=up.uuid, offset=0))
    async with raises(grpc.StatusCode.NOT_FOUND):
        await tenant.artifacts.UploadArtifact(b.UploadArtifactRequest(name='x', upload_uuid=up.uuid))
