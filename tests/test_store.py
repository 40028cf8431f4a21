"""sfcontrol.store against a real etcd (tests/etcd_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid

import pytest
import pytest_asyncio

from sfup.etcd import _free_ports
from sfcontrol.store.etcd import Store, StoreCompacted, StoreUnavailable, Txn


@pytest_asyncio.fixture
async def store(etcd):
    # A fresh prefix per test keeps tests independent on the shared etcd.
    s = await Store.connect([etcd.endpoint], prefix=f"/sftest/{uuid.uuid4().hex}", tls=etcd.client_tls)
    yield s
    await s.close()


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until predicate() is true, failing the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def collecting(store: Store, prefix: str, start_revision: int):
    """Run a watch in a background task; yields the list its events are appended to."""
    seen: list = []

    async def consume():
        async with contextlib.aclosing(store.watch_prefix(prefix, start_revision)) as it:
            async for ev in it:
                seen.append(ev)

    task = asyncio.create_task(consume())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def summary(events):
    return [(e.type, e.key, e.value) for e in events]


async def test_create_succeeds_only_when_key_is_absent(store):
    ok, rev = await store.commit(Txn().create("a", b"1"))
    assert ok and await store.get("a") == (b"1", rev)
    ok, _ = await store.commit(Txn().create("a", b"2"))
    assert not ok
    assert (await store.get("a"))[0] == b"1"


async def test_failed_create_applies_nothing_else_in_the_txn(store):
    await store.put("exists", b"old")
    await store.put("victim", b"keep me")
    ok, _ = await store.commit(
        Txn().put("new", b"x").create("exists", b"new").delete("victim").put("other", b"y"))
    assert not ok
    assert (await store.get("exists"))[0] == b"old"
    assert (await store.get("victim"))[0] == b"keep me"
    assert await store.get("new") is None
    assert await store.get("other") is None


async def test_successful_txn_applies_all_ops_at_one_revision(store):
    await store.put("gone", b"x")
    ok, rev = await store.commit(Txn().create("a", b"1").put("b", b"2").delete("gone"))
    assert ok
    assert await store.get("a") == (b"1", rev)
    assert await store.get("b") == (b"2", rev)
    assert await store.get("gone") is None


async def test_concurrent_read_modify_write_exactly_one_succeeds(store):
    await store.put("counter", b"0")
    (v1, rev1), (v2, rev2) = await asyncio.gather(store.get("counter"), store.get("counter"))
    assert rev1 == rev2
    results = await asyncio.gather(
        store.commit(Txn().put("counter", b"from-1").check_revision("counter", rev1)),
        store.commit(Txn().put("counter", b"from-2").check_revision("counter", rev2)))
    assert sorted(ok for ok, _ in results) == [False, True]
    winner = b"from-1" if results[0][0] else b"from-2"
    assert (await store.get("counter"))[0] == winner


async def test_check_revision_increments_are_never_lost(store):
    await store.put("n", b"0")

    async def increment():
        while True:
            value, rev = await store.get("n")
            txn = Txn().put("n", b"%d" % (int(value) + 1)).check_revision("n", rev)
            ok, _ = await store.commit(txn)
            if ok:
                return

    await asyncio.gather(*(increment() for _ in range(10)))
    assert (await store.get("n"))[0] == b"10"


async def test_check_absent_and_check_revision_zero_mean_missing(store):
    assert (await store.commit(Txn().check_absent("x").check_revision("x", 0).put("y", b"1")))[0]
    await store.put("x", b"1")
    assert not (await store.commit(Txn().check_absent("x").put("y", b"2")))[0]
    assert not (await store.commit(Txn().check_revision("x", 0).put("y", b"3")))[0]
    assert (await store.get("y"))[0] == b"1"


async def test_get_prefix_pages_in_key_order_without_gaps_or_duplicates(store):
    names = [f"items/{i:04d}-{uuid.uuid4().hex[:6]}" for i in range(250)]
    random.shuffle(names)
    # Inserted in random order, 25 keys per transaction.
    for i in range(0, 250, 25):
        txn = Txn()
        for name in names[i:i + 25]:
            txn.put(name, name.encode())
        assert (await store.commit(txn))[0]
    # Neighbours that share the string prefix but are outside "items/".
    await store.put("items", b"no")
    await store.put("items0", b"no")
    await store.put("itemsz/1", b"no")

    pages, after, revision = [], None, 0
    while True:
        page = await store.get_prefix("items/", limit=100, start_after=after, revision=revision)
        pages.append(page)
        revision = page.revision  # every page at the first page's snapshot
        if not page.more:
            break
        after = page[-1][0]
    assert [len(p) for p in pages] == [100, 100, 50]
    keys = [k for p in pages for k, _, _ in p]
    assert keys == sorted(names)
    assert all(v == k.encode() for p in pages for k, v, _ in p)
    assert await store.count("items/") == 250
    assert len(await store.get_prefix("items/")) == 250


async def test_get_prefix_pages_backwards_with_reverse_and_end_before(store):
    names = [f"ev/{i:04d}" for i in range(250)]
    for i in range(0, 250, 50):  # etcd allows 128 ops per txn by default
        txn = Txn()
        for name in names[i:i + 50]:
            txn.put(name, b"")
        assert (await store.commit(txn))[0]
    await store.put("ev0", b"outside")
    pages, before = [], None
    while True:
        page = await store.get_prefix("ev/", limit=100, reverse=True, end_before=before)
        pages.append([k for k, _, _ in page])
        if not page.more:
            break
        before = page[-1][0]
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [k for p in pages for k in p] == names[::-1]
    middle = await store.get_prefix("ev/", start_after="ev/0010", end_before="ev/0013")
    assert [k for k, _, _ in middle] == ["ev/0011", "ev/0012"]


async def test_watch_replays_puts_and_deletes_in_order_from_start_revision(store):
    await store.put("w/before", b"ignored")
    start = await store.put("w/a", b"1")
    await store.put("w/b", b"2")
    await store.put("other/x", b"not watched")
    await store.delete("w/a")
    await store.commit(Txn().put("w/c", b"3").delete("w/b"))
    async with collecting(store, "w/", start) as seen:
        await until(lambda: len(seen) >= 5, what="history replay")
        await store.put("w/live", b"4")  # and it keeps going live
        await until(lambda: len(seen) >= 6, what="live event")
    assert summary(seen) == [
        ("put", "w/a", b"1"), ("put", "w/b", b"2"), ("delete", "w/a", b""),
        ("put", "w/c", b"3"), ("delete", "w/b", b""), ("put", "w/live", b"4")]
    revs = [e.mod_revision for e in seen]
    assert revs == sorted(revs) and revs[0] == start
    assert revs[3] == revs[4]  # one txn, one revision


async def test_watch_survives_etcd_restart_without_missing_or_repeating(private_etcd):
    store = await Store.connect([private_etcd.endpoint], tls=private_etcd.client_tls)
    try:
        start = await store.put("r/before", b"0") + 1
        async with collecting(store, "r/", start) as seen:
            await store.put("r/k1", b"1")
            await until(lambda: len(seen) >= 1, what="k1")
            t0 = time.monotonic()
            await private_etcd.restart_async()
            restarted_in = time.monotonic() - t0
            await store.put("r/k2", b"2")
            await store.put("r/k3", b"3")
            await until(lambda: len(seen) >= 3, timeout=20, what="k2 and k3 after restart")
            await store.put("r/k4", b"sentinel")  # a duplicate would show up before it
            await until(lambda: len(seen) >= 4, what="sentinel")
        assert [e.key for e in seen] == ["r/k1", "r/k2", "r/k3", "r/k4"]
        assert store.requests["watch_create"] >= 2, "the watch never reconnected"
        print(f"etcd restarted in {restarted_in:.2f}s, "
              f"watch_create={store.requests['watch_create']}")
    finally:
        await store.close()


async def test_watch_from_compacted_revision_raises_store_compacted(store):
    old = await store.put("c/x", b"1")
    await store.put("c/x", b"2")
    latest = await store.put("c/x", b"3")
    await store.compact(latest)
    with pytest.raises(StoreCompacted) as info:
        async with asyncio.timeout(10):
            async for _ in store.watch_prefix("c/", old):
                pass
    assert info.value.compact_revision == latest
    with pytest.raises(StoreCompacted):
        await store.get_prefix("c/", revision=old)
    # From the compact revision on, watching works again.
    async with collecting(store, "c/", latest) as seen:
        await until(lambda: len(seen) >= 1, what="event at the compact revision")
    assert summary(seen) == [("put", "c/x", b"3")]


async def test_idle_watch_makes_no_requests(store):
    start = await store.put("idle/x", b"0") + 1
    async with collecting(store, "idle/", start) as seen:
        await store.put("idle/y", b"1")
        await until(lambda: len(seen) == 1, what="watch to be live")
        before = dict(store.requests)
        await asyncio.sleep(2.0)  # the measurement window itself, not synchronisation
        assert dict(store.requests) == before
        assert len(seen) == 1
        await store.put("idle/z", b"2")  # the watch was alive all along
        await until(lambda: len(seen) == 2, what="event after idle window")
    assert before == {"put": 2, "watch_create": 1}


async def test_requests_are_counted_by_kind(store):
    await store.put("k", b"v")
    await store.get("k")
    await store.get_prefix("")
    await store.count("")
    await store.delete("k")
    await store.commit(Txn().create("k", b"v"))
    lease = await store.grant(10)
    await store.keepalive(lease)
    assert store.requests == {"put": 1, "range": 3, "delete": 1, "txn": 1, "lease": 1, "lease_keepalive": 1}


async def test_lease_keys_vanish_on_revoke_and_keepalive_reports_ttl(store):
    lease = await store.grant(30)
    await store.put("leased", b"x", lease=lease)
    assert (await store.commit(Txn().create("leased2", b"y", lease=lease)))[0]
    assert 0 < await store.keepalive(lease) <= 30
    await store.revoke(lease)
    assert await store.get("leased") is None
    assert await store.get("leased2") is None
    assert await store.keepalive(lease) == 0


async def test_unreachable_etcd_is_store_unavailable(private_etcd):
    with pytest.raises(StoreUnavailable):
        await Store.connect([f"127.0.0.1:{_free_ports(1)[0]}"], timeout=0.5)
    store = await Store.connect([private_etcd.endpoint], timeout=1.0, tls=private_etcd.client_tls)
    try:
        await store.put("a", b"1")
        await private_etcd.stop_async()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("a")
        assert time.monotonic() - t0 < 5  # bounded by the store's 1 s timeout, no hang
        await private_etcd.start_async()
        assert (await store.get("a"))[0] == b"1"  # and it recovers by itself
    finally:
        await store.close()


async def test_a_cache_learns_it_has_passed_a_revision_made_elsewhere(etcd, store):
    """A failed transaction answers with etcd's revision, which may be another prefix's
    change: the cache writes a mark and sees it pass instead of waiting for an event
    that never comes (it used to wait its whole timeout)."""
    from sfcontrol.core import Core
    core = await Core.open(store)
    other = await Store.connect([etcd.endpoint], prefix=f"/sftest/{uuid.uuid4().hex}", tls=etcd.client_tls)
    try:
        await other.put("elsewhere", b"x")              # a revision of no change of ours
        ok, revision = await store.commit(Txn().check_revision("absent", 5).put("absent", b"y"))
        assert not ok and revision > core.cache.revision
        with pytest.raises(TimeoutError):
            await core.cache.wait_for(revision, timeout=0.5)
        t = time.monotonic()
        await core.cache.wait_for(revision, timeout=5, elsewhere=True)
        assert time.monotonic() - t < 1 and core.cache.revision >= revision
        # Waiters for revisions the last mark is past write no more marks.
        puts = store.requests["put"]
        await asyncio.gather(*(core.cache.wait_for(revision, timeout=5, elsewhere=True) for _ in range(5)))
        assert store.requests["put"] == puts
        rev = await store.put("ours", b"z")
        await core.cache.wait_for(rev, timeout=5)
    finally:
        await other.close()
        await core.close()


async def test_a_cache_catching_up_never_says_it_has_a_revision_it_has_not_seen(store, monkeypatch):
    """A cache that starts behind (as after a reconnect) has a backlog of events to take.
    etcd 3.4 answered a progress request at once with its current revision, ahead of that
    backlog: the cache took it as "seen up to here", and a read right after a commit (or
    a failed transaction) showed the object as it had been (CI: a node's "created" report
    refused, "from preflight", after an etcd restart)."""
    from sfcontrol.core import Core
    from sfcontrol.store import keys
    from shakenfist.v1 import instance_pb2
    key = keys.instance("ns", str(uuid.uuid4()))
    first = await store.put(key, instance_pb2.Instance(name="v0").SerializeToString())
    for i in range(1, 301):
        await store.put(key, instance_pb2.Instance(name=f"v{i}").SerializeToString())
    ok, revision = await store.commit(Txn().check_revision("absent", 5).put("absent", b"y"))
    assert not ok
    # The cache lists the objects as they were at `first`, so it watches from there on;
    # etcd sends such a watch its backlog at its next sync (every 100 ms).
    listing, open_watch, opened = Store.get_prefix, Store._open_watch, asyncio.Event()

    async def behind(self, prefix, *, revision=0, **kw):
        page = await listing(self, prefix, revision=revision or first, **kw)
        page.revision = first           # (etcd's header has the current one)
        return page

    async def watch_opened(call, create):
        created = await open_watch(call, create)
        opened.set()
        return created
    monkeypatch.setattr(Store, "get_prefix", behind)
    monkeypatch.setattr(Store, "_open_watch", staticmethod(watch_opened))
    core = await Core.open(store)
    monkeypatch.setattr(Store, "get_prefix", listing)
    try:
        await asyncio.wait_for(opened.wait(), 5)
        await core.cache.wait_for(revision, timeout=10, elsewhere=True)
        assert core.cache.get(key).value.name == "v300"
    finally:
        await core.close()
