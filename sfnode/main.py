"""sfnode: the node agent. Settings come from flags or SF_NODE_* environment variables
(sfnode/settings.py; `sfnode --help` lists them)."""

import logging
import sys

from sfcommon import pki, serve
from sfcommon.settings import parse
from sfnode.network.mesh import MeshConfig
from sfnode.node import Node, NodeConfig
from sfnode.settings import NodeSettings

log = logging.getLogger('sfnode.main')   # also when run as __main__


def settings_from(argv=None) -> NodeSettings:
    return parse(NodeSettings, argv, prog='sfnode', description=__doc__.splitlines()[0])


async def start(settings: NodeSettings, stops: serve.Stops):
    from sfnode.libvirt.hypervisor import Hypervisor
    from shakenfist.node.v1alpha1 import node_pb2
    capacity = None
    if settings.capacity:
        cpus, mem, disk = settings.capacity
        capacity = node_pb2.NodeCapacity(cpus=cpus, memory_mib=mem, disk_gib=disk)
    state = settings.state_dir.resolve()
    hypervisor = await Hypervisor.connect(str(state), settings.libvirt_uri, caps_cache=settings.caps_cache)
    stops.add('libvirt', hypervisor.close)
    # KVM only if a probe guest boots under it (here /dev/kvm exists but guests crash).
    probe_image = settings.images.get('sftest', '').removeprefix('file://') or None
    domain_type = settings.domain_type or await hypervisor.probe_kvm(probe_image)
    config = NodeConfig(
        name=settings.name, controller=settings.controller, pki=pki.Bundle(settings.pki_dir, 'node'),
        state_dir=state, libvirt_uri=settings.libvirt_uri, listen=settings.listen,
        console_listen=settings.console_listen, bridge_prefix=settings.bridge_prefix,
        image_table=settings.image_table, image_allow=settings.image_allow,
        extra_images=dict(settings.images), capacity=capacity, usage_interval=settings.usage_interval,
        domain_type=domain_type, console_open=settings.console_open, metrics_listen=settings.metrics_listen,
        mesh=MeshConfig(address=settings.mesh_address, netns=settings.mesh_namespace,
                        device=settings.mesh_device),
        network_node=settings.network_node, edge_namespace=settings.edge_namespace)
    node = await Node(config, hypervisor).start()
    stops.add('node', lambda: node.stop(stop_guests=settings.stop_guests_on_exit))
    log.info('node started', extra={'node': settings.name, 'port': node.port, 'domain_type': domain_type,
                                    'metrics': node.metrics.url if node.metrics else None})


def main(argv=None):
    settings = settings_from(argv)
    serve.run(f'sfnode-{settings.name}', settings, start)


if __name__ == '__main__':
    main(sys.argv[1:])
