"""What nodes are and what they may say: registration, liveness by heartbeat, and their reports.

NodeRegistry keeps the node records. A node is alive while it heartbeats: each
heartbeat re-arms a timer on the controller's clock; when the timer fires the
node is marked unreachable (one write, on the transition), and its instances
show it. A heartbeat or a registration makes it reachable again.

NodeReports applies what a node reports, each checked against what that node
was given: the instances placed on it, their agent operations and the blobs
those put into guests. Which node is calling is the servicer's to say
(sfcontrol/nodeapi.py); these take it as an argument.
"""

import logging

from sfcommon import errors, states
from sfcommon.clock import SYSTEM, Clock, Timer
from sfcommon.tasks import Tasks
from sfcontrol import caller
from sfcontrol.agentops import FINAL as OPERATION_FINAL
from sfcontrol.agentops import AgentOperations
from sfcontrol.core import Core
from sfcontrol.feeds import NodeFeed
from sfcontrol.instances import Instances
from sfcontrol.meshes import NetworkFeed
from sfcontrol.store import keys
from sfcontrol.store.etcd import Txn
from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import event_pb2, instance_pb2

log = logging.getLogger(__name__)
OBJ_NODE, OBJ_INSTANCE = event_pb2.OBJECT_TYPE_NODE, event_pb2.OBJECT_TYPE_INSTANCE
OBJ_NETWORK = event_pb2.OBJECT_TYPE_NETWORK
OBJ_IFACE = event_pb2.OBJECT_TYPE_NETWORK_INTERFACE
STATUS = event_pb2.EVENT_TYPE_STATUS


class NodeRegistry:
    def __init__(self, core: Core, clock: Clock = SYSTEM, heartbeat_interval: float = 5.0,
                 heartbeat_timeout: float = 20.0, floating_netblock: str = ''):
        self.core = core
        self.floating_netblock = floating_netblock
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.tasks = Tasks('node liveness')     # the markings unreachable under way
        self._timers: dict[str, Timer] = {}

    def start(self):
        """Nodes registered before this controller started get one timeout to heartbeat
        to it; otherwise a node that died while no controller ran would go unnoticed."""
        for entry in self.core.cache.range(keys.NODES)[0]:
            if not entry.value.unreachable:
                self._arm(entry.value.name)

    async def stop(self):
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.tasks.close()

    def require(self, name: str):
        """The node's record (NOT_FOUND if it never registered, or was forgotten)."""
        entry = self.core.cache.get(keys.node(name))
        if entry is None:
            raise errors.NotFound(f'node {name} is not registered')
        return entry

    # -- membership ------------------------------------------------------------
    async def register(self, request: pb.RegisterNodeRequest) -> float:
        """Record the node (again, after a restart) and start its liveness; returns
        the heartbeat interval it is to keep."""
        if not request.address:
            raise errors.InvalidArgument('a node needs the address of its NodeService')
        name = request.name

        def build():
            entry = self.core.cache.get(keys.node(name))
            record = records_pb2.NodeRecord(
                name=name, address=request.address, console_host=request.console_host,
                capacity=request.capacity, features=request.features, registered_at=self.clock.now(),
                mesh_address=request.mesh_address, network_node=request.network_node)
            if entry is not None:
                # Kept as it is: every create and every finished delete changes it in the
                # transaction that changes the placements, and an instance in delete-wait
                # (or failed, awaiting the node's clean-up) still holds its share with no
                # placement left, so a sum of the placements would free it twice.
                record.allocated.CopyFrom(entry.value.allocated)
            else:
                # A new node (or one whose record was lost): what its placements hold.
                for placement in self.core.cache.range(keys.placements(name))[0]:
                    size = placement.value.size
                    record.allocated.cpus += size.cpus
                    record.allocated.memory_mib += size.memory_mib
                    record.allocated.disk_gib += size.disk_gib
            txn = Txn()
            if entry is None:
                txn.check_absent(keys.node(name))
            else:
                txn.check_revision(entry.key, entry.mod_revision)
            txn.put(keys.node(name), record.SerializeToString())
            self.core.event(txn, caller.SYSTEM, OBJ_NODE, name, STATUS, 'node registered',
                            {'address': request.address})
            return txn, record
        await self.core.mutate(build)
        self._arm(name)
        return self.heartbeat_interval

    async def heartbeat(self, name: str):
        entry = self.require(name)
        self._arm(name)
        if entry.value.unreachable:
            await self._set_reachable(name, True)

    def desired(self, name: str):
        """The node's desired-state stream (sfcontrol/feeds.py)."""
        self.require(name)
        return NodeFeed(self.core.cache, name).stream()

    def desired_networks(self, name: str):
        """The node's desired-networks stream (sfcontrol/meshes.py)."""
        self.require(name)
        return NetworkFeed(self.core.cache, name, self.floating_netblock).stream()

    # -- liveness --------------------------------------------------------------
    def _arm(self, name: str):
        if (old := self._timers.pop(name, None)) is not None:
            old.cancel()
        self._timers[name] = self.clock.call_later(
            self.heartbeat_timeout, lambda: self.tasks.spawn(self._lost(name), name=f'lost-{name}'))

    async def _lost(self, name: str):
        self._timers.pop(name, None)
        caller.set_current(caller.Caller(caller.SYSTEM))
        try:
            await self._set_reachable(name, False)
            log.warning('node %s missed its heartbeats: marked unreachable', name)
        except Exception:
            log.exception('could not mark node %s unreachable', name)

    async def _set_reachable(self, name: str, reachable: bool):
        def build():
            entry = self.core.cache.get(keys.node(name))
            record = records_pb2.NodeRecord()
            record.CopyFrom(entry.value)
            record.unreachable = not reachable
            txn = Txn().check_revision(entry.key, entry.mod_revision).put(entry.key, record.SerializeToString())
            self.core.event(txn, caller.SYSTEM, OBJ_NODE, name, STATUS,
                            'node reachable again' if reachable else 'node unreachable: missed heartbeats')
            return txn, record
        await self.core.mutate(build)


class NodeReports:
    def __init__(self, core: Core, instances: Instances, agentops: AgentOperations, blobs, auth,
                 snapshots):
        self.core = core
        self.snapshots = snapshots
        self.instances = instances
        self.agentops = agentops
        self.blobs = blobs
        self.auth = auth

    def placed(self, node: str, instance_uuid: str):
        """An instance placed on node (NOT_FOUND for any other, as for a foreign namespace)."""
        entry = self.core.cache.by_uuid(keys.INSTANCES, instance_uuid)
        if entry is None or entry.value.node != node:
            raise errors.NotFound(f'instance {instance_uuid} is not placed on node {node}')
        return entry

    # -- instance status -----------------------------------------------------------
    async def instance_status(self, node: str, request: pb.ReportInstanceStatusRequest):
        """Apply what node observed of one of its instances: state, power, agent, ports,
        disks and interfaces (a state only by a legal transition)."""
        entry = self.placed(node, request.instance_uuid)

        def build():
            current = self.core.cache.get(entry.key)
            inst = instance_pb2.Instance()
            inst.CopyFrom(current.value)
            if inst.node != node:
                raise errors.StateConflict(f'instance {inst.uuid} is not placed on {node}')
            txn = Txn().check_revision(current.key, current.mod_revision)
            if request.HasField('state') and request.state != inst.state:
                self._apply_state(txn, inst, request)
            # Power and agent changes are status events too: a watcher (the web console's
            # list, say) sees every change of what an instance shows.
            for field, enum, what in (('power_state', instance_pb2.PowerState, 'power state'),
                                      ('agent_state', instance_pb2.AgentState, 'agent state')):
                if request.HasField(field) and getattr(request, field) != getattr(inst, field):
                    self.core.event(txn, inst.namespace, OBJ_INSTANCE, inst.uuid, STATUS,
                                    f'{what} changed to {states.name(getattr(request, field), enum)}')
            for field in ('power_state', 'agent_state', 'agent_system_boot_time', 'console_port',
                          'vdi_port', 'vdi_tls_port'):
                if request.HasField(field):
                    setattr(inst, field, getattr(request, field))
            if request.disks_set:
                del inst.disks[:]
                inst.disks.extend(request.disks)
            for iface_uuid, iface_state in request.interface_states.items():
                iface = self.core.cache.get(keys.interface(iface_uuid))
                if iface is not None and iface.value.instance_uuid == inst.uuid:
                    updated = type(iface.value)()
                    updated.CopyFrom(iface.value)
                    updated.state = iface_state
                    txn.check_revision(iface.key, iface.mod_revision).put(iface.key, updated.SerializeToString())
            if inst != current.value:
                txn.put(current.key, inst.SerializeToString())
            return txn, pb.ReportInstanceStatusResponse()
        await self.core.mutate(build)

    def _apply_state(self, txn: Txn, inst, request):
        new = request.state
        if new == states.DELETED:
            if inst.state not in (states.DELETE_WAIT, *states.ERROR_OF.values()):
                raise errors.StateConflict(f'instance {inst.uuid} is {states.name(inst.state)}, not being deleted')
            self.instances.finish_delete(txn, inst)
            return
        states.check(inst.state, new)
        inst.state = new
        if request.HasField('error_message'):
            inst.error_message = request.error_message
        if new in states.ERROR_OF.values():
            # The node cleans up once the placement goes; it then reports deleted,
            # which finishes in state error.
            placement = self.core.cache.get(keys.placement(inst.node, inst.uuid))
            if placement is not None:
                self.instances.drop_placement(txn, placement)
        self.core.event(txn, inst.namespace, OBJ_INSTANCE, inst.uuid, STATUS,
                        f'state changed to {states.name(new)}',
                        {'error': request.error_message} if request.HasField('error_message') else None)

    # -- events -----------------------------------------------------------------------
    async def events(self, node: str, events):
        """Record events node observed, of its instances, the networks it carries (and, a network
        node, their interfaces' floating addresses) and itself only."""
        txn = Txn()
        for item in events:
            ev = item.event
            ev.fqdn = node          # who observed it is not the node's to say
            ns = caller.SYSTEM
            if ev.object_type == OBJ_INSTANCE:
                inst = self.core.cache.by_uuid(keys.INSTANCES, ev.object_uuid)
                if inst is None:
                    continue        # deleted since: its events go with it
                if inst.value.node != node:
                    raise errors.NotFound(f'instance {ev.object_uuid} is not placed on node {node}')
                ns = inst.value.namespace
            elif ev.object_type == OBJ_NETWORK:
                net = self.core.cache.by_uuid(keys.NETWORKS, ev.object_uuid)
                me = self.core.cache.get(keys.node(node))
                if net is None:
                    continue
                if me is None or not me.value.mesh_address:
                    raise errors.PermissionDenied(f'node {node} carries no networks')
                ns = net.value.namespace
            elif ev.object_type == OBJ_IFACE:      # floated and defloated, by the network node
                iface = self.core.cache.by_uuid(keys.INTERFACES, ev.object_uuid)
                me = self.core.cache.get(keys.node(node))
                if iface is None:
                    continue
                if me is None or not me.value.network_node:
                    raise errors.PermissionDenied(f'node {node} is not a network node')
                inst = self.core.cache.by_uuid(keys.INSTANCES, iface.value.instance_uuid)
                net = self.core.cache.by_uuid(keys.NETWORKS, iface.value.network_uuid)
                if inst is None and net is None:
                    continue
                ns = inst.value.namespace if inst is not None else net.value.namespace
            elif ev.object_type != OBJ_NODE or ev.object_uuid != node:
                raise errors.PermissionDenied('a node records events of its instances and itself only')
            type_name = event_pb2.ObjectType.Name(ev.object_type)[len('OBJECT_TYPE_'):].lower()
            txn.put(keys.event(ns, type_name, ev.object_uuid), ev.SerializeToString())
        if txn.ops:
            await self.core.mutate(lambda: (txn, None))

    # -- agent operations ----------------------------------------------------------------
    async def agent_operation(self, node: str, request: pb.UpdateAgentOperationRequest):
        """Progress of an agent operation, from the node its instance is placed on only."""
        op = self.core.cache.get(keys.agentop(request.uuid))
        if op is None:
            raise errors.NotFound('agent operation not found')
        inst = self.core.cache.by_uuid(keys.INSTANCES, op.value.instance_uuid)
        if inst is None or inst.value.node != node:
            raise errors.StateConflict(f'agent operation {request.uuid} is not for an instance '
                                  f'placed on {node}')
        await self.agentops.update(
            request.uuid, request.state, results=dict(request.results),
            error_message=request.error_message if request.HasField('error_message') else None,
            last_progress=request.last_progress if request.HasField('last_progress') else None)

    # -- blobs --------------------------------------------------------------------------
    async def store_blob(self, node: str, instance_uuid: str, chunks, snapshot_blob_uuid: str = ''):
        """A blob an instance of node produced (a file got from it, a large output, or a
        snapshot it was ordered to take)."""
        inst = self.placed(node, instance_uuid).value
        if snapshot_blob_uuid:
            return await self.snapshots.store(node, inst, snapshot_blob_uuid, chunks)
        return await self.blobs.store(chunks, 'instance', inst.uuid, inst.namespace)

    async def fail_snapshot(self, node: str, request):
        inst = self.placed(node, request.instance_uuid).value
        await self.snapshots.fail(node, inst, request.blob_uuid, request.error_message)

    def blob_stream(self, node: str, blob_uuid: str, offset: int):
        """A blob node is to put into a guest or start a disk from: only one an unfinished
        agent operation of an instance on node puts, or a disk base or NVRAM template of
        an instance placed on node (NOT_FOUND for any other)."""
        if not self._blob_is_given_to(node, blob_uuid):
            raise errors.NotFound(f'blob {blob_uuid} is not for node {node}')
        return self.blobs.stream(blob_uuid, offset)

    def _blob_is_given_to(self, node: str, blob_uuid: str) -> bool:
        for placement in self.core.cache.range(keys.placements(node))[0]:
            if blob_uuid in placement.value.base_blobs:
                return True
            uuid = placement.value.instance_uuid
            inst = self.core.cache.by_uuid(keys.INSTANCES, uuid)
            if inst is not None and inst.value.nvram_template == blob_uuid:
                return True
            for op in self.core.cache.where(keys.AGENTOPS, 'instance_uuid', uuid):
                if op.value.state not in OPERATION_FINAL and any(
                        c.blob_uuid == blob_uuid for c in op.value.commands):
                    return True
        return False

    # -- consoles -------------------------------------------------------------------------
    def authorize_console(self, node: str, instance_uuid: str, token: str) -> str:
        """The namespace of a token that may see node's instance (for its serial console)."""
        entry = self.placed(node, instance_uuid)
        who = self.auth.authenticate(f'Bearer {token}')
        if not who.can_see(entry.value.namespace):
            # As the public API answers a foreign namespace: nothing to see here.
            raise errors.NotFound(f'instance {instance_uuid} not found')
        return who.namespace
