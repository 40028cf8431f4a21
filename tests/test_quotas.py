"""Uploads and blobs cannot fill the controller's disk: a blob (or upload) is at most
max_blob_size bytes, a namespace holds at most namespace_quota bytes, and a write
over either is 413 / RESOURCE_EXHAUSTED that changes nothing."""

import hashlib

import aiohttp
import grpc
import pytest_asyncio

from sfcontrol import server
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import auth_service_pb2 as auth, blob_service_pb2 as b
from tests.conftest import controller_config, system_key
from tests.grpc_client import Client
from tests.helpers import create_created, raises
from tests.node_double import NodeApi, NodeDouble

C = grpc.StatusCode
KiB = 1024
MAX_BLOB, QUOTA = 256 * KiB, 600 * KiB


@pytest_asyncio.fixture
async def small(etcd, tmp_path):
    """A controller whose blobs are at most 256 KiB, with 600 KiB per namespace; its system
    client, a tenant client, and the state directory."""
    ctl = await server.start(controller_config(etcd, tmp_path, max_blob_size=MAX_BLOB,
                                               namespace_quota=QUOTA))
    system = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='tenant'))
    await system.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='tenant', key_name='k', key='tk'))
    tenant = await Client(f'127.0.0.1:{ctl.port}').login('tenant', 'tk')
    yield ctl, system, tenant, tmp_path / 'state' / 'blobs'
    await tenant.close()
    await system.close()
    await ctl.stop(None)


async def new_upload(client):
    return (await client.uploads.CreateUpload(b.CreateUploadRequest())).upload.uuid


async def write(client, uuid, data, chunk=64 * KiB):
    async def messages():
        for i in range(0, len(data), chunk):
            m = b.WriteUploadRequest(upload_uuid=uuid)
            m.data.data = data[i:i + chunk]
            yield m
    return (await client.uploads.WriteUpload(messages())).size


def upload_file(blob_dir, uuid):
    return blob_dir / 'uploads' / uuid


async def test_truncate_never_grows_an_upload(small):
    _, _, tenant, blob_dir = small
    up = await new_upload(tenant)
    await write(tenant, up, b'x' * 1000)
    for offset in (2**40, 2**63 - 2, 1001, -1):
        async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'offset'):
            await tenant.uploads.TruncateUpload(b.TruncateUploadRequest(upload_uuid=up, offset=offset))
    assert upload_file(blob_dir, up).stat().st_size == 1000
    await tenant.uploads.TruncateUpload(b.TruncateUploadRequest(upload_uuid=up, offset=10))
    assert upload_file(blob_dir, up).stat().st_size == 10


async def test_an_upload_over_the_blob_size_is_413_and_keeps_what_it_had(small):
    _, _, tenant, blob_dir = small
    up = await new_upload(tenant)
    assert await write(tenant, up, b'a' * (200 * KiB)) == 200 * KiB
    async with raises(C.RESOURCE_EXHAUSTED, 'PAYLOAD_TOO_LARGE', f'at most {MAX_BLOB} bytes'):
        await write(tenant, up, b'b' * (100 * KiB))
    assert upload_file(blob_dir, up).stat().st_size == 200 * KiB      # the refused write left nothing
    assert await write(tenant, up, b'c' * (56 * KiB)) == MAX_BLOB     # exactly the limit is fine
    art = (await tenant.artifacts.UploadArtifact(b.UploadArtifactRequest(name='a', upload_uuid=up))).artifact
    blob = (await tenant.blobs.GetBlob(b.GetBlobRequest(blob_uuid=art.blob_uuid))).blob
    assert blob.size == MAX_BLOB
    assert blob.sha512 == hashlib.sha512(b'a' * (200 * KiB) + b'c' * (56 * KiB)).hexdigest()
    assert not upload_file(blob_dir, up).exists()       # the upload became the blob: not copied


async def test_a_namespace_over_its_quota_is_413_and_others_are_unaffected(small):
    _, system, tenant, _ = small
    for i in range(2):                                   # 2 x 256 KiB of 600 KiB
        up = await new_upload(tenant)
        await write(tenant, up, bytes([i]) * MAX_BLOB)
        await tenant.artifacts.UploadArtifact(b.UploadArtifactRequest(name=f'a{i}', upload_uuid=up))
    up = await new_upload(tenant)
    await write(tenant, up, b'z' * (88 * KiB))          # exactly at the quota
    async with raises(C.RESOURCE_EXHAUSTED, 'PAYLOAD_TOO_LARGE', 'storage quota'):
        await write(tenant, up, b'z')
    # Content already held costs nothing more: the same bytes again are one blob.
    other = await new_upload(system)
    await write(system, other, b'\x00' * MAX_BLOB)       # system's own quota
    await system.artifacts.UploadArtifact(b.UploadArtifactRequest(name='s', upload_uuid=other))


async def test_a_node_storing_a_blob_over_the_limit_stores_nothing(small, etcd):
    ctl, system, _, blob_dir = small
    node = await NodeDouble(NodeApi.of(ctl, etcd.pki)).start()
    try:
        inst = await create_created(system)

        async def parts():
            yield node_pb2.PutBlobRequest(header=node_pb2.PutBlobHeader(node='node1', instance_uuid=inst.uuid))
            for _ in range(5):
                yield node_pb2.PutBlobRequest(data=b'q' * (64 * KiB))
        async with raises(C.RESOURCE_EXHAUSTED, 'PAYLOAD_TOO_LARGE'):
            await node.node_control.PutBlob(parts())
        assert list((blob_dir / 'partial').iterdir()) == []
        assert list((blob_dir / 'blobs').iterdir()) == []
    finally:
        await node.stop()


async def test_rest_callers_see_413_with_the_error_model(small):
    from gateway.app import start_gateway
    ctl, _, tenant, _ = small
    runner, port = await start_gateway(f'127.0.0.1:{ctl.port}', '127.0.0.1', 0)
    try:
        up = await new_upload(tenant)
        async with aiohttp.ClientSession(headers={'Authorization': f'Bearer {tenant.token}'}) as http:
            async with http.post(f'http://127.0.0.1:{port}/upload/{up}', data=b'x' * (MAX_BLOB + 1)) as r:
                assert r.status == 413
                body = await r.json()
                assert body['status'] == 413 and f'at most {MAX_BLOB} bytes' in body['error']
            async with http.post(f'http://127.0.0.1:{port}/upload/{up}/truncate/{2**40}') as r:
                assert r.status == 400 and (await r.json())['status'] == 400
    finally:
        await runner.cleanup()


async def test_a_write_that_ends_before_its_declared_length_keeps_nothing(small):
    """The gateway declares a body's length (a cancelled stream looks complete to the server)."""
    _, _, tenant, blob_dir = small
    up = await new_upload(tenant)
    await write(tenant, up, b'k' * 10)

    async def messages():
        m = b.WriteUploadRequest(upload_uuid=up)
        m.data.data = b'x' * 50
        yield m
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'carried 50 of the 100 bytes'):
        await tenant.uploads.WriteUpload(messages(), metadata=(('x-body-length', '100'),))
    assert upload_file(blob_dir, up).stat().st_size == 10
