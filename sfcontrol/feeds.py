"""What each node should make true, and the stream that tells it (WatchDesiredInstances).

Each instance is stored once (instances/<ns>/<uuid>); its placement record says
only where it runs and what its node must hold for it (desired power, vsock CID,
console password, size). A node's desired instance is computed from the cache:
the instance (without what the node itself reports), its live interfaces and
their networks.

A NodeFeed is a listener on the controller's cache, like a client-go informer's:
it replays the node's placements when it starts, then follows every change that
alters one of them (the placement, the instance, its interfaces, their networks),
coalesced per instance in its own buffer, and sends only what differs from what
the node last got. It unsubscribes when the stream ends. No etcd request is made.
"""

import asyncio

from sfcontrol import metrics
from sfcontrol.store import keys
from sfcontrol.store.cache import ObjectCache
from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.v1 import network_pb2

# What the node reports about an instance: not part of what it is asked to make true.
OBSERVED = ('power_state', 'agent_state', 'agent_system_boot_time', 'console_port', 'vdi_port',
            'vdi_tls_port', 'disks', 'error_message', 'node_unreachable')
DELETED_IFACE = network_pb2.NETWORK_INTERFACE_STATE_DELETED


def desired_instance(cache: ObjectCache, placement) -> pb.DesiredInstance | None:
    """The desired instance of a placement entry, or None if its instance is gone."""
    record = placement.value
    entry = cache.by_uuid(keys.INSTANCES, record.instance_uuid)
    if entry is None:
        return None
    desired = pb.DesiredInstance(desired_power_state=record.desired_power_state,
                                 vsock_cid=record.vsock_cid, console_password=record.console_password,
                                 base_blobs=record.base_blobs, snapshots=record.snapshots,
                                 power_generation=record.power_generation)
    desired.instance.CopyFrom(entry.value)
    for name in OBSERVED:
        desired.instance.ClearField(name)
    interfaces = sorted((e.value for e in cache.where(keys.INTERFACES, 'instance_uuid', record.instance_uuid)
                         if e.value.state != DELETED_IFACE), key=lambda i: i.order)
    for iface in interfaces:
        desired.instance.interfaces.add().CopyFrom(iface)
        desired.instance.interfaces[-1].ClearField('metadata')
    for network_uuid in dict.fromkeys(i.network_uuid for i in interfaces):
        network = cache.by_uuid(keys.NETWORKS, network_uuid)
        if network is not None:
            desired.networks.add().CopyFrom(network.value)
            desired.networks[-1].ClearField('metadata')
    return desired


class NodeFeed:
    """The desired-state changes of one node, as WatchDesiredInstancesResponses."""

    def __init__(self, cache: ObjectCache, node: str):
        self.cache = cache
        self.node = node
        self._pending: dict[str, None] = {}         # instance uuids to look at, in order
        self._sent: dict[str, bytes] = {}           # instance uuid -> what the node has
        self._networks: dict[str, set[str]] = {}    # instance uuid -> its networks, as sent
        self._wake = asyncio.Event()
        self._listeners = [
            (keys.placements(node), self._on_placement), (keys.INSTANCES, self._on_instance),
            (keys.INTERFACES, self._on_interface), (keys.NETWORKS, self._on_network)]

    def _mark(self, uuid: str):
        self._pending[uuid] = None
        self._wake.set()

    def _on_placement(self, key, entry):
        self._mark(key.rsplit('/', 1)[-1])

    def _placed_here(self, uuid: str) -> bool:
        return uuid in self._sent or self.cache.get(keys.placement(self.node, uuid)) is not None

    def _on_instance(self, key, entry):
        uuid = key.rsplit('/', 1)[-1]
        if self._placed_here(uuid):
            self._mark(uuid)

    def _on_interface(self, key, entry):
        if entry is not None and self._placed_here(entry.value.instance_uuid):
            self._mark(entry.value.instance_uuid)

    def _on_network(self, key, entry):
        network_uuid = key.rsplit('/', 1)[-1]
        for uuid, networks in self._networks.items():
            if network_uuid in networks:
                self._mark(uuid)

    async def stream(self):
        """Yield every placement (then sync_complete), then each change, until cancelled."""
        for prefix, callback in self._listeners:
            self.cache.listen(prefix, callback)
        metrics.NODE_FEEDS.inc()
        try:
            for entry in self.cache.range(keys.placements(self.node))[0]:
                self._pending[entry.key.rsplit('/', 1)[-1]] = None
            for message in self._drain():
                yield message
            yield pb.WatchDesiredInstancesResponse(sync_complete=pb.SyncComplete())
            while True:
                await self._wake.wait()
                self._wake.clear()
                for message in self._drain():
                    yield message
        finally:
            metrics.NODE_FEEDS.dec()
            for prefix, callback in self._listeners:
                self.cache.unlisten(prefix, callback)

    def _drain(self):
        while self._pending:
            uuid = next(iter(self._pending))
            del self._pending[uuid]
            placement = self.cache.get(keys.placement(self.node, uuid))
            desired = desired_instance(self.cache, placement) if placement is not None else None
            if desired is None:
                if self._sent.pop(uuid, None) is not None:
                    self._networks.pop(uuid, None)
                    yield pb.WatchDesiredInstancesResponse(remove_uuid=uuid)
                continue
            # The lifecycle state goes with each upsert (a restarted node resumes from it),
            # but its changes alone are no news to the node: it made them.
            compared = pb.DesiredInstance()
            compared.CopyFrom(desired)
            compared.instance.ClearField('state')
            data = compared.SerializeToString(deterministic=True)
            if self._sent.get(uuid) != data:
                self._sent[uuid] = data
                self._networks[uuid] = {n.uuid for n in desired.networks}
                yield pb.WatchDesiredInstancesResponse(upsert=desired)
