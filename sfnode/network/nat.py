"""NAT egress and floating addresses for one network on a network node, in the
network's namespace (<prefix>dhcp-<vni>, sfnode/network/dhcp.py, whose int0
holds the gateway address).

A veth ext0 in that namespace reaches the edge (<prefix>e<vni> in the edge
namespace, on its bridge edge0, which holds the floating pool's first address:
the outside's gateway). ext0 holds the network's egress address (its
floating_gateway, in the pool's prefix) when it provides NAT, and each
floating address as a /32; the default route is via the pool's gateway
(onlink: a network without NAT has only /32s there); ip_forward is on in this
namespace only. One nft table, `ip sfnat`, replaced whole and atomically
(`nft -f`) on every change:

- prerouting: daddr floating -> dnat to the inner address (from outside, and
  from the network itself: hairpin);
- postrouting: a hairpinned packet (int0 -> int0, ct status dnat) is
  masqueraded to the gateway, so the other guest answers through here; a
  floated address leaving by ext0 is snat to its floating address (1:1); with
  provide_nat, the rest of the netblock leaving by ext0 is masqueraded to the
  egress address (without, the rest does not leave: only floated addresses);
- forward: policy drop; established and related, int0 to int0 (hairpin),
  from int0 anything with NAT (only the floated addresses without), and from
  ext0 only what was dnat'ed.

A floating address that comes is announced on the edge (a gratuitous ARP), so
an outside that already asked for it learns it at once. A floating address that
goes has its conntrack entries deleted (either
direction), so connections through it are cut at once rather than living on
in conntrack.
"""

import ipaddress
import json
import logging

from sfcommon import errors
from sfnode.network import ip
from sfnode.network.dhcp import INNER

log = logging.getLogger(__name__)
OUTER = 'ext0'
EDGE_BRIDGE = 'edge0'
TABLE = 'sfnat'


def ruleset(netblock: str, floats: dict[str, str], masquerade: bool = True) -> str:
    """The table, floats being floating -> inner; masquerade: NAT egress for the rest."""
    net = ipaddress.IPv4Network(netblock)
    dnat = ', '.join(f'{f} : {i}' for f, i in sorted(floats.items()))
    snat = ', '.join(f'{i} : {f}' for f, i in sorted(floats.items()))
    lines = [f'table ip {TABLE} {{',
             '  chain prerouting {', '    type nat hook prerouting priority dstnat; policy accept;']
    if floats:
        lines.append(f'    dnat to ip daddr map {{ {dnat} }}')
    lines += ['  }', '  chain postrouting {', '    type nat hook postrouting priority srcnat; policy accept;',
              f'    iifname "{INNER}" oifname "{INNER}" ct status dnat masquerade']
    if floats:
        lines.append(f'    oifname "{OUTER}" snat to ip saddr map {{ {snat} }}')
    if masquerade:
        lines.append(f'    oifname "{OUTER}" ip saddr {net} masquerade')
    lines += ['  }', '  chain forward {', '    type filter hook forward priority filter; policy drop;',
              '    ct state established,related accept', f'    iifname "{INNER}" oifname "{INNER}" accept']
    if masquerade:
        lines.append(f'    iifname "{INNER}" accept')
    elif floats:        # without NAT only a floated address leaves
        lines.append(f'    iifname "{INNER}" ip saddr {{ {", ".join(sorted(floats.values()))} }} accept')
    lines += [f'    iifname "{OUTER}" ct status dnat accept', '  }', '}', '']
    return '\n'.join(lines)


class Nat:
    def __init__(self, prefix: str, edge: str | None):
        self.prefix = prefix
        self.edge = edge
        self._floats: dict[str, dict[str, str]] = {}     # namespace -> floating -> inner, as made

    def veth(self, vni: int) -> str:
        return f'{self.prefix}e{vni:06x}'

    async def ensure(self, ns: str, network, floating_netblock: str, floats: dict[str, str]) -> tuple[set, set]:
        """Make it so in ns; returns the floating addresses (added, removed) now."""
        if not self.edge:
            raise errors.Internal('NAT wanted but this network node has no edge namespace')
        pool = ipaddress.IPv4Network(floating_netblock)
        masquerade = network.provide_nat and bool(network.floating_gateway)
        egress = f'{network.floating_gateway}/{pool.prefixlen}' if masquerade else None
        outer = self.veth(network.vxlan_id)
        have = await ip.links(OUTER, netns=ns)
        if OUTER not in have:
            await ip.ip('link', 'del', outer, netns=self.edge, check=False)
            await ip.ip('link', 'add', OUTER, 'type', 'veth', 'peer', 'name', outer, 'netns', self.edge, netns=ns)
        await ip.ip('link', 'set', outer, 'master', EDGE_BRIDGE, 'up', netns=self.edge)
        await ip.ip('link', 'set', OUTER, 'up', netns=ns)
        await ip.run('ip', 'netns', 'exec', ns, 'sysctl', '-qw', 'net.ipv4.ip_forward=1')
        addrs = await self._addresses(ns)
        if egress and egress not in addrs:
            await ip.ip('addr', 'replace', egress, 'dev', OUTER, netns=ns)
        await ip.ip('route', 'replace', 'default', 'via', str(pool.network_address + 1), 'dev', OUTER, 'onlink',
                    netns=ns)
        before = self._floats.get(ns)
        if before is None:      # a restart: what is on ext0 besides the egress address
            before = {a.split('/')[0]: '' for a in addrs if a.endswith('/32')}
        added = set(floats) - set(before)
        removed = set(before) - set(floats)
        for f in added:
            await ip.ip('addr', 'replace', f'{f}/32', 'dev', OUTER, netns=ns)
        text = ruleset(network.netblock, floats, masquerade)
        await ip.run('ip', 'netns', 'exec', ns, 'nft', '-f', '-', check=True, stdin=(
            f'table ip {TABLE}\ndelete table ip {TABLE}\n' + text).encode())
        for f in added:
            await ip.announce(f, OUTER, ns)
        for f in removed:
            await ip.ip('addr', 'del', f'{f}/32', 'dev', OUTER, netns=ns, check=False)
            for flag in ('-d', '-q', '-s', '-r'):
                await ip.run('ip', 'netns', 'exec', ns, 'conntrack', '-D', flag, f, check=False)
        changed = {f for f in floats if before.get(f) not in ('', floats[f])}
        for f in changed:       # the same floating address now for another inner one
            for flag in ('-d', '-q'):
                await ip.run('ip', 'netns', 'exec', ns, 'conntrack', '-D', flag, f, check=False)
        self._floats[ns] = dict(floats)
        return added, removed

    async def _addresses(self, ns: str) -> set[str]:
        out = await ip.ip('-j', 'addr', 'show', 'dev', OUTER, netns=ns)
        return {f'{a["local"]}/{a["prefixlen"]}' for link in json.loads(out or '[]')
                for a in link.get('addr_info', []) if a.get('family') == 'inet'}

    async def remove(self, ns: str, vni: int):
        """Everything NAT made for the network (the namespace itself is DHCP's to remove)."""
        floats = self._floats.pop(ns, {})
        await ip.run('ip', 'netns', 'exec', ns, 'nft', 'delete', 'table', 'ip', TABLE, check=False)
        await ip.ip('link', 'del', OUTER, netns=ns, check=False)
        if self.edge:
            await ip.ip('link', 'del', self.veth(vni), netns=self.edge, check=False)
        for f in floats:
            await ip.run('ip', 'netns', 'exec', ns, 'conntrack', '-D', '-d', f, check=False)

    async def orphans(self) -> set[int]:
        """The VNIs whose edge veth exists."""
        if not self.edge:
            return set()
        found = set()
        for name in await ip.links(f'{self.prefix}e', netns=self.edge):
            try:
                found.add(int(name.removeprefix(f'{self.prefix}e'), 16))
            except ValueError:
                pass
        return found
