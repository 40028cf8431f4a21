"""The nodes' underlay on one machine: what the VXLANs of sf-up's nodes run over.

As measured (shared/reference/network-dataplane.md): a fabric namespace of the
plane's own holds a bridge; each node gets an underlay namespace with a veth
on that bridge holding its mesh address (198.51.100.10+i, a documentation range
that is never the machine's own). A node's VXLANs are created in its underlay
namespace (their sockets stay there, so each node is its own VTEP on one
machine) and moved into the root namespace, beside the node's bridges and the
guests' taps (sfnode/network/). sfnode itself runs in the root namespace: its
gRPC to the controller, its consoles and libvirt need nothing new.

Nothing is added to the root namespace: no address, route, forwarding or
firewall. Every namespace is named sf<plane>..., from the state directory, so
planes on one machine never share one.

The edge (<prefix>-edge) is the network node's outside: a bridge edge0 holding
the floating pool's first address (203.0.113.1/24, the pool's gateway), with
ip_forward on in that namespace only. Each NAT network's namespace on the
network node has a veth on edge0 (sfnode/network/nat.py); whatever stands for
the world (a test's "outside" namespace) is joined to the edge by a veth of its
own and routes the pool via the edge. Deleting an underlay namespace deletes
the VXLANs made in it: stop() runs after the nodes have stopped.

With host_route (sf-up --host-route, off by default) the machine itself
reaches the floating addresses: a veth <prefix>-hr (198.19.255.1/30) into the
edge (hr0, 198.19.255.2/30) and one route, the pool via the edge. That is the
one change to the host's namespace sf-up makes, and only when asked; stop()
deletes the veth, and with it the route. Tests
point host_netns at a namespace of their own.
"""

import asyncio
import dataclasses
import hashlib
import ipaddress
import pathlib

MESH = ipaddress.IPv4Network('198.51.100.0/24')
FLOATING = ipaddress.IPv4Network('203.0.113.0/24')
EDGE_BRIDGE = 'edge0'
FIRST_HOST = 10
HOST_LINK = ipaddress.IPv4Network('198.19.255.0/30')    # the host's veth into the edge, with host_route


def plane_prefix(state: pathlib.Path) -> str:
    """What every device and namespace of the plane's name starts with."""
    return 'sf' + hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:3]


@dataclasses.dataclass
class NodeUnderlay:
    netns: str
    device: str
    address: str
    edge: str | None = None     # the edge namespace, for the network node


async def _run(*argv, check=True):
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)} failed: {err.decode().strip()}')
    return proc.returncode


class Underlay:
    def __init__(self, state: pathlib.Path, nodes: int, host_route: bool = False):
        self.prefix = plane_prefix(state)
        self.host_route = host_route
        self.host_netns: str | None = None      # None: the root namespace
        self.fabric = f'{self.prefix}-fabric'
        self.edge = f'{self.prefix}-edge'
        self.nodes = [NodeUnderlay(f'{self.prefix}{i}-ul', 'ul0', str(MESH.network_address + FIRST_HOST + i),
                                   self.edge if i == 0 else None)
                      for i in range(nodes)]

    async def _exists(self, ns: str) -> bool:
        return await _run('ip', 'netns', 'exec', ns, 'true', check=False) == 0

    async def start(self):
        """Make what is missing (a second start finds it made)."""
        if not await self._exists(self.fabric):
            await _run('ip', 'netns', 'add', self.fabric)
            await _run('ip', '-n', self.fabric, 'link', 'add', 'fab0', 'type', 'bridge')
            await _run('ip', '-n', self.fabric, 'link', 'set', 'fab0', 'up')
        if not await self._exists(self.edge):
            await _run('ip', 'netns', 'add', self.edge)
            await _run('ip', '-n', self.edge, 'link', 'set', 'lo', 'up')
            await _run('ip', '-n', self.edge, 'link', 'add', EDGE_BRIDGE, 'type', 'bridge')
            await _run('ip', '-n', self.edge, 'addr', 'add', f'{FLOATING.network_address + 1}/{FLOATING.prefixlen}',
                       'dev', EDGE_BRIDGE)
            await _run('ip', '-n', self.edge, 'link', 'set', EDGE_BRIDGE, 'up')
            await _run('ip', 'netns', 'exec', self.edge, 'sysctl', '-qw', 'net.ipv4.ip_forward=1')
        if self.host_route:
            await self._route_host()
        for i, node in enumerate(self.nodes):
            if await self._exists(node.netns):
                continue
            await _run('ip', 'netns', 'add', node.netns)
            await _run('ip', '-n', node.netns, 'link', 'set', 'lo', 'up')
            await _run('ip', '-n', self.fabric, 'link', 'del', f'n{i}', check=False)
            await _run('ip', '-n', self.fabric, 'link', 'add', f'n{i}', 'type', 'veth',
                       'peer', 'name', node.device, 'netns', node.netns)
            await _run('ip', '-n', self.fabric, 'link', 'set', f'n{i}', 'master', 'fab0', 'up')
            await _run('ip', '-n', node.netns, 'addr', 'add', f'{node.address}/{MESH.prefixlen}',
                       'dev', node.device)
            await _run('ip', '-n', node.netns, 'link', 'set', node.device, 'up')

    async def _route_host(self):
        """The host's veth into the edge and its route to the pool (made again whole)."""
        host = ['-n', self.host_netns] if self.host_netns else []
        device, near, far = f'{self.prefix}-hr', HOST_LINK.network_address + 1, HOST_LINK.network_address + 2
        await _run('ip', *host, 'link', 'del', device, check=False)
        await _run('ip', *host, 'link', 'add', device, 'type', 'veth', 'peer', 'name', 'hr0', 'netns', self.edge)
        await _run('ip', *host, 'addr', 'add', f'{near}/{HOST_LINK.prefixlen}', 'dev', device)
        await _run('ip', *host, 'link', 'set', device, 'up')
        await _run('ip', '-n', self.edge, 'addr', 'add', f'{far}/{HOST_LINK.prefixlen}', 'dev', 'hr0')
        await _run('ip', '-n', self.edge, 'link', 'set', 'hr0', 'up')
        await _run('ip', *host, 'route', 'replace', str(FLOATING), 'via', str(far), 'dev', device)

    async def stop(self):
        if self.host_route:     # at once: a deleted namespace's veths go later, in the kernel's own time
            await _run('ip', *(['-n', self.host_netns] if self.host_netns else []), 'link', 'del',
                       f'{self.prefix}-hr', check=False)
        for node in self.nodes:
            await _run('ip', 'netns', 'del', node.netns, check=False)
        await _run('ip', 'netns', 'del', self.edge, check=False)
        await _run('ip', 'netns', 'del', self.fabric, check=False)
