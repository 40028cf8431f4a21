"""DHCP and DNS for one network on a network node: dnsmasq in a namespace of its own
(<prefix>dhcp-<vni>), on a veth (<prefix>h<vni> on the bridge, int0 inside) that
holds the network's gateway address. NAT (sfnode/network/nat.py) stands in the
same namespace; deleting the namespace takes its veths and nft table with it.

Leases are fixed, from the controller's IPAM: a dhcp-hostsfile of MAC, address
and name, and the same names for DNS in an addn-hosts file; both are re-read on
SIGHUP. An address whose MAC changed or went is released (dhcp_release), or
dnsmasq would refuse it to the next MAC while the old lease lives. The MTU is
forced (option 26): busybox udhcpc does not ask for it. Leases given and gone
are told to the node by a dhcp-script (sfnode/network/leases.py).

dnsmasq runs as a daemon with a pid file under the node's state: a node that
restarts (even after kill -9) finds it, and the guests keep their DNS meanwhile.
"""

import asyncio
import ipaddress
import logging
import os
import pathlib
import shutil
import signal

from sfnode.network import ip, leases
from sfnode.network.ip import NETWORK_MTU

log = logging.getLogger(__name__)
INNER = 'int0'


def gateway(netblock: str) -> ipaddress.IPv4Interface:
    net = ipaddress.IPv4Network(netblock)
    return ipaddress.IPv4Interface(f'{net.network_address + 1}/{net.prefixlen}')


def config(net: ipaddress.IPv4Network, router: str, d: pathlib.Path, script: bool) -> str:
    return '\n'.join([
        # Every name is answered here (no upstream yet): a known name's missing AAAA is
        # "no data" and an unknown name NXDOMAIN, rather than REFUSED.
        'no-resolv', 'no-hosts', 'local=/#/', 'bind-interfaces', f'interface={INNER}', 'except-interface=lo',
        'user=root',    # the node's state directory is not the world's to read
        f'dhcp-range={net.network_address},static,{net.netmask},1h',
        f'dhcp-hostsfile={d / "dhcp-hosts"}', f'addn-hosts={d / "dns-hosts"}',
        f'dhcp-leasefile={d / "leases"}', f'pid-file={d / "dnsmasq.pid"}',
        f'log-facility={d / "dnsmasq.log"}', 'log-dhcp',
        f'dhcp-option=option:router,{router}', f'dhcp-option=option:dns-server,{router}',
        f'dhcp-option-force=option:mtu,{NETWORK_MTU}', 'dhcp-authoritative',
        *([f'dhcp-script={d / "lease-hook"}'] if script else []), ''])


class Dhcp:
    def __init__(self, prefix: str, state_dir: pathlib.Path, lease_socket: pathlib.Path | None = None):
        self.prefix = prefix
        self.dir = state_dir
        self.lease_socket = lease_socket    # where dnsmasq's dhcp-script reports (sfnode/network/leases.py)

    def namespace(self, vni: int) -> str:
        return f'{self.prefix}dhcp-{vni:06x}'

    def veth(self, vni: int) -> str:
        return f'{self.prefix}h{vni:06x}'

    async def present(self) -> set[int]:
        """The VNIs this node serves now: its namespaces, and state left by a half-made one."""
        found = set()
        names = {ns.removeprefix(f'{self.prefix}dhcp-') for ns in await ip.namespaces(f'{self.prefix}dhcp-')}
        names |= {n.removeprefix(f'{self.prefix}h') for n in await ip.links(f'{self.prefix}h')}
        if self.dir.exists():
            names |= {p.name for p in self.dir.iterdir()}
        for name in names:
            try:
                if len(name) == 6:
                    found.add(int(name, 16))
            except ValueError:
                pass
        return found

    async def plumb(self, network, bridge: str) -> str:
        """The network's namespace, its veth on the bridge and the gateway address on
        int0 (what DHCP and NAT both stand on); returns the namespace."""
        vni = network.vxlan_id
        ns, veth = self.namespace(vni), self.veth(vni)
        router = gateway(network.netblock)
        if ns not in await ip.namespaces(ns):
            await ip.run('ip', 'netns', 'add', ns)
            await ip.ip('link', 'set', 'lo', 'up', netns=ns)
        if not (await ip.links(veth)).get(veth):
            # Both ends at the network's MTU: a veth peer is otherwise left at 1500.
            await ip.ip('link', 'add', veth, 'mtu', str(NETWORK_MTU), 'type', 'veth', 'peer', 'name',
                        INNER, 'mtu', str(NETWORK_MTU), 'netns', ns)
        await ip.ip('link', 'set', veth, 'master', bridge, 'up')
        await ip.ip('addr', 'replace', str(router), 'dev', INNER, netns=ns)
        await ip.ip('link', 'set', INNER, 'up', netns=ns)
        return ns

    async def ensure(self, network, bridge: str, hosts) -> bool:
        """Make it so; True if dnsmasq was started now (the network is newly served)."""
        vni = network.vxlan_id
        ns, d = await self.plumb(network, bridge), self.dir / f'{vni:06x}'
        net = ipaddress.IPv4Network(network.netblock)
        router = gateway(network.netblock)
        d.mkdir(parents=True, exist_ok=True)
        released = self._write_hosts(d, hosts)
        for ipv4, mac in released or ():
            await ip.run('ip', 'netns', 'exec', ns, 'dhcp_release', INNER, ipv4, mac, check=False)
        if self.lease_socket is not None:
            script = d / 'lease-hook'
            script.write_text(leases.hook(vni, self.lease_socket))
            script.chmod(0o700)
        conf = d / 'dnsmasq.conf'
        text = config(net, str(router.ip), d, self.lease_socket is not None)
        changed = not conf.exists() or conf.read_text() != text
        conf.write_text(text)
        pid = self._pid(d)
        if pid is not None and changed:
            await _stop(pid)
            pid = None
        if pid is None:
            (d / 'dnsmasq.pid').unlink(missing_ok=True)
            await ip.run('ip', 'netns', 'exec', ns, 'dnsmasq', f'--conf-file={conf}')
            log.info('dnsmasq started', extra={'netns': ns, 'network': network.uuid})
            return True
        if released is not None:
            os.kill(pid, signal.SIGHUP)
        return False

    def _write_hosts(self, d: pathlib.Path, hosts):
        """Write the hosts files; returns the (address, MAC) leases to release, or None
        if nothing changed."""
        path = d / 'dhcp-hosts'
        old = {}
        if path.exists():
            for line in path.read_text().splitlines():
                mac, ipv4, *_ = line.split(',')
                old[ipv4] = mac
        new = {h.ipv4: h.macaddr for h in hosts}
        text = ''.join(f'{h.macaddr},{h.ipv4},{h.hostname}\n' for h in hosts)
        if path.exists() and path.read_text() == text:
            return None
        path.write_text(text)
        (d / 'dns-hosts').write_text(''.join(f'{h.ipv4} {h.hostname}\n' for h in hosts))
        return [(ipv4, mac) for ipv4, mac in old.items() if new.get(ipv4) != mac]

    def _pid(self, d: pathlib.Path) -> int | None:
        """dnsmasq's pid, if it runs (and is ours: its command line names our config)."""
        try:
            pid = int((d / 'dnsmasq.pid').read_text().strip())
            cmdline = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(d / 'dnsmasq.conf').encode() in cmdline else None

    async def stop_dnsmasq(self, vni: int):
        """dnsmasq gone, the namespace kept (a network still given NAT)."""
        d = self.dir / f'{vni:06x}'
        pid = self._pid(d)
        if pid is not None:
            await _stop(pid)
        shutil.rmtree(d, ignore_errors=True)

    async def remove(self, vni: int):
        d = self.dir / f'{vni:06x}'
        pid = self._pid(d)
        if pid is not None:
            await _stop(pid)
        await ip.ip('link', 'del', self.veth(vni), check=False)
        await ip.run('ip', 'netns', 'del', self.namespace(vni), check=False)
        shutil.rmtree(d, ignore_errors=True)


async def _stop(pid: int, timeout: float = 2.0):
    """SIGTERM dnsmasq and wait (a while) until it is gone, so its sockets are free."""
    os.kill(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pathlib.Path(f'/proc/{pid}').exists() and loop.time() < deadline:
        await asyncio.sleep(0.02)
