"""Events: listing (newest first, filtered by type) and resumable watches.

Events are written in the same transaction as the change they describe, under
events/<ns>/<object type>/<uuid>/<time-ordered seq>. A watch cursor is the etcd
revision after which to resume, so a client that reconnects with its last
cursor misses nothing and sees nothing twice.
"""

import re

from sfcommon import errors
from sfcontrol import metrics
from sfcontrol.store import keys
from sfcontrol.core import Core, object_type_name
from sfcontrol.store.etcd import StoreCompacted
from shakenfist.v1 import event_pb2, event_service_pb2

_CURSOR = re.compile(r'[0-9]{1,18}')

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
_READ_PAGE = 200


class Events:
    def __init__(self, core: Core):
        self.core = core

    async def list(self, ns: str, object_type: int, uuid: str, *, event_type: int = 0,
                   limit: int = 0, page_token: str = ''):
        """(events newest first, next_page_token, watch_cursor) for one object."""
        if limit < 0:
            raise errors.InvalidArgument('limit: must not be negative')
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        prefix = keys.events(ns, object_type_name(object_type), uuid)
        if page_token and not page_token.startswith(prefix):
            raise errors.InvalidArgument('page_token: not a token of this listing')
        out, before, revision = [], page_token or None, 0
        while True:
            page = await self.core.store.get_prefix(prefix, limit=_READ_PAGE, reverse=True,
                                                    end_before=before, revision=revision)
            revision = revision or page.revision
            for key, value, _ in page:
                before = key
                ev = event_pb2.Event.FromString(value)
                if not event_type or ev.type == event_type:
                    out.append(ev)
                    if len(out) == limit:
                        last_of_all = not page.more and key == page[-1][0]
                        return out, '' if last_of_all else key, str(revision)
            if not page.more:
                return out, '', str(revision)

    async def watch(self, prefix: str, event_types=(), cursor: str = '', *, object_type: str = ''):
        """Yield WatchEventsResponses for events under prefix after cursor (or from now)."""
        # An etcd revision: ASCII digits that fit an int64 (str.isdigit() also
        # takes '²', which int() refuses, and etcd refuses what is too large).
        if cursor and not _CURSOR.fullmatch(cursor):
            raise errors.InvalidArgument('cursor: not a cursor returned by this server')
        wanted = set(event_types)
        if not cursor:      # from now: the store's current revision
            cursor = str((await self.core.store.get_prefix(prefix, limit=1, keys_only=True)).revision)
        with metrics.EVENT_WATCHES.track_inprogress():
            # The watch starts right after the cursor's revision however late etcd sets
            # it up, so the client may rely on it from this first message on.
            yield event_service_pb2.WatchEventsResponse(cursor=cursor)
            try:
                async for change in self.core.store.watch_prefix(prefix, start_revision=int(cursor) + 1):
                    if change.type != 'put':
                        continue
                    if object_type and change.key.split('/')[2] != object_type:
                        continue
                    ev = event_pb2.Event.FromString(change.value)
                    if not wanted or ev.type in wanted:
                        # This watch is not the cache's: an event may come before the cache
                        # has its transaction, and a read right after it would show the
                        # object as it was. Held until reads include it.
                        await self.core.cache.wait_for(change.mod_revision)
                        yield event_service_pb2.WatchEventsResponse(event=ev, cursor=str(change.mod_revision))
            except StoreCompacted:
                raise errors.CursorExpired(
                    'the cursor is older than the event history kept: list the events again, '
                    'then watch from the watch_cursor of that listing')

