"""A network's VXLAN on this node: VNI network.vxlan_id, its VTEP on the node's mesh
address, joined to the network's bridge, with head-end replication (an all-zero
fdb entry per peer) to exactly the peers the controller names.

Named <prefix>v<vni in hex>; a restarted node finds its own by that name (the
kernel keeps them, and their fdb, across a crash of the agent)."""

import dataclasses
import json
import logging
import os

from sfnode.network import ip
from sfnode.network.ip import NETWORK_MTU

log = logging.getLogger(__name__)
ZERO_MAC = '00:00:00:00:00:00'
VXLAN_PORT = 4789


@dataclasses.dataclass
class MeshConfig:
    address: str                    # this node's mesh (underlay) address; '' carries no networks
    netns: str | None = None        # the namespace the VTEP's socket lives in (sf-up's underlay)
    device: str | None = None       # the mesh interface, in netns if set


class Mesh:
    def __init__(self, prefix: str, config: MeshConfig):
        self.prefix = prefix
        self.config = config

    def name(self, vni: int) -> str:
        return f'{self.prefix}v{vni:06x}'

    async def present(self) -> dict[int, str]:
        """The VXLANs of this node that exist, by VNI."""
        found = {}
        for name in await ip.links(f'{self.prefix}v'):
            try:
                found[int(name[len(self.prefix) + 1:], 16)] = name
            except ValueError:
                pass
        return found

    async def ensure(self, vni: int, bridge: str, peers: list[str]):
        name = self.name(vni)
        if not (await ip.links(name)).get(name):
            await self._create(vni, name)
        await ip.ip('link', 'set', name, 'master', bridge, 'mtu', str(NETWORK_MTU), 'up')
        await self._peers(name, set(peers) - {self.config.address})

    async def _create(self, vni: int, name: str):
        ns = self.config.netns
        args = ['link', 'add', name, 'type', 'vxlan', 'id', str(vni), 'local', self.config.address,
                'dstport', str(VXLAN_PORT), 'nolearning']
        if self.config.device:
            args[-1:-1] = ['dev', self.config.device]
        if ns:
            # Left over from a create that stopped half way (before the move).
            await ip.ip('link', 'del', name, netns=ns, check=False)
        await ip.ip(*args, netns=ns)
        if ns:
            # Into this process's namespace (the root one); its socket stays in ns.
            await ip.ip('link', 'set', name, 'netns', str(os.getpid()), netns=ns)
        log.info('vxlan made', extra={'device': name, 'vni': vni})

    async def _peers(self, name: str, wanted: set[str]):
        out = await ip.run('bridge', '-j', 'fdb', 'show', 'dev', name)
        have = {e['dst'] for e in json.loads(out or '[]') if e.get('mac') == ZERO_MAC and 'dst' in e}
        for peer in sorted(wanted - have):
            await ip.run('bridge', 'fdb', 'append', ZERO_MAC, 'dev', name, 'dst', peer, 'self', 'permanent')
        for peer in sorted(have - wanted):
            await ip.run('bridge', 'fdb', 'del', ZERO_MAC, 'dev', name, 'dst', peer, 'self', check=False)

    async def remove(self, vni: int):
        await ip.ip('link', 'del', self.name(vni), check=False)
