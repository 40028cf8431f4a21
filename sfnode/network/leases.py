"""What dnsmasq says of its leases, as the network node hears it.

dnsmasq runs its dhcp-script on each lease it gives (`add`) or that goes
(`del`: released or expired). The script, written next to each network's
dnsmasq config, sends one datagram to a unix socket under the node's state
(a path, so reachable from the network's namespace); the node turns each into
an event on the network. A datagram sent while the node is down is lost: an
event is an observation, the lease itself lives in dnsmasq.
"""

import asyncio
import json
import logging
import os
import pathlib
import re
import socket

log = logging.getLogger(__name__)
MAX_DATAGRAM = 1024
MAX_PATH = 107          # sun_path, less its terminating NUL
MAC = re.compile(r'^[0-9a-f]{2}(:[0-9a-f]{2}){5}$')
HOSTNAME = re.compile(r'^[A-Za-z0-9._-]{0,253}$')

HOOK = '''#!/usr/bin/python3 -SI
# dnsmasq's dhcp-script for one network: tells the node of a lease given or gone.
import json, socket, sys
if len(sys.argv) >= 4 and sys.argv[1] in ('add', 'del'):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(json.dumps({{'vni': {vni}, 'action': sys.argv[1], 'mac': sys.argv[2], 'ipv4': sys.argv[3],
                             'hostname': sys.argv[4] if len(sys.argv) > 4 else ''}}).encode(), {path!r})
    except OSError:
        pass
'''


def hook(vni: int, path: pathlib.Path) -> str:
    return HOOK.format(vni=vni, path=str(path))


def parse(data: bytes) -> dict | None:
    """A datagram as {vni, action, mac, ipv4, hostname}, or None if it is not one."""
    try:
        m = json.loads(data)
        lease = {'vni': int(m['vni']), 'action': m['action'], 'mac': m['mac'].lower(),
                 'ipv4': m['ipv4'], 'hostname': m.get('hostname', '')}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if (lease['action'] not in ('add', 'del') or not MAC.match(lease['mac'])
            or not isinstance(lease['ipv4'], str) or len(lease['ipv4']) > 15):
        return None
    if not isinstance(lease['hostname'], str) or not HOSTNAME.match(lease['hostname']):
        lease['hostname'] = ''      # a name the client gave itself is not ours to repeat
    return lease


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue):
        self.queue = queue

    def datagram_received(self, data, addr):
        lease = parse(data)
        if lease is None:
            log.warning('ignored a malformed lease datagram', extra={'bytes': len(data)})
        elif self.queue.full():
            log.warning('lease events dropped: the node is behind')
        else:
            self.queue.put_nowait(lease)


class LeaseListener:
    """The node's end of the dhcp-scripts: binds the socket, queues what arrives."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._transport = None

    @property
    def usable(self) -> bool:
        return len(str(self.path)) <= MAX_PATH

    async def start(self) -> bool:
        if not self.usable:
            log.warning('no lease events: the socket path is too long', extra={'path': str(self.path)})
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)       # a node killed before left it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Protocol(self.queue), sock=sock)
        return True

    def stop(self):
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self.path.unlink(missing_ok=True)
