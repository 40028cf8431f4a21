"""Event watches: resumable from a cursor, surviving an etcd restart, and a clear
error for a cursor older than the history kept."""

import asyncio

import grpc
from google.protobuf import struct_pb2

from sfcontrol import server
from shakenfist.v1 import event_pb2, event_service_pb2 as ev, instance_service_pb2 as api
from tests.conftest import controller_config, system_key
from tests.grpc_client import Client
from tests.helpers import create_created, raises
from tests.node_double import NodeApi, NodeDouble
from tests.waiting import eventually

INSTANCE = event_pb2.OBJECT_TYPE_INSTANCE


async def set_md(client, n):
    await client.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
        instance_ref='inst1', key='n', value=struct_pb2.Value(number_value=n)))


class Collector:
    """Runs a watch in the background and keeps what it yields."""

    def __init__(self, client, **request):
        self.items = []
        self.established = asyncio.Event()
        self.call = client.events.WatchEvents(ev.WatchEventsRequest(**request))
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        async for item in self.call:
            if item.HasField('event'):
                self.items.append(item)
            else:
                self.established.set()      # the first message confirms the watch

    def messages(self, message='set metadata'):
        return [i for i in self.items if i.event.message == message]

    async def stop(self):
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_a_watch_resumes_from_its_cursor_with_nothing_missed_or_repeated(system, node):
    await create_created(system)
    listing = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref='inst1'))
    first = Collector(system, object_type=INSTANCE, object_ref='inst1', cursor=listing.watch_cursor)
    await set_md(system, 1)
    await set_md(system, 2)
    await eventually(lambda: len(first.messages()) == 2, what='two events')
    await first.stop()
    cursor = first.items[-1].cursor
    await set_md(system, 3)        # happens while nobody watches
    second = Collector(system, object_type=INSTANCE, object_ref='inst1', cursor=cursor)
    await set_md(system, 4)
    await eventually(lambda: len(second.messages()) == 2, what='the missed and the new event')
    await second.stop()
    revisions = [int(i.cursor) for i in first.items + second.items]
    assert first.established.is_set() and second.established.is_set()
    assert revisions == sorted(set(revisions)), 'an event was repeated or out of order'


async def test_watch_filters_by_event_type(system, node):
    await create_created(system)
    w = Collector(system, event_types=[event_pb2.EVENT_TYPE_STATUS])
    await asyncio.wait_for(w.established.wait(), 10)
    await set_md(system, 1)                                  # audit: filtered out
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='inst1'))
    await eventually(lambda: any(i.event.message == 'deleted' for i in w.items))
    await w.stop()
    assert all(i.event.type == event_pb2.EVENT_TYPE_STATUS for i in w.items)


async def test_a_watch_survives_an_etcd_restart(private_etcd, tmp_path):
    ctl = await server.start(controller_config(private_etcd, tmp_path))
    c = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(tmp_path))
    node = await NodeDouble(NodeApi.of(ctl, private_etcd.pki)).start()
    try:
        await create_created(c)
        w = Collector(c, object_type=INSTANCE, object_ref='inst1')
        await asyncio.wait_for(w.established.wait(), 10)
        await set_md(c, 1)
        await eventually(lambda: len(w.messages()) == 1)
        await private_etcd.restart_async()

        async def write(n):
            try:
                await set_md(c, n)
                return True
            except grpc.aio.AioRpcError as e:       # etcd may still be electing a leader
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                return False
        await eventually(lambda: write(2), timeout=20, interval=0.2, what='a write after the restart')
        await set_md(c, 3)
        await eventually(lambda: len(w.messages()) == 3, timeout=20, what='all three events')
        await w.stop()
        revisions = [int(i.cursor) for i in w.items]
        assert revisions == sorted(set(revisions))
    finally:
        await node.stop()
        await c.close()
        await ctl.stop(None)


async def test_an_expired_cursor_is_a_clear_error(system, node, controller):
    await create_created(system)
    listing = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref='inst1'))
    old = listing.watch_cursor
    await set_md(system, 1)
    await set_md(system, 2)
    current = (await controller.core.store.get_prefix('', limit=1)).revision
    await controller.core.store.compact(current)
    async with raises(grpc.StatusCode.OUT_OF_RANGE, 'CURSOR_EXPIRED', 'list the events again'):
        async for _ in system.events.WatchEvents(ev.WatchEventsRequest(cursor=old)):
            pass
    async with raises(grpc.StatusCode.INVALID_ARGUMENT):
        async for _ in system.events.WatchEvents(ev.WatchEventsRequest(cursor='nonsense')):
            pass


async def test_the_first_message_confirms_the_watch_with_its_cursor(system, node):
    await create_created(system)
    listing = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref='inst1'))
    call = system.events.WatchEvents(ev.WatchEventsRequest(cursor=listing.watch_cursor))
    first = await asyncio.wait_for(call.read(), 10)
    assert not first.HasField('event') and first.cursor == listing.watch_cursor
    call.cancel()



async def test_a_read_right_after_an_event_shows_what_the_event_says(etcd, tmp_path):
    """Writes through one controller; a watch and reads through another, whose cache
    follows etcd on a watch of its own. Each read, made the moment its event arrives,
    must show the value the event is about (the watch waits for the reader's cache)."""
    import dataclasses
    config = controller_config(etcd, tmp_path)
    writer = await server.start(config)
    reader = await server.start(dataclasses.replace(config, state_dir=tmp_path / 'state-b'))
    a = await Client(f'127.0.0.1:{writer.port}').login('system', system_key(tmp_path))
    b = await Client(f'127.0.0.1:{reader.port}').login('system', system_key(tmp_path))
    node = await NodeDouble(NodeApi.of(writer, etcd.pki)).start()
    watch = None
    try:
        await create_created(a)
        watch = b.events.WatchEvents(ev.WatchEventsRequest(object_type=INSTANCE, object_ref='inst1'))
        assert not (await watch.read()).HasField('event')
        stale = []
        for n in range(1, 41):
            await set_md(a, n)
            while (await asyncio.wait_for(watch.read(), 10)).event.message != 'set metadata':
                pass
            md = await b.instances.GetInstanceMetadata(api.GetInstanceMetadataRequest(instance_ref='inst1'))
            if md.metadata.fields['n'].number_value != n:
                stale.append(n)
        assert not stale
    finally:
        if watch is not None:
            watch.cancel()
        await node.stop()
        for c in (a, b):
            await c.close()
        for ctl in (reader, writer):
            await ctl.stop(None)
