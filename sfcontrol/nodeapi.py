"""The controller's side of the node API (NodeControlService).

Nodes register, send heartbeats, watch the instances placed on them, and
report what they observe. A node is the node its certificate names
(caller.current().node, set by the interceptor); every call is checked
against what that node was given: its own name, the instances placed on it,
their agent operations and the blobs those put into guests. A node is alive while it heartbeats: each heartbeat
re-arms a timer; when the timer fires the node is marked unreachable (one
write, on the transition), and its instances show it.
"""

import asyncio
import logging
import time

from sfcommon import errors
from sfcontrol import caller
from sfcommon import states
from sfcontrol.store import keys
from sfcontrol.agentops import FINAL as OPERATION_FINAL, AgentOperations
from sfcontrol.core import Core
from sfcontrol.feeds import NodeFeed
from sfcontrol.instances import Instances
from sfcontrol.store.etcd import Txn
from shakenfist.node.v1alpha1 import node_pb2 as pb, node_pb2_grpc
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import event_pb2, instance_pb2

log = logging.getLogger(__name__)
OBJ_NODE, OBJ_INSTANCE = event_pb2.OBJECT_TYPE_NODE, event_pb2.OBJECT_TYPE_INSTANCE
STATUS = event_pb2.EVENT_TYPE_STATUS


class NodeControl(node_pb2_grpc.NodeControlServiceServicer):
    def __init__(self, core: Core, instances: Instances, agentops: AgentOperations, blobs, auth,
                 heartbeat_interval: float = 5.0, heartbeat_timeout: float = 20.0):
        self.core = core
        self.auth = auth
        self.instances = instances
        self.agentops = agentops
        self.blobs = blobs
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def start(self):
        """Nodes registered before this controller started get one timeout to heartbeat
        to it; otherwise a node that died while no controller ran would go unnoticed."""
        for entry in self.core.cache.range(keys.NODES)[0]:
            if not entry.value.unreachable:
                self._arm(entry.value.name)

    def stop(self):
        for timer in self._timers.values():
            timer.cancel()

    # -- identity --------------------------------------------------------------
    @staticmethod
    def _me(claimed: str) -> str:
        """The calling node, which must be the node the request names."""
        node = caller.current().node
        if claimed != node:
            raise errors.permission_denied(f'this credential is node {node}\'s, not {claimed!r}\'s')
        return node

    def _my_instance(self, node: str, instance_uuid: str):
        """An instance placed on node (NOT_FOUND for any other, as for a foreign namespace)."""
        entry = self.core.cache.by_uuid(keys.INSTANCES, instance_uuid)
        if entry is None or entry.value.node != node:
            raise errors.not_found(f'instance {instance_uuid} is not placed on node {node}')
        return entry

    # -- membership ------------------------------------------------------------
    async def RegisterNode(self, request: pb.RegisterNodeRequest, context):
        self._me(request.name)
        if not request.address:
            raise errors.invalid('a node needs the address of its NodeService')

        def build():
            entry = self.core.cache.get(keys.node(request.name))
            record = records_pb2.NodeRecord(
                name=request.name, address=request.address, console_host=request.console_host,
                capacity=request.capacity, features=request.features, registered_at=time.time())
            if entry is not None:
                # Kept as it is: every create and every finished delete changes it in the
                # transaction that changes the placements, and an instance in delete-wait
                # (or failed, awaiting the node's clean-up) still holds its share with no
                # placement left, so a sum of the placements would free it twice.
                record.allocated.CopyFrom(entry.value.allocated)
            else:
                # A new node (or one whose record was lost): what its placements hold.
                for placement in self.core.cache.range(keys.placements(request.name))[0]:
                    size = placement.value.size
                    record.allocated.cpus += size.cpus
                    record.allocated.memory_mib += size.memory_mib
                    record.allocated.disk_gib += size.disk_gib
            txn = Txn()
            if entry is None:
                txn.check_absent(keys.node(request.name))
            else:
                txn.check_revision(entry.key, entry.mod_revision)
            txn.put(keys.node(request.name), record.SerializeToString())
            self.core.event(txn, caller.SYSTEM, OBJ_NODE, request.name, STATUS, 'node registered',
                            {'address': request.address})
            return txn, pb.RegisterNodeResponse(heartbeat_interval_seconds=self.heartbeat_interval)
        response = await self.core.mutate(build)
        self._arm(request.name)
        return response

    async def Heartbeat(self, request: pb.HeartbeatRequest, context):
        self._me(request.name)
        entry = self.core.cache.get(keys.node(request.name))
        if entry is None:
            raise errors.not_found(f'node {request.name} is not registered')
        self._arm(request.name)
        if entry.value.unreachable:
            await self._set_reachable(request.name, True)
        return pb.HeartbeatResponse()

    def _arm(self, name: str):
        if (old := self._timers.pop(name, None)) is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(
            self.heartbeat_timeout, lambda: asyncio.ensure_future(self._lost(name)))

    async def _lost(self, name: str):
        self._timers.pop(name, None)
        caller.set_current(caller.Caller(caller.SYSTEM))
        try:
            await self._set_reachable(name, False)
            log.warning('node %s missed its heartbeats: marked unreachable', name)
        except Exception:   # noqa: BLE001 -- a timer callback has no caller to report to
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

    # -- desired state -----------------------------------------------------------
    async def WatchDesiredInstances(self, request: pb.WatchDesiredInstancesRequest, context):
        self._me(request.name)
        if self.core.cache.get(keys.node(request.name)) is None:
            raise errors.not_found(f'node {request.name} is not registered')
        async for message in NodeFeed(self.core.cache, request.name).stream():
            yield message

    # -- reports -------------------------------------------------------------------
    async def ReportInstanceStatus(self, request: pb.ReportInstanceStatusRequest, context):
        entry = self._my_instance(self._me(request.node), request.instance_uuid)

        def build():
            current = self.core.cache.get(entry.key)
            inst = instance_pb2.Instance()
            inst.CopyFrom(current.value)
            if inst.node != request.node:
                raise errors.conflict(f'instance {inst.uuid} is not placed on {request.node}')
            txn = Txn().check_revision(current.key, current.mod_revision)
            if request.HasField('state') and request.state != inst.state:
                self._apply_state(txn, inst, request)
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
        return await self.core.mutate(build)

    def _apply_state(self, txn: Txn, inst, request):
        new = request.state
        if new == states.DELETED:
            if inst.state not in (states.DELETE_WAIT, *states.ERROR_OF.values()):
                raise errors.conflict(f'instance {inst.uuid} is {states.name(inst.state)}, not being deleted')
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

    async def RecordEvents(self, request: pb.RecordEventsRequest, context):
        node = self._me(request.node)
        txn = Txn()
        for item in request.events:
            ev = item.event
            ev.fqdn = node          # who observed it is not the node's to say
            ns = caller.SYSTEM
            if ev.object_type == OBJ_INSTANCE:
                inst = self.core.cache.by_uuid(keys.INSTANCES, ev.object_uuid)
                if inst is None:
                    continue        # deleted since: its events go with it
                if inst.value.node != node:
                    raise errors.not_found(f'instance {ev.object_uuid} is not placed on node {node}')
                ns = inst.value.namespace
            elif ev.object_type != OBJ_NODE or ev.object_uuid != node:
                raise errors.permission_denied('a node records events of its instances and itself only')
            type_name = event_pb2.ObjectType.Name(ev.object_type)[len('OBJECT_TYPE_'):].lower()
            txn.put(keys.event(ns, type_name, ev.object_uuid), ev.SerializeToString())
        if txn.ops:
            await self.core.mutate(lambda: (txn, pb.RecordEventsResponse()))
        return pb.RecordEventsResponse()

    async def UpdateAgentOperation(self, request: pb.UpdateAgentOperationRequest, context):
        # As with ReportInstanceStatus: only the node the instance is placed on may report.
        node = self._me(request.node)
        op = self.core.cache.get(keys.agentop(request.uuid))
        if op is None:
            raise errors.not_found('agent operation not found')
        inst = self.core.cache.by_uuid(keys.INSTANCES, op.value.instance_uuid)
        if inst is None or inst.value.node != node:
            raise errors.conflict(f'agent operation {request.uuid} is not for an instance '
                                  f'placed on {request.node}')
        await self.agentops.update(
            request.uuid, request.state, results=dict(request.results),
            error_message=request.error_message if request.HasField('error_message') else None,
            last_progress=request.last_progress if request.HasField('last_progress') else None)
        return pb.UpdateAgentOperationResponse()

    async def PutBlob(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof('part') != 'header':
            raise errors.invalid('a blob stream starts with its header')
        header = first.header
        inst = self._my_instance(self._me(header.node), header.instance_uuid)

        async def chunks():
            async for part in request_iterator:
                if part.WhichOneof('part') != 'data':
                    raise errors.invalid('only the first message of a blob stream is a header')
                yield part.data
        blob = await self.blobs.store(chunks(), 'instance', inst.value.uuid, inst.value.namespace)
        return pb.PutBlobResponse(blob_uuid=blob.uuid, size=blob.size, sha512=blob.sha512)

    async def GetBlob(self, request: pb.GetBlobRequest, context):
        node = caller.current().node
        if not self._blob_is_given_to(node, request.blob_uuid):
            raise errors.not_found(f'blob {request.blob_uuid} is not for node {node}')
        async for chunk in self.blobs.stream(request.blob_uuid, request.offset):
            yield pb.GetBlobResponse(data=chunk)

    def _blob_is_given_to(self, node: str, blob_uuid: str) -> bool:
        """Whether an unfinished agent operation of an instance on node puts the blob."""
        for placement in self.core.cache.range(keys.placements(node))[0]:
            uuid = placement.value.instance_uuid
            for op in self.core.cache.where(keys.AGENTOPS, 'instance_uuid', uuid):
                if op.value.state not in OPERATION_FINAL and any(
                        c.blob_uuid == blob_uuid for c in op.value.commands):
                    return True
        return False

    async def AuthorizeConsole(self, request: pb.AuthorizeConsoleRequest, context):
        entry = self._my_instance(self._me(request.node), request.instance_uuid)
        who = self.auth.authenticate(f'Bearer {request.token}')
        if not who.can_see(entry.value.namespace):
            # As the public API answers a foreign namespace: nothing to see here.
            raise errors.not_found(f'instance {request.instance_uuid} not found')
        return pb.AuthorizeConsoleResponse(namespace=who.namespace)
