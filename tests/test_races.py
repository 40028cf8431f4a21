"""Concurrent changes that each read what the other changes: because every read
guards the commit (ObjectCache.tracking, as etcd's STM keeps a read set), one of
the two always sees the other, whatever the interleaving."""

import asyncio

import grpc

from shakenfist.v1 import auth_service_pb2 as auth, blob_service_pb2 as b
from shakenfist.v1 import instance_service_pb2 as api, network_service_pb2 as net
from tests.helpers import create_request, network

ROUNDS = 20


def outcome(result):
    """'ok', or the gRPC code's name of a refusal (anything else is raised)."""
    if isinstance(result, grpc.aio.AioRpcError):
        return result.code().name
    if isinstance(result, BaseException):
        raise result
    return 'ok'


async def test_an_instance_is_never_created_on_a_network_deleted_at_the_same_time(system, node):
    both = 0
    for i in range(ROUNDS):
        made = await network(system, f'race{i}', '10.9.0.0/24')
        created, deleted = await asyncio.gather(
            system.instances.CreateInstance(create_request(f'i{i}', networks=[made.uuid])),
            system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=made.uuid)),
            return_exceptions=True)
        if outcome(created) == 'ok' and outcome(deleted) == 'ok':
            both += 1
    assert both == 0, f'{both} of {ROUNDS} rounds created an instance on a network deleted with it'


async def test_a_namespace_deleted_while_an_instance_is_created_in_it(system, node):
    both = 0
    for i in range(ROUNDS):
        ns = f'racer{i}'
        await system.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace=ns))
        created, deleted = await asyncio.gather(
            system.instances.CreateInstance(create_request('x', namespace=ns)),
            system.auth.DeleteNamespace(auth.DeleteNamespaceRequest(namespace=ns)),
            return_exceptions=True)
        if outcome(created) == 'ok' and outcome(deleted) == 'ok':
            both += 1
    assert both == 0, f'{both} of {ROUNDS} rounds left an instance in a deleted namespace'


async def test_a_released_blob_is_never_attached_to_an_artifact_at_the_same_time(system, node):
    """The last holder lets go of a blob (its instance's deletion finishes) while an
    artifact takes it: either the artifact holds a live blob, or it was refused."""
    from tests.helpers import create_created, wait_state
    from shakenfist.v1 import instance_pb2
    dead = 0
    for i in range(ROUNDS // 2):
        inst = await create_created(system, f'shot{i}')
        node.screen = b'\x89PNG\r\n\x1a\n' + f'screen {i}'.encode()
        shot = await system.instances.GetScreenshot(api.GetScreenshotRequest(instance_ref=inst.uuid))
        node.auto_create = False            # the node reports the teardown when the test says
        await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
        await wait_state(system, inst.uuid, instance_pb2.INSTANCE_STATE_DELETE_WAIT)
        _, attached = await asyncio.gather(
            node.report(inst.uuid, state=instance_pb2.INSTANCE_STATE_DELETED),
            system.artifacts.UploadArtifact(b.UploadArtifactRequest(name=f'keep{i}', blob_uuid=shot.blob_uuid)),
            return_exceptions=True)
        node.auto_create = True
        if outcome(attached) == 'ok':
            try:
                await system.blobs.GetBlob(b.GetBlobRequest(blob_uuid=shot.blob_uuid))
            except grpc.aio.AioRpcError:
                dead += 1
    assert dead == 0, f'{dead} of {ROUNDS // 2} artifacts hold a deleted blob'
