"""The OpenStack config drive ("openstack-disk"): an ISO9660 disk labelled
config-2 with openstack/latest/{meta_data,network_data}.json and user_data."""

import asyncio
import base64
import ipaddress
import json
import pathlib
import tempfile

from sfcommon import errors
from sfnode.network.ip import NETWORK_MTU


def contents(instance, networks: dict) -> dict[str, bytes]:
    """The files of the drive, by path."""
    meta = {'uuid': instance.uuid, 'name': instance.name, 'hostname': instance.name,
            'launch_index': 0, 'availability_zone': 'shakenfist',
            'public_keys': {'key': instance.ssh_key} if instance.HasField('ssh_key') else {}}
    links, nets, services = [], [], []
    for iface in instance.interfaces:
        link = f'eth{iface.order}'
        links.append({'id': link, 'type': 'vif', 'ethernet_mac_address': iface.macaddr,
                      'mtu': NETWORK_MTU})
        if iface.HasField('ipv4'):
            net = networks.get(iface.network_uuid)
            netmask = net.netblock.split('/')[1] if net else '24'
            entry = {'id': f'network{iface.order}', 'link': link, 'type': 'ipv4',
                     'ip_address': iface.ipv4, 'netmask': _mask(int(netmask)),
                     'network_id': iface.network_uuid, 'routes': []}
            if net is not None:
                # The network node holds the gateway address (sfnode/network/dhcp.py): it
                # answers DNS where the network is served, and routes out once NAT is on.
                router = str(ipaddress.IPv4Network(net.netblock).network_address + 1)
                if net.provide_nat:
                    entry['routes'].append({'network': '0.0.0.0', 'netmask': '0.0.0.0', 'gateway': router})
                if net.provide_dhcp and {'type': 'dns', 'address': router} not in services:
                    services.append({'type': 'dns', 'address': router})
            nets.append(entry)
    files = {'openstack/latest/meta_data.json': json.dumps(meta).encode(),
             'openstack/latest/network_data.json': json.dumps(
                 {'links': links, 'networks': nets, 'services': services}).encode()}
    if instance.HasField('user_data'):
        files['openstack/latest/user_data'] = base64.b64decode(instance.user_data)
    return files


def _mask(prefix: int) -> str:
    bits = (0xffffffff << (32 - prefix)) & 0xffffffff
    return '.'.join(str((bits >> s) & 0xff) for s in (24, 16, 8, 0))


async def build(path: pathlib.Path, instance, networks: dict):
    """Write the drive to path (replacing it): called at create and every power on."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name, data in contents(instance, networks).items():
            f = root / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
        partial = path.with_suffix('.partial')
        proc = await asyncio.create_subprocess_exec(
            'genisoimage', '-quiet', '-J', '-R', '-V', 'config-2', '-o', str(partial), str(root),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise errors.Internal(f'building the config drive failed: {err.decode()[-300:]}')
        partial.replace(path)
