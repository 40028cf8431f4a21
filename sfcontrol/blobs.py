"""Blobs (content-addressed data), chunked uploads and upload artifacts.

Blob records live in etcd (blobs/<uuid>, with the SHA-512 indexed); their
bytes live in the state directories of the controllers that hold them
(sfcontrol/replicas.py): a blob is acknowledged (its record CREATED, so the
upload's artifact made, the screenshot or the node's blob stored) only once its
bytes are on two controllers, or on every live one if fewer; any controller
serves any blob (pulling the bytes from a holder), and when a controller dies
the others copy what it held again. With a single controller, one copy is what
there is. Each user of a blob (an instance for screenshots and agent-operation
output, an artifact for uploads) has a BlobRef; the blob is deleted with its
last reference, and its bytes on every holder.

Sizes are bounded: a blob (and an upload) is at most max_blob_size bytes, and
what a namespace holds (its blobs, each counted once, and its open uploads) at
most namespace_quota bytes. A write over either is PAYLOAD_TOO_LARGE (413) and
its bytes are not kept.

Limit, written down: an open upload (not yet an artifact) lives on the
controller that created it; writes reaching another controller are UNAVAILABLE,
and the upload is lost with its controller (the client starts it again).
Nodes hold no blob bytes.
"""

import asyncio
import collections
import contextlib
import hashlib
import os
import pathlib
import time
import uuid as uuidlib

from sfcommon import errors
from sfcontrol import caller
from sfcontrol.core import Core
from sfcontrol.replicas import COPIES, HOLDER_TTL, Replicas
from sfcontrol.replicas import private as _private
from sfcontrol.store import keys
from sfcontrol.store.etcd import Txn
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import blob_pb2 as pb

CHUNK = 1024 * 1024
GiB = 1024 ** 3
DEFAULT_MAX_BLOB_SIZE = 20 * GiB
DEFAULT_NAMESPACE_QUOTA = 200 * GiB
INITIAL = pb.BlobState.Value('BLOB_STATE_INITIAL')
CREATED = pb.BlobState.Value('BLOB_STATE_CREATED')
DELETED = pb.BlobState.Value('BLOB_STATE_DELETED')
ERROR = pb.BlobState.Value('BLOB_STATE_ERROR')
UPLOAD_CREATED = pb.UploadState.Value('UPLOAD_STATE_CREATED')
UPLOAD_DELETED = pb.UploadState.Value('UPLOAD_STATE_DELETED')


class Blobs:
    def __init__(self, core: Core, data_dir: pathlib.Path, max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
                 namespace_quota: int = DEFAULT_NAMESPACE_QUOTA, bundle=None, copies: int = COPIES,
                 holder_ttl: int = HOLDER_TTL):
        self.core = core
        self.dir = pathlib.Path(data_dir)
        self.max_blob_size = max_blob_size
        self.namespace_quota = namespace_quota
        # Bytes this controller is receiving now, by namespace (not yet in a record).
        self._receiving: collections.Counter[str] = collections.Counter()
        # The bytes are tenants' data: readable by the controller alone.
        for sub in ('', 'blobs', 'uploads', 'partial'):
            (self.dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.dir / sub, 0o700)
        # Where the bytes are, and their copies on other controllers (bundle: this
        # controller's certificate, to call them).
        self.replicas = Replicas(core, self.dir, bundle, copies=copies, ttl=holder_ttl,
                                 max_size=max_blob_size)

    # -- reading -------------------------------------------------------------------
    def _refs(self, uuid):
        return [e.value for e in self.core.cache.range(keys.blob_refs(uuid))[0]]

    def get(self, uuid: str) -> pb.Blob:
        """A blob the caller may see (a holder in its namespace), with its references."""
        entry = self.core.cache.get(keys.blob(uuid))
        me = caller.current()
        refs = self._refs(uuid)
        if entry is None or entry.value.state == DELETED or not (
                me.is_system or any(r.namespace == me.namespace for r in refs)):
            raise errors.NotFound('blob not found')
        out = pb.Blob()
        out.CopyFrom(entry.value)
        out.reference_count = len(refs)
        out.locations[:] = self.replicas.where(uuid)
        out.instances.extend(r.holder_uuid for r in refs if r.holder_type == 'instance')
        return out

    def by_sha512(self, digest: str) -> pb.Blob | None:
        for entry in self.core.cache.where(keys.BLOBS, 'sha512', digest.lower()):
            try:
                return self.get(entry.value.uuid)
            except errors.ApiError:
                continue
        return None

    async def read(self, uuid: str, offset: int = 0, limit: int = 0):
        """Yield the bytes of a blob the caller may see from offset, at most limit (0: to the end)."""
        self.get(uuid)
        async for chunk in self.stream(uuid, offset, limit):
            yield chunk

    async def stream(self, uuid: str, offset: int = 0, limit: int = 0):
        """Yield a blob's bytes, for a caller whose right to them was checked already."""
        if offset < 0 or limit < 0:
            raise errors.InvalidArgument('offset and limit must not be negative')
        entry = self.core.cache.get(keys.blob(uuid))
        if entry is None or entry.value.state == DELETED:
            raise errors.NotFound('blob not found')
        if self.replicas.path(uuid).exists():
            chunks = self.replicas.read_local(uuid, offset, limit)
        else:
            chunks = self.replicas.fetch(entry.value, offset, limit)
        async for chunk in chunks:
            yield chunk

    # -- sizes ---------------------------------------------------------------------
    def usage(self, namespace: str) -> int:
        """Bytes the namespace holds: its blobs (each once), open uploads, and what this
        controller is receiving for it now."""
        held = {e.value.blob_uuid for e in self.core.cache.where(keys.BLOB_REFS, 'namespace', namespace)}
        stored = 0
        for uuid in held:
            entry = self.core.cache.get(keys.blob(uuid))
            if entry is not None and entry.value.state == CREATED:
                stored += entry.value.size
        uploading = sum(e.value.size for e in self.core.cache.where(keys.UPLOADS, 'namespace', namespace)
                        if e.value.state == UPLOAD_CREATED)
        return stored + uploading + self._receiving[namespace]

    def _make_room(self, namespace: str, size_before: int, adding: int):
        """Refuse adding bytes to a blob or upload of size_before, or to the namespace."""
        if size_before + adding > self.max_blob_size:
            raise errors.PayloadTooLarge(f'a blob or upload is at most {self.max_blob_size} bytes')
        used = self.usage(namespace)
        if used + adding > self.namespace_quota:
            raise errors.PayloadTooLarge(f'namespace {namespace} would exceed its storage quota of '
                                   f'{self.namespace_quota} bytes (it holds {used})')

    @contextlib.contextmanager
    def _counted(self, namespace: str):
        """Count what is appended within the block as the namespace's until the block ends
        (by then it is in a record: a blob's or an upload's size)."""
        held = [0]
        try:
            yield held
        finally:
            self._receiving[namespace] -= held[0]

    async def _append(self, chunks, f, namespace: str, size: int, held: list[int]):
        """Append what chunks yields to file f (size bytes so far), within the limits;
        (new size, SHA-512 of what was appended)."""
        digest = hashlib.sha512()
        async for chunk in chunks:
            self._make_room(namespace, size, len(chunk))
            self._receiving[namespace] += len(chunk)
            held[0] += len(chunk)
            await asyncio.to_thread(f.write, chunk)
            digest.update(chunk)
            size += len(chunk)
        return size, digest

    # -- writing ---------------------------------------------------------------------
    async def store(self, chunks, holder_type: str, holder_uuid: str, namespace: str) -> pb.Blob:
        """Store the bytes chunks yields as a blob held by holder. Identical content is
        stored once: a second copy only adds a reference."""
        partial = self.dir / 'partial' / uuidlib.uuid4().hex
        try:
            with self._counted(namespace) as held:
                with _private(partial, 'wb') as f:
                    size, digest = await self._append(chunks, f, namespace, 0, held)
                return await self._adopt(partial, digest.hexdigest(), size, holder_type,
                                         holder_uuid, namespace)
        finally:
            partial.unlink(missing_ok=True)

    async def _adopt(self, partial: pathlib.Path, sha512: str, size: int, holder_type, holder_uuid,
                     namespace) -> pb.Blob:
        new_uuid = str(uuidlib.uuid4())
        path = self.replicas.path(new_uuid)
        holders = []
        if not [e for e in self.core.cache.where(keys.BLOBS, 'sha512', sha512) if e.value.state == CREATED]:
            os.link(partial, path)
            try:
                holders = await self.replicas.copy_new(new_uuid, size, sha512)
            except BaseException:
                path.unlink(missing_ok=True)
                raise

        def build():
            same = [e for e in self.core.cache.where(keys.BLOBS, 'sha512', sha512)
                    if e.value.state == CREATED]
            blob = same[0].value if same else pb.Blob(
                uuid=new_uuid, state=CREATED, size=size, modified=time.time(),
                fetched_at=time.time(), version=1, sha512=sha512)
            txn = Txn()
            if same:
                txn.check_revision(same[0].key, same[0].mod_revision)
            elif not holders:
                raise errors.Unavailable('a blob with these bytes went away as this one was stored; retry')
            else:
                blob.metadata.SetInParent()
                txn.create(keys.blob(blob.uuid), blob.SerializeToString())
                self.replicas.locate_into(txn, blob.uuid, holders)  # where, with the blob
            ref = records_pb2.BlobRef(blob_uuid=blob.uuid, holder_type=holder_type,
                                      holder_uuid=holder_uuid, namespace=namespace)
            txn.put(keys.blob_ref(blob.uuid, holder_type, holder_uuid), ref.SerializeToString())
            return txn, blob
        try:
            blob = await self.core.mutate(build)
        finally:
            if not _stored(self.core.cache.get(keys.blob(new_uuid))):
                # Stored as another blob of the same bytes (or not at all). A copy pushed to
                # another controller is removed when that one restarts (replicas.py).
                path.unlink(missing_ok=True)
        return blob

    async def fill(self, blob_uuid: str, chunks, namespace: str, finish) -> pb.Blob:
        """Store the bytes chunks yields as those of blob_uuid, recorded before as initial
        (a snapshot's: its UUID was promised before its bytes existed). finish(txn, blob)
        adds to the transaction that makes the blob created. Never deduplicated: the
        UUID is the one promised."""
        partial = self.dir / 'partial' / uuidlib.uuid4().hex
        path = self.replicas.path(blob_uuid)
        try:
            with self._counted(namespace) as held:
                with _private(partial, 'wb') as f:
                    size, digest = await self._append(chunks, f, namespace, 0, held)
                os.link(partial, path)
                holders = await self.replicas.copy_new(blob_uuid, size, digest.hexdigest())

                def build():
                    entry = self.core.cache.get(keys.blob(blob_uuid))
                    if entry is None or entry.value.state != INITIAL:
                        raise errors.StateConflict(f'blob {blob_uuid} is not waiting for its bytes')
                    blob = pb.Blob()
                    blob.CopyFrom(entry.value)
                    blob.state, blob.size, blob.sha512 = CREATED, size, digest.hexdigest()
                    blob.fetched_at = time.time()   # modified stays when it was asked for
                    txn = Txn().check_revision(entry.key, entry.mod_revision).put(
                        entry.key, blob.SerializeToString())
                    self.replicas.locate_into(txn, blob_uuid, holders)
                    finish(txn, blob)
                    return txn, blob
                return await self.core.mutate(build)
        except BaseException:
            if not _stored(self.core.cache.get(keys.blob(blob_uuid))):
                path.unlink(missing_ok=True)
            raise
        finally:
            partial.unlink(missing_ok=True)

    def release_into(self, txn: Txn, holder_uuid: str) -> list[str]:
        """Drop holder's references in txn; the blobs this leaves unreferenced are
        marked deleted (and their bytes go when the cache sees that)."""
        return [entry.value.blob_uuid for entry in self.core.cache.where(keys.BLOB_REFS, 'holder_uuid', holder_uuid)
                if self.release_ref_into(txn, entry.value.blob_uuid, entry.value.holder_type, holder_uuid)]

    def release_ref_into(self, txn: Txn, blob_uuid: str, holder_type: str, holder_uuid: str) -> bool:
        """Drop one reference in txn; True if that leaves the blob unreferenced (deleted)."""
        txn.delete(keys.blob_ref(blob_uuid, holder_type, holder_uuid))
        others = [r for r in self._refs(blob_uuid) if (r.holder_type, r.holder_uuid) != (holder_type, holder_uuid)]
        blob = self.core.cache.get(keys.blob(blob_uuid))
        if others or blob is None:
            return False
        dead = pb.Blob()
        dead.CopyFrom(blob.value)
        dead.state = DELETED
        txn.check_revision(blob.key, blob.mod_revision).put(blob.key, dead.SerializeToString())
        self.replicas.forget_into(txn, blob_uuid)
        return True

    def start(self):
        """Delete a blob's bytes here once its record says it is deleted (by any
        controller): every holder does so for what it holds."""
        def on_change(key, entry):
            if entry is not None and entry.value.state == DELETED:
                self.replicas.path(entry.value.uuid).unlink(missing_ok=True)
        self.core.cache.listen(keys.BLOBS, on_change)

    # -- uploads and artifacts ------------------------------------------------------------
    def _upload(self, uuid: str):
        entry = self.core.cache.get(keys.upload(uuid))
        if entry is None or entry.value.state != UPLOAD_CREATED or not caller.current().can_see(
                entry.value.namespace):
            raise errors.NotFound('upload not found')
        return entry

    def _upload_file(self, uuid: str) -> pathlib.Path:
        """The file of an open upload, which lives on the controller that created it."""
        path = self.dir / 'uploads' / uuid
        if not path.exists():
            raise errors.Unavailable(f'upload {uuid} is held by another controller '
                                     f'({self._upload(uuid).value.node}); write to it there')
        return path

    async def create_upload(self, request) -> pb.Upload:
        def build():
            upload = pb.Upload(uuid=str(uuidlib.uuid4()), state=UPLOAD_CREATED, version=1,
                               node=self.core.fqdn, created_at=time.time(),
                               namespace=caller.current().namespace)
            upload.metadata.SetInParent()
            _private(self.dir / 'uploads' / upload.uuid, 'wb').close()
            return Txn().create(keys.upload(upload.uuid), upload.SerializeToString()), upload
        return await self.core.mutate(build, request=request)

    async def write_upload(self, upload_uuid: str, chunks, expected: int | None = None) -> int:
        """Append chunks to an upload; with expected (the bytes the write declared), a
        write that carried fewer or more changes nothing."""
        upload = self._upload(upload_uuid).value
        path = self._upload_file(upload_uuid)
        with self._counted(upload.namespace) as held:
            with await asyncio.to_thread(open, path, 'ab') as f:
                before = f.tell()
                try:
                    size, _ = await self._append(chunks, f, upload.namespace, before, held)
                    if expected is not None and size - before != expected:
                        raise errors.InvalidArgument(f'the write carried {size - before} of the {expected} '
                                             'bytes it declared: nothing was kept')
                except BaseException:
                    f.truncate(before)      # a refused (or broken) write leaves the upload as it was
                    raise
            await self._record_upload_size(upload_uuid, size)
        return size

    async def truncate_upload(self, upload_uuid: str, offset: int):
        """Shorten an upload to offset bytes (a client rolls back a failed chunk so);
        it never grows one."""
        self._upload(upload_uuid)
        path = self._upload_file(upload_uuid)
        size = path.stat().st_size
        if not 0 <= offset <= size:
            raise errors.InvalidArgument(f'offset: 0 to the upload\'s size, {size} bytes (got {offset})')
        os.truncate(path, offset)
        await self._record_upload_size(upload_uuid, offset)

    async def _record_upload_size(self, upload_uuid: str, size: int):
        def build():
            entry = self._upload(upload_uuid)
            upload = pb.Upload()
            upload.CopyFrom(entry.value)
            upload.size = size
            return Txn().check_revision(entry.key, entry.mod_revision).put(
                entry.key, upload.SerializeToString()), upload
        await self.core.mutate(build)

    async def upload_artifact(self, req) -> pb.Artifact:
        me = caller.current()
        ns = req.namespace if req.HasField('namespace') else me.namespace
        if not me.can_see(ns):
            raise errors.NotFound('namespace not found')
        if '/' in req.name or not req.name:
            raise errors.InvalidArgument('name: an artifact name cannot be empty or contain "/"')
        if req.HasField('upload_uuid') == req.HasField('blob_uuid'):
            raise errors.InvalidArgument('give exactly one of upload_uuid and blob_uuid')
        if req.shared and not me.is_system:
            raise errors.PermissionDenied('only the system namespace may share artifacts')
        artifact_uuid = self._artifact_uuid(ns, req.name)
        if req.HasField('upload_uuid'):
            self._upload(req.upload_uuid)
            # The upload's file becomes the blob: not copied, so not counted twice.
            path = self._upload_file(req.upload_uuid)
            sha512, size = await asyncio.to_thread(_file_digest, path)
            blob = await self._adopt(path, sha512, size, 'artifact', artifact_uuid, ns)
        else:
            def hold():
                blob = self.get(req.blob_uuid)      # read in the build: it guards the reference
                return Txn().put(keys.blob_ref(blob.uuid, 'artifact', artifact_uuid), records_pb2.BlobRef(
                    blob_uuid=blob.uuid, holder_type='artifact', holder_uuid=artifact_uuid,
                    namespace=ns).SerializeToString()), blob
            blob = await self.core.mutate(hold)

        def build():
            entry = self.core.cache.get(keys.artifact(ns, artifact_uuid))
            art = pb.Artifact()
            if entry is not None:
                art.CopyFrom(entry.value)
            else:
                art = pb.Artifact(uuid=artifact_uuid, name=req.name, artifact_type='upload',
                                  namespace=ns, shared=req.shared, max_versions=3, version=1,
                                  state=CREATED, source_url=req.source_url if req.HasField('source_url')
                                  else f'sf://upload/{ns}/{req.name}')
                art.metadata.SetInParent()
            art.index += 1
            art.blob_uuid = blob.uuid
            art.blobs[str(art.index)].CopyFrom(pb.ArtifactBlob(uuid=blob.uuid, size=blob.size,
                                                               reference_count=1))
            txn = Txn()
            if entry is not None:
                txn.check_revision(entry.key, entry.mod_revision)
            txn.put(keys.artifact(ns, artifact_uuid), art.SerializeToString())
            if req.HasField('upload_uuid'):
                up = self.core.cache.get(keys.upload(req.upload_uuid))
                done = pb.Upload()
                done.CopyFrom(up.value)
                done.state = UPLOAD_DELETED
                txn.put(up.key, done.SerializeToString())
            return txn, art
        art = await self.core.mutate(build, request=req)
        if req.HasField('upload_uuid'):
            (self.dir / 'uploads' / req.upload_uuid).unlink(missing_ok=True)
        return art

    def _artifact_uuid(self, ns: str, name: str) -> str:
        found = self.core.cache.range(keys.artifacts(ns), filter=lambda a: a.name == name)[0]
        return found[0].value.uuid if found else str(uuidlib.uuid4())


def _stored(entry) -> bool:
    return entry is not None and entry.value.state == CREATED


def _file_digest(path: pathlib.Path) -> tuple[str, int]:
    digest, size = hashlib.sha512(), 0
    with open(path, 'rb') as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def bytes_chunks(data: bytes):
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]
