"""The controller's state store: a small asyncio layer over etcd v3.

Keys are str relative to the prefix ("instances/x" is "/sf/instances/x"); values are bytes.
It uses aetcd's generated stubs (aetcd.rpc) on one grpc.aio channel, not aetcd.Client: we need
range limits, one self-resuming stream per watch, and an exact RPC count (Store.requests).

    ok, rev = await store.commit(Txn().create("a", b"1").check_revision("b", 7))
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import AsyncIterator, Iterable, NamedTuple

import grpc
from aetcd import rpc

from sfcommon.backoff import Backoff
from sfcontrol import metrics

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    # Reconnect quickly after an etcd restart (gRPC's default backoff grows to 120 s);
    # HTTP/2 pings (not RPCs) notice a dead peer under a silent watch (etcd's floor is 5 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
# Stream failures a watch survives by reconnecting (etcd restart, leader change, ...).
_WATCH_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 2.0


class StoreError(Exception):
    code = grpc.StatusCode.INTERNAL  # what a servicer should answer with


class StoreUnavailable(StoreError):
    """etcd could not be reached (or the store is closed)."""
    code = grpc.StatusCode.UNAVAILABLE


class StoreCompacted(StoreError):
    """The requested revision was compacted away: re-list, then watch from the list revision."""
    code = grpc.StatusCode.ABORTED

    def __init__(self, compact_revision: int | None):
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class Event(NamedTuple):
    type: str  # "put" or "delete"
    key: str  # relative to the store prefix
    value: bytes  # b"" for deletes
    mod_revision: int


class KVList(list):
    """(key, value, mod_revision) tuples in key order; .revision: the store revision read
    (watch from .revision + 1 to follow it); .more: keys exist beyond the last one."""
    revision: int = 0
    more: bool = False


def _map_error(e: grpc.aio.AioRpcError) -> StoreError:
    code, details = e.code(), e.details()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        return StoreUnavailable(f"etcd {code.name}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (details or ""):
        return StoreCompacted(None)
    return StoreError(f"etcd {code.name}: {details}")


def _prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with prefix."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else b"\0"


def _target(endpoints: list[str]) -> str:
    eps = [e.split("://", 1)[-1].rstrip("/") for e in endpoints]
    # Several endpoints use gRPC's static resolver, which takes IPv4 literals only.
    return eps[0] if len(eps) == 1 else "ipv4:" + ",".join(eps)


class Txn:
    """Builds one etcd transaction: every check must hold, then every op is applied.
    etcd refuses more than 128 ops per transaction (its --max-txn-ops default)."""

    def __init__(self) -> None:
        self.checks: list[tuple[str, str, int]] = []
        self.ops: list[tuple] = []

    def put(self, key: str, value: bytes, lease: int = 0) -> Txn:
        self.ops.append(("put", key, value, lease))
        return self

    def create(self, key: str, value: bytes, lease: int = 0) -> Txn:
        """Put only if key does not exist (else the whole transaction fails)."""
        return self.check_absent(key).put(key, value, lease)

    def delete(self, key: str) -> Txn:
        self.ops.append(("delete", key))
        return self

    def check_revision(self, key: str, mod_revision: int) -> Txn:
        """key was last modified at mod_revision (0 means: key absent)."""
        self.checks.append(("mod", key, mod_revision))
        return self

    def check_absent(self, key: str) -> Txn:
        self.checks.append(("version", key, 0))
        return self

    def check_range_unchanged(self, prefix: str, revision: int) -> Txn:
        """No key under prefix was created or changed after revision (a deleted one is
        not seen: check the keys read one by one for that)."""
        self.checks.append(("range", prefix, revision))
        return self

    def build(self, k) -> tuple[list[rpc.Compare], list[rpc.RequestOp]]:
        """The etcd messages, with keys mapped through k (relative -> absolute bytes)."""
        compares = []
        for what, key, n in dict.fromkeys(self.checks):     # each check once, in order
            if what == "mod":
                compares.append(rpc.Compare(key=k(key), result=rpc.Compare.EQUAL,
                                            target=rpc.Compare.MOD, mod_revision=n))
            elif what == "version":
                compares.append(rpc.Compare(key=k(key), result=rpc.Compare.EQUAL,
                                            target=rpc.Compare.VERSION, version=n))
            else:
                full = k(key)
                compares.append(rpc.Compare(key=full, range_end=_prefix_end(full),
                                            result=rpc.Compare.LESS, target=rpc.Compare.MOD,
                                            mod_revision=n + 1))
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k(op[1]), value=op[2], lease=op[3]))
               if op[0] == "put" else
               rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k(op[1])))
               for op in self.ops]
        return compares, ops


class Store:
    def __init__(self, channel: grpc.aio.Channel, prefix: str, timeout: float):
        self._channel, self._timeout, self._closed = channel, timeout, False
        self._root = prefix.rstrip("/") + "/"
        self._kv, self._lease = rpc.KVStub(channel), rpc.LeaseStub(channel)
        self._watch = rpc.WatchStub(channel)
        #: RPCs made to etcd, by kind: range, txn, put, delete, watch_create,
        #: lease (grant, revoke), lease_keepalive, compact.
        self.requests: collections.Counter[str] = collections.Counter()

    @classmethod
    async def connect(cls, endpoints: list[str], prefix: str = "/sf", *,
                      timeout: float = 5.0, tls=None) -> Store:
        """Connect, waiting up to timeout; timeout also bounds every RPC (and reconnect).

        tls (sfcommon.pki.EtcdTls): etcd's CA and the client certificate etcd requires. The
        members' certificates are checked for tls.server_name, one name that every member's
        certificate carries (several endpoints share one channel and one name)."""
        if tls is None:
            channel = grpc.aio.insecure_channel(_target(endpoints), options=_CHANNEL_OPTIONS)
        else:
            ca, cert, key = tls.read()
            channel = grpc.aio.secure_channel(
                _target(endpoints), grpc.ssl_channel_credentials(ca, key, cert),
                options=[*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)])
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except TimeoutError:
            await channel.close()
            raise StoreUnavailable(f"etcd at {endpoints} not reachable in {timeout}s") from None
        return cls(channel, prefix, timeout)

    async def close(self) -> None:
        self._closed = True
        await self._channel.close()

    def key(self, key: str) -> bytes:
        """The absolute etcd key for a store key (for txn())."""
        return (self._root + key).encode()

    def _rel(self, key: bytes) -> str:
        return key.decode()[len(self._root):]

    async def _unary(self, kind: str, method, request):
        self._raise_if_closed()
        self.requests[kind] += 1
        try:
            # wait_for_ready: ride out a reconnect within the deadline instead of failing fast.
            return await method(request, timeout=self._timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e) from e
        except asyncio.CancelledError:
            self._raise_if_closed()
            raise

    def _raise_if_closed(self) -> None:
        # close() cancels in-flight calls: that is StoreUnavailable, not a task cancellation.
        if self._closed and not asyncio.current_task().cancelling():
            raise StoreUnavailable("store is closed") from None

    async def get(self, key: str) -> tuple[bytes, int] | None:
        r = await self._unary("range", self._kv.Range, rpc.RangeRequest(key=self.key(key)))
        return (r.kvs[0].value, r.kvs[0].mod_revision) if r.kvs else None

    async def get_prefix(self, prefix: str, *, limit: int = 0, start_after: str | None = None,
                         end_before: str | None = None, reverse: bool = False,
                         revision: int = 0, keys_only: bool = False) -> KVList:
        """Keys under prefix, strictly between start_after and end_before, at most limit
        (0: all); reverse=True gives the highest keys first (etcd then reads the whole
        range per page). Pass the first page's .revision as revision for one snapshot."""
        full = self.key(prefix)
        start = full if start_after is None else self.key(start_after) + b"\0"
        end = _prefix_end(full) if end_before is None else self.key(end_before)
        r = await self._unary("range", self._kv.Range, rpc.RangeRequest(
            key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only,
            sort_order=rpc.RangeRequest.DESCEND if reverse else rpc.RangeRequest.NONE))
        out = KVList((self._rel(kv.key), kv.value, kv.mod_revision) for kv in r.kvs)
        out.revision, out.more = r.header.revision, r.more
        return out

    async def count(self, prefix: str) -> int:
        full = self.key(prefix)
        r = await self._unary("range", self._kv.Range, rpc.RangeRequest(
            key=full, range_end=_prefix_end(full), count_only=True))
        return r.count

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Unconditional put; returns the new store revision."""
        r = await self._unary("put", self._kv.Put,
                              rpc.PutRequest(key=self.key(key), value=value, lease=lease))
        return r.header.revision

    async def delete(self, key: str) -> bool:
        r = await self._unary("delete", self._kv.DeleteRange,
                              rpc.DeleteRangeRequest(key=self.key(key)))
        return r.deleted > 0

    async def txn(self, compares: Iterable[rpc.Compare], success_ops: Iterable[rpc.RequestOp],
                  failure_ops: Iterable[rpc.RequestOp] = ()) -> rpc.TxnResponse:
        """Raw etcd transaction; keys are absolute (see key())."""
        return await self._unary("txn", self._kv.Txn, rpc.TxnRequest(
            compare=list(compares), success=list(success_ops), failure=list(failure_ops)))

    async def commit(self, txn: Txn) -> tuple[bool, int]:
        """Apply txn atomically: (succeeded, store revision after it)."""
        started = time.perf_counter()
        try:
            r = await self.txn(*txn.build(self.key))
        except StoreError:
            metrics.TXN_ERROR.inc()
            raise
        metrics.STORE_TRANSACTION_SECONDS.observe(time.perf_counter() - started)
        (metrics.TXN_COMMITTED if r.succeeded else metrics.TXN_CONFLICT).inc()
        return r.succeeded, r.header.revision

    async def compact(self, revision: int) -> None:
        await self._unary("compact", self._kv.Compact, rpc.CompactionRequest(revision=revision))

    async def grant(self, ttl: int) -> int:
        r = await self._unary("lease", self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl))
        return r.ID

    async def revoke(self, lease_id: int) -> None:
        await self._unary("lease", self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id))

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its new TTL, 0 if it has expired."""
        r = await self._unary("lease_keepalive", self._keepalive_once, rpc.LeaseKeepAliveRequest(ID=lease_id))
        return 0 if r is grpc.aio.EOF else r.TTL

    async def _keepalive_once(self, request, **kwargs):
        call = self._lease.LeaseKeepAlive(**kwargs)
        try:
            await call.write(request)
            return await call.read()
        finally:
            call.cancel()

    async def watch_prefix(self, prefix: str, start_revision: int = 0, *,
                           max_outage: float | None = None) -> AsyncIterator[Event]:
        """Every change under prefix from start_revision (0: from when the watch starts).

        No progress notifications: etcd 3.4 answers a progress request at once with
        its current revision, ahead of the events a watch that is catching up (after
        a reconnect, say) has not sent yet, so a notification does not say that
        everything before it was seen. (ObjectCache.wait_for writes a key instead.)

        Survives etcd restarts: reconnects with capped backoff and resumes after the last
        event yielded, so nothing is missed or repeated. Raises StoreCompacted if the
        revision it needs is gone; StoreUnavailable after max_outage s without etcd."""
        full = self.key(prefix)
        create = rpc.WatchCreateRequest(key=full, range_end=_prefix_end(full))
        next_rev, down_since = start_revision, None
        backoff = Backoff(_BACKOFF_FIRST, _BACKOFF_MAX)
        loop = asyncio.get_running_loop()
        while True:
            call = None
            try:
                self._raise_if_closed()
                self.requests["watch_create"] += 1
                create.start_revision = next_rev
                call = self._watch.Watch(wait_for_ready=True)
                created = await asyncio.wait_for(self._open_watch(call, create), self._timeout)
                if next_rev == 0:
                    next_rev = created.header.revision + 1
                down_since = None
                backoff.reset()
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("watch stream ended")
                    if resp.compact_revision:
                        raise StoreCompacted(resp.compact_revision)
                    if resp.canceled:
                        raise StoreError(f"watch canceled by etcd: {resp.cancel_reason}")
                    # etcd never splits one revision across responses (no fragment=True),
                    # so resuming after the last event of a response is exact.
                    for ev in resp.events:
                        yield Event("delete" if ev.type == rpc.Event.DELETE else "put",
                                    self._rel(ev.kv.key), ev.kv.value, ev.kv.mod_revision)
                    if resp.events:
                        next_rev = resp.events[-1].kv.mod_revision + 1
            except grpc.aio.AioRpcError as e:
                if self._closed or e.code() not in _WATCH_RETRY:
                    raise _map_error(e) from e
                reason = f"{e.code().name}: {e.details()}"
            except (TimeoutError, ConnectionError) as e:
                reason = str(e) or "no watch-created reply in time"
            except asyncio.CancelledError:
                self._raise_if_closed()
                raise
            finally:
                if call is not None:
                    call.cancel()
            down_since = down_since or loop.time()
            if max_outage is not None and loop.time() - down_since > max_outage:
                raise StoreUnavailable(f"watch on {prefix!r}: etcd unreachable for {max_outage}s")
            delay = backoff.next()
            log.warning("watch on %r lost (%s); resuming at revision %d in %.1fs",
                        prefix, reason, next_rev, delay)
            await asyncio.sleep(delay)

    @staticmethod
    async def _open_watch(call, create: rpc.WatchCreateRequest) -> rpc.WatchResponse:
        await call.write(rpc.WatchRequest(create_request=create))
        resp = await call.read()
        if resp is grpc.aio.EOF or not resp.created:
            raise ConnectionError("watch stream ended before the watch was created")
        if resp.compact_revision:
            raise StoreCompacted(resp.compact_revision)
        if resp.canceled:
            raise StoreError(f"watch refused by etcd: {resp.cancel_reason}")
        return resp
