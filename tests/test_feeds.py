"""The nodes' desired-state streams are listeners on the controller's cache
(sfcontrol/feeds.py): replay when a node subscribes, each change that matters
once, no etcd request, and nothing left behind when the stream ends."""

import asyncio

from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api
from tests.helpers import create_created, network
from tests.node_double import NodeDouble
from tests.waiting import eventually


async def test_a_subscribing_node_gets_a_replay_without_any_etcd_request(system, controller, node, node_api):
    inst = await create_created(system)
    store = controller.core.store
    before = sum(store.requests.values())
    listeners = len(controller.core.cache._listeners)
    other = NodeDouble(node_api, 'node1')           # a second stream for node1
    stream = other.node_control.WatchDesiredInstances(pb.WatchDesiredInstancesRequest(name='node1'))
    first, second = await stream.read(), await stream.read()
    assert first.upsert.instance.uuid == inst.uuid and second.HasField('sync_complete')
    assert first.upsert.instance.state == instance_pb2.INSTANCE_STATE_CREATED
    assert first.upsert.instance.power_state == instance_pb2.POWER_STATE_UNSPECIFIED   # the node's own report
    assert len(controller.core.cache._listeners) > listeners
    assert sum(store.requests.values()) == before
    stream.cancel()
    await other.channel.close()
    await eventually(lambda: len(controller.core.cache._listeners) == listeners, 5,
                     what='the stream unsubscribed')


async def test_what_the_node_acts_on_is_sent_once_and_its_own_reports_are_not(system, node):
    net = await network(system)
    inst = await create_created(system, networks=[net.uuid])
    before = node.upserts[inst.uuid]
    for state in (instance_pb2.AGENT_STATE_READY, instance_pb2.AGENT_STATE_NOT_READY_NO_CONTACT):
        await node.report(inst.uuid, agent_state=state)
    await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref=inst.uuid))
    async with node.changed:
        await asyncio.wait_for(node.changed.wait_for(
            lambda: node.desired[inst.uuid].desired_power_state == instance_pb2.POWER_STATE_OFF), 5)
    assert node.upserts[inst.uuid] == before + 1        # the power change; not the agent reports
    desired = node.desired[inst.uuid]
    assert [i.network_uuid for i in desired.instance.interfaces] == [net.uuid]
    assert [n.uuid for n in desired.networks] == [net.uuid]
