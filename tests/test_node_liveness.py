"""Node liveness (heartbeats and their timeout) and node re-registration, against a real etcd,
with a scripted node that heartbeats when a test says and controllers on a ManualClock:
a heartbeat timeout passes when the test advances the clock, never by waiting for it."""

import grpc
import pytest_asyncio

from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_pb2
from shakenfist.v1 import instance_service_pb2 as api
from tests.conftest import controller_config
from tests.helpers import ManualClock, create, create_created, get, raises, wait_state
from tests.local_plane import LocalPlane
from tests.node_double import NodeDouble

C = grpc.StatusCode
TIMEOUT = 20.0          # the default heartbeat timeout, in seconds of the test's clock


def liveness_config(etcd, tmp_path):
    return controller_config(etcd, tmp_path, clock=ManualClock(), heartbeat_timeout=TIMEOUT)


@pytest_asyncio.fixture
async def plane(etcd, tmp_path):
    p = await LocalPlane(liveness_config(etcd, tmp_path), etcd.pki).start()
    yield p
    await p.stop()


async def unreachable(client, uuid):
    return (await get(client, uuid)).node_unreachable


async def register(node, **capacity):
    cap = node.capacity if not capacity else node_pb2.NodeCapacity(**capacity)
    await node.node_control.RegisterNode(node_pb2.RegisterNodeRequest(
        name=node.name, address=f'127.0.0.1:{node.port}', capacity=cap, console_host='127.0.0.1'))


# -- heartbeats ----------------------------------------------------------------------------------

async def test_missed_heartbeats_mark_the_node_unreachable_and_a_heartbeat_brings_it_back(plane):
    node = await NodeDouble(plane.node_api).start()
    try:
        inst = await create_created(plane.client)
        await node.heartbeat()
        await plane.advance(TIMEOUT - 0.5)
        assert not await unreachable(plane.client, inst.uuid)      # not a moment early
        await plane.advance(0.5)
        assert await unreachable(plane.client, inst.uuid)
        shown = await get(plane.client, inst.uuid)
        assert shown.state == instance_pb2.INSTANCE_STATE_CREATED     # the instance itself is kept
        await node.heartbeat()
        assert not await unreachable(plane.client, inst.uuid)
    finally:
        await node.stop()


async def test_an_unreachable_node_gets_no_new_instances_or_node_calls(plane):
    node = await NodeDouble(plane.node_api).start()
    try:
        await create_created(plane.client)
        await plane.advance(TIMEOUT)
        assert await unreachable(plane.client, 'inst1')
        async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
            await create(plane.client, 'other')
        async with raises(C.UNAVAILABLE, 'UNAVAILABLE', 'unreachable'):
            await plane.client.instances.GetConsoleData(api.GetConsoleDataRequest(instance_ref='inst1'))
        assert [n for n, _ in node.calls if n == 'GetConsoleData'] == []
        await node.heartbeat()
        await create_created(plane.client, 'other')
    finally:
        await node.stop()


async def test_heartbeats_keep_a_node_reachable_past_the_timeout(plane):
    node = await NodeDouble(plane.node_api).start()
    try:
        inst = await create_created(plane.client)
        # Three timeouts' worth of heartbeats, each within the timeout of the last: never unreachable.
        for _ in range(4):
            await plane.advance(TIMEOUT * 3 / 4)
            assert not await unreachable(plane.client, inst.uuid)
            await node.heartbeat()
        # ...and the timer still runs: silence from here is noticed one timeout later.
        await plane.advance(TIMEOUT - 0.5)
        assert not await unreachable(plane.client, inst.uuid)
        await plane.advance(0.5)
        assert await unreachable(plane.client, inst.uuid)
    finally:
        await node.stop()


async def test_registering_again_makes_an_unreachable_node_reachable(plane):
    node = await NodeDouble(plane.node_api).start()
    try:
        inst = await create_created(plane.client)
        await plane.advance(TIMEOUT)
        assert await unreachable(plane.client, inst.uuid)
        await register(node)
        assert not await unreachable(plane.client, inst.uuid)
    finally:
        await node.stop()


async def test_heartbeat_from_an_unknown_node_is_not_found(plane):
    ghost = NodeDouble(plane.node_api, 'ghost')
    try:
        async with raises(C.NOT_FOUND, 'NOT_FOUND', 'not registered'):
            await ghost.heartbeat()
    finally:
        await ghost.channel.close()


async def test_a_node_silent_across_a_controller_restart_becomes_unreachable(etcd, tmp_path):
    config = liveness_config(etcd, tmp_path)
    first = await LocalPlane(config, etcd.pki).start()
    node = await NodeDouble(first.node_api).start()
    try:
        inst = await create_created(first.client)
        await node.heartbeat()
    finally:
        await node.stop()
        await first.stop()
    second = await LocalPlane(config, etcd.pki).start()
    try:
        # The node never heartbeats to the new controller: it must still be noticed, one
        # timeout after the new controller started.
        await second.advance(TIMEOUT - 0.5)
        assert not await unreachable(second.client, inst.uuid)
        await second.advance(0.5)
        assert await unreachable(second.client, inst.uuid)
    finally:
        await second.stop()


# -- re-registration and allocation -------------------------------------------------------------------

async def fill(client, node):
    """Fill the node's memory with four instances; return them and their memory."""
    memory = node.capacity.memory_mib // 4
    made = [await create_created(client, f'i{i}', memory=memory) for i in range(4)]
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(client, 'one-too-many', memory=memory)
    return made, memory


async def test_reregistering_keeps_the_allocation_of_placed_instances(system, node):
    made, memory = await fill(system, node)
    await register(node)
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(system, 'after-restart', memory=memory)
    # What is freed is usable again, exactly once.
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=made[0].uuid))
    await wait_state(system, made[0].uuid, instance_pb2.INSTANCE_STATE_DELETED)
    await create_created(system, 'fits', memory=memory)
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(system, 'still-full', memory=memory)


async def test_reregistering_while_an_instance_is_deleted_frees_it_only_once(system, node):
    made, memory = await fill(system, node)
    node.auto_create = False            # the node has not torn the domain down yet
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=made[0].uuid))
    await wait_state(system, made[0].uuid, instance_pb2.INSTANCE_STATE_DELETE_WAIT)
    await register(node)                # the node restarts meanwhile
    await node.report(made[0].uuid, state=instance_pb2.INSTANCE_STATE_DELETED)
    assert (await get(system, made[0].uuid)).state == instance_pb2.INSTANCE_STATE_DELETED
    await create(system, 'fits', memory=memory)
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(system, 'overcommitted', memory=memory)


async def test_reregistering_while_an_instance_failed_frees_it_only_once(system, node):
    made, memory = await fill(system, node)
    node.auto_create = False
    await node.report(made[0].uuid, state=instance_pb2.INSTANCE_STATE_CREATED_ERROR,
                      error_message='domain crashed')
    await register(node)
    await node.report(made[0].uuid, state=instance_pb2.INSTANCE_STATE_DELETED)
    assert (await get(system, made[0].uuid)).state == instance_pb2.INSTANCE_STATE_ERROR
    await create(system, 'fits', memory=memory)
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(system, 'overcommitted', memory=memory)


async def test_register_needs_an_address(node):
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'address'):
        await node.node_control.RegisterNode(node_pb2.RegisterNodeRequest(name=node.name))
