"""sfnode: the node agent. Settings come from flags or SF_NODE_* environment variables."""

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal

from sfcommon import logs, pki
from sfnode.node import Node, NodeConfig

log = logging.getLogger(__name__)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or '').split(',') if v.strip()]


def parser():
    env = os.environ.get
    p = argparse.ArgumentParser(prog='sfnode', description=__doc__.splitlines()[0])
    p.add_argument('--name', default=env('SF_NODE_NAME', os.uname().nodename))
    p.add_argument('--controller', default=env('SF_NODE_CONTROLLER', '127.0.0.1:13002'),
                   help="host:port of the controller's node port (SF_NODE_CONTROLLER)")
    p.add_argument('--pki-dir', type=pathlib.Path, default=env('SF_NODE_PKI_DIR', '/etc/shakenfist/node'),
                   help="this node's bundle from sf-pki: ca.pem, node.pem, node.key (SF_NODE_PKI_DIR)")
    p.add_argument('--state-dir', type=pathlib.Path, default=env('SF_NODE_STATE_DIR', '/srv/sfnode'))
    p.add_argument('--libvirt-uri', default=env('SF_NODE_LIBVIRT_URI'),
                   help='default: qemu:///embed?root=<state dir>/libvirt; qemu:///system on production hosts')
    p.add_argument('--listen', default=env('SF_NODE_LISTEN', '127.0.0.1:0'),
                   help='host:port of the NodeService the controller calls')
    p.add_argument('--console-listen', default=env('SF_NODE_CONSOLE_LISTEN', '127.0.0.1'))
    p.add_argument('--bridge-prefix', default=env('SF_NODE_BRIDGE_PREFIX', 'sfb0-'))
    p.add_argument('--image-table', default=env('SF_NODE_IMAGE_TABLE'),
                   help='JSON file of {shorthand: url} over the built-in table')
    p.add_argument('--image-allow', action='append', default=_split(env('SF_IMAGE_ALLOW')),
                   help='a URL prefix (file:///srv/images/, http://10.0.0.5/) that tenants may use '
                        'as an image although it is a local file or internal address; repeatable '
                        '(SF_IMAGE_ALLOW, comma-separated)')
    p.add_argument('--images', default=env('SF_NODE_IMAGES', '{}'),
                   help='JSON {shorthand: url} given on the command line (sf-up uses it for sftest)')
    p.add_argument('--capacity', default=env('SF_NODE_CAPACITY'),
                   help='cpus,memory_mib,disk_gib to offer; default: from the host')
    p.add_argument('--usage-interval', type=float, default=float(env('SF_NODE_USAGE_INTERVAL', '60')))
    p.add_argument('--domain-type', choices=['qemu', 'kvm'], default=env('SF_NODE_DOMAIN_TYPE'),
                   help='force TCG (qemu) or KVM; default: probe')
    p.add_argument('--caps-cache', default=env('SF_NODE_CAPS_CACHE'),
                   help='a directory shared by the nodes of a host for QEMU\'s capabilities, '
                        'which saves a 4-9 s probe at the first start of each node')
    p.add_argument('--stop-guests-on-exit', action='store_true',
                   default=env('SF_NODE_STOP_GUESTS_ON_EXIT') == '1',
                   help='power guests off when the node stops (sf-up does this); by default '
                        'they keep running and a restarted node adopts them')
    p.add_argument('--console-open', action='store_true', default=env('SF_NODE_CONSOLE_OPEN') == '1',
                   help="serial console ports take anyone, without a token (Shaken Fist's behaviour; "
                        'off by default) (SF_NODE_CONSOLE_OPEN=1)')
    p.add_argument('--log-level', default=env('SF_LOG_LEVEL', 'info'))
    return p


async def run(args):
    from shakenfist.node.v1alpha1 import node_pb2
    from sfnode.libvirt.hypervisor import Hypervisor
    capacity = None
    if args.capacity:
        cpus, mem, disk = (int(x) for x in args.capacity.split(','))
        capacity = node_pb2.NodeCapacity(cpus=cpus, memory_mib=mem, disk_gib=disk)
    state = args.state_dir.resolve()
    images_table = json.loads(args.images)
    hypervisor = await Hypervisor.connect(str(state), args.libvirt_uri, caps_cache=args.caps_cache)
    # KVM only if a probe guest boots under it (here /dev/kvm exists but guests crash).
    probe_image = images_table.get('sftest', '').removeprefix('file://') or None
    domain_type = args.domain_type or await hypervisor.probe_kvm(probe_image)
    config = NodeConfig(
        name=args.name, controller=args.controller, pki=pki.Bundle(args.pki_dir, 'node'),
        state_dir=state, libvirt_uri=args.libvirt_uri, listen=args.listen,
        console_listen=args.console_listen, bridge_prefix=args.bridge_prefix,
        image_table=args.image_table, image_allow=tuple(args.image_allow), extra_images=images_table, capacity=capacity,
        usage_interval=args.usage_interval, domain_type=domain_type, console_open=args.console_open)
    node = await Node(config, hypervisor).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info('node started', extra={'node': args.name, 'port': node.port, 'domain_type': domain_type})
    await stop.wait()
    await node.stop(stop_guests=args.stop_guests_on_exit)
    hypervisor.close()


def main():
    args = parser().parse_args()
    os.umask(0o077)     # keys, disks, blobs and logs are the plane's alone
    logs.setup(f'sfnode-{args.name}', args.log_level)
    asyncio.run(run(args))


if __name__ == '__main__':
    main()
