"""End to end, NAT egress and floating addresses on a real TCG guest: an instance
on a provide_nat network (on node1, so its packets cross the VXLAN to the
network node) reaches a server in an "outside" namespace made by the test,
joined to sf-up's edge, which sees the network's egress address; floated, it is
seen as its floating address, and the outside reaches the guest's HTTP server
through the floating address, also while and after the network node is killed
with SIGKILL and started again by sf-up (nothing duplicated); defloated, it no longer does and
the connections through the floating address are gone from conntrack. Floated and defloated are
events on the interface. Deleting it all leaves nothing of the plane."""

import re
import subprocess
import time

import pytest
import pytest_asyncio

from sfup.underlay import plane_prefix
from shakenfist.v1 import event_pb2, specs_pb2
from shakenfist.v1 import instance_pb2 as pb
from shakenfist.v1 import instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net
from tests.helpers import get, watching
from tests.plane import Plane
from tests.test_e2e_network import BOOT, _deleted, plane_things, run
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
NETBLOCK = '198.18.30.0/24'
OUTSIDE = '198.19.0.2'
PORT = 8000

# A TCP server that tells each client the address it sees it from, then closes.
SERVER = ('import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n'
          f's.bind(("0.0.0.0",{PORT}));s.listen()\n'
          'while True:\n c,a=s.accept();c.sendall((a[0]+"\\n").encode());c.close()\n')


def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@pytest.fixture(scope='module')
def plane():
    p = Plane(nodes=2).start()
    yield p
    p.stop()


def nat_state(netns):
    """What NAT made in the network's namespace: its nft tables, ext0's addresses, routes."""
    return (sh('ip', 'netns', 'exec', netns, 'nft', 'list', 'tables').stdout,
            sorted(sh('ip', '-n', netns, '-o', 'addr', 'show', 'dev', 'ext0').stdout.split('\n')),
            sh('ip', '-n', netns, 'route').stdout)


@pytest.fixture(scope='module')
def outside(plane):
    """A host outside: a namespace on sf-up's edge, 198.19.0.2, routing the pool via the edge."""
    prefix = plane_prefix(plane.state)
    ns, edge = f'{prefix}-out', f'{prefix}-edge'
    sh('ip', 'netns', 'add', ns)
    sh('ip', '-n', ns, 'link', 'add', 'o0', 'type', 'veth', 'peer', 'name', 'out0', 'netns', edge)
    sh('ip', '-n', edge, 'addr', 'add', '198.19.0.1/24', 'dev', 'out0')
    sh('ip', '-n', edge, 'link', 'set', 'out0', 'up')
    sh('ip', '-n', ns, 'addr', 'add', f'{OUTSIDE}/24', 'dev', 'o0')
    sh('ip', '-n', ns, 'link', 'set', 'o0', 'up')
    sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')
    sh('ip', '-n', ns, 'route', 'add', '203.0.113.0/24', 'via', '198.19.0.1')
    server = subprocess.Popen(['ip', 'netns', 'exec', ns, 'python3', '-c', SERVER])
    yield ns
    server.kill()
    server.wait()
    sh('ip', 'netns', 'del', ns, check=False)


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def client(plane):
    c = await plane.client()
    yield c
    await c.close()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def iface_events(client):
    async with watching(client, event_pb2.OBJECT_TYPE_NETWORK_INTERFACE) as seen:
        yield seen


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def guest(plane, client, outside, iface_events):
    network = (await client.networks.CreateNetwork(net.CreateNetworkRequest(
        name='natted', netblock=NETBLOCK, provide_dhcp=True, provide_nat=True))).network
    inst = (await client.instances.CreateInstance(api.CreateInstanceRequest(
        name='gamma', cpus=1, memory=128, disk=[specs_pb2.DiskSpec(size=1, base='sftest')],
        network=[specs_pb2.NetworkSpec(network_uuid='natted')], placed_on='node1'))).instance

    async def ready():
        i = await get(client, inst.uuid)
        return i.state == pb.INSTANCE_STATE_CREATED and i.agent_state == pb.AGENT_STATE_READY
    await eventually(ready, BOOT, interval=0.5, what='gamma created with its agent ready')
    rc, out = await run(client, 'gamma', 'mkdir -p /tmp/w && echo gamma > /tmp/w/index.html && httpd -p 80 -h /tmp/w')
    assert rc == 0, out
    return network, await get(client, inst.uuid)


async def seen_from(client, name):
    """What the outside server says the guest's address is."""
    rc, out = await run(client, name, f'nc -w 3 {OUTSIDE} {PORT} </dev/null')
    return out.strip() if rc == 0 else ''


def fetch(ns, address):
    """GET / from the guest's server, from the outside ('' if unreachable)."""
    r = sh('ip', 'netns', 'exec', ns, 'python3', '-c',
           f'import urllib.request;print(urllib.request.urlopen("http://{address}/",timeout=2).read().decode())',
           check=False)
    return r.stdout.strip()


async def test_egress_is_seen_as_the_networks_egress_address(client, guest):
    network, _ = guest
    assert network.floating_gateway.startswith('203.0.113.')
    assert await eventually(lambda: seen_from(client, 'gamma'), 60, interval=0.5,
                            what='gamma reaches the outside') == network.floating_gateway


async def test_floated_it_is_seen_as_its_floating_address_and_reached_through_it(
        plane, client, outside, guest, iface_events):
    network, inst = guest
    iface = inst.interfaces[0]
    start = time.monotonic()
    await client.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface.uuid))
    floating = next(i for i in (await get(client, inst.uuid)).interfaces if i.uuid == iface.uuid).floating
    assert floating.startswith('203.0.113.'), floating
    assert await eventually(lambda: fetch(outside, floating), 10, interval=0.05,
                            what=f'the outside reaches gamma at {floating}') == 'gamma'
    took = time.monotonic() - start
    assert took < 2.0, took      # with a python started per try in the outside
    assert await seen_from(client, 'gamma') == floating
    await eventually(lambda: any(e.object_uuid == iface.uuid and e.message.startswith('floated')
                                 for e in iface_events), 10, what='a floated event on the interface')

    # The network node killed with SIGKILL and restarted: the floating address keeps
    # working meanwhile (the kernel holds it) and after, with nothing duplicated.
    prefix = plane_prefix(plane.state)
    netns = f'{prefix}0-dhcp-{network.vxlan_id:06x}'
    state = nat_state(netns)
    offset = plane.kill_node('node0')
    assert fetch(outside, floating) == 'gamma'
    synced = re.compile(r'"message": "networks synced"')
    await eventually(lambda: synced.search(plane.node_log('node0', offset)), 60, interval=0.5,
                     what='node0 restarted by sf-up and synced')
    assert 'converging networks failed' not in plane.node_log('node0', offset), plane.node_log('node0', offset)[-3000:]
    assert fetch(outside, floating) == 'gamma'
    assert nat_state(netns) == state
    assert len([e for e in iface_events if e.object_uuid == iface.uuid and e.message.startswith('floated')]) == 1

    # A connection held open through the floating address, then the defloat.
    held = subprocess.Popen(['ip', 'netns', 'exec', outside, 'python3', '-c',  # noqa: ASYNC220 -- held open
                             (f'import socket,time;s=socket.create_connection(("{floating}",80),timeout=3);'
                              'time.sleep(600)')])
    try:
        await eventually(lambda: floating in sh('ip', 'netns', 'exec', netns, 'conntrack', '-L',
                                                check=False).stdout, 10, what='the connection in conntrack')
        start = time.monotonic()
        await client.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=iface.uuid))
        await eventually(lambda: fetch(outside, floating) == '', 10, interval=0.05,
                         what=f'gamma no longer reached at {floating}')
        assert time.monotonic() - start < 3.5       # the fetch itself waits 2 s to fail
        assert floating not in sh('ip', 'netns', 'exec', netns, 'conntrack', '-L', check=False).stdout
    finally:
        held.kill()
        held.wait()
    assert await seen_from(client, 'gamma') == network.floating_gateway
    await eventually(lambda: any(e.object_uuid == iface.uuid and e.message.startswith('defloated')
                                 for e in iface_events), 10, what='a defloated event on the interface')


async def test_deleting_everything_leaves_nothing_of_the_plane_behind(plane, client, guest):
    _, inst = guest
    prefix = plane_prefix(plane.state)
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    await eventually(lambda: _deleted(client, inst.uuid), 120, interval=0.5, what='gamma deleted')
    await client.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref='natted'))
    empty = {'links': [], 'namespaces': [f'{prefix}-out'], 'dnsmasq': []}
    await eventually(lambda: plane_things(plane) == empty, 30, interval=0.25,
                     what='no link, namespace or dnsmasq of the plane left')
    edge = sh('ip', '-n', f'{prefix}-edge', '-j', 'link').stdout
    assert f'{prefix}0-e' not in edge, edge
