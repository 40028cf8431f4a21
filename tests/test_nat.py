"""NAT egress and floating addresses on a network node (sfnode/network/nat.py), with
namespaces standing in for guests and the outside (no VM): a network's namespace
made as the network node makes it, an edge as sf-up makes it (sfup/underlay.py),
and an outside host joined to the edge. Egress is seen as the network's egress
address, a floated guest as its floating address; the outside reaches the guest
through it, another guest too (hairpin); a defloat cuts an open connection.
Without provide_nat only a floated guest reaches the outside, as itself. A
lease dnsmasq gives (to busybox udhcpc in a stand-in) reaches the node. With
sf-up's host route (a namespace standing for the host) the host reaches a
floating address, and stop takes the route away.
Needs root; everything made is named with a prefix of the test's own and removed."""

import asyncio
import json
import os
import secrets
import subprocess
import types

import pytest

from sfnode.network import ip
from sfnode.network.dhcp import Dhcp
from sfnode.network.leases import LeaseListener, parse
from sfnode.network.nat import Nat
from sfup.underlay import Underlay
from tests.waiting import eventually

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason='needs root (namespaces)'),
              pytest.mark.asyncio]
NETBLOCK = '198.18.20.0/24'
OUTSIDE = '198.19.0.2'


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, capture_output=True, text=True, check=check, **kw)


def netns(name, *argv, **kw):
    return sh('ip', 'netns', 'exec', name, *argv, **kw)


@pytest.fixture
def world(tmp_path):
    """A bridge (the node's), two guest stand-ins on it, an edge and an outside."""
    tag = secrets.token_hex(2)
    prefix = f'tn{tag}-'
    underlay = Underlay(tmp_path / 'plane', 0)
    underlay.prefix, underlay.fabric, underlay.edge = f'tn{tag}', f'tn{tag}-fabric', f'tn{tag}-edge'
    asyncio.run(underlay.start())
    bridge = f'{prefix}br'
    sh('ip', 'link', 'add', bridge, 'type', 'bridge')
    sh('ip', 'link', 'set', bridge, 'up')
    guests = []
    for i in (1, 2):
        ns, addr = f'{prefix}g{i}', f'198.18.20.{10 + i}'
        sh('ip', 'netns', 'add', ns)
        sh('ip', 'link', 'add', f'{prefix}g{i}', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns)
        sh('ip', 'link', 'set', f'{prefix}g{i}', 'master', bridge, 'up')
        sh('ip', '-n', ns, 'addr', 'add', f'{addr}/24', 'dev', 'eth0')
        sh('ip', '-n', ns, 'link', 'set', 'eth0', 'up')
        sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')
        sh('ip', '-n', ns, 'route', 'add', 'default', 'via', '198.18.20.1')
        guests.append((ns, addr))
    outside = f'{prefix}out'
    sh('ip', 'netns', 'add', outside)
    sh('ip', '-n', outside, 'link', 'add', 'o0', 'type', 'veth', 'peer', 'name', 'out0', 'netns', underlay.edge)
    sh('ip', '-n', underlay.edge, 'addr', 'add', '198.19.0.1/24', 'dev', 'out0')
    sh('ip', '-n', underlay.edge, 'link', 'set', 'out0', 'up')
    sh('ip', '-n', outside, 'addr', 'add', f'{OUTSIDE}/24', 'dev', 'o0')
    sh('ip', '-n', outside, 'link', 'set', 'o0', 'up')
    sh('ip', '-n', outside, 'link', 'set', 'lo', 'up')
    sh('ip', '-n', outside, 'route', 'add', '203.0.113.0/24', 'via', '198.19.0.1')
    w = types.SimpleNamespace(prefix=prefix, bridge=bridge, guests=guests, outside=outside, edge=underlay.edge,
                              underlay=underlay,
                              dhcp=Dhcp(prefix, tmp_path / 'state'), nat=Nat(prefix, underlay.edge),
                              procs=[])
    yield w
    for p in w.procs:
        p.kill()
        p.wait()
    asyncio.run(underlay.stop())
    for ns in json.loads(sh('ip', '-j', 'netns', 'list').stdout or '[]'):
        if ns['name'].startswith(prefix):
            sh('ip', 'netns', 'del', ns['name'], check=False)
    for link in json.loads(sh('ip', '-j', 'link').stdout):
        if link['ifname'].startswith(prefix):
            sh('ip', 'link', 'del', link['ifname'], check=False)


def network(vni=0x20, provide_nat=True):
    return types.SimpleNamespace(vxlan_id=vni, netblock=NETBLOCK, provide_nat=provide_nat, uuid='n',
                                 floating_gateway='203.0.113.5' if provide_nat else '')


def server(w, ns, port):
    """A TCP server in ns that answers each connection with the peer's address, then
    holds it open (a long-lived connection) until the client goes."""
    code = ('import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n'
            f's.bind(("0.0.0.0",{port}));s.listen()\n'
            'while True:\n c,a=s.accept();c.sendall((a[0]+"\\n").encode())\n'
            ' import threading;threading.Thread(target=lambda c=c:(c.recv(1),c.close()),daemon=True).start()\n')
    p = subprocess.Popen(['ip', 'netns', 'exec', ns, 'python3', '-c', code])
    w.procs.append(p)


def seen(ns, address, port):
    """What the server at address:port says the client's address is ('' if unreachable)."""
    r = netns(ns, 'python3', '-c', f'import socket;s=socket.create_connection(("{address}",{port}),timeout=2);'
              'print(s.recv(64).decode().strip())', check=False)
    return r.stdout.strip()


async def test_egress_floating_hairpin_and_defloat(world):
    w = world
    (g1, a1), (g2, _) = w.guests
    ns = await w.dhcp.plumb(network(), w.bridge)
    await w.nat.ensure(ns, network(), '203.0.113.0/24', {})
    server(w, w.outside, 8000)
    await eventually(lambda: seen(g1, OUTSIDE, 8000), 10, interval=0.1, what='the outside reached')
    assert seen(g1, OUTSIDE, 8000) == '203.0.113.5'       # masqueraded to the egress address

    server(w, g1, 9000)
    await w.nat.ensure(ns, network(), '203.0.113.0/24', {'203.0.113.9': a1})
    assert seen(g1, OUTSIDE, 8000) == '203.0.113.9'       # 1:1 SNAT
    assert seen(g2, OUTSIDE, 8000) == '203.0.113.5'
    assert seen(w.outside, '203.0.113.9', 9000) == OUTSIDE  # DNAT, the client's address kept
    assert seen(g2, '203.0.113.9', 9000) == '198.18.20.1'   # hairpin, via the gateway

    # An open connection from the outside through the floating address is cut by the defloat.
    held = subprocess.Popen(['ip', 'netns', 'exec', w.outside, 'python3', '-c',  # noqa: ASYNC220 -- a client held open
                             ('import socket,time;s=socket.create_connection(("203.0.113.9",9000),timeout=2);'
                             'print(s.recv(64).decode().strip(),flush=True);input();s.settimeout(5);s.sendall(b"x")\n'
                             'try:\n print(repr(s.recv(64)))\nexcept OSError as e: print("cut",e)')],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    w.procs.append(held)
    assert held.stdout.readline().strip() == OUTSIDE
    await w.nat.ensure(ns, network(), '203.0.113.0/24', {})
    assert seen(w.outside, '203.0.113.9', 9000) == ''
    assert seen(g1, OUTSIDE, 8000) == '203.0.113.5'
    assert not netns(ns, 'conntrack', '-L', '-d', '203.0.113.9', check=False).stdout.strip()
    out, _ = held.communicate('\n', timeout=30)
    # Had the byte reached the guest, its server would have closed the connection (b'').
    assert out.startswith('cut'), out

    await w.nat.remove(ns, 0x20)
    await w.dhcp.remove(0x20)
    assert not (await ip.links(w.prefix + 'e', netns=w.edge))
    assert not (await ip.namespaces(w.dhcp.namespace(0x20)))


async def test_without_nat_only_a_floated_address_leaves_and_is_reached(world):
    w = world
    (g1, a1), (g2, _) = w.guests
    plain = network(provide_nat=False)
    ns = await w.dhcp.plumb(plain, w.bridge)
    server(w, w.outside, 8000)
    server(w, g1, 9000)
    await w.nat.ensure(ns, plain, '203.0.113.0/24', {'203.0.113.9': a1})
    assert await eventually(lambda: seen(g1, OUTSIDE, 8000), 10, interval=0.1,
                            what='the floated guest reaches the outside') == '203.0.113.9'
    assert seen(w.outside, '203.0.113.9', 9000) == OUTSIDE
    assert seen(g2, OUTSIDE, 8000) == ''                    # not floated: no egress without NAT
    assert seen(g2, '203.0.113.9', 9000) == '198.18.20.1'   # hairpin still works
    addrs = netns(ns, 'ip', '-o', 'addr', 'show', 'dev', 'ext0').stdout
    assert '203.0.113.9/32' in addrs and '203.0.113.5' not in addrs

    await w.nat.ensure(ns, plain, '203.0.113.0/24', {})
    assert seen(w.outside, '203.0.113.9', 9000) == ''
    assert seen(g1, OUTSIDE, 8000) == ''
    await w.nat.remove(ns, 0x20)
    await w.dhcp.remove(0x20)
    assert not (await ip.links(w.prefix + 'e', netns=w.edge))


async def test_a_lease_given_by_dnsmasq_reaches_the_node(world, tmp_path):
    w = world
    g2, _ = w.guests[1]
    mac = json.loads(netns(g2, 'ip', '-j', 'link', 'show', 'eth0').stdout)[0]['address']
    listener = LeaseListener(tmp_path / 'leases.sock')
    assert await listener.start()
    try:
        dhcp = Dhcp(w.prefix, tmp_path / 'served', listener.path)
        lan = types.SimpleNamespace(vxlan_id=0x21, netblock=NETBLOCK, uuid='n')
        host = types.SimpleNamespace(macaddr=mac, ipv4='198.18.20.40', hostname='beta')
        await dhcp.ensure(lan, w.bridge, [host])
        got = await asyncio.to_thread(netns, g2, 'busybox', 'udhcpc', '-i', 'eth0', '-n', '-q', '-t', '5',
                                      '-s', '/bin/true', check=False)
        assert got.returncode == 0, got.stderr
        lease = await asyncio.wait_for(listener.queue.get(), 10)
        assert lease == {'vni': 0x21, 'action': 'add', 'mac': mac, 'ipv4': '198.18.20.40', 'hostname': 'beta'}
        await dhcp.remove(0x21)
    finally:
        listener.stop()
    assert not (tmp_path / 'leases.sock').exists()


async def test_a_lease_datagram_is_checked_before_it_is_believed():
    good = {'vni': 7, 'action': 'add', 'mac': '02:00:00:AA:bb:01', 'ipv4': '198.18.0.5', 'hostname': 'web'}
    assert parse(json.dumps(good).encode())['mac'] == '02:00:00:aa:bb:01'
    assert parse(json.dumps({**good, 'hostname': 'a b;rm -rf'}).encode())['hostname'] == ''
    for bad in (b'not json', b'[]', json.dumps({**good, 'action': 'old'}).encode(),
                json.dumps({**good, 'mac': 'zz'}).encode(), json.dumps({**good, 'ipv4': 'x' * 40}).encode(),
                json.dumps({k: v for k, v in good.items() if k != 'vni'}).encode()):
        assert parse(bad) is None, bad


async def test_the_host_route_lets_the_host_reach_a_floating_address_and_goes_on_stop(world):
    w = world
    g1, a1 = w.guests[0]
    host = f'{w.prefix}host'
    sh('ip', 'netns', 'add', host)
    ns = await w.dhcp.plumb(network(), w.bridge)
    await w.nat.ensure(ns, network(), '203.0.113.0/24', {'203.0.113.9': a1})
    server(w, g1, 9000)
    assert seen(host, '203.0.113.9', 9000) == ''          # no route yet
    w.underlay.host_route, w.underlay.host_netns = True, host
    await w.underlay.start()
    device = f'{w.underlay.prefix}-hr'
    routes = sorted(r.strip() for r in netns(host, 'ip', 'route').stdout.splitlines())
    assert routes == [f'198.19.255.0/30 dev {device} proto kernel scope link src 198.19.255.1',
                      f'203.0.113.0/24 via 198.19.255.2 dev {device}'], routes
    assert await eventually(lambda: seen(host, '203.0.113.9', 9000), 10, interval=0.1,
                            what='the host reaches the floating address') == '198.19.255.1'
    await w.underlay.start()                                # a second start makes it again, once
    assert len(netns(host, 'ip', 'route').stdout.splitlines()) == 2
    await w.underlay.stop()
    assert netns(host, 'ip', 'route').stdout.strip() == ''
    assert device not in netns(host, 'ip', 'link').stdout
