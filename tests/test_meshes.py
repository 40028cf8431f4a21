"""Each network's mesh, as the controller decides it (sfcontrol/meshes.py): the
nodes with an interface on it plus the network nodes, each told the others'
mesh addresses; the network node also gets the fixed leases of a DHCP
network, and of a NAT network its floating addresses. Nodes without a mesh
address carry nothing."""

import asyncio

import pytest_asyncio

from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.node.v1alpha1 import node_pb2_grpc
from shakenfist.v1 import network_service_pb2 as net
from tests.helpers import create, network

NETWORK_NODE, OTHER = '198.51.100.10', '198.51.100.11'


class Stream:
    """One node's WatchDesiredNetworks, read into what the node would hold."""

    def __init__(self, stub, name):
        self.call = stub.WatchDesiredNetworks(pb.WatchDesiredNetworksRequest(name=name))
        self.desired: dict[str, pb.DesiredNetwork] = {}

    async def until_synced(self):
        while (await self.read()) != 'sync_complete':
            pass

    async def read(self) -> str:
        change = await asyncio.wait_for(self.call.read(), 5)
        kind = change.WhichOneof('change')
        if kind == 'upsert':
            self.desired[change.upsert.network.uuid] = change.upsert
        elif kind == 'remove_uuid':
            self.desired.pop(change.remove_uuid)
        return kind

    async def until(self, check):
        while not check(self.desired):
            await self.read()


@pytest_asyncio.fixture
async def nodes(node_api):
    """nodea, a network node, and nodeb, registered with mesh addresses; their streams."""
    channels, streams = [], {}
    for name, address, network_node in (('nodea', NETWORK_NODE, True), ('nodeb', OTHER, False)):
        channel = node_api.channel(name)
        channels.append(channel)
        stub = node_pb2_grpc.NodeControlServiceStub(channel)
        await stub.RegisterNode(pb.RegisterNodeRequest(
            name=name, address='127.0.0.1:9', mesh_address=address, network_node=network_node,
            capacity=pb.NodeCapacity(cpus=64, memory_mib=65536, disk_gib=2000)))
        streams[name] = Stream(stub, name)
        await streams[name].until_synced()
    yield streams
    for s in streams.values():
        s.call.cancel()
    for c in channels:
        await c.close()


async def test_a_network_is_carried_by_the_network_node_until_an_instance_brings_another(system, nodes):
    a, b = nodes['nodea'], nodes['nodeb']
    lan = await network(system, 'lan', '198.18.20.0/24', provide_dhcp=True)
    await a.until(lambda d: lan.uuid in d)
    assert a.desired[lan.uuid].serve and list(a.desired[lan.uuid].peers) == []
    assert b.desired == {}

    inst = await create(system, 'web', networks=[lan.uuid], placed_on='nodeb')
    iface = inst.interfaces[0]
    await a.until(lambda d: list(d[lan.uuid].peers) == [OTHER] and d[lan.uuid].hosts)
    assert [(h.macaddr, h.ipv4, h.hostname) for h in a.desired[lan.uuid].hosts] == \
        [(iface.macaddr, iface.ipv4, 'web')]
    await b.until(lambda d: lan.uuid in d)
    carried = b.desired[lan.uuid]
    assert list(carried.peers) == [NETWORK_NODE] and not carried.serve and not carried.hosts
    assert carried.network.vxlan_id == lan.vxlan_id


async def test_a_network_without_dhcp_is_carried_but_not_served_and_goes_when_deleted(system, nodes):
    a = nodes['nodea']
    plain = await network(system, 'plain', '198.18.21.0/24')
    await a.until(lambda d: plain.uuid in d)
    assert not a.desired[plain.uuid].serve
    await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=plain.uuid))
    await a.until(lambda d: plain.uuid not in d)


async def test_a_node_without_a_mesh_address_carries_nothing(system, node, node_api):
    await network(system, 'lan', '198.18.22.0/24', provide_dhcp=True)
    stream = Stream(node.node_control, node.name)
    assert await stream.read() == 'sync_complete' and stream.desired == {}
    stream.call.cancel()


async def test_a_nat_network_gives_the_network_node_its_floating_addresses_as_they_come_and_go(system, nodes):
    a, b = nodes['nodea'], nodes['nodeb']
    lan = await network(system, 'natted', '198.18.23.0/24', provide_nat=True)
    await a.until(lambda d: lan.uuid in d)
    assert a.desired[lan.uuid].nat and not a.desired[lan.uuid].serve and not a.desired[lan.uuid].floating
    inst = await create(system, 'web', networks=[lan.uuid], placed_on='nodeb')
    iface = inst.interfaces[0]
    await system.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface.uuid))
    await a.until(lambda d: d[lan.uuid].floating)
    [floated] = a.desired[lan.uuid].floating
    assert (floated.interface_uuid, floated.ipv4) == (iface.uuid, iface.ipv4)
    assert floated.floating != lan.floating_gateway and a.desired[lan.uuid].floating_netblock
    await b.until(lambda d: lan.uuid in d)
    assert not b.desired[lan.uuid].nat and not b.desired[lan.uuid].floating
    await system.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=iface.uuid))
    await a.until(lambda d: not d[lan.uuid].floating)


async def test_a_floated_interface_on_a_network_without_nat_is_given_to_the_network_node(system, nodes):
    a = nodes['nodea']
    lan = await network(system, 'plainfloat', '198.18.24.0/24')
    await a.until(lambda d: lan.uuid in d)
    assert not a.desired[lan.uuid].nat
    inst = await create(system, 'web', networks=[lan.uuid], placed_on='nodeb')
    iface = inst.interfaces[0]
    await system.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface.uuid))
    await a.until(lambda d: d[lan.uuid].floating)
    assert a.desired[lan.uuid].nat and not a.desired[lan.uuid].network.provide_nat
    await system.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=iface.uuid))
    await a.until(lambda d: not d[lan.uuid].nat)


async def test_get_network_shows_where_it_is_served_and_carried(system, nodes):
    async def shown(uuid):
        return (await system.networks.GetNetwork(net.GetNetworkRequest(network_ref=uuid))).network

    served = await network(system, 'served', '198.18.25.0/24', provide_dhcp=True)
    plain = await network(system, 'carried', '198.18.26.0/24')
    got = await shown(served.uuid)
    assert (list(got.served_by), list(got.mesh_nodes)) == (['nodea'], ['nodea'])
    got = await shown(plain.uuid)
    assert (list(got.served_by), list(got.mesh_nodes)) == ([], ['nodea'])
    await create(system, 'web', networks=[served.uuid], placed_on='nodeb')
    assert list((await shown(served.uuid)).mesh_nodes) == ['nodea', 'nodeb']
    listed = (await system.networks.ListNetworks(net.ListNetworksRequest())).networks
    assert {n.name: list(n.mesh_nodes) for n in listed}['served'] == ['nodea', 'nodeb']
    await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=plain.uuid))
    got = await shown(plain.uuid)
    assert (list(got.served_by), list(got.mesh_nodes)) == ([], [])
