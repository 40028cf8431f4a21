"""Blobs (content-addressed data), chunked uploads and upload artifacts.

Blob records live in etcd (blobs/<uuid>, with the SHA-512 indexed); their
bytes live in the controller's state directory. Each holder of a blob (an
instance for screenshots and agent-operation output, an artifact for uploads)
has a BlobRef; the blob is deleted with its last reference.

Limit, written down: blob bytes live on the controller that stored them. With
several controllers, each must share the blob directory (for example over
NFS) for every blob to be readable through every controller.
"""

import asyncio
import hashlib
import os
import pathlib
import time
import uuid as uuidlib

from sfcommon import errors
from sfcontrol import caller
from sfcontrol.core import Core
from sfcontrol.store import Txn
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import blob_pb2 as pb

CHUNK = 1024 * 1024
CREATED = pb.BlobState.Value('BLOB_STATE_CREATED')
DELETED = pb.BlobState.Value('BLOB_STATE_DELETED')
UPLOAD_CREATED = pb.UploadState.Value('UPLOAD_STATE_CREATED')
UPLOAD_DELETED = pb.UploadState.Value('UPLOAD_STATE_DELETED')


def blob_key(uuid): return f'blobs/{uuid}'
def ref_key(blob, holder_type, holder): return f'blob-refs/{blob}/{holder_type}/{holder}'
def upload_key(uuid): return f'uploads/{uuid}'
def artifact_key(ns, uuid): return f'artifacts/{ns}/{uuid}'


class Blobs:
    def __init__(self, core: Core, data_dir: pathlib.Path):
        self.core = core
        self.dir = pathlib.Path(data_dir)
        for sub in ('blobs', 'uploads', 'partial'):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------
    def _refs(self, uuid):
        return [e.value for e in self.core.cache.range(f'blob-refs/{uuid}/')[0]]

    def get(self, uuid: str) -> pb.Blob:
        """A blob the caller may see (a holder in its namespace), with its references."""
        entry = self.core.cache.get(blob_key(uuid))
        me = caller.current()
        refs = self._refs(uuid)
        if entry is None or entry.value.state == DELETED or not (
                me.is_system or any(r.namespace == me.namespace for r in refs)):
            raise errors.not_found('blob not found')
        out = pb.Blob()
        out.CopyFrom(entry.value)
        out.reference_count = len(refs)
        out.instances.extend(r.holder_uuid for r in refs if r.holder_type == 'instance')
        return out

    def by_sha512(self, digest: str) -> pb.Blob | None:
        for entry in self.core.cache.where('blobs/', 'sha512', digest.lower()):
            try:
                return self.get(entry.value.uuid)
            except errors.ApiError:
                continue
        return None

    async def read(self, uuid: str, offset: int = 0, limit: int = 0):
        """Yield the blob's bytes from offset, at most limit (0: to the end)."""
        if offset < 0 or limit < 0:
            raise errors.invalid('offset and limit must not be negative')
        self.get(uuid)
        path = self.dir / 'blobs' / uuid
        remaining = limit or None
        with open(path, 'rb') as f:
            f.seek(offset)
            while remaining is None or remaining > 0:
                chunk = await asyncio.to_thread(f.read, CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    # -- writing ---------------------------------------------------------------------
    async def store(self, chunks, holder_type: str, holder_uuid: str, namespace: str) -> pb.Blob:
        """Store the bytes chunks yields as a blob held by holder. Identical content is
        stored once: a second copy only adds a reference."""
        partial = self.dir / 'partial' / uuidlib.uuid4().hex
        digest, size = hashlib.sha512(), 0
        try:
            with open(partial, 'wb') as f:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
            return await self._adopt(partial, digest.hexdigest(), size, holder_type, holder_uuid,
                                     namespace)
        finally:
            partial.unlink(missing_ok=True)

    async def _adopt(self, partial: pathlib.Path, sha512: str, size: int, holder_type, holder_uuid,
                     namespace) -> pb.Blob:
        new_uuid = str(uuidlib.uuid4())
        os.link(partial, self.dir / 'blobs' / new_uuid)

        def build():
            same = [e for e in self.core.cache.where('blobs/', 'sha512', sha512)
                    if e.value.state == CREATED]
            blob = same[0].value if same else pb.Blob(
                uuid=new_uuid, state=CREATED, size=size, modified=time.time(),
                fetched_at=time.time(), version=1, sha512=sha512,
                locations=[self.core.fqdn])
            txn = Txn()
            if same:
                txn.check_revision(same[0].key, same[0].mod_revision)
            else:
                blob.metadata.SetInParent()
                txn.create(blob_key(blob.uuid), blob.SerializeToString())
            ref = records_pb2.BlobRef(blob_uuid=blob.uuid, holder_type=holder_type,
                                      holder_uuid=holder_uuid, namespace=namespace)
            txn.put(ref_key(blob.uuid, holder_type, holder_uuid), ref.SerializeToString())
            return txn, blob
        blob = await self.core.mutate(build)
        if blob.uuid != new_uuid:
            (self.dir / 'blobs' / new_uuid).unlink(missing_ok=True)
        return blob

    def release_into(self, txn: Txn, holder_uuid: str) -> list[str]:
        """Drop holder's references in txn; the blobs this leaves unreferenced are
        marked deleted (and their bytes go when the cache sees that)."""
        gone = []
        for entry in self.core.cache.where('blob-refs/', 'holder_uuid', holder_uuid):
            txn.delete(entry.key)
            blob_uuid = entry.value.blob_uuid
            others = [r for r in self._refs(blob_uuid) if r.holder_uuid != holder_uuid]
            blob = self.core.cache.get(blob_key(blob_uuid))
            if not others and blob is not None:
                dead = pb.Blob()
                dead.CopyFrom(blob.value)
                dead.state = DELETED
                txn.check_revision(blob.key, blob.mod_revision).put(blob.key, dead.SerializeToString())
                gone.append(blob_uuid)
        return gone

    def start(self):
        """Delete a blob's bytes once its record says it is deleted (by any controller)."""
        def on_change(key, entry):
            if entry is not None and entry.value.state == DELETED:
                (self.dir / 'blobs' / entry.value.uuid).unlink(missing_ok=True)
        self.core.cache.listen('blobs/', on_change)

    # -- uploads and artifacts ------------------------------------------------------------
    def _upload(self, uuid: str):
        entry = self.core.cache.get(upload_key(uuid))
        if entry is None or entry.value.state != UPLOAD_CREATED or not caller.current().can_see(
                entry.value.namespace):
            raise errors.not_found('upload not found')
        return entry

    async def create_upload(self, request) -> pb.Upload:
        def build():
            upload = pb.Upload(uuid=str(uuidlib.uuid4()), state=UPLOAD_CREATED, version=1,
                               node=self.core.fqdn, created_at=time.time(),
                               namespace=caller.current().namespace)
            upload.metadata.SetInParent()
            (self.dir / 'uploads' / upload.uuid).touch()
            return Txn().create(upload_key(upload.uuid), upload.SerializeToString()), upload
        return await self.core.mutate(build, request=request)

    async def write_upload(self, upload_uuid: str, chunks) -> int:
        self._upload(upload_uuid)
        path = self.dir / 'uploads' / upload_uuid
        with open(path, 'ab') as f:
            async for chunk in chunks:
                await asyncio.to_thread(f.write, chunk)
            return f.tell()

    def truncate_upload(self, upload_uuid: str, offset: int):
        self._upload(upload_uuid)
        if offset < 0:
            raise errors.invalid('offset must not be negative')
        os.truncate(self.dir / 'uploads' / upload_uuid, offset)

    async def upload_artifact(self, req) -> pb.Artifact:
        me = caller.current()
        ns = req.namespace if req.HasField('namespace') else me.namespace
        if not me.can_see(ns):
            raise errors.not_found('namespace not found')
        if '/' in req.name or not req.name:
            raise errors.invalid('name: an artifact name cannot be empty or contain "/"')
        if req.HasField('upload_uuid') == req.HasField('blob_uuid'):
            raise errors.invalid('give exactly one of upload_uuid and blob_uuid')
        if req.shared and not me.is_system:
            raise errors.permission_denied('only the system namespace may share artifacts')
        artifact_uuid = self._artifact_uuid(ns, req.name)
        if req.HasField('upload_uuid'):
            self._upload(req.upload_uuid)
            path = self.dir / 'uploads' / req.upload_uuid
            blob = await self.store(_file_chunks(path), 'artifact', artifact_uuid, ns)
        else:
            blob = self.get(req.blob_uuid)
            await self.core.mutate(lambda: (Txn().put(
                ref_key(blob.uuid, 'artifact', artifact_uuid), records_pb2.BlobRef(
                    blob_uuid=blob.uuid, holder_type='artifact', holder_uuid=artifact_uuid,
                    namespace=ns).SerializeToString()), blob))

        def build():
            entry = self.core.cache.get(artifact_key(ns, artifact_uuid))
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
            txn.put(artifact_key(ns, artifact_uuid), art.SerializeToString())
            if req.HasField('upload_uuid'):
                up = self.core.cache.get(upload_key(req.upload_uuid))
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
        found = self.core.cache.range(f'artifacts/{ns}/', filter=lambda a: a.name == name)[0]
        return found[0].value.uuid if found else str(uuidlib.uuid4())


async def _file_chunks(path: pathlib.Path):
    with open(path, 'rb') as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


async def bytes_chunks(data: bytes):
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]
