"""NetworkService and InterfaceService against a real etcd: networks, IPAM, interfaces,
floating addresses and metadata (wire reference §B.3, §C.2 rules 9 and 13)."""

import asyncio
import ipaddress
import re

import grpc
import pytest
from google.protobuf import struct_pb2

from sfcontrol import server
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api, network_pb2 as pb
from shakenfist.v1 import network_service_pb2 as net, specs_pb2
from tests.conftest import controller_config, system_key
from tests.grpc_client import Client
from tests.helpers import create, create_created, network, raises, wait_state
from tests.node_double import NodeApi, NodeDouble

C = grpc.StatusCode
FLOATING = ipaddress.IPv4Network('198.51.100.0/24')


def spec(net_ref='net1', **kw):
    return specs_pb2.NetworkSpec(network_uuid=net_ref, **kw)


async def get_network(client, ref, **kw):
    return (await client.networks.GetNetwork(net.GetNetworkRequest(network_ref=ref, **kw))).network


async def list_networks(client, all=False):
    return (await client.networks.ListNetworks(net.ListNetworksRequest(all=all))).networks


async def network_interfaces(client, ref='net1'):
    return (await client.networks.ListNetworkInterfaces(
        net.ListNetworkInterfacesRequest(network_ref=ref))).interfaces


async def get_interface(client, uuid):
    return (await client.interfaces.GetInterface(
        net.GetInterfaceRequest(interface_uuid=uuid))).network_interface


async def count_instances(client):
    return len((await client.instances.ListInstances(api.ListInstancesRequest(all=True))).instances)


async def delete_instance(client, uuid):
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=uuid))
    await wait_state(client, uuid, instance_pb2.INSTANCE_STATE_DELETED)


def assignable(netblock):
    """Every address IPAM may hand out: not the network, gateway (.1) or broadcast address."""
    n = ipaddress.IPv4Network(netblock)
    return {str(a) for a in n.hosts()} - {str(n.network_address + 1)}


# -- networks ------------------------------------------------------------------------------

async def test_create_then_get_by_name_and_uuid_list_and_delete(system):
    n = await network(system, 'net1', '10.5.0.0/24', provide_dhcp=True, provide_dns=True)
    assert n.state == pb.NETWORK_STATE_CREATED and n.namespace == 'system'
    assert n.netblock == '10.5.0.0/24' and n.provide_dhcp and n.provide_dns and not n.provide_nat
    assert 0 < n.vxlan_id < 2 ** 24
    assert (await get_network(system, 'net1')).uuid == n.uuid
    assert (await get_network(system, n.uuid)).name == 'net1'
    assert [x.uuid for x in await list_networks(system)] == [n.uuid]

    r = await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref='net1'))
    assert r.network.uuid == n.uuid
    assert (await get_network(system, n.uuid)).state == pb.NETWORK_STATE_DELETED
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'network not found'):
        await get_network(system, 'net1')
    assert await list_networks(system) == []
    assert [x.uuid for x in await list_networks(system, all=True)] == [n.uuid]
    async with raises(C.NOT_FOUND):
        await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=n.uuid))


async def test_netblock_host_bits_are_normalised(system):
    n = await network(system, netblock='10.6.0.77/24')
    assert n.netblock == '10.6.0.0/24'


@pytest.mark.parametrize('netblock,message', [
    ('10.0.0.0/30', 'network is below minimum size of /29'),
    ('10.0.0.0/32', 'network is below minimum size of /29'),
    ('banana', 'cannot parse netblock'),
    ('10.0.0.0/33', 'cannot parse netblock'),
    ('', 'cannot parse netblock'),
    ('fd00::/64', 'cannot parse netblock'),
])
async def test_bad_netblock_is_invalid_argument_and_creates_nothing(system, netblock, message):
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', message):
        await network(system, netblock=netblock)
    assert await list_networks(system, all=True) == []


async def test_a_29_is_the_smallest_network_allowed(system):
    assert (await network(system, netblock='10.0.0.8/29')).netblock == '10.0.0.8/29'


async def test_unknown_network_is_not_found(system):
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'network not found'):
        await get_network(system, 'nope')


async def test_duplicate_name_in_a_namespace_is_already_exists(system, tenant):
    first = await network(system)
    async with raises(C.ALREADY_EXISTS, 'ALREADY_EXISTS', 'already exists'):
        await network(system, netblock='10.9.0.0/24')
    assert len(await list_networks(system)) == 1
    # Another namespace may use the name; and once deleted, the name is free again.
    theirs = await network(tenant)
    assert theirs.namespace == 'tenant'
    await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=first.uuid))
    again = await network(system)
    assert again.uuid != first.uuid and again.state == pb.NETWORK_STATE_CREATED


async def test_concurrent_creates_with_one_name_make_one_network(system):
    results = await asyncio.gather(*[network(system, 'same', f'10.{i}.0.0/24') for i in range(5)],
                                   return_exceptions=True)
    made = [r for r in results if isinstance(r, pb.Network)]
    failed = [r for r in results if not isinstance(r, pb.Network)]
    assert len(made) == 1, results
    assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == C.ALREADY_EXISTS
               for e in failed), [(e.code(), e.details()) for e in failed]
    assert len(await list_networks(system)) == 1


async def test_other_namespaces_networks_are_invisible(system, tenant):
    mine = await network(system)
    async with raises(C.NOT_FOUND):
        await get_network(tenant, mine.uuid)
    async with raises(C.NOT_FOUND):
        await tenant.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=mine.uuid))
    assert await list_networks(tenant) == []
    theirs = await network(tenant, 'tnet')
    assert {n.uuid for n in await list_networks(system)} == {mine.uuid, theirs.uuid}
    assert (await get_network(system, 'tnet', namespace='tenant')).uuid == theirs.uuid


async def test_network_in_use_cannot_be_deleted_until_its_instance_is(system, node):
    n = await network(system)
    inst = await create_created(system, networks=['net1'])
    async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT', 'in use'):
        await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref='net1'))
    assert (await get_network(system, n.uuid)).state == pb.NETWORK_STATE_CREATED
    await delete_instance(system, inst.uuid)
    r = await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref='net1'))
    assert r.network.uuid == n.uuid
    assert (await get_network(system, n.uuid)).state == pb.NETWORK_STATE_DELETED


async def test_delete_all_needs_confirm_and_system_must_name_a_namespace(system, tenant):
    a = await network(system, 'a', '10.1.0.0/24')
    b = await network(system, 'b', '10.2.0.0/24')
    t = await network(tenant, 't', '10.3.0.0/24')
    async with raises(C.INVALID_ARGUMENT, match='confirm'):
        await system.networks.DeleteAllNetworks(net.DeleteAllNetworksRequest(namespace='system'))
    async with raises(C.INVALID_ARGUMENT, match='system user must specify parameter namespace'):
        await system.networks.DeleteAllNetworks(net.DeleteAllNetworksRequest(confirm=True))
    assert len(await list_networks(system)) == 3
    r = await system.networks.DeleteAllNetworks(net.DeleteAllNetworksRequest(
        confirm=True, namespace='system'))
    assert sorted(r.network_uuids) == sorted([a.uuid, b.uuid])
    assert [n.uuid for n in await list_networks(system)] == [t.uuid]
    # A tenant deletes its own without naming a namespace.
    r = await tenant.networks.DeleteAllNetworks(net.DeleteAllNetworksRequest(confirm=True))
    assert list(r.network_uuids) == [t.uuid]
    assert await list_networks(system) == []


async def test_deleted_network_is_not_ready_for_instances(system, node):
    """Rule 9: a network that is not `created` is 406 (NOT_READY). A deleted network is
    still found by UUID, which is the real path to a network in another state."""
    n = await network(system)
    await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=n.uuid))
    async with raises(C.UNAVAILABLE, 'NOT_READY', 'is not ready'):
        await create(system, networks=[n.uuid])
    assert await count_instances(system) == 0
    await network(system, 'other', '10.7.0.0/24')
    await create(system, networks=['other'])
    async with raises(C.UNAVAILABLE, 'NOT_READY', 'is not ready'):
        await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
            instance_ref='inst1', network=spec(n.uuid)))


async def test_an_instance_cannot_use_another_namespaces_network(system, tenant, node):
    mine = await network(system)
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'network not found'):
        await create(tenant, networks=[mine.uuid])
    assert await count_instances(system) == 0


# -- IPAM -----------------------------------------------------------------------------------

async def test_addresses_are_random_free_and_never_network_broadcast_or_gateway(system, node):
    await network(system, netblock='10.8.0.0/26')       # 61 assignable addresses
    seen = []
    for i in range(4):
        inst = await create(system, f'i{i}', network=[spec() for _ in range(8)])
        seen += [iface.ipv4 for iface in inst.interfaces]
    assert len(seen) == 32 and len(set(seen)) == 32, seen
    assert set(seen) <= assignable('10.8.0.0/26')
    # Random, not handed out in order from the bottom of the range.
    assert sorted(seen, key=ipaddress.IPv4Address) != \
        [str(ipaddress.IPv4Address('10.8.0.2') + i) for i in range(32)]
    listed = await network_interfaces(system)
    assert sorted(i.ipv4 for i in listed) == sorted(seen)


async def test_a_29_has_exactly_five_addresses_and_the_sixth_is_exhausted(system, node):
    await network(system, netblock='10.1.0.0/29')
    got = []
    for i in range(5):
        inst = await create(system, f'i{i}', networks=['net1'])
        got.append(inst.interfaces[0].ipv4)
    assert sorted(got) == sorted(assignable('10.1.0.0/29'))
    assert sorted(got) == [f'10.1.0.{n}' for n in range(2, 7)]
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES', 'no free addresses'):
        await create(system, 'sixth', networks=['net1'])
    assert await count_instances(system) == 5
    assert len(await network_interfaces(system)) == 5


async def test_one_instance_can_take_every_address_of_a_29(system, node):
    """Several interfaces on one network in one request get distinct addresses."""
    await network(system, netblock='10.1.0.0/29')
    for attempt in range(5):        # random choices: repeat so a clash would show
        inst = await create_created(system, f'i{attempt}', network=[spec() for _ in range(5)])
        assert sorted(i.ipv4 for i in inst.interfaces) == sorted(assignable('10.1.0.0/29'))
        await delete_instance(system, inst.uuid)


async def test_one_request_asking_twice_for_an_address_is_already_exists(system, node):
    await network(system)
    async with raises(C.ALREADY_EXISTS, 'ALREADY_EXISTS', 'in use'):
        await create(system, network=[spec(address='10.0.0.5'), spec(address='10.0.0.5')])
    assert await count_instances(system) == 0


async def test_requested_address_in_use_is_409_and_creates_nothing(system, node):
    await network(system)
    first = await create(system, 'a', network=[spec(address='10.0.0.5')])
    assert first.interfaces[0].ipv4 == '10.0.0.5'
    async with raises(C.ALREADY_EXISTS, 'ALREADY_EXISTS', '10.0.0.5'):
        await create(system, 'b', network=[spec(address='10.0.0.5')])
    assert await count_instances(system) == 1
    assert [i.ipv4 for i in await network_interfaces(system)] == ['10.0.0.5']


@pytest.mark.parametrize('address,message', [
    ('10.0.0.0', 'not in the range'), ('10.0.0.1', 'not in the range'),
    ('10.0.0.255', 'not in the range'), ('10.0.1.2', 'not in the range'),
    ('ten', 'not an IPv4 address'),
])
async def test_requested_address_must_be_assignable(system, node, address, message):
    await network(system)
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', message):
        await create(system, network=[spec(address=address)])
    assert await count_instances(system) == 0


async def test_address_none_gives_an_interface_without_ipv4(system, node):
    await network(system, netblock='10.1.0.0/29')
    inst = await create(system, network=[spec(address='none')])
    (iface,) = inst.interfaces
    assert not iface.HasField('ipv4')
    assert not (await get_interface(system, iface.uuid)).HasField('ipv4')
    # It took no address: all five are still free.
    for i in range(5):
        await create(system, f'i{i}', networks=['net1'])


async def test_macs_are_locally_administered_and_distinct(system, node):
    await network(system)
    macs = []
    for i in range(3):
        inst = await create(system, f'i{i}', network=[spec() for _ in range(5)])
        macs += [iface.macaddr for iface in inst.interfaces]
    assert all(re.fullmatch(r'02:00:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}', m) for m in macs), macs
    assert len(set(macs)) == len(macs) == 15


async def test_requested_mac_is_used_and_a_mac_in_use_is_already_exists(system, node):
    await network(system)
    inst = await create_created(system, 'a', network=[spec(macaddress='02:00:00:aa:bb:cc')])
    assert inst.interfaces[0].macaddr == '02:00:00:aa:bb:cc'
    async with raises(C.ALREADY_EXISTS, 'ALREADY_EXISTS', '02:00:00:aa:bb:cc'):
        await create(system, 'b', network=[spec(macaddress='02:00:00:aa:bb:cc')])
    async with raises(C.ALREADY_EXISTS, 'ALREADY_EXISTS', '02:00:00:aa:bb:dd'):
        await create(system, 'b', network=[spec(macaddress='02:00:00:aa:bb:dd'),
                                           spec(macaddress='02:00:00:aa:bb:dd')])
    assert await count_instances(system) == 1
    await delete_instance(system, inst.uuid)
    again = await create(system, 'c', network=[spec(macaddress='02:00:00:aa:bb:cc')])
    assert again.interfaces[0].macaddr == '02:00:00:aa:bb:cc'


async def test_interfaces_are_ordered_as_the_networkspecs(system, node):
    nets = [await network(system, f'n{i}', f'10.{i}.0.0/24') for i in range(3)]
    inst = await create(system, network=[spec('n2'), spec('n0'), spec('n1')])
    assert [(i.order, i.network_uuid) for i in inst.interfaces] == \
        [(0, nets[2].uuid), (1, nets[0].uuid), (2, nets[1].uuid)]
    listed = (await system.instances.ListInstanceInterfaces(
        api.ListInstanceInterfacesRequest(instance_ref=inst.uuid))).interfaces
    assert [(i.order, i.network_uuid, i.uuid) for i in listed] == \
        [(i.order, i.network_uuid, i.uuid) for i in inst.interfaces]
    assert all(i.instance_uuid == inst.uuid and i.model == specs_pb2.NIC_MODEL_VIRTIO for i in listed)


async def test_list_network_interfaces_shows_the_interfaces_on_that_network(system, node):
    await network(system)
    await network(system, 'net2', '10.2.0.0/24')
    a = await create(system, 'a', network=[spec(), spec('net2')])
    b = await create(system, 'b', networks=['net1'])
    on1 = await network_interfaces(system, 'net1')
    assert sorted(i.uuid for i in on1) == sorted([a.interfaces[0].uuid, b.interfaces[0].uuid])
    assert [i.uuid for i in await network_interfaces(system, 'net2')] == [a.interfaces[1].uuid]
    assert await network_interfaces(system, (await network(system, 'empty', '10.3.0.0/24')).uuid) == []


# -- floating addresses -------------------------------------------------------------------------

async def test_float_takes_a_floating_address_and_defloat_gives_it_back(system, node):
    await network(system)
    inst = await create(system, networks=['net1'])
    iface = inst.interfaces[0].uuid
    assert not (await get_interface(system, iface)).HasField('floating')
    await system.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface))
    floating = (await get_interface(system, iface)).floating
    assert floating in assignable(str(FLOATING))
    await system.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface))
    assert (await get_interface(system, iface)).floating == floating       # already floated
    await system.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=iface))
    assert not (await get_interface(system, iface)).HasField('floating')


async def test_float_in_the_networkspec_and_nat_gateways_use_distinct_pool_addresses(system, node):
    nat = await network(system, provide_nat=True)
    assert nat.floating_gateway in assignable(str(FLOATING))
    inst = await create(system, network=[spec(float=True) for _ in range(4)])
    floats = [i.floating for i in inst.interfaces]
    assert all(f in assignable(str(FLOATING)) for f in floats)
    assert len({nat.floating_gateway, *floats}) == 5


async def test_a_deleted_instance_gives_its_floating_address_back(system, node):
    await network(system)
    inst = await create_created(system, network=[spec(float=True)])
    iface = inst.interfaces[0].uuid
    await delete_instance(system, inst.uuid)
    gone = await get_interface(system, iface)
    assert gone.state == pb.NETWORK_INTERFACE_STATE_DELETED and not gone.HasField('floating')
    async with raises(C.NOT_FOUND):
        await system.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface))


async def test_an_exhausted_floating_pool_is_resource_exhausted(etcd, tmp_path):
    ctl = await server.start(controller_config(etcd, tmp_path, floating_netblock='203.0.113.0/29'))
    client = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    node = await NodeDouble(NodeApi.of(ctl, etcd.pki)).start()
    try:
        pool = assignable('203.0.113.0/29')                 # five addresses
        nat = await network(client, provide_nat=True)       # the gateway takes one
        inst = await create(client, network=[spec(float=True) for _ in range(3)])
        extra = (await create(client, 'extra', networks=['net1'])).interfaces[0].uuid
        await client.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=extra))
        freed = (await get_interface(client, extra)).floating
        assert {nat.floating_gateway, freed, *(i.floating for i in inst.interfaces)} == pool
        async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES', 'no free addresses'):
            await create(client, 'more', network=[spec(float=True)])
        await client.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=extra))
        again = await create(client, 'more', network=[spec(float=True)])
        assert again.interfaces[0].floating == freed
    finally:
        await node.stop()
        await client.close()
        await ctl.stop(None)


async def test_unknown_or_foreign_interface_is_not_found(system, tenant, node):
    await network(system)
    inst = await create(system, networks=['net1'])
    for ref in ('nope', inst.interfaces[0].uuid):
        async with raises(C.NOT_FOUND, 'NOT_FOUND', 'interface not found'):
            await get_interface(tenant, ref)
        async with raises(C.NOT_FOUND):
            await tenant.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=ref))


# -- metadata ---------------------------------------------------------------------------------------

def value(v):
    out = struct_pb2.Value()
    if isinstance(v, list):
        out.list_value.extend(v)
    elif isinstance(v, dict):
        out.struct_value.update(v)
    else:
        out.string_value = v
    return out


async def test_network_metadata_get_set_delete(system):
    await network(system)

    async def md():
        r = await system.networks.GetNetworkMetadata(net.GetNetworkMetadataRequest(network_ref='net1'))
        return dict(r.metadata)
    assert await md() == {}
    await system.networks.SetNetworkMetadata(net.SetNetworkMetadataRequest(
        network_ref='net1', key='owner', value=value('ops')))
    await system.networks.SetNetworkMetadata(net.SetNetworkMetadataRequest(
        network_ref='net1', key='ports', value=value([22.0, 80.0])))
    got = await md()
    assert got['owner'] == 'ops' and list(got['ports']) == [22, 80]
    assert (await get_network(system, 'net1')).metadata['owner'] == 'ops'
    await system.networks.DeleteNetworkMetadata(net.DeleteNetworkMetadataRequest(
        network_ref='net1', key='owner'))
    assert set(await md()) == {'ports'}
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'owner'):
        await system.networks.DeleteNetworkMetadata(net.DeleteNetworkMetadataRequest(
            network_ref='net1', key='owner'))
    async with raises(C.INVALID_ARGUMENT, match='no value'):
        await system.networks.SetNetworkMetadata(net.SetNetworkMetadataRequest(
            network_ref='net1', key='empty'))


async def test_interface_metadata_get_set_delete(system, node):
    await network(system)
    iface = (await create(system, networks=['net1'])).interfaces[0].uuid

    async def md():
        r = await system.interfaces.GetInterfaceMetadata(net.GetInterfaceMetadataRequest(
            interface_uuid=iface))
        return dict(r.metadata)
    assert await md() == {}
    await system.interfaces.SetInterfaceMetadata(net.SetInterfaceMetadataRequest(
        interface_uuid=iface, key='role', value=value({'tier': 'web'})))
    assert dict((await md())['role']) == {'tier': 'web'}
    assert (await get_interface(system, iface)).metadata['role']['tier'] == 'web'
    await system.interfaces.DeleteInterfaceMetadata(net.DeleteInterfaceMetadataRequest(
        interface_uuid=iface, key='role'))
    assert await md() == {}
    async with raises(C.NOT_FOUND):
        await system.interfaces.DeleteInterfaceMetadata(net.DeleteInterfaceMetadataRequest(
            interface_uuid=iface, key='role'))
