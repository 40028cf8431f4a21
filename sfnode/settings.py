"""The node agent's settings (`sfnode --help`): flags, SF_NODE_* variables and defaults,
each declared once (the mechanism: sfcommon/settings.py). Defaults the in-process
NodeConfig also has are taken from it."""

import os
import pathlib
from typing import Annotated, Literal

from pydantic import BeforeValidator

from sfcommon.settings import CommaList, HostPort, JsonObject, Settings, setting
from sfnode.node import NodeConfig


def _capacity(value):
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(',')]
        if len(parts) != 3:
            raise ValueError(f'expected cpus,memory_mib,disk_gib, got {value!r}')
        return tuple(parts)
    return value


# cpus, memory in MiB, disk in GiB.
Capacity = Annotated[tuple[int, int, int], BeforeValidator(_capacity)]


class NodeSettings(Settings):
    name: str = setting(default_factory=lambda: os.uname().nodename, env='SF_NODE_NAME',
                        help="this node's name (default: the host's name)")
    controller: HostPort = setting('127.0.0.1:13002', env='SF_NODE_CONTROLLER',
                                   help="host:port of the controller's node port")
    pki_dir: pathlib.Path = setting(pathlib.Path('/etc/shakenfist/node'), env='SF_NODE_PKI_DIR',
                                    help="this node's bundle from sf-pki: ca.pem, node.pem, node.key")
    state_dir: pathlib.Path = setting(pathlib.Path('/srv/sfnode'), env='SF_NODE_STATE_DIR',
                                      help='instances, images and the embedded libvirt')
    libvirt_uri: str | None = setting(
        NodeConfig.libvirt_uri, env='SF_NODE_LIBVIRT_URI',
        help='default: qemu:///embed?root=<state dir>/libvirt; qemu:///system on production hosts')
    listen: HostPort = setting(NodeConfig.listen, env='SF_NODE_LISTEN',
                               help='host:port of the NodeService the controller calls')
    console_listen: str = setting(NodeConfig.console_listen, env='SF_NODE_CONSOLE_LISTEN',
                                  help='address the serial and VNC consoles listen on')
    bridge_prefix: str = setting(NodeConfig.bridge_prefix, env='SF_NODE_BRIDGE_PREFIX', max_length=8,
                                 help="the prefix of this node's network devices and namespaces, at most 8 "
                                      "characters (a VXLAN's name, the prefix, 'v' and 6 hex digits, is at "
                                      'most 15); distinct per node and per plane on one machine')
    mesh_address: str = setting('', env='SF_NODE_MESH_ADDRESS',
                                help="this node's address on the mesh (the underlay its VXLANs use); "
                                     'empty: the node carries no networks')
    mesh_device: str | None = setting(None, env='SF_NODE_MESH_DEVICE',
                                      help='the mesh interface (a real host: the NIC with the mesh address)')
    mesh_namespace: str | None = setting(None, env='SF_NODE_MESH_NAMESPACE',
                                         help="the network namespace holding the mesh device (sf-up's "
                                              "per-node underlay); the VXLANs' sockets live there")
    network_node: bool = setting(False, env='SF_NODE_NETWORK_NODE',
                                 help='serve DHCP and DNS for the networks (a network node) (variable: 1 or 0)')
    edge_namespace: str | None = setting(None, env='SF_NODE_EDGE_NAMESPACE',
                                         help="a network node's outside: the namespace whose bridge edge0 "
                                              "holds the floating pool's gateway (sf-up's edge); NAT egress "
                                              'and floating addresses leave there')
    image_table: str | None = setting(NodeConfig.image_table, env='SF_NODE_IMAGE_TABLE',
                                      help='JSON file of {shorthand: url} over the built-in table')
    image_allow: CommaList = setting(
        NodeConfig.image_allow, env='SF_IMAGE_ALLOW', metavar='PREFIX',
        help='a URL prefix (file:///srv/images/, http://10.0.0.5/) that tenants may use as an image '
             'although it is a local file or internal address; repeatable, or comma-separated in the '
             'variable')
    images: JsonObject = setting(default_factory=dict, env='SF_NODE_IMAGES', metavar='JSON',
                                 help='JSON {shorthand: url} given on the command line (sf-up uses it for sftest)')
    capacity: Capacity | None = setting(None, env='SF_NODE_CAPACITY', metavar='CPUS,MEMORY_MIB,DISK_GIB',
                                        help='what to offer; default: from the host')
    usage_interval: float = setting(NodeConfig.usage_interval, env='SF_NODE_USAGE_INTERVAL', ge=0,
                                    help='seconds between usage events; 0 turns them off')
    domain_type: Literal['qemu', 'kvm'] | None = setting(None, env='SF_NODE_DOMAIN_TYPE',
                                                         help='force TCG (qemu) or KVM; default: probe')
    caps_cache: str | None = setting(
        None, env='SF_NODE_CAPS_CACHE',
        help="a directory shared by the nodes of a host for QEMU's capabilities, which saves a 4-9 s "
             'probe at the first start of each node')
    stop_guests_on_exit: bool = setting(
        False, env='SF_NODE_STOP_GUESTS_ON_EXIT',
        help='power guests off when the node stops (sf-up does this); by default they keep running '
             'and a restarted node adopts them (variable: 1 or 0)')
    console_open: bool = setting(
        NodeConfig.console_open, env='SF_NODE_CONSOLE_OPEN',
        help="serial console ports take anyone, without a token (Shaken Fist's behaviour; off by "
             'default) (variable: 1 or 0)')
    metrics_listen: HostPort | None = setting(
        None, env='SF_NODE_METRICS_LISTEN',
        help='host:port of GET /metrics (Prometheus, plain HTTP, no token); default off')
