"""Which node carries which network, and the stream that tells each node (WatchDesiredNetworks).

The controller decides each network's mesh: the nodes with a live interface on
it (where its instances are placed) plus every network node (they serve it).
Each of those nodes gets a DesiredNetwork with the mesh addresses of the
others (its VXLAN's head-end replication list); a network node also gets, for
a network with provide_dhcp, the fixed leases of the network's interfaces
(MAC -> address, from the controller's IPAM) and their instances' names, and,
for a network with provide_nat, NAT (its egress address is the network's
floating_gateway) with the floating addresses of its interfaces and the pool
they come from. A float or defloat is an interface change, so it reaches the
network node as soon as the cache sees it.

A NetworkFeed is a listener on the controller's cache, like NodeFeed
(sfcontrol/feeds.py): it lists the node's networks when it starts, then, on any
change of nodes, networks, interfaces or instances, recomputes them (coalesced:
one recomputation per wake-up) and sends only what differs from what the node
last got. No etcd request is made.
"""

import asyncio

from sfcontrol import metrics
from sfcontrol.store import keys
from sfcontrol.store.cache import ObjectCache
from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.v1 import network_pb2

CARRIED = {network_pb2.NETWORK_STATE_CREATED, network_pb2.NETWORK_STATE_DELETE_WAIT}
DELETED_IFACE = network_pb2.NETWORK_INTERFACE_STATE_DELETED


def _live_interfaces(cache: ObjectCache, network_uuid: str):
    return [e.value for e in cache.where(keys.INTERFACES, 'network_uuid', network_uuid)
            if e.value.state != DELETED_IFACE]


def mesh_of(cache: ObjectCache, network, interfaces) -> dict[str, str]:
    """The nodes that carry a network, by name, with their mesh addresses."""
    nodes = {e.value.name: e.value for e in cache.range(keys.NODES)[0] if e.value.mesh_address}
    members = {name for name, node in nodes.items() if node.network_node}
    for iface in interfaces:
        inst = cache.by_uuid(keys.INSTANCES, iface.instance_uuid)
        if inst is not None and inst.value.node in nodes:
            members.add(inst.value.node)
    return {name: nodes[name].mesh_address for name in sorted(members)}


def _floated(interfaces):
    return [i for i in sorted(interfaces, key=lambda i: i.uuid) if i.HasField('ipv4') and i.HasField('floating')]


def _natted(network, interfaces) -> bool:
    """Whether a network node stands between the network and the outside: NAT egress,
    or a floating address (1:1, also on a network without provide_nat)."""
    return (network.provide_nat and network.HasField('floating_gateway')) or bool(_floated(interfaces))


def served_by(cache: ObjectCache, network) -> tuple[list[str], list[str]]:
    """The nodes serving a network (its DHCP, DNS, NAT or floating addresses) and the
    nodes carrying its mesh, by name: what GetNetwork shows."""
    if network.state not in CARRIED:
        return [], []
    interfaces = _live_interfaces(cache, network.uuid)
    mesh = mesh_of(cache, network, interfaces)
    serving = network.provide_dhcp or _natted(network, interfaces)
    servers = [n for n in mesh if serving and (node := cache.get(keys.node(n))) and node.value.network_node]
    return servers, list(mesh)


def desired_networks(cache: ObjectCache, node: str, floating_netblock: str = '') -> dict[str, pb.DesiredNetwork]:
    """What node is to carry, by network uuid."""
    me = cache.get(keys.node(node))
    if me is None or not me.value.mesh_address:
        return {}
    found = {}
    for entry in cache.range(keys.NETWORKS)[0]:
        network = entry.value
        if network.state not in CARRIED:
            continue
        interfaces = _live_interfaces(cache, network.uuid)
        mesh = mesh_of(cache, network, interfaces)
        if node not in mesh:
            continue
        desired = pb.DesiredNetwork(peers=sorted({a for n, a in mesh.items() if n != node
                                                  and a != me.value.mesh_address}),
                                    serve=me.value.network_node and network.provide_dhcp)
        desired.network.CopyFrom(network)
        desired.network.ClearField('metadata')
        if desired.serve:
            for iface in sorted(interfaces, key=lambda i: i.uuid):
                inst = cache.by_uuid(keys.INSTANCES, iface.instance_uuid)
                if iface.HasField('ipv4') and inst is not None:
                    desired.hosts.add(macaddr=iface.macaddr, ipv4=iface.ipv4, hostname=inst.value.name)
        if me.value.network_node and _natted(network, interfaces):
            desired.nat = True
            desired.floating_netblock = floating_netblock
            for iface in _floated(interfaces):
                desired.floating.add(interface_uuid=iface.uuid, ipv4=iface.ipv4, floating=iface.floating)
        found[network.uuid] = desired
    return found


class NetworkFeed:
    """The desired-network changes of one node, as WatchDesiredNetworksResponses."""

    PREFIXES = (keys.NODES, keys.NETWORKS, keys.INTERFACES, keys.INSTANCES)

    def __init__(self, cache: ObjectCache, node: str, floating_netblock: str = ''):
        self.cache = cache
        self.node = node
        self.floating_netblock = floating_netblock
        self._sent: dict[str, bytes] = {}
        self._wake = asyncio.Event()

    def _changed(self, key, entry):
        self._wake.set()

    async def stream(self):
        for prefix in self.PREFIXES:
            self.cache.listen(prefix, self._changed)
        metrics.NODE_FEEDS.inc()
        try:
            for message in self._diff():
                yield message
            yield pb.WatchDesiredNetworksResponse(sync_complete=pb.SyncComplete())
            while True:
                await self._wake.wait()
                self._wake.clear()
                for message in self._diff():
                    yield message
        finally:
            metrics.NODE_FEEDS.dec()
            for prefix in self.PREFIXES:
                self.cache.unlisten(prefix, self._changed)

    def _diff(self):
        desired = desired_networks(self.cache, self.node, self.floating_netblock)
        for uuid in [u for u in self._sent if u not in desired]:
            del self._sent[uuid]
            yield pb.WatchDesiredNetworksResponse(remove_uuid=uuid)
        for uuid, network in desired.items():
            data = network.SerializeToString(deterministic=True)
            if self._sent.get(uuid) != data:
                self._sent[uuid] = data
                yield pb.WatchDesiredNetworksResponse(upsert=network)
