"""Snapshots on the controller, with a scripted node taking them: the records, the
orders a node gets, storing and failing, listing, and disks made from snapshots.
(tests/test_e2e_snapshots.py takes real ones of a real guest.)"""

import hashlib
import os

import grpc

from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import blob_pb2, blob_service_pb2 as b, event_pb2, event_service_pb2 as ev, instance_pb2
from shakenfist.v1 import instance_service_pb2 as api, specs_pb2
from tests.helpers import create, create_created, disk, get, raises, wait_state
from tests.waiting import eventually


async def snapshot(client, ref='inst1', **kw):
    return (await client.instances.SnapshotInstance(api.SnapshotInstanceRequest(
        instance_ref=ref, **kw))).snapshots


async def listed(client, ref='inst1'):
    return list((await client.instances.ListInstanceSnapshots(
        api.ListInstanceSnapshotsRequest(instance_ref=ref))).snapshots)


async def orders(node, uuid):
    """The snapshot orders the node's desired state holds once they are there."""
    await eventually(lambda: uuid in node.desired and node.desired[uuid].snapshots, what='an order')
    return list(node.desired[uuid].snapshots)


async def store(node, inst_uuid, blob_uuid, data, name=None):
    async def parts():
        yield node_pb2.PutBlobRequest(header=node_pb2.PutBlobHeader(
            node=name or node.name, namespace='system', instance_uuid=inst_uuid,
            snapshot_blob_uuid=blob_uuid))
        yield node_pb2.PutBlobRequest(data=data)
    return await node.node_control.PutBlob(parts())


async def blob(client, uuid):
    return (await client.blobs.GetBlob(b.GetBlobRequest(blob_uuid=uuid))).blob


async def test_a_snapshot_is_ordered_of_the_node_and_created_when_it_stores_it(system, node):
    inst = await create_created(system)
    targets = await snapshot(system)
    assert list(targets) == ['vda']
    first = targets['vda']
    assert first.source_url == f'sf://instance/{inst.uuid}/vda' and first.artifact_index == 1
    [shown] = await listed(system)
    assert (shown.uuid, shown.device, shown.blob_uuid, shown.state) == (
        first.artifact_uuid, 'vda', first.blob_uuid, 'initial')
    [order] = await orders(node, inst.uuid)
    assert (order.device, order.blob_uuid) == ('vda', first.blob_uuid)

    data = os.urandom(300_000)
    stored = await store(node, inst.uuid, first.blob_uuid, data)
    assert stored.blob_uuid == first.blob_uuid      # the UUID promised, not a new one
    [shown] = await listed(system)
    assert shown.state == 'created' and shown.size == len(data)
    got = await blob(system, first.blob_uuid)
    assert got.sha512 == hashlib.sha512(data).hexdigest()
    await eventually(lambda: not node.desired[inst.uuid].snapshots, what='the order gone')
    # Stored once: the order is gone, so a second store of it is refused.
    async with raises(grpc.StatusCode.NOT_FOUND, match='no snapshot'):
        await store(node, inst.uuid, first.blob_uuid, b'again')

    second = (await snapshot(system))['vda']
    assert second.artifact_uuid == first.artifact_uuid and second.artifact_index == 2
    assert [s.index for s in await listed(system)] == [1, 2]
    events = (await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref=inst.uuid))).events
    messages = [e.message for e in events]
    assert 'snapshot requested' in messages and 'snapshot created' in messages


async def test_which_disks_a_snapshot_takes(system, node):
    inst = await create_created(system, disk=[disk(), disk(base='none'), disk(type=specs_pb2.DISK_TYPE_CDROM)])
    assert sorted(await snapshot(system, all=True)) == ['vda', 'vdb']     # not the cdrom, not the config drive
    assert list(await snapshot(system, device='vdb')) == ['vdb']
    async with raises(grpc.StatusCode.NOT_FOUND, match='device vdz not found'):
        await snapshot(system, device='vdz')
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, match='cdrom or the config drive'):
        await snapshot(system, device='vdd')
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, match='thin'):
        await snapshot(system, thin=True)
    assert len(await listed(system)) == 3
    assert len(await orders(node, inst.uuid)) == 3


async def test_a_snapshot_needs_a_created_instance(system, node):
    await node.stop()       # nobody takes it on to created
    inst = await create(system)
    async with raises(grpc.StatusCode.UNAVAILABLE, 'NOT_READY'):
        await snapshot(system, ref=inst.uuid)
    assert await listed(system, inst.uuid) == []


async def test_only_the_node_of_the_instance_stores_its_snapshot(system, node, node_api):
    from tests.node_double import NodeDouble
    other = await NodeDouble(node_api, name='node2').start()
    try:
        inst = await create_created(system, placed_on=node.name)
        target = (await snapshot(system))['vda']
        async with raises(grpc.StatusCode.NOT_FOUND):
            await store(other, inst.uuid, target.blob_uuid, b'not mine')
        async with raises(grpc.StatusCode.NOT_FOUND, match='no snapshot'):
            await store(node, inst.uuid, 'a0000000-0000-4000-8000-000000000000', b'never ordered')
        assert (await listed(system))[0].state == 'initial'
    finally:
        await other.stop()


async def test_a_failed_snapshot_is_an_error_and_its_order_goes(system, node):
    inst = await create_created(system)
    target = (await snapshot(system))['vda']
    await orders(node, inst.uuid)
    await node.node_control.FailSnapshot(node_pb2.FailSnapshotRequest(
        node=node.name, instance_uuid=inst.uuid, blob_uuid=target.blob_uuid, error_message='disk gone'))
    assert (await listed(system))[0].state == 'error'
    await eventually(lambda: not node.desired[inst.uuid].snapshots, what='the order gone')
    events = (await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref=inst.uuid))).events
    failed = [e for e in events if e.message == 'snapshot failed']
    assert failed and 'disk gone' in failed[0].extra['error']


async def test_an_instance_deleted_with_orders_leaves_error_blobs(system, node):
    inst = await create_created(system)
    target = (await snapshot(system))['vda']
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    await wait_state(system, inst.uuid, instance_pb2.INSTANCE_STATE_DELETED)
    assert (await blob(system, target.blob_uuid)).state == blob_pb2.BLOB_STATE_ERROR


async def test_a_new_instance_starts_from_a_snapshot(system, node, tenant):
    inst = await create_created(system)
    target = (await snapshot(system))['vda']
    async with raises(grpc.StatusCode.UNAVAILABLE, 'NOT_READY', match='not complete'):
        await create(system, 'early', disk=[disk(base=f'sf://blob/{target.blob_uuid}')])
    data = os.urandom(70_000)
    await store(node, inst.uuid, target.blob_uuid, data)

    by_blob = await create_created(system, 'copy1', disk=[disk(base=f'sf://blob/{target.blob_uuid}')])
    by_snapshot = await create_created(system, 'copy2', disk=[disk(base=f'sf://snapshot/{target.artifact_uuid}')])
    for copy in (by_blob, by_snapshot):
        assert node.desired[copy.uuid].base_blobs == [target.blob_uuid]
    # The node of an instance made from it may read it (others may not: test_blobs).
    got = b''
    async for part in node.node_control.GetBlob(node_pb2.GetBlobRequest(blob_uuid=target.blob_uuid)):
        got += part.data
    assert got == data
    # Each instance holds the blob while it lives.
    assert set((await blob(system, target.blob_uuid)).instances) == {by_blob.uuid, by_snapshot.uuid}

    # Another namespace's snapshot is not a base a tenant can name.
    for base in (f'sf://blob/{target.blob_uuid}', f'sf://snapshot/{target.artifact_uuid}',
                 'sf://blob/nope', 'sf://elsewhere/x', 'label:mine'):
        async with raises(grpc.StatusCode.NOT_FOUND):
            await create(tenant, 'stolen', disk=[disk(base=base)])
    assert not (await tenant.instances.ListInstances(api.ListInstancesRequest())).instances


async def test_snapshots_are_watchable_events(system, node):
    inst = await create_created(system)
    stream = system.events.WatchEvents(ev.WatchEventsRequest(
        object_ref=inst.uuid, object_type=event_pb2.OBJECT_TYPE_INSTANCE))
    assert not (await stream.read()).HasField('event')      # the watch is established
    target = (await snapshot(system))['vda']
    await store(node, inst.uuid, target.blob_uuid, b'x' * 10)
    seen = []
    async for item in stream:
        if item.HasField('event'):
            seen.append(item.event.message)
            if item.event.message == 'snapshot created':
                break
    stream.cancel()
    assert 'snapshot requested' in seen
    assert (await get(system, inst.uuid)).state == instance_pb2.INSTANCE_STATE_CREATED


async def test_three_versions_are_kept_and_pending_snapshots_are_bounded(system, node):
    from sfcontrol.instances.snapshots import MAX_PENDING, MAX_VERSIONS
    inst = await create_created(system)
    taken = []
    for _ in range(MAX_VERSIONS + 2):
        target = (await snapshot(system))['vda']
        await store(node, inst.uuid, target.blob_uuid, os.urandom(1000))
        taken.append(target)
    shown = await listed(system)
    assert [s.index for s in shown] == [3, 4, 5] and all(s.state == 'created' for s in shown)
    # The oldest versions' blobs went with their last reference.
    for old in taken[:2]:
        async with raises(grpc.StatusCode.NOT_FOUND):
            await blob(system, old.blob_uuid)
    # Orders not yet taken are bounded: the next one waits. Pending ones take no finished
    # version's place.
    for _ in range(MAX_PENDING):
        await snapshot(system)
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, 'TOO_MANY_REQUESTS', match='still being taken'):
        await snapshot(system)
    await eventually(lambda: len(node.desired[inst.uuid].snapshots) == MAX_PENDING, what='8 orders')
    assert len(await listed(system)) == MAX_VERSIONS + MAX_PENDING


async def test_an_nvram_template_is_a_blob_of_the_namespace_the_node_may_read(system, node, tenant):
    from tests.test_blobs import upload
    art = await upload(system, b'NVRAM' * 100, 'vars')
    for ref in (art.blob_uuid, f'sf://blob/{art.blob_uuid}', f'sf://artifact/{art.uuid}'):
        inst = await create_created(system, 'uefi', uefi=True, nvram_template=ref)
        assert inst.nvram_template == art.blob_uuid     # shown as the blob it resolved to
        got = b''
        async for part in node.node_control.GetBlob(node_pb2.GetBlobRequest(blob_uuid=art.blob_uuid)):
            got += part.data
        assert got == b'NVRAM' * 100
        await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
        await wait_state(system, inst.uuid, instance_pb2.INSTANCE_STATE_DELETED)
    async with raises(grpc.StatusCode.INVALID_ARGUMENT, match='set uefi'):
        await create(system, 'bios', nvram_template=art.blob_uuid)
    async with raises(grpc.StatusCode.NOT_FOUND, match='nvram_template'):
        await create(tenant, 'stolen', uefi=True, nvram_template=art.blob_uuid)
