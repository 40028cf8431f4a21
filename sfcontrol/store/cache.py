"""An in-memory mirror of the controller's objects in etcd, kept current by one watch.

Reads (get, list, lookups by uuid, name or field) are served from memory, so an
idle plane makes no etcd requests and a page of a list costs the same with 100
or 10,000 objects stored. Writes go to etcd as transactions; after a write,
wait_for(revision) makes the writer's next read see it. On compaction the
cache re-lists.

While a change is built (Core.mutate), every read is recorded in a ReadSet, as
etcd's STM does, and the commit is guarded by all of them: a key read must not
have changed (or appeared, if it was absent), and no key of a range read may
have been written since. A builder cannot forget a read. Reads that only rank
choices (the scheduler's) opt out explicitly with untracked().
"""

import asyncio
import bisect
import collections
import contextlib
import contextvars
import dataclasses
import logging
from typing import Callable

from google.protobuf.message import Message

from sfcontrol.store import keys
from sfcontrol.store.etcd import Store, StoreCompacted

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of cached object: every key under prefix holds a `message`."""
    prefix: str
    message: type[Message]
    # Fields whose values are indexed (for example NetworkInterface.instance_uuid).
    index: tuple[str, ...] = ()


@dataclasses.dataclass
class Entry:
    key: str
    value: Message
    mod_revision: int


# Keys of a range read that are also checked one by one (so that their deletion is
# seen); past this many, the range's guard alone holds (a deletion there goes unseen).
POINTS_PER_RANGE = 32


@dataclasses.dataclass
class ReadSet:
    """What a change was built from: the cache revision, each key read with the
    mod_revision seen (0: absent), and each prefix read as a range."""
    revision: int
    points: dict[str, int] = dataclasses.field(default_factory=dict)
    ranges: set[str] = dataclasses.field(default_factory=set)

    def point(self, key: str, entry: 'Entry | None'):
        self.points.setdefault(key, entry.mod_revision if entry else 0)

    def span(self, prefix: str, entries: list['Entry']):
        self.ranges.add(prefix)
        for entry in entries[:POINTS_PER_RANGE]:
            self.point(entry.key, entry)

    def guard(self, txn):
        """Add a check of every read to txn (a Txn of sfcontrol.store)."""
        for key, mod_revision in self.points.items():
            if mod_revision:
                txn.check_revision(key, mod_revision)
            else:
                txn.check_absent(key)
        for prefix in sorted(self.ranges):
            txn.check_range_unchanged(prefix, self.revision)


_reads: contextvars.ContextVar[ReadSet | None] = contextvars.ContextVar('reads', default=None)


@contextlib.contextmanager
def untracked():
    """Reads in this block do not guard the change being built (they only rank choices,
    and what is chosen is read again, tracked)."""
    token = _reads.set(None)
    try:
        yield
    finally:
        _reads.reset(token)


class ObjectCache:
    def __init__(self, store: Store, kinds: list[Kind]):
        self._store = store
        self._kinds = kinds
        self._entries: dict[str, Entry] = {}
        self._sorted: dict[str, list[str]] = {k.prefix: [] for k in kinds}
        self._by_uuid: dict[tuple[str, str], str] = {}   # (kind prefix, last key part) -> key
        self._index: dict[tuple[str, str, object], set[str]] = {}
        self._listeners: list[tuple[str, Callable[[str, Entry | None], None]]] = []
        self.revision = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._marking = asyncio.Lock()
        self._marked = 0                # the revision of the last mark written
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------
    async def start(self):
        self._task = asyncio.create_task(self._run(), name='object-cache')
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()     # raises what stopped it

    async def stop(self):
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self):
        while True:
            revision = await self._load()
            self._ready.set()
            try:
                async for ev in self._store.watch_prefix('', start_revision=revision + 1):
                    if kind := self._kind_of(ev.key):
                        if ev.type == 'put':
                            self._apply(kind, ev.key, kind.message.FromString(ev.value),
                                        ev.mod_revision)
                        else:
                            self._remove(ev.key)
                    self._advance(ev.mod_revision)
            except StoreCompacted:
                log.warning('object cache: watch revision compacted; re-listing')

    async def _load(self) -> int:
        revision, seen = 0, set()
        for kind in self._kinds:
            start_after = None
            while True:
                page = await self._store.get_prefix(kind.prefix, limit=1000, revision=revision,
                                                    start_after=start_after)
                revision = revision or page.revision
                for key, value, mod in page:
                    seen.add(key)
                    entry = self._entries.get(key)
                    if entry is None or entry.mod_revision != mod:
                        self._apply(kind, key, kind.message.FromString(value), mod)
                if not page.more:
                    break
                start_after = page[-1][0]
        # After a compaction: drop what was deleted while we could not watch.
        for key in [k for k in self._entries if k not in seen]:
            self._remove(key)
        self._advance(revision)
        return revision

    # -- applying changes ------------------------------------------------------
    def _kind_of(self, key: str) -> Kind | None:
        for kind in self._kinds:
            if key.startswith(kind.prefix):
                return kind
        return None

    def _apply(self, kind: Kind, key: str, value: Message, mod_revision: int):
        old = self._entries.get(key)
        if old is None:
            bisect.insort(self._sorted[kind.prefix], key)
        else:
            self._unindex(kind, old)
        entry = Entry(key, value, mod_revision)
        self._entries[key] = entry
        self._by_uuid[(kind.prefix, key.rsplit('/', 1)[-1])] = key
        for field in kind.index:
            self._index.setdefault((kind.prefix, field, getattr(value, field)), set()).add(key)
        self._notify(key, entry)

    def _remove(self, key: str):
        old = self._entries.pop(key, None)
        if old is None:
            return
        kind = self._kind_of(key)
        in_order = self._sorted[kind.prefix]
        del in_order[bisect.bisect_left(in_order, key)]
        self._unindex(kind, old)
        self._by_uuid.pop((kind.prefix, key.rsplit('/', 1)[-1]), None)
        self._notify(key, None)

    def _unindex(self, kind: Kind, entry: Entry):
        for field in kind.index:
            self._index.get((kind.prefix, field, getattr(entry.value, field)), set()).discard(entry.key)

    def _notify(self, key, entry):
        for prefix, callback in list(self._listeners):
            if key.startswith(prefix):
                callback(key, entry)

    def _advance(self, revision: int):
        if revision <= self.revision:
            return
        self.revision = revision
        still = []
        for rev, fut in self._waiters:
            if rev <= revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((rev, fut))
        self._waiters = still

    # -- reads -----------------------------------------------------------------
    async def wait_for(self, revision: int, timeout: float = 10.0, *, elsewhere: bool = False):
        """Return once every change up to revision is visible here. With elsewhere, the
        revision may be of no change of this prefix (a failed transaction's, say), which
        the watch never shows: a mark is written here, and the watch passes it after
        every change before it (a watch delivers in revision order)."""
        if revision <= self.revision:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))

        async def passed():
            if elsewhere:
                await self._mark(revision)
            await fut
        await asyncio.wait_for(passed(), timeout)

    async def _mark(self, revision: int):
        # One mark at a time, and none for a revision an earlier mark is past.
        async with self._marking:
            if self._marked < revision:
                self._marked = await self._store.put(keys.REVISION_MARK, b'')

    def listen(self, prefix: str, callback: Callable[[str, Entry | None], None]):
        """Call callback(key, entry or None when deleted) on every change under prefix."""
        self._listeners.append((prefix, callback))

    def unlisten(self, prefix: str, callback: Callable[[str, Entry | None], None]):
        self._listeners.remove((prefix, callback))

    @contextlib.contextmanager
    def tracking(self):
        """Record every read made in the block; yields the ReadSet."""
        reads = ReadSet(self.revision)
        token = _reads.set(reads)
        try:
            yield reads
        finally:
            _reads.reset(token)

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if (reads := _reads.get()) is not None:
            reads.point(key, entry)
        return entry

    def by_uuid(self, prefix: str, uuid: str) -> Entry | None:
        """The entry of the kind at prefix whose key ends with /uuid."""
        key = self._by_uuid.get((prefix, uuid))
        entry = self._entries.get(key) if key else None
        if (reads := _reads.get()) is not None:
            if entry is not None:
                reads.point(entry.key, entry)
            else:
                reads.span(prefix, [])      # one with that uuid must not appear meanwhile
        return entry

    def where(self, prefix: str, field: str, value) -> list[Entry]:
        """Entries of the kind at prefix whose field equals value, in key order."""
        keys = sorted(self._index.get((prefix, field, value), ()))
        out = [self._entries[k] for k in keys]
        if (reads := _reads.get()) is not None:
            reads.span(prefix, out)
        return out

    def range(self, prefix: str, *, start_after: str | None = None, limit: int = 0,
              filter: Callable[[Message], bool] | None = None) -> tuple[list[Entry], bool]:
        """Entries under prefix in key order, after start_after; (page, more)."""
        kind = self._kind_of(prefix)
        keys = self._sorted[kind.prefix]
        i = bisect.bisect_left(keys, prefix)
        if start_after is not None:
            i = max(i, bisect.bisect_right(keys, start_after))
        out = []
        while i < len(keys) and keys[i].startswith(prefix):
            entry = self._entries[keys[i]]
            i += 1
            if filter is None or filter(entry.value):
                if limit and len(out) == limit:
                    self._track_range(prefix, out)
                    return out, True
                out.append(entry)
        self._track_range(prefix, out)
        return out, False

    def count(self, prefix: str, key: Callable[[Message], object]) -> collections.Counter:
        """How many entries under prefix have each key(value). Never tracked: for metrics,
        computed when they are scraped."""
        keys = self._sorted[self._kind_of(prefix).prefix]
        counts = collections.Counter()
        for i in range(bisect.bisect_left(keys, prefix), len(keys)):
            if not keys[i].startswith(prefix):
                break
            counts[key(self._entries[keys[i]].value)] += 1
        return counts

    @staticmethod
    def _track_range(prefix: str, entries: list[Entry]):
        if (reads := _reads.get()) is not None:
            reads.span(prefix, entries)
