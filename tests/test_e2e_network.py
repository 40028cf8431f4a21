"""End to end, networks that carry packets: two real TCG guests on one DHCP network,
pinned to two nodes of one plane (sf-up's per-node underlays, node0 the network
node), get their addresses by DHCP, reach each other over the VXLAN mesh by
address and by name, with no MTU black hole. Each node (the network node too)
killed with SIGKILL is started again by sf-up, and carries and serves again with
nothing duplicated; hot-plugged NICs get their addresses; an address given up goes to
the next MAC; a floated guest is reached from the network through its floating
address (hairpin). The network node says which leases it gave, and the network
where it is served. Deleting it all leaves no link, namespace or dnsmasq of the plane
behind."""

import json
import re
import subprocess

import grpc
import pytest
import pytest_asyncio

from sfup.underlay import plane_prefix
from shakenfist.v1 import agent_operation_service_pb2 as aop
from shakenfist.v1 import event_pb2, specs_pb2
from shakenfist.v1 import instance_pb2 as pb
from shakenfist.v1 import instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net
from tests.helpers import get, watching
from tests.plane import Plane
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
BOOT = 150          # a boot, two guests at once, on a busy 2-core machine under TCG
NETBLOCK, NETBLOCK2 = '198.18.10.0/24', '198.18.11.0/24'


@pytest.fixture(scope='module')
def plane():
    p = Plane(nodes=2).start()
    yield p
    p.stop()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def client(plane):
    c = await plane.client()
    yield c
    await c.close()


async def run(client, ref, command, timeout=60):
    """Run a command in the guest through its agent: (exit code, stdout)."""
    op = (await client.agentops.ExecuteCommand(aop.ExecuteCommandRequest(
        instance_ref=ref, command_line=command, deadline_seconds=timeout))).agent_operation

    async def ended():
        r = (await client.agentops.GetAgentOperation(aop.GetAgentOperationRequest(
            agent_operation_uuid=op.uuid))).agent_operation
        return r if r.state in (5, 6, 7) else None
    done = await eventually(ended, timeout + 10, interval=0.5, what=f'{command!r} ended')
    assert done.state == 5, done
    return done.results['0'].return_code, done.results['0'].stdout


def plane_things(plane) -> dict[str, list[str]]:
    """Every link, namespace and dnsmasq of the plane's nodes (sf-up's own underlay aside)."""
    prefix = plane_prefix(plane.state)
    links = [link['ifname'] for link in json.loads(subprocess.run(
        ['ip', '-j', 'link'], capture_output=True, text=True, check=False).stdout) if link['ifname'].startswith(prefix)]
    namespaces = [ns['name'] for ns in json.loads(subprocess.run(
        ['ip', '-j', 'netns', 'list'], capture_output=True, text=True, check=False).stdout or '[]')
        if ns['name'].startswith(prefix) and not ns['name'].endswith(('-ul', '-fabric', '-edge'))]
    dnsmasqs = [line for line in subprocess.run(['ps', '-eo', 'args'], capture_output=True,
                                                text=True, check=False).stdout.splitlines()
                if line.startswith('dnsmasq') and str(plane.state) in line]
    return {'links': links, 'namespaces': namespaces, 'dnsmasq': dnsmasqs}


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def network_events(client):
    """The networks' events from before the network is made (a watch from now on)."""
    async with watching(client, event_pb2.OBJECT_TYPE_NETWORK) as seen:
        yield seen


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def guests(plane, client, network_events):
    await client.networks.CreateNetwork(net.CreateNetworkRequest(
        name='lan', netblock=NETBLOCK, provide_dhcp=True, provide_dns=True))
    made = []
    for name, node in (('alpha', 'node0'), ('beta', 'node1')):
        made.append((await client.instances.CreateInstance(api.CreateInstanceRequest(
            name=name, cpus=1, memory=128, disk=[specs_pb2.DiskSpec(size=1, base='sftest')],
            network=[specs_pb2.NetworkSpec(network_uuid='lan')], placed_on=node))).instance)
    for inst in made:
        async def ready(inst=inst):
            i = await get(client, inst.uuid)
            return i.state == pb.INSTANCE_STATE_CREATED and i.agent_state == pb.AGENT_STATE_READY
        await eventually(ready, BOOT, interval=0.5, what=f'{inst.name} created with its agent ready')
    return [await get(client, i.uuid) for i in made]


async def test_guests_on_two_nodes_get_their_addresses_by_dhcp(plane, guests):
    assert {g.node for g in guests} == {'node0', 'node1'}
    for g in guests:
        address = g.interfaces[0].ipv4
        marker = re.compile(rf'SFTEST net: eth0 {re.escape(address)}/24 mtu=1450')
        await eventually(lambda g=g, marker=marker: marker.search(plane.console(g.node, g.uuid)), 60, interval=0.5,
                         what=f'{g.name} reports {address}/24 from DHCP')


async def test_the_network_says_where_it_is_served_and_who_carries_it(client, guests, network_events):
    served = [e for e in network_events if e.type == event_pb2.EVENT_TYPE_STATUS
              and 'served by node0' in e.message]
    assert served, [e.message for e in network_events]
    meshes = {e.fqdn: dict(e.extra)['peers'] for e in network_events if e.message.startswith('mesh on')}
    assert meshes == {'node0': ['198.51.100.11'], 'node1': ['198.51.100.10']}, meshes
    for g in guests:
        await eventually(lambda g=g: any(e.message.startswith(f'DHCP lease given: {g.interfaces[0].ipv4} to '
                                                              f'{g.interfaces[0].macaddr} ({g.name})')
                                         for e in network_events), 30, what=f'the lease given to {g.name}')
    shown = (await client.networks.GetNetwork(net.GetNetworkRequest(network_ref='lan'))).network
    assert (list(shown.served_by), list(shown.mesh_nodes)) == (['node0'], ['node0', 'node1'])


async def test_guests_reach_each_other_by_address_and_by_name_without_an_mtu_black_hole(client, guests):
    alpha, beta = guests
    for me, other in ((alpha, beta), (beta, alpha)):
        address = other.interfaces[0].ipv4
        rc, out = await run(client, me.name, f'ping -c 3 -W 5 {address}')
        assert rc == 0, out
        rc, out = await run(client, me.name, f'nslookup {other.name}')
        assert rc == 0 and address in out, out
        # 1422 bytes of data is a 1450-byte packet: the network's MTU, which the guest
        # learnt by DHCP (a 1500-MTU guest would send frames the VXLAN cannot carry).
        rc, out = await run(client, me.name, 'cat /sys/class/net/eth0/mtu')
        assert out.strip() == '1450'
        for size in (1400, 1422):
            rc, out = await run(client, me.name, f'ping -c 2 -W 5 -s {size} {address}')
            assert rc == 0, out


async def test_a_floated_guest_is_reached_through_its_floating_address_from_the_network_itself(
        client, guests, network_events):
    """Hairpin between real guests, on a network without NAT: alpha fetches from
    beta's floating address, through the network node and back."""
    _, beta = guests
    rc, out = await run(client, 'beta', 'mkdir -p /tmp/w && echo beta > /tmp/w/index.html && httpd -p 80 -h /tmp/w')
    assert rc == 0, out
    iface = beta.interfaces[0]
    await client.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface.uuid))
    floating = next(i for i in (await get(client, beta.uuid)).interfaces if i.uuid == iface.uuid).floating
    # busybox's static wget crashes in this guest; nc speaks the HTTP.
    fetch = f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 2 {floating} 80'

    async def fetched():
        rc, out = await run(client, 'alpha', fetch)
        return out.strip().splitlines()[-1] if rc == 0 and out.strip() else ''
    assert await eventually(fetched, 30, interval=0.5, what=f'alpha reaches beta at {floating}') == 'beta'
    await client.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=iface.uuid))
    await eventually(lambda: _not(fetched), 30, interval=0.5, what=f'beta no longer reached at {floating}')
    for verb in ('floated', 'defloated'):
        await eventually(lambda verb=verb: any(e.message.startswith(f'{verb}: {floating} (interface {iface.uuid})')
                                               for e in network_events), 10, what=f'{verb} on the network')


async def _not(check):
    return not await check()


@pytest.mark.parametrize('index', [1, 0], ids=['node1', 'node0, the network node'])
async def test_a_node_killed_and_restarted_carries_again_with_nothing_duplicated(plane, client, guests, index):
    name = f'node{index}'
    here = next(g for g in guests if g.node == name)
    there = next(g for g in guests if g.node != name)
    before = plane_things(plane)
    killed = set(plane.node_pids(name))
    offset = plane.kill_node(name)
    # The guests keep their connectivity while the node is away: the kernel holds it.
    rc, out = await run(client, there.name, f'ping -c 2 -W 5 {here.interfaces[0].ipv4}')
    assert rc == 0, out
    # sf-up starts it again. The restarted node found its VXLAN, bridge (and dnsmasq)
    # and kept them: its first listing converged, and what was not desired was removed.
    synced = re.compile(r'"message": "networks synced"')
    try:
        await eventually(lambda: synced.search(plane.node_log(name, offset)), 60, interval=0.5,
                         what=f'{name} restarted by sf-up and its networks synced')
    except AssertionError as e:
        raise AssertionError(f'{e}\n{plane.node_log(name, offset)[-3000:]}') from None
    [restarted] = plane.node_pids(name)
    assert restarted not in killed
    assert 'converging networks failed' not in plane.node_log(name, offset)
    rc, out = await run(client, there.name, f'nslookup {here.name}')
    assert rc == 0 and here.interfaces[0].ipv4 in out, out
    rc, out = await run(client, here.name, f'ping -c 2 -W 5 {there.interfaces[0].ipv4}')
    assert rc == 0, out
    assert plane_things(plane) == before


async def test_a_hot_plugged_nic_gets_its_address_on_a_second_network(plane, client, guests):
    alpha = guests[0]
    await client.networks.CreateNetwork(net.CreateNetworkRequest(
        name='lan2', netblock=NETBLOCK2, provide_dhcp=True))
    added = []
    for g in guests:
        added.append((await client.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
            instance_ref=g.uuid, network=specs_pb2.NetworkSpec(network_uuid='lan2')))).network_interface)
    for g, iface in zip(guests, added):
        marker = re.compile(rf'SFTEST net: eth1 {re.escape(iface.ipv4)}/24 mtu=1450')
        await eventually(lambda g=g, marker=marker: marker.search(plane.console(g.node, g.uuid)), 90,
                         interval=0.5, what=f'{g.name} reports {iface.ipv4} on eth1')
    rc, out = await run(client, alpha.name, f'ping -c 2 -W 5 {added[1].ipv4}')
    assert rc == 0, out


async def test_an_address_given_up_is_leased_to_the_next_mac_that_gets_it(plane, client, guests):
    """alpha's eth1 is unplugged and its address given to a new NIC of beta's: the
    network node releases the old lease, or dnsmasq would refuse the new MAC."""
    alpha, beta = guests
    old = next(i for i in (await get(client, alpha.uuid)).interfaces if i.order == 1)
    await client.instances.RemoveInstanceInterface(api.RemoveInstanceInterfaceRequest(
        instance_ref=alpha.uuid, interface_uuid=old.uuid))
    await eventually(lambda: 'SFTEST nic-removed: eth1' in plane.console(alpha.node, alpha.uuid), 60,
                     interval=0.5, what='eth1 unplugged from alpha')

    async def plugged():
        try:
            return (await client.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
                instance_ref=beta.uuid, network=specs_pb2.NetworkSpec(network_uuid='lan2', address=old.ipv4)))
                ).network_interface
        except grpc.aio.AioRpcError as e:     # the address is free once the unplug is done
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e
            return None
    new = await eventually(plugged, 60, interval=0.5, what=f'{old.ipv4} free for beta')
    assert new.macaddr != old.macaddr
    marker = re.compile(rf'SFTEST net: eth2 {re.escape(old.ipv4)}/24 mtu=1450')
    await eventually(lambda: marker.search(plane.console(beta.node, beta.uuid)), 90, interval=0.5,
                     what=f'beta reports {old.ipv4} on eth2')


async def test_deleting_everything_leaves_nothing_of_the_plane_behind(plane, client, guests):
    assert plane_things(plane)['dnsmasq'], 'the network node serves the network'
    for g in guests:
        await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=g.uuid))
    for g in guests:
        await eventually(lambda g=g: _deleted(client, g.uuid), 120, interval=0.5, what=f'{g.name} deleted')
    for name in ('lan', 'lan2'):
        await client.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=name))
    empty = {'links': [], 'namespaces': [], 'dnsmasq': []}
    await eventually(lambda: plane_things(plane) == empty, 30, interval=0.25,
                     what='no link, namespace or dnsmasq of the plane left')


async def _deleted(client, uuid):
    return (await get(client, uuid)).state == pb.INSTANCE_STATE_DELETED
