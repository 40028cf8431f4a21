"""An instance's life: create, read, delete, its interfaces and metadata, its events.

Every change is one transaction built from the cache (see Core.mutate).
"""

import asyncio
import base64
import random
import secrets
import uuid as uuidlib

from google.protobuf import json_format

from sfcommon import errors, states
from sfcommon.urlpolicy import ImagePolicy
from sfcontrol import caller, limits, scheduler, validation
from sfcontrol.core import Core, object_type_name
from sfcontrol.events import Events
from sfcontrol.networks import Networks
from sfcontrol.nodeclient import NodeClients
from sfcontrol.store import keys
from sfcontrol.store.cache import untracked
from sfcontrol.store.etcd import Txn
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import blob_pb2, event_pb2, specs_pb2
from shakenfist.v1 import instance_pb2 as pb
from shakenfist.v1 import instance_service_pb2 as api

OBJ = event_pb2.OBJECT_TYPE_INSTANCE
AUDIT, STATUS = event_pb2.EVENT_TYPE_AUDIT, event_pb2.EVENT_TYPE_STATUS
P = pb.PowerState
ON, OFF, PAUSED = P.Value('POWER_STATE_ON'), P.Value('POWER_STATE_OFF'), P.Value('POWER_STATE_PAUSED')
A = pb.AgentState
DEFAULT_PAGE = 1000
# The operations of one delete-all transaction at most: etcd takes 128 (checks and
# operations each), and the reads each delete makes are checks too.
BATCH_OPS = 60
# Interfaces per instance, hot-plugged ones included: the schema's limit on
# Instance.interfaces (and on CreateInstanceRequest.network).
MAX_INTERFACES = limits.max_items(pb.Instance.DESCRIPTOR.fields_by_name['interfaces'])


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


class Instances:
    def __init__(self, core: Core, networks: Networks, nodes: NodeClients, events: Events, blobs,
                 images: ImagePolicy):
        self.core = core
        self.images = images
        self.networks = networks
        self.nodes = nodes
        self.events = events
        self.blobs = blobs
        # Every create checks its node's record, so concurrent creates in this
        # controller would mostly conflict and retry (bench P3): take turns.
        self._creating = asyncio.Lock()

    # -- lookups ---------------------------------------------------------------
    def resolve(self, ref: str, namespace: str | None = None):
        """An instance by UUID (any state) or by name (active ones in the namespace)."""
        me = caller.current()
        if namespace is not None:
            if not me.can_see(namespace):
                raise errors.NotFound('namespace not found')
            if self.core.cache.get(keys.namespace(namespace)) is None:
                raise errors.NotFound('namespace not found')
        entry = self.core.cache.by_uuid(keys.INSTANCES, ref)
        if entry is not None:
            if not me.can_see(entry.value.namespace) or (
                    namespace is not None and entry.value.namespace != namespace):
                raise errors.NotFound('instance not found')
            return entry
        scope = namespace or (None if me.is_system else me.namespace)
        prefix = keys.instances(scope)
        matches, _ = self.core.cache.range(
            prefix, filter=lambda i: i.name == ref and states.is_active(i.state))
        if not matches:
            raise errors.NotFound('instance not found')
        if len(matches) > 1:
            raise errors.InvalidArgument(f'multiple instances have the name "{ref}" in namespace '
                                 f'"{scope or "all"}"')
        return matches[0]

    def view(self, instance: pb.Instance) -> pb.Instance:
        """The instance as users see it: with its interfaces and its node's health."""
        out = _copy(instance)
        out.interfaces.extend(self.networks.interfaces_of(instance.uuid))
        if instance.HasField('node'):
            node = self.core.cache.get(keys.node(instance.node))
            out.node_unreachable = node is None or node.value.unreachable
        return out

    def active(self, ref: str):
        """For power, console and agent calls: NOT_READY (406) unless created."""
        entry = self.resolve(ref)
        if entry.value.state != states.CREATED:
            raise errors.NotReady(f'instance {entry.value.uuid} is not ready '
                                   f'({states.name(entry.value.state)})')
        return entry

    # -- create ------------------------------------------------------------------
    async def create(self, req: api.CreateInstanceRequest):
        me = caller.current()
        ns = req.namespace if req.HasField('namespace') else me.namespace
        if not me.can_see(ns) or self.core.cache.get(keys.namespace(ns)) is None:
            raise errors.NotFound('namespace not found')
        validation.check_create(req, self.images)
        affinity = {}
        if req.HasField('metadata') and 'affinity' in req.metadata:
            affinity = json_format.MessageToDict(req.metadata)['affinity']
        size = scheduler.size_of_instance(req.cpus, req.memory, req.disk)

        def build():
            if self.core.cache.get(keys.namespace(ns)) is None:    # read here: it guards the create
                raise errors.NotFound('namespace not found')
            txn = Txn()
            inst = pb.Instance(
                uuid=str(uuidlib.uuid4()), state=states.INITIAL, version=1, name=req.name,
                namespace=ns, cpus=req.cpus, memory=req.memory, disk_spec=req.disk,
                uefi=req.uefi, secure_boot=req.secure_boot, vtpm=req.vtpm,
                configdrive=req.configdrive or pb.CONFIG_DRIVE_OPENSTACK_DISK,
                machine_type=pb.MACHINE_TYPE_Q35 if req.secure_boot else pb.MACHINE_TYPE_PC,
                side_channels=(req.side_channels.side_channels if req.HasField('side_channels')
                               else validation.DEFAULT_SIDE_CHANNELS),
                power_state=P.Value('POWER_STATE_INITIAL'))
            inst.metadata.update(json_format.MessageToDict(req.metadata) if req.HasField('metadata') else {})
            inst.video.CopyFrom(specs_pb2.VideoSpec(**validation.DEFAULT_VIDEO))
            if req.HasField('video'):
                inst.video.model, inst.video.memory = req.video.model, req.video.memory
                inst.video.vdi = req.video.vdi or specs_pb2.VDI_TYPE_SPICE
            for field in ('ssh_key', 'user_data'):
                if req.HasField(field):
                    setattr(inst, field, getattr(req, field))
            if req.HasField('user_data'):
                try:
                    base64.b64decode(req.user_data, validate=True)
                except ValueError:
                    raise errors.InvalidArgument('user_data: must be base64 encoded')
            if req.HasField('placed_on'):
                inst.requested_placement = req.placed_on
            interfaces = [self.networks.new_interface(txn, spec, inst.uuid, order, ns)
                          for order, spec in enumerate(req.network)]
            node = scheduler.choose(self.core.cache, size, ns, affinity,
                                    req.placed_on if req.HasField('placed_on') else None)
            inst.node = node.value.name
            scheduler.allocate(txn, node, size)
            if req.nvram_template:      # shown as the blob it resolved to, as Shaken Fist does
                template = req.nvram_template
                inst.nvram_template = self.blob_of(
                    txn, inst, template if template.startswith('sf://') else f'sf://blob/{template}',
                    'nvram_template')
            txn.put(keys.instance(ns, inst.uuid), inst.SerializeToString())
            cid = 0
            if pb.SIDE_CHANNEL_SF_AGENT2 in inst.side_channels:
                # The agent's vsock address, unique in the cluster (the guard makes it so).
                cid = random.randint(3, 2**32 - 2)
                txn.create(keys.vsock_cid(cid), inst.uuid.encode())
            bases = [self.base_blob(txn, inst, i, spec) for i, spec in enumerate(req.disk)]
            self._place(txn, inst, ON, size, cid, bases)
            self.core.event(txn, ns, OBJ, inst.uuid, AUDIT, 'create request from API',
                            {'caller': me.namespace})
            for iface in interfaces:
                self.core.event(txn, ns, OBJ, inst.uuid, STATUS, 'allocated ip address',
                                {'interface': iface.uuid, 'ipv4': iface.ipv4 or None,
                                 'macaddr': iface.macaddr})
            self.core.event(txn, ns, OBJ, inst.uuid, STATUS, 'instance placed',
                            {'node': inst.node})
            view = _copy(inst)
            view.interfaces.extend(interfaces)
            return txn, api.CreateInstanceResponse(instance=view)
        async with self._creating:
            return await self.core.mutate(build, request=req)

    def base_blob(self, txn: Txn, inst: pb.Instance, i: int, spec) -> str:
        """The blob a disk starts from when its base is one, held by the instance while
        it lives; '' for any other base (a URL or shorthand, fetched by the node)."""
        base = spec.base if spec.HasField('base') else ''
        return self.blob_of(txn, inst, base, f'disk[{i}].base') if base.startswith('sf://') else ''

    def blob_of(self, txn: Txn, inst: pb.Instance, ref: str, field: str) -> str:
        """The complete blob that ref names for inst's namespace (sf://blob/<uuid>, the
        newest complete version of sf://snapshot/<uuid> or sf://artifact/<uuid>, or of
        sf://upload/<ns>/<name>), held by the instance (a reference in txn)."""
        base = ref
        ns, me = inst.namespace, caller.current()
        kind, _, rest = base.removeprefix('sf://').partition('/')
        missing = errors.NotFound(f'{field}: {base} not found')
        if not base.startswith('sf://'):
            raise missing
        if kind == 'blob':
            blob = self.core.cache.get(keys.blob(rest))
            refs = self.core.cache.range(keys.blob_refs(rest))[0]
            if blob is None or not (me.is_system or any(r.value.namespace == ns for r in refs)):
                raise missing
            blob_uuid = rest
        elif kind in ('snapshot', 'artifact', 'upload'):
            if kind == 'upload':
                found = self.core.cache.where(keys.ARTIFACTS, 'source_url', base)
            else:
                art = self.core.cache.by_uuid(keys.ARTIFACTS, rest)
                found = [art] if art is not None else []
            found = [a for a in found if a.value.namespace == ns or a.value.shared]
            if not found:
                raise missing
            versions = sorted(found[0].value.blobs.items(), key=lambda v: -int(v[0]))
            ready = [v.uuid for _, v in versions if (b := self.core.cache.get(keys.blob(v.uuid)))
                     is not None and b.value.state == blob_pb2.BlobState.Value('BLOB_STATE_CREATED')]
            if not ready:
                raise errors.NotReady(f'{field}: {base} has no complete version yet')
            blob_uuid = ready[0]
            blob = self.core.cache.get(keys.blob(blob_uuid))
        else:
            raise missing
        if blob.value.state != blob_pb2.BlobState.Value('BLOB_STATE_CREATED'):
            raise errors.NotReady(f'{field}: blob {blob_uuid} is not complete '
                                  f'({blob_pb2.BlobState.Name(blob.value.state)})')
        txn.put(keys.blob_ref(blob_uuid, 'instance', inst.uuid), records_pb2.BlobRef(
            blob_uuid=blob_uuid, holder_type='instance', holder_uuid=inst.uuid,
            namespace=ns).SerializeToString())
        return blob_uuid

    @staticmethod
    def _place(txn: Txn, inst: pb.Instance, desired_power, size, vsock_cid: int, base_blobs=()):
        """Place the instance on its node (sfcontrol/feeds.py tells the node)."""
        placement = records_pb2.Placement(
            instance_uuid=inst.uuid, desired_power_state=desired_power, size=size, vsock_cid=vsock_cid,
            base_blobs=base_blobs,
            # The graphical console's password, made once per instance (VNC reads 8 characters).
            console_password=secrets.token_urlsafe(6))
        txn.put(keys.placement(inst.node, inst.uuid), placement.SerializeToString())

    def drop_placement(self, txn: Txn, placement):
        """Take an instance off its node (the node then removes it), freeing its vsock CID;
        snapshots it was still to take will never be (their blobs become errors)."""
        txn.delete(placement.key)
        if placement.value.vsock_cid:
            txn.delete(keys.vsock_cid(placement.value.vsock_cid))
        for order in placement.value.snapshots:
            blob = self.core.cache.get(keys.blob(order.blob_uuid))
            if blob is not None and blob.value.state == blob_pb2.BlobState.Value('BLOB_STATE_INITIAL'):
                failed = _copy(blob.value)
                failed.state = blob_pb2.BlobState.Value('BLOB_STATE_ERROR')
                txn.check_revision(blob.key, blob.mod_revision).put(blob.key, failed.SerializeToString())

    def _set_desired_power(self, txn: Txn, inst: pb.Instance, power):
        """Ask the node for power, even if it was asked before (power_generation)."""
        entry = self.core.cache.get(keys.placement(inst.node, inst.uuid))
        if entry is None:
            return
        placement = records_pb2.Placement()
        placement.CopyFrom(entry.value)
        placement.desired_power_state = power
        placement.power_generation += 1
        txn.put(entry.key, placement.SerializeToString())

    # -- read ----------------------------------------------------------------------
    def get(self, req: api.GetInstanceRequest):
        entry = self.resolve(req.instance_ref, req.namespace if req.HasField('namespace') else None)
        return api.GetInstanceResponse(instance=self.view(entry.value))

    def list(self, req: api.ListInstancesRequest):
        me = caller.current()
        ns = req.namespace if req.HasField('namespace') else (None if me.is_system else me.namespace)
        if ns is not None and not me.can_see(ns):
            raise errors.NotFound('namespace not found')
        page, more = self.core.cache.range(
            keys.instances(ns), start_after=req.page_token or None,
            limit=req.page_size or DEFAULT_PAGE,
            filter=None if req.all else (lambda i: states.is_active(i.state)))
        return api.ListInstancesResponse(instances=[self.view(e.value) for e in page],
                                         next_page_token=page[-1].key if more else '')

    # -- delete ----------------------------------------------------------------------
    async def delete(self, req: api.DeleteInstanceRequest):
        entry = self.resolve(req.instance_ref, req.namespace if req.HasField('namespace') else None)

        def build():
            current = self.core.cache.get(entry.key)
            if current.value.state == states.DELETED:
                raise errors.NotFound('instance not found')
            txn = Txn()
            before = self.view(current.value)
            self._delete(txn, current)
            return txn, api.DeleteInstanceResponse(instance=before)
        return await self.core.mutate(build, request=req)

    def _delete(self, txn: Txn, entry):
        inst = _copy(entry.value)
        txn.check_revision(entry.key, entry.mod_revision)
        placement = self.core.cache.get(keys.placement(inst.node, inst.uuid)) if inst.HasField('node') else None
        self.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT, 'delete request from API')
        if inst.state == states.DELETE_WAIT:
            return          # already on its way
        if placement is None:
            # Nothing on a node any more (it failed): delete now. One in error was freed
            # when its node reported it gone (freeing it again gave its node's capacity
            # back twice); one still in its failed state is freed here. Either way it
            # ends deleted, as asked.
            states.check(inst.state, states.DELETED)
            if inst.state == states.ERROR:
                self.core.event(txn, inst.namespace, OBJ, inst.uuid, STATUS, 'deleted')
            else:
                self.finish_delete(txn, inst)
            inst.state = states.DELETED
        else:
            states.check(inst.state, states.DELETE_WAIT)
            inst.state = states.DELETE_WAIT
            self.drop_placement(txn, placement)     # the node sees it go and tears the domain down
        txn.put(entry.key, inst.SerializeToString())

    def finish_delete(self, txn: Txn, inst: pb.Instance):
        """The node has removed the instance: free what it held. Mutates inst. One that
        failed ends in error (kept until the user deletes it), any other in deleted."""
        failed = inst.state in states.ERROR_OF.values()
        inst.state = states.ERROR if failed else states.DELETED
        if failed:
            inst.power_state = OFF
        for iface in self.networks.interfaces_of(inst.uuid):
            self.networks.release_interface(txn, iface)
        if inst.HasField('node'):
            node = self.core.cache.get(keys.node(inst.node))
            if node is not None:
                scheduler.allocate(txn, node, scheduler.size_of_instance(inst.cpus, inst.memory, inst.disk_spec),
                                   release=True)
            placement = self.core.cache.get(keys.placement(inst.node, inst.uuid))
            if placement is not None:
                self.drop_placement(txn, placement)
        self.blobs.release_into(txn, inst.uuid)     # its screenshots and agent output
        self.core.event(txn, inst.namespace, OBJ, inst.uuid, STATUS,
                        'cleaned up after error' if failed else 'deleted')

    async def delete_all(self, req: api.DeleteAllInstancesRequest):
        """Delete every instance of the scope, in transactions of a bounded size (etcd
        takes at most 128 operations in one), then record the request. Not atomic, as
        no delete-all is: a retry deletes what is left and answers with all of it."""
        ns = caller.delete_all_scope(req)
        if (prior := await self.core.replayed(req)) is not None:
            return prior
        uuids: list[str] = []
        while batch := (await self.core.mutate(lambda: self._delete_batch(ns, set(uuids)))).instance_uuids:
            uuids.extend(batch)

        def record():
            return Txn(), api.DeleteAllInstancesResponse(instance_uuids=uuids)
        return await self.core.mutate(record, request=req)

    def _delete_batch(self, ns, done: set[str]):
        """A transaction deleting the next instances not in done, and their uuids (an
        empty response when none is left). Two deletes that write one key (a node
        record) go in different transactions: the second must see the first's."""
        txn, written, response = Txn(), set(), api.DeleteAllInstancesResponse()
        with untracked():       # what is left only chooses; each instance read is checked
            live, _ = self.core.cache.range(keys.instances(ns), filter=lambda i: (
                i.uuid not in done and i.state not in (states.DELETED, states.DELETE_WAIT_ERROR)))
        for entry in live:
            one = Txn()
            self._delete(one, entry)
            touched = {op[1] for op in one.ops}
            if response.instance_uuids and (touched & written or len(txn.ops) + len(one.ops) > BATCH_OPS):
                break
            txn.checks += one.checks
            txn.ops += one.ops
            written |= touched
            response.instance_uuids.append(entry.value.uuid)
        return txn, response

    # -- interfaces -----------------------------------------------------------------
    def list_interfaces(self, req: api.ListInstanceInterfacesRequest):
        entry = self.resolve(req.instance_ref)
        ifaces = self.networks.interfaces_of(entry.value.uuid)
        start = validation.page_start(req.page_token)
        end = start + req.page_size if req.page_size else len(ifaces)
        return api.ListInstanceInterfacesResponse(
            interfaces=ifaces[start:end], next_page_token=str(end) if end < len(ifaces) else '')

    async def add_interface(self, req: api.AddInstanceInterfaceRequest):
        entry = self.resolve(req.instance_ref)
        if not req.HasField('network'):
            raise errors.InvalidArgument('network: a networkspec is required')
        if not req.network.network_uuid:
            raise errors.InvalidArgument('network: a networkspec must name a network_uuid')

        def build():
            current = self.core.cache.get(entry.key)
            inst = current.value
            if inst.state in states.TERMINAL:
                raise errors.NotReady(f'instance {inst.uuid} is not ready ({states.name(inst.state)})')
            txn = Txn().check_revision(current.key, current.mod_revision)
            existing = self.networks.interfaces_of(inst.uuid)
            if len(existing) >= MAX_INTERFACES:
                raise errors.InvalidArgument(f'network: an instance has at most {MAX_INTERFACES} '
                                     f'interfaces (it has {len(existing)})')
            order = max((i.order for i in existing), default=-1) + 1
            iface = self.networks.new_interface(txn, req.network, inst.uuid, order, inst.namespace)
            self.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT, 'hot plug interface request',
                            {'interface': iface.uuid, 'network': iface.network_uuid})
            return txn, api.AddInstanceInterfaceResponse(network_interface=iface)
        return await self.core.mutate(build, request=req)

    async def remove_interface(self, req: api.RemoveInstanceInterfaceRequest):
        entry = self.resolve(req.instance_ref)

        def build():
            current = self.core.cache.get(entry.key)
            inst = current.value
            if inst.state in states.TERMINAL:
                raise errors.NotReady(f'instance {inst.uuid} is not ready ({states.name(inst.state)})')
            remaining = self.networks.interfaces_of(inst.uuid)
            gone = [i for i in remaining if i.uuid == req.interface_uuid]
            if not gone:
                raise errors.NotFound('interface not found')
            txn = Txn().check_revision(current.key, current.mod_revision)
            self.networks.release_interface(txn, gone[0])
            self.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT, 'hot unplug interface request',
                            {'interface': req.interface_uuid})
            return txn, api.RemoveInstanceInterfaceResponse()
        return await self.core.mutate(build, request=req)

    # -- metadata --------------------------------------------------------------------
    def get_metadata(self, req):
        entry = self.resolve(req.instance_ref)
        return api.GetInstanceMetadataResponse(metadata=entry.value.metadata)

    async def set_metadata(self, req: api.SetInstanceMetadataRequest):
        if not req.key:
            raise errors.InvalidArgument('key: a metadata key is required')
        value = json_format.MessageToDict(req.value) if req.HasField('value') else None
        if not value:
            raise errors.InvalidArgument('no value specified')
        validation.check_metadata(req.key, value)

        def change(inst):
            inst.metadata.update({req.key: value})
            limits.check_stored(inst, 'metadata')      # all keys: at most 64, 64 KiB
        return await self.change(req, 'set metadata', change, api.SetInstanceMetadataResponse())

    async def delete_metadata(self, req: api.DeleteInstanceMetadataRequest):
        def change(inst):
            if req.key not in inst.metadata:
                raise errors.NotFound(f'metadata key {req.key} not found')
            del inst.metadata[req.key]
        return await self.change(req, 'delete metadata', change,
                                  api.DeleteInstanceMetadataResponse())

    async def change(self, req, what, change, response, *, ready=False,
                      desired_power=None, check=None):
        """Apply change(instance) in one transaction, with an audit event."""
        entry = self.active(req.instance_ref) if ready else self.resolve(req.instance_ref)

        def build():
            current = self.core.cache.get(entry.key)
            inst = _copy(current.value)
            if ready and inst.state != states.CREATED:
                raise errors.NotReady(f'instance {inst.uuid} is not ready ({states.name(inst.state)})')
            if check:
                check(inst)
            change(inst)
            txn = Txn().check_revision(current.key, current.mod_revision)
            txn.put(current.key, inst.SerializeToString())
            if desired_power is not None:
                self._set_desired_power(txn, inst, desired_power)
            self.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT, what)
            return txn, response
        return await self.core.mutate(build, request=req)

    async def node_action(self, req, entry, what, act, response):
        """Run a node action, then record it; a repeated request_id does not act again."""
        if (prior := await self.core.replayed(req)) is not None:
            return prior
        await act()

        def build():
            txn = Txn()
            self.core.event(txn, entry.value.namespace, OBJ, entry.value.uuid, AUDIT, what)
            return txn, response
        return await self.core.mutate(build, request=req)

    # -- events -------------------------------------------------------------------------
    async def list_events(self, req: api.ListInstanceEventsRequest):
        inst = self.resolve(req.instance_ref).value
        events, token, cursor = await self.events.list(
            inst.namespace, OBJ, inst.uuid, event_type=req.event_type,
            limit=req.page_size or req.limit, page_token=req.page_token)
        return api.ListInstanceEventsResponse(events=events, next_page_token=token,
                                              watch_cursor=cursor)

    def events_prefix(self, req):
        """The event key prefix a WatchEvents request may see (its namespace scoping)."""
        me = caller.current()
        object_type = object_type_name(req.object_type) if req.object_type else ''
        if req.object_ref:
            if req.object_type != OBJ:
                raise errors.InvalidArgument('object_ref: only instances can be watched by reference')
            inst = self.resolve(req.object_ref).value
            return keys.events(inst.namespace, object_type, inst.uuid), ''
        if me.is_system:
            return keys.EVENTS, object_type
        return keys.events(me.namespace, object_type), ''
