"""The controller's shared state and the one way to change it.

Every change is one etcd transaction built by a function that reads the cache:
mutate() commits it guarded by everything the function read, retries it when
any of that moved, records the
response of a request that carries a request_id (AIP-155) in the same
transaction, and waits until the cache shows the change before returning.
"""

import asyncio
import hashlib
import logging
import socket
import time
from typing import Callable

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from sfcommon import errors
from sfcommon.events import make_event
from sfcontrol import caller
from sfcontrol.store import keys
from sfcontrol.store.cache import Kind, ObjectCache
from sfcontrol.store.etcd import Store, Txn
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import (agent_operation_pb2, blob_pb2, event_pb2, instance_pb2, namespace_pb2,
                           network_pb2)

log = logging.getLogger(__name__)

KINDS = [
    Kind(keys.NAMESPACES, namespace_pb2.Namespace),
    Kind(keys.NAMESPACE_KEYS, records_pb2.NamespaceKeyRecord),
    Kind(keys.INSTANCES, instance_pb2.Instance),
    Kind(keys.NETWORKS, network_pb2.Network),
    Kind(keys.INTERFACES, network_pb2.NetworkInterface, index=('instance_uuid', 'network_uuid')),
    Kind(keys.AGENTOPS, agent_operation_pb2.AgentOperation, index=('instance_uuid',)),
    Kind(keys.NODES, records_pb2.NodeRecord),
    Kind(keys.PLACEMENTS, records_pb2.Placement),
    Kind(keys.BLOBS, blob_pb2.Blob, index=('sha512',)),
    Kind(keys.BLOB_REFS, records_pb2.BlobRef, index=('holder_uuid', 'namespace')),
    Kind(keys.UPLOADS, blob_pb2.Upload, index=('namespace',)),
    Kind(keys.ARTIFACTS, blob_pb2.Artifact, index=('source_url',)),
    Kind(keys.TOKEN_KEYS, records_pb2.TokenKeyRecord),
    Kind(keys.BLOB_HOLDERS, records_pb2.BlobHolderRecord),
    Kind(keys.BLOB_LOCATIONS, records_pb2.BlobLocation),
]

MAX_ATTEMPTS = 20


class Core:
    def __init__(self, store: Store, cache: ObjectCache, fqdn: str | None = None):
        self.store = store
        self.cache = cache
        self.fqdn = fqdn or socket.gethostname()
        self._retrying = asyncio.Lock()     # see mutate()

    @classmethod
    async def open(cls, store: Store) -> 'Core':
        cache = ObjectCache(store, KINDS)
        await cache.start()
        return cls(store, cache)

    async def close(self):
        await self.cache.stop()

    # -- changing state --------------------------------------------------------
    async def mutate(self, build: Callable[[], tuple[Txn, Message]], *,
                     request: Message | None = None, method: str | None = None) -> Message:
        """Commit the transaction build() returns and return its response.

        build() reads the cache; every read guards the commit (ObjectCache.tracking),
        and build() is called again when one of them moved. With a request_id, a
        repeat of the same request gets the first response and changes nothing."""
        request_id = getattr(request, 'request_id', '') if request is not None else ''
        ns = caller.current().namespace if request_id else ''
        method = method or caller.current_method.get()
        digest = hashlib.sha256(request.SerializeToString(deterministic=True)).digest() if request_id else b''
        if request_id:
            prior = await self._prior(ns, request_id, method, digest)
            if prior is not None:
                return prior[0]

        async def attempt() -> tuple[Message] | None:
            with self.cache.tracking() as reads:
                txn, response = build()
            if not txn.ops and not request_id:
                return (response,)      # nothing to change (build() checked what it needed)
            reads.guard(txn)            # everything build() read must be as it was
            if request_id:
                record = records_pb2.RequestRecord(
                    method=method, request_hash=digest, created_at=time.time(),
                    response=response.SerializeToString())
                txn.create(keys.request(ns, request_id), record.SerializeToString())
            ok, revision = await self.store.commit(txn)
            if ok:
                await self.cache.wait_for(revision)
                return (response,)
            if request_id:
                prior = await self._prior(ns, request_id, method, digest, type(response))
                if prior is not None:
                    return prior
            await self.cache.wait_for(revision, elsewhere=True)
            return None

        done = await attempt()
        if done is None:
            # It conflicted: retry one request at a time in this controller. Otherwise N
            # concurrent requests on one hot key (every create checks its node's record)
            # take N rounds, and some lose MAX_ATTEMPTS times in a row; queued, a retry
            # races only other controllers and requests on their first attempt.
            async with self._retrying:
                for _ in range(MAX_ATTEMPTS - 1):
                    if (done := await attempt()) is not None:
                        break
        if done is None:
            raise errors.Unavailable('the request conflicted with others too often; retry it')
        return done[0]

    async def replayed(self, request: Message) -> Message | None:
        """The first response to request if its request_id was seen before, else None:
        for calls that act outside etcd (on a node) before they record anything."""
        request_id = getattr(request, 'request_id', '')
        if not request_id:
            return None
        digest = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
        prior = await self._prior(caller.current().namespace, request_id,
                                  caller.current_method.get(), digest)
        return prior[0] if prior else None

    async def _prior(self, ns, request_id, method, digest, response_cls=None):
        found = await self.store.get(keys.request(ns, request_id))
        if found is None:
            return None
        record = records_pb2.RequestRecord.FromString(found[0])
        if record.method != method or record.request_hash != digest:
            raise errors.InvalidArgument(f'request_id {request_id} was already used for another request')
        # The retry must also see what the first request changed.
        await self.cache.wait_for(found[1])
        if response_cls is None:
            response_cls = _response_class(method)
        return (response_cls.FromString(record.response),)

    # -- events ----------------------------------------------------------------
    def event(self, txn: Txn, ns: str, object_type: int, uuid: str, event_type: int,
              message: str, extra: dict | None = None, duration: float | None = None):
        """Add an event to txn, so that it is recorded with the change it describes."""
        ev = make_event(self.fqdn, object_type, uuid, event_type, message, extra, duration)
        txn.put(keys.event(ns, object_type_name(object_type), uuid), ev.SerializeToString())


def object_type_name(object_type: int) -> str:
    return event_pb2.ObjectType.Name(object_type)[len('OBJECT_TYPE_'):].lower()


def _response_class(method: str):
    """The response class of a method named '/package.Service/Method'."""
    service, name = method.lstrip('/').rsplit('/', 1)
    desc = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    return message_factory.GetMessageClass(desc.output_type)

