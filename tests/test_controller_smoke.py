import grpc
import pytest

from shakenfist.v1 import instance_service_pb2 as api, network_service_pb2 as net, specs_pb2
from shakenfist.v1 import instance_pb2
from tests.node_double import NodeDouble
from tests.waiting import eventually


async def test_create_get_delete(system):
    node = await NodeDouble(system).start()
    try:
        n = await system.networks.CreateNetwork(net.CreateNetworkRequest(netblock='10.0.0.0/24', name='net1'))
        r = await system.instances.CreateInstance(api.CreateInstanceRequest(
            name='inst1', cpus=1, memory=256, disk=[specs_pb2.DiskSpec(size=1, base='sftest')],
            network=[specs_pb2.NetworkSpec(network_uuid='net1')]))
        assert r.instance.state == instance_pb2.INSTANCE_STATE_INITIAL
        assert r.instance.interfaces[0].network_uuid == n.network.uuid

        async def created():
            i = (await system.instances.GetInstance(api.GetInstanceRequest(instance_ref='inst1'))).instance
            return i.state == instance_pb2.INSTANCE_STATE_CREATED
        await eventually(created)
        d = await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='inst1'))

        async def deleted():
            i = (await system.instances.GetInstance(api.GetInstanceRequest(instance_ref=r.instance.uuid))).instance
            return i.state == instance_pb2.INSTANCE_STATE_DELETED
        await eventually(deleted)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await system.instances.GetInstance(api.GetInstanceRequest(instance_ref='inst1'))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await node.stop()
