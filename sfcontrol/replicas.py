"""Blob bytes on more than one controller: any controller serves any blob, and the
loss of one controller loses none.

Each controller is a holder of blob bytes. At start it registers
blob-holders/<id> (with the address of its BlobPeerService: the node port, mutual
TLS) under an etcd lease that it keeps alive, and records each blob it has bytes of
as blob-locations/<blob>/<id> under the same lease. When a controller dies its lease
expires, and its record and its locations go with it.

- Acknowledging: the bytes of a new blob are pushed to another holder
  (BlobPeerService.PushBlob, checked there by size and SHA-512) before the
  transaction that makes the blob CREATED, which records both locations. So an
  acknowledged blob is on min(copies, live holders) holders: two by default, one
  with a single controller (one copy is what there is).
- Reading: a controller without a blob's bytes pulls them from a holder, streaming
  them through (and resuming from another holder if one fails midway); a whole
  read keeps the copy and records its location.
- Repairing: when a holder joins or a location goes (a lease expired), each blob
  with fewer copies than it should have is pushed to another holder by the live
  holder of it whose id sorts first. Driven by the cache's changes and coalesced
  into passes, no polling; a pass that could not finish is retried with backoff.
- Deleting: the transaction that marks a blob deleted removes its locations, and
  every controller removes its bytes when its cache sees the mark (Blobs.start).

A controller's bytes outlive its lease on its disk: at start it records again
those whose blobs still live, and removes the rest (among them copies pushed to it
for blobs whose taker died before acknowledging them).
"""

import asyncio
import functools
import hashlib
import logging
import os
import pathlib
import time
import uuid as uuidlib

import grpc

from sfcommon import errors, pki
from sfcommon.backoff import Backoff
from sfcontrol.core import Core
from sfcontrol.store import keys
from sfcontrol.store.etcd import StoreError, Txn
from shakenfist.peer.v1alpha1 import blob_peer_pb2 as pb
from shakenfist.peer.v1alpha1 import blob_peer_pb2_grpc
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import blob_pb2

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
COPIES = 2              # holders of each blob, when that many controllers are alive
HOLDER_TTL = 10         # seconds a dead controller still counts as a holder
CREATED = blob_pb2.BlobState.Value('BLOB_STATE_CREATED')
DELETED = blob_pb2.BlobState.Value('BLOB_STATE_DELETED')
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


class PeerError(Exception):
    """Another controller did not take or give a blob's bytes."""


class Replicas:
    def __init__(self, core: Core, directory: pathlib.Path, bundle: pki.Bundle | None = None, *,
                 copies: int = COPIES, ttl: int = HOLDER_TTL, max_size: int = 0):
        self.core = core
        self.dir = directory        # blobs/ (whole blobs, by uuid) and partial/ (incoming)
        self.copies = copies
        self.ttl = ttl
        self.max_size = max_size
        # New at each start: two controllers never share an id, even on one state directory.
        self.id = f'{core.fqdn}-{uuidlib.uuid4().hex[:8]}'
        self.lease = 0
        self.address = ''
        self._credentials = None
        if bundle is not None:
            ca, cert, key = bundle.read()
            self._credentials = grpc.ssl_channel_credentials(ca, key, cert)
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        self._registered = asyncio.Event()
        self._wake = asyncio.Event()
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task] = []

    def path(self, blob_uuid: str) -> pathlib.Path:
        return self.dir / 'blobs' / blob_uuid

    # -- membership ------------------------------------------------------------------
    async def start(self, address: str):
        """Register as a holder reachable at address ('' if no other controller can reach
        this one), and follow the others."""
        self.address = address
        await self._register(at_start=True)
        self.core.cache.listen(keys.BLOB_HOLDERS, self._holders_changed)
        self.core.cache.listen(keys.BLOB_LOCATIONS, self._location_changed)
        self._tasks = [asyncio.create_task(self._keep_alive(), name='blob-holder-lease'),
                       asyncio.create_task(self._repairs(), name='blob-repairs')]
        self._wake.set()        # blobs left short while no controller was running

    async def stop(self, hand_off: bool = True):
        """Stop holding. With hand_off the lease is revoked, so that the others repair at
        once; without, this controller leaves as a dead one does (its lease expires)."""
        if self._tasks:
            self.core.cache.unlisten(keys.BLOB_HOLDERS, self._holders_changed)
            self.core.cache.unlisten(keys.BLOB_LOCATIONS, self._location_changed)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._retry is not None:
            self._retry.cancel()
        if hand_off and self.lease:
            try:
                await self.core.store.revoke(self.lease)
            except StoreError as e:
                log.warning('blob holder %s: lease not revoked (%s); it will expire', self.id, e)
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _register(self, at_start: bool):
        """Take a lease, record under it every blob held here whose record lives (at start,
        remove the bytes of the others), then the holder record itself."""
        self.lease = await self.core.store.grant(self.ttl)
        held = []
        for path in (self.dir / 'blobs').iterdir():
            if _alive(self.core.cache.get(keys.blob(path.name))):
                held.append(path.name)
            elif at_start:
                path.unlink(missing_ok=True)
        if at_start:
            for path in (self.dir / 'partial').iterdir():
                path.unlink(missing_ok=True)
        for i in range(0, len(held), 100):
            await self.core.mutate(functools.partial(self._record_held, held[i:i + 100]))
        record = records_pb2.BlobHolderRecord(id=self.id, address=self.address, lease=self.lease,
                                              registered_at=time.time())
        revision = await self.core.store.put(keys.blob_holder(self.id), record.SerializeToString(),
                                             lease=self.lease)
        await self.core.cache.wait_for(revision)
        self._registered.set()
        log.info('blob holder registered', extra={'holder': self.id, 'address': self.address,
                                                  'blobs': len(held)})

    def _record_held(self, blob_uuids: list[str]):
        txn = Txn()
        for blob_uuid in blob_uuids:
            if _alive(self.core.cache.get(keys.blob(blob_uuid))):
                self.locate_into(txn, blob_uuid, [self.id])
        return txn, None

    async def _keep_alive(self):
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if await self.core.store.keepalive(self.lease) == 0:
                    log.warning('blob holder %s: its lease expired; registering again', self.id)
                    await self._register(at_start=False)
            except (StoreError, TimeoutError, errors.ApiError) as e:
                log.warning('blob holder %s: lease not renewed: %s', self.id, e)

    def holders(self) -> dict[str, records_pb2.BlobHolderRecord]:
        """The live holders, by id (a dead one until its lease expires)."""
        return {e.value.id: e.value for e in self.core.cache.range(keys.BLOB_HOLDERS)[0]}

    def where(self, blob_uuid: str) -> list[str]:
        """The holders with a blob's bytes."""
        return [e.value.holder for e in self.core.cache.range(keys.blob_locations(blob_uuid))[0]]

    def _peers(self, holders) -> list[records_pb2.BlobHolderRecord]:
        """The other holders this controller can push to and pull from."""
        if self._credentials is None:
            return []
        return [h for h in holders.values() if h.id != self.id and h.address]

    def _wanted(self, holders) -> int:
        """How many holders each blob should have now."""
        return max(1, min(self.copies, 1 + len(self._peers(holders))))

    @staticmethod
    def _ranked(blob_uuid: str, candidates):
        """Candidates in an order of the blob's own (rendezvous hashing): blobs spread
        over holders, and every controller ranks one blob's alike."""
        return sorted(candidates, key=lambda h: hashlib.sha256(f'{blob_uuid}/{h.id}'.encode()).digest())

    # -- locations in etcd -------------------------------------------------------------
    def locate_into(self, txn: Txn, blob_uuid: str, holder_ids: list[str]):
        """Record in txn that these holders have the blob's bytes, each under its lease."""
        for holder in holder_ids:
            if holder == self.id:
                lease = self.lease
            else:
                entry = self.core.cache.get(keys.blob_holder(holder))   # read: guards the commit
                if entry is None:
                    raise errors.Unavailable(f'controller {holder} went away while it took a copy '
                                             'of the blob; retry')
                lease = entry.value.lease
            location = records_pb2.BlobLocation(blob_uuid=blob_uuid, holder=holder)
            txn.put(keys.blob_location(blob_uuid, holder), location.SerializeToString(), lease=lease)

    def forget_into(self, txn: Txn, blob_uuid: str):
        """Remove every location of a blob in txn (its bytes go when the blob's record
        says it is deleted)."""
        for entry in self.core.cache.range(keys.blob_locations(blob_uuid))[0]:
            txn.delete(entry.key)

    # -- acknowledging a new blob ----------------------------------------------------
    async def copy_new(self, blob_uuid: str, size: int, sha512: str) -> list[str]:
        """Push the bytes of a new blob (held here) to as many other holders as it needs;
        the holders that have it, this one first. UNAVAILABLE if too few took it."""
        await asyncio.wait_for(self._registered.wait(), 30)
        holders = self.holders()
        have = [self.id]
        wanted = self._wanted(holders)
        for peer in self._ranked(blob_uuid, self._peers(holders)):
            if len(have) >= wanted:
                break
            try:
                await self._push(peer, blob_uuid, size, sha512)
                have.append(peer.id)
            except PeerError as e:
                log.warning('blob %s: no copy on %s', blob_uuid, e)
        if len(have) < wanted:
            raise errors.Unavailable('the blob could not be copied to another controller; '
                                     'nothing was kept: retry')
        return have

    # -- moving bytes --------------------------------------------------------------
    def _stub(self, holder: records_pb2.BlobHolderRecord) -> blob_peer_pb2_grpc.BlobPeerServiceStub:
        known = self._channels.get(holder.id)
        if known is None or known[0] != holder.address:
            channel = grpc.aio.secure_channel(holder.address, self._credentials, options=[
                ('grpc.ssl_target_name_override', pki.CONTROLLER_SERVER_NAME),
                ('grpc.max_receive_message_length', 4 * CHUNK)])
            self._channels[holder.id] = (holder.address, channel)
        return blob_peer_pb2_grpc.BlobPeerServiceStub(self._channels[holder.id][1])

    async def _push(self, holder, blob_uuid: str, size: int, sha512: str):
        async def messages():
            yield pb.PushBlobRequest(header=pb.PushBlobHeader(blob_uuid=blob_uuid, size=size,
                                                              sha512=sha512))
            async for chunk in self.read_local(blob_uuid):
                yield pb.PushBlobRequest(data=chunk)
        try:
            # Generous: a minute, or the time to move the blob at 1 MiB/s.
            await self._stub(holder).PushBlob(messages(), timeout=max(60.0, size / CHUNK))
        except grpc.aio.AioRpcError as e:
            raise PeerError(f'{holder.id}: {e.code().name}: {e.details()}') from e

    async def pull(self, blob_uuid: str, offset: int = 0, limit: int = 0):
        """Yield a blob's bytes (from offset, at most limit; 0: to the end) from the
        holders that have them, resuming with the next where one fails."""
        holders = self.holders()
        sources = [p for p in self._peers(holders) if p.id in set(self.where(blob_uuid))]
        done = 0
        for holder in self._ranked(blob_uuid, sources):
            request = pb.PullBlobRequest(blob_uuid=blob_uuid, offset=offset + done,
                                         limit=limit - done if limit else 0)
            try:
                async for part in self._stub(holder).PullBlob(request):
                    done += len(part.data)
                    yield part.data
                return
            except grpc.aio.AioRpcError as e:
                log.warning('blob %s: not read from %s: %s', blob_uuid, holder.id, e.code().name)
        raise errors.Unavailable(f'no controller holding blob {blob_uuid} could be reached; retry')

    async def fetch(self, blob: blob_pb2.Blob, offset: int = 0, limit: int = 0):
        """Yield the bytes of a blob held elsewhere. A whole read keeps a copy here."""
        if offset or limit:
            async for chunk in self.pull(blob.uuid, offset, limit):
                yield chunk
            return
        partial = self.dir / 'partial' / uuidlib.uuid4().hex
        digest, size = hashlib.sha512(), 0
        try:
            with private(partial, 'wb') as f:
                async for chunk in self.pull(blob.uuid):
                    await asyncio.to_thread(f.write, chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk
            if size == blob.size and digest.hexdigest() == blob.sha512:
                await self._keep(partial, blob.uuid)
            else:
                log.error('blob %s: a holder sent %d bytes that are not the blob', blob.uuid, size)
        finally:
            partial.unlink(missing_ok=True)

    async def _keep(self, partial: pathlib.Path, blob_uuid: str):
        os.replace(partial, self.path(blob_uuid))

        def build():
            txn = Txn()
            if _alive(self.core.cache.get(keys.blob(blob_uuid))):
                self.locate_into(txn, blob_uuid, [self.id])
            return txn, None
        await self.core.mutate(build)
        if not _alive(self.core.cache.get(keys.blob(blob_uuid))):
            self.path(blob_uuid).unlink(missing_ok=True)       # deleted meanwhile

    async def read_local(self, blob_uuid: str, offset: int = 0, limit: int = 0):
        """Yield the bytes of a blob held here from offset, at most limit (0: to the end)."""
        remaining = limit or None
        with await asyncio.to_thread(open, self.path(blob_uuid), 'rb') as f:
            f.seek(offset)
            while remaining is None or remaining > 0:
                chunk = await asyncio.to_thread(f.read, CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def receive(self, header: pb.PushBlobHeader, chunks):
        """Keep the bytes another controller pushes, if they are what the header says."""
        blob_uuid = _checked_uuid(header.blob_uuid)
        if not 0 <= header.size <= (self.max_size or header.size):
            raise errors.PayloadTooLarge(f'a blob is at most {self.max_size} bytes')
        partial = self.dir / 'partial' / uuidlib.uuid4().hex
        digest, size = hashlib.sha512(), 0
        try:
            with private(partial, 'wb') as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > header.size:
                        raise errors.InvalidArgument('the push carried more bytes than its header says')
                    await asyncio.to_thread(f.write, chunk)
                    digest.update(chunk)
            if size != header.size or digest.hexdigest() != header.sha512.lower():
                raise errors.InvalidArgument('the pushed bytes are not the blob its header describes')
            os.replace(partial, self.path(blob_uuid))
        finally:
            partial.unlink(missing_ok=True)
        entry = self.core.cache.get(keys.blob(blob_uuid))
        if entry is not None and entry.value.state == DELETED:
            self.path(blob_uuid).unlink(missing_ok=True)       # deleted while it was copied

    # -- repairing -------------------------------------------------------------------
    def _holders_changed(self, key, entry):
        self._wake.set()

    def _location_changed(self, key, entry):
        if entry is None:
            self._wake.set()

    async def _repairs(self):
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                complete = await self._repair_pass()
            except Exception:   # the loop outlives any one failure
                log.exception('blob repair pass failed')
                complete = False
            if complete:
                backoff.reset()
            else:
                self._retry = asyncio.get_running_loop().call_later(backoff.next(), self._wake.set)

    async def _repair_pass(self) -> bool:
        """Copy each blob that has too few holders, where this controller is the one to
        (its first live holder); whether every such blob now has enough."""
        holders = self.holders()
        for gone in [h for h in self._channels if h not in holders]:
            await self._channels.pop(gone)[1].close()
        if self.id not in holders:
            return True         # not registered (the lease is being taken again)
        wanted, complete = self._wanted(holders), True
        for entry in self.core.cache.range(keys.BLOBS)[0]:
            blob = entry.value
            if blob.state != CREATED:
                continue
            have = sorted(h for h in self.where(blob.uuid) if h in holders)
            if not have:
                log.error('blob %s: no live controller holds its bytes', blob.uuid)
            if len(have) >= wanted or not have or have[0] != self.id:
                continue
            for peer in self._ranked(blob.uuid, [p for p in self._peers(holders) if p.id not in have]):
                if len(have) >= wanted:
                    break
                try:
                    await self._push(peer, blob.uuid, blob.size, blob.sha512)
                    await self.core.mutate(functools.partial(self._record_copy, blob.uuid, peer.id))
                    have.append(peer.id)
                    log.info('blob %s copied to %s', blob.uuid, peer.id)
                except (PeerError, errors.ApiError, OSError) as e:
                    log.warning('blob %s: not copied to %s: %s', blob.uuid, peer.id, e)
            complete = complete and len(have) >= wanted
        return complete

    def _record_copy(self, blob_uuid: str, holder: str):
        txn = Txn()
        if _alive(self.core.cache.get(keys.blob(blob_uuid))):
            self.locate_into(txn, blob_uuid, [holder])
        return txn, None


class BlobPeerService(blob_peer_pb2_grpc.BlobPeerServiceServicer):
    """Other controllers' access to the blob bytes held here (the interceptor lets only
    controller certificates call it)."""

    def __init__(self, replicas: Replicas):
        self.replicas = replicas

    async def PushBlob(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof('part') != 'header':
            raise errors.InvalidArgument('a push starts with its header')

        async def chunks():
            async for part in request_iterator:
                if part.WhichOneof('part') != 'data':
                    raise errors.InvalidArgument('only the first message of a push is a header')
                yield part.data
        await self.replicas.receive(first.header, chunks())
        return pb.PushBlobResponse()

    async def PullBlob(self, request: pb.PullBlobRequest, context):
        blob_uuid = _checked_uuid(request.blob_uuid)
        if request.offset < 0 or request.limit < 0:
            raise errors.InvalidArgument('offset and limit must not be negative')
        if not self.replicas.path(blob_uuid).exists():
            raise errors.NotFound(f'this controller holds no bytes of blob {blob_uuid}')
        async for chunk in self.replicas.read_local(blob_uuid, request.offset, request.limit):
            yield pb.PullBlobResponse(data=chunk)


def _alive(entry) -> bool:
    return entry is not None and entry.value.state == CREATED


def _checked_uuid(value: str) -> str:
    """A blob UUID in its canonical form (it names a file)."""
    try:
        if str(uuidlib.UUID(value)) == value:
            return value
    except ValueError:
        pass
    raise errors.InvalidArgument(f'not a blob UUID: {value[:64]!r}')


def private(path: pathlib.Path, mode: str):
    """open(path, mode), creating the file readable by its owner only."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if 'a' in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)
