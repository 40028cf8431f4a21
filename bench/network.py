"""P9: networks that carry packets, on a real guest (the sftest image, QEMU/TCG).

sf-up with two nodes (tests/plane.py): node0 the network node, the guest pinned to
node1, so every packet crosses the VXLAN mesh. Per round, one new guest on a
DHCP and NAT network:

- P9: create -> the guest answers a ping on its DHCP address, pinged from the
  network's own namespace on the network node; against the guest's own boot in
  the same round: create -> the guest's console says it configured that address
  (`SFTEST net: eth0 <addr>/24`, printed by its DHCP client).
- P9b: float -> an "outside" namespace on sf-up's edge fetches from the guest's
  HTTP server through the floating address; P9c: defloat -> it no longer does.

The probes are short: a ping with a 200 ms wait every 50 ms, a curl with a
300 ms limit every 20 ms; a probe that fails waits out its limit, so P9c
includes up to one curl limit.
"""

import asyncio
import re

from bench.common import now
from sfup.underlay import plane_prefix
from shakenfist.v1 import agent_operation_service_pb2 as aop
from shakenfist.v1 import instance_pb2 as ipb
from shakenfist.v1 import instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net
from shakenfist.v1 import specs_pb2
from tests.plane import Plane

NETBLOCK = '198.18.50.0/24'
BOOT = 180.0


async def _ok(*argv) -> bool:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return proc.returncode == 0 and (b'ok' in out if 'curl' in argv else True)


async def _sh(*argv):
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    await proc.wait()


async def _until(check, interval, what):
    t0 = now()
    while not await check():
        if now() - t0 > BOOT:
            raise TimeoutError(what)
        await asyncio.sleep(interval)
    return now()


async def _outside(prefix: str) -> str:
    """A namespace joined to the edge (198.19.0.2), routing the pool via the edge."""
    ns, edge = f'{prefix}-bout', f'{prefix}-edge'
    for argv in (('ip', 'netns', 'add', ns),
                 ('ip', '-n', ns, 'link', 'add', 'o0', 'type', 'veth', 'peer', 'name', 'bout0', 'netns', edge),
                 ('ip', '-n', edge, 'addr', 'add', '198.19.0.1/24', 'dev', 'bout0'),
                 ('ip', '-n', edge, 'link', 'set', 'bout0', 'up'),
                 ('ip', '-n', ns, 'addr', 'add', '198.19.0.2/24', 'dev', 'o0'),
                 ('ip', '-n', ns, 'link', 'set', 'o0', 'up'),
                 ('ip', '-n', ns, 'route', 'add', '203.0.113.0/24', 'via', '198.19.0.1')):
        await _sh(*argv)
    return ns


async def _run(client, uuid, command):
    op = (await client.agentops.ExecuteCommand(aop.ExecuteCommandRequest(
        instance_ref=uuid, command_line=command, deadline_seconds=60))).agent_operation
    get = aop.GetAgentOperationRequest(agent_operation_uuid=op.uuid)
    while (await client.agentops.GetAgentOperation(get)).agent_operation.state not in (5, 6, 7):
        await asyncio.sleep(0.2)


async def _round(plane, client, netns, outside, name) -> dict:
    t0 = now()
    inst = (await client.instances.CreateInstance(api.CreateInstanceRequest(
        name=name, cpus=1, memory=128, disk=[specs_pb2.DiskSpec(size=1, base='sftest')],
        network=[specs_pb2.NetworkSpec(network_uuid='benchnet')], placed_on='node1'))).instance
    address = inst.interfaces[0].ipv4
    marker = re.compile(rf'SFTEST net: eth0 {re.escape(address)}/')

    async def configured():
        return bool(marker.search(plane.console(inst.node, inst.uuid)))
    booted, pinged = await asyncio.gather(
        _until(configured, 0.02, f'{name} configured {address}'),
        _until(lambda: _ok('ip', 'netns', 'exec', netns, 'ping', '-c1', '-W0.2', address), 0.05,
               f'{name} answers a ping'))
    get = api.GetInstanceRequest(instance_ref=inst.uuid)

    async def ready():
        return (await client.instances.GetInstance(get)).instance.agent_state == ipb.AGENT_STATE_READY
    await _until(ready, 0.2, f'{name} agent ready')
    await _run(client, inst.uuid, 'mkdir -p /tmp/w && echo ok > /tmp/w/index.html && httpd -p 80 -h /tmp/w')
    iface = inst.interfaces[0].uuid
    t1 = now()
    await client.interfaces.FloatInterface(net.FloatInterfaceRequest(interface_uuid=iface))
    floating = next(i for i in (await client.instances.GetInstance(get)).instance.interfaces
                    if i.uuid == iface).floating
    curl = ('ip', 'netns', 'exec', outside, 'curl', '-s', '-m', '0.3', f'http://{floating}/')
    floated = await _until(lambda: _ok(*curl), 0.02, f'{name} reached at {floating}')
    t2 = now()
    await client.interfaces.DefloatInterface(net.DefloatInterfaceRequest(interface_uuid=iface))

    async def gone():
        return not await _ok(*curl)
    defloated = await _until(gone, 0.02, f'{name} no longer reached')
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    while (await client.instances.GetInstance(get)).instance.state != ipb.INSTANCE_STATE_DELETED:
        await asyncio.sleep(0.2)
    return {'boot': booted - t0, 'ping': pinged - t0, 'float': floated - t1, 'defloat': defloated - t2}


async def p9(rounds: int) -> dict:
    plane = Plane(nodes=2).start()
    outside = None
    try:
        client = await plane.client()
        prefix = plane_prefix(plane.state)
        outside = await _outside(prefix)
        network = (await client.networks.CreateNetwork(net.CreateNetworkRequest(
            name='benchnet', netblock=NETBLOCK, provide_dhcp=True, provide_nat=True))).network
        netns = f'{prefix}0-dhcp-{network.vxlan_id:06x}'
        out = {k: [] for k in ('boot', 'ping', 'float', 'defloat', 'P9')}
        await _round(plane, client, netns, outside, 'warm')     # fetches the image
        for r in range(rounds):
            got = await _round(plane, client, netns, outside, f'n{r}')
            for k, v in got.items():
                out[k].append(v)
            out['P9'].append(got['ping'] / got['boot'])
        await client.close()
        return out
    finally:
        if outside:
            await _sh('ip', 'netns', 'del', outside)
        plane.stop()
