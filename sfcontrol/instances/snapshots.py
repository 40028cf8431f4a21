"""Snapshots: an instance's disks copied into blobs, as versions of one artifact per disk.

SnapshotInstance records, in one transaction, for each disk: a new version of the
disk's snapshot artifact (source sf://instance/<uuid>/<device>), its blob (state
initial, held by the artifact), and an order on the instance's placement. The
node takes the snapshot (sfnode/snapshots.py) and stores it with PutBlob naming
the order's blob: then the blob is created and the order goes, in one
transaction (Snapshots.store). A node that restarts finds its orders where they
were and takes them again, so an acknowledged snapshot is not lost with a node.
A snapshot that cannot be taken (FailSnapshot) leaves its blob in state error.

A snapshot outlives its instance: the artifact holds the blob. Its blob is a
disk base for new instances (sf://blob/<uuid>, or sf://snapshot/<artifact uuid>
for the newest version).
"""

import time
import uuid as uuidlib

from sfcommon import errors, states
from sfcontrol import validation
from sfcontrol.blobs import CREATED, ERROR, INITIAL
from sfcontrol.store import keys
from sfcontrol.store.etcd import Txn
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import blob_pb2, event_pb2
from shakenfist.v1 import instance_service_pb2 as api

from .lifecycle import OBJ, Instances, _copy

STATUS, AUDIT = event_pb2.EVENT_TYPE_STATUS, event_pb2.EVENT_TYPE_AUDIT
SNAPSHOT = 'snapshot'
# Finished versions kept of each disk's snapshot artifact (Shaken Fist's default): one
# more finishing releases the oldest, and its blob with its last reference.
MAX_VERSIONS = 3
# Snapshots of one instance still to be taken: more wait (their orders live in the
# instance's placement record, which must stay small).
MAX_PENDING = 8


def source_url(instance_uuid: str, device: str) -> str:
    return f'sf://instance/{instance_uuid}/{device}'


class Snapshots:
    def __init__(self, instances: Instances):
        self.instances = instances
        self.core = instances.core
        self.blobs = instances.blobs

    # -- taking ----------------------------------------------------------------------------
    async def snapshot(self, req: api.SnapshotInstanceRequest):
        entry = self.instances.active(req.instance_ref)
        if req.thin:
            raise errors.InvalidArgument('thin: thin snapshots (an overlay of the base) are not '
                                         'supported; take a full one (thin false)')

        def build():
            current = self.core.cache.get(entry.key)
            inst = current.value
            if inst.state != states.CREATED:
                raise errors.NotReady(f'instance {inst.uuid} is not ready ({states.name(inst.state)})')
            disks = self._chosen(inst, req)
            placement = self.core.cache.get(keys.placement(inst.node, inst.uuid))
            if placement is None:
                raise errors.NotReady(f'instance {inst.uuid} is not placed on a node')
            if len(placement.value.snapshots) + len(disks) > MAX_PENDING:
                raise errors.TooManyRequests(
                    f'{len(placement.value.snapshots)} snapshots of instance {inst.uuid} are still '
                    f'being taken (at most {MAX_PENDING}); wait for them')
            ordered = _copy(placement.value)
            txn = Txn().check_revision(current.key, current.mod_revision).check_revision(
                placement.key, placement.mod_revision)
            response = api.SnapshotInstanceResponse()
            now = time.time()
            for device in disks:
                url = source_url(inst.uuid, device)
                art = self._artifact(inst.namespace, url, f'{inst.name}-{device}')
                blob = blob_pb2.Blob(uuid=str(uuidlib.uuid4()), state=INITIAL, version=1, modified=now)
                blob.metadata.SetInParent()
                art.index += 1
                art.blob_uuid = blob.uuid
                art.blobs[str(art.index)].CopyFrom(blob_pb2.ArtifactBlob(uuid=blob.uuid, reference_count=1))
                txn.create(keys.blob(blob.uuid), blob.SerializeToString())
                txn.put(keys.blob_ref(blob.uuid, 'artifact', art.uuid), records_pb2.BlobRef(
                    blob_uuid=blob.uuid, holder_type='artifact', holder_uuid=art.uuid,
                    namespace=inst.namespace).SerializeToString())
                txn.put(keys.artifact(inst.namespace, art.uuid), art.SerializeToString())
                ordered.snapshots.add(device=device, blob_uuid=blob.uuid)
                response.snapshots[device].CopyFrom(api.SnapshotTarget(
                    source_url=url, artifact_uuid=art.uuid, blob_uuid=blob.uuid, artifact_index=art.index))
                self.core.event(txn, inst.namespace, OBJ, inst.uuid, STATUS, 'snapshot requested',
                                {'device': device, 'artifact': art.uuid, 'blob': blob.uuid,
                                 'index': art.index})
            txn.put(placement.key, ordered.SerializeToString())
            self.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT, 'snapshot')
            return txn, response
        return await self.core.mutate(build, request=req)

    @staticmethod
    def _chosen(inst, req) -> list[str]:
        """The devices to snapshot: the one named, every disk with all, else the first;
        never a cdrom or the config drive (snapshot_ignores)."""
        if not inst.disks:
            raise errors.NotReady(f'instance {inst.uuid} has not reported its disks yet')
        usable = [d.device for d in inst.disks if not d.snapshot_ignores]
        if req.HasField('device'):
            known = {d.device: d for d in inst.disks}
            if req.device not in known:
                raise errors.NotFound(f'device {req.device} not found: the instance has '
                                      f'{", ".join(known)}')
            if known[req.device].snapshot_ignores:
                raise errors.InvalidArgument(f'device {req.device} is a cdrom or the config drive: '
                                             'it cannot be snapshotted')
            return [req.device]
        if not usable:
            raise errors.InvalidArgument('the instance has no disk that can be snapshotted')
        return usable if req.all else usable[:1]

    def _artifact(self, ns: str, url: str, name: str) -> blob_pb2.Artifact:
        found = [e for e in self.core.cache.where(keys.ARTIFACTS, 'source_url', url)
                 if e.value.namespace == ns]
        if found:
            return _copy(found[0].value)
        art = blob_pb2.Artifact(uuid=str(uuidlib.uuid4()), name=name, artifact_type=SNAPSHOT,
                                source_url=url, namespace=ns, max_versions=MAX_VERSIONS, version=1, state=INITIAL)
        art.metadata.SetInParent()
        return art

    def _trim_into(self, txn: Txn, art: blob_pb2.Artifact, keep: int):
        """Drop the oldest finished (created or failed) versions, keeping the newest `keep`."""
        finished = sorted(int(i) for i, v in art.blobs.items()
                          if (b := self.core.cache.get(keys.blob(v.uuid))) is None or b.value.state != INITIAL)
        for index in finished[:max(0, len(finished) - keep)]:
            version = art.blobs.pop(str(index))
            self.blobs.release_ref_into(txn, version.uuid, 'artifact', art.uuid)

    # -- the node's side ------------------------------------------------------------------
    def _order(self, node: str, instance_uuid: str, blob_uuid: str):
        placement = self.core.cache.get(keys.placement(node, instance_uuid))
        if placement is None or not any(o.blob_uuid == blob_uuid for o in placement.value.snapshots):
            raise errors.NotFound(f'no snapshot {blob_uuid} is ordered of instance {instance_uuid} '
                                  f'on node {node}')
        return placement

    def _finish_into(self, txn: Txn, node: str, inst, blob_uuid: str, state, extra: dict):
        """In txn: drop the order, record the version's size (and trim the artifact) if it was
        created, and say how it ended."""
        placement = self._order(node, inst.uuid, blob_uuid)
        rest = _copy(placement.value)
        del rest.snapshots[:]
        rest.snapshots.extend(o for o in placement.value.snapshots if o.blob_uuid != blob_uuid)
        txn.check_revision(placement.key, placement.mod_revision).put(placement.key, rest.SerializeToString())
        device = next(o.device for o in placement.value.snapshots if o.blob_uuid == blob_uuid)
        art_entry = self.core.cache.where(keys.ARTIFACTS, 'source_url', source_url(inst.uuid, device))
        for entry in art_entry:
            if entry.value.namespace != inst.namespace:
                continue
            art = _copy(entry.value)
            for version in art.blobs.values():
                if version.uuid == blob_uuid:
                    version.size = extra.get('size', 0)
            if state == CREATED:
                art.state = CREATED
                # This one (still initial in the cache) makes max_versions finished ones.
                self._trim_into(txn, art, art.max_versions - 1)
            txn.check_revision(entry.key, entry.mod_revision).put(entry.key, art.SerializeToString())
        message = 'snapshot created' if state == CREATED else 'snapshot failed'
        self.core.event(txn, inst.namespace, OBJ, inst.uuid, STATUS, message,
                        {'device': device, 'blob': blob_uuid, **extra})

    async def store(self, node: str, inst, blob_uuid: str, chunks) -> blob_pb2.Blob:
        """The bytes of a snapshot node was ordered to take."""
        self._order(node, inst.uuid, blob_uuid)
        return await self.blobs.fill(blob_uuid, chunks, inst.namespace, lambda txn, blob: self._finish_into(
            txn, node, inst, blob_uuid, CREATED, {'size': blob.size}))

    async def fail(self, node: str, inst, blob_uuid: str, message: str):
        def build():
            entry = self.core.cache.get(keys.blob(blob_uuid))
            txn = Txn()
            if entry is not None and entry.value.state == INITIAL:
                failed = _copy(entry.value)
                failed.state = ERROR
                txn.check_revision(entry.key, entry.mod_revision).put(entry.key, failed.SerializeToString())
            self._finish_into(txn, node, inst, blob_uuid, ERROR, {'error': message[:1000]})
            return txn, node_pb2.FailSnapshotResponse()
        return await self.core.mutate(build)

    # -- listing -----------------------------------------------------------------------------
    def list(self, req: api.ListInstanceSnapshotsRequest):
        inst = self.instances.resolve(req.instance_ref).value
        prefix = source_url(inst.uuid, '')
        found = []
        for entry in self.core.cache.range(keys.artifacts(inst.namespace),
                                           filter=lambda a: a.source_url.startswith(prefix))[0]:
            art = entry.value
            for index, version in art.blobs.items():
                blob = self.core.cache.get(keys.blob(version.uuid))
                if blob is None:
                    continue
                found.append(api.InstanceSnapshot(
                    uuid=art.uuid, device=art.source_url[len(prefix):], created=blob.value.modified,
                    blob_uuid=version.uuid, state=blob_pb2.BlobState.Name(blob.value.state)
                    .removeprefix('BLOB_STATE_').lower(), source_url=art.source_url,
                    index=int(index), size=blob.value.size))
        found.sort(key=lambda s: (s.created, s.device, s.index))
        start = validation.page_start(req.page_token)
        end = start + req.page_size if req.page_size else len(found)
        return api.ListInstanceSnapshotsResponse(
            snapshots=found[start:end], next_page_token=str(end) if end < len(found) else '')
