"""P1, P2, P7, P8: latencies of reads and of event delivery, against child-process servers."""

import asyncio
import json
import uuid as uuidlib

import aiohttp
import grpc
from google.protobuf import struct_pb2

from bench.common import Node, Plane, interleaved, login, now, p50, timed
from sfcommon.events import make_event
from sfcontrol.store import keys
from sfcontrol.store.etcd import Store, Txn
from shakenfist.v1 import event_pb2, event_service_pb2 as ev, instance_pb2, instance_service_pb2 as api
from tests.grpc_client import Client
from tests.helpers import create_created, network

INSTANCE = event_pb2.OBJECT_TYPE_INSTANCE


async def p1_p2(plane: Plane, rounds: int, n: int) -> dict:
    """Sequential unary calls from one client: echo, GetInstance, and REST GET through
    the gateway, interleaved in each round. P1 = GetInstance / echo, P2 = REST / gRPC."""
    target, key, node_api = plane.controller('/p1')
    rest = plane.gateway(target)
    client = await login(target, key)
    node = await Node(node_api).start()
    net = await network(client)
    inst = await create_created(client, 'bench1', networks=[net.uuid])
    request = api.GetInstanceRequest(instance_ref=inst.uuid)

    # The echo server through the same client code: a Client (its interceptors add
    # the same token), a unary multicallable, protobuf (de)serializers.
    echo_target, http_echo = plane.echo()
    echo = Client(echo_target)
    echo.token = client.token
    echo_call = echo.channel.unary_unary(
        '/bench.Echo/Echo', request_serializer=api.GetInstanceRequest.SerializeToString,
        response_deserializer=api.GetInstanceRequest.FromString)
    session = aiohttp.ClientSession(headers={'Authorization': f'Bearer {client.token}'})
    url = f'{rest}/instances/{inst.uuid}'
    async with session.get(url) as r:           # the HTTP echo answers with the same body
        async with session.post(http_echo, data=await r.read()) as posted:
            assert posted.status == 200

    async def http_get(where):
        async with session.get(where) as r:
            assert r.status == 200, r.status
            json.loads(await r.read())

    calls = {'echo': lambda: echo_call(request), 'grpc': lambda: client.instances.GetInstance(request),
             'rest': lambda: http_get(url), 'http_echo': lambda: http_get(http_echo)}
    for call in calls.values():
        await timed(call, 200)                               # warm up
    out = {'echo': [], 'grpc': [], 'rest': [], 'http_echo': [], 'P1': [], 'P2': []}
    for r in range(rounds):
        got = {name: p50(times) for name, times in (await interleaved(calls, n)).items()}
        for name, value in got.items():
            out[name].append(value)
        out['P1'].append(got['grpc'] / got['echo'])
        out['P2'].append(got['rest'] / got['grpc'])
    await session.close()
    await echo.close()
    await node.stop()
    await client.close()
    return out


async def _seed(store: Store, template: instance_pb2.Instance, count: int) -> str:
    """count copies of template under new UUIDs, written straight to etcd; returns the
    UUID of the last (the cache has every copy once it shows that one)."""
    last = ''
    for start in range(0, count, 100):
        txn = Txn()
        for i in range(start, min(count, start + 100)):
            inst = instance_pb2.Instance()
            inst.CopyFrom(template)
            inst.uuid, inst.name = str(uuidlib.uuid4()), f'seed{i}'
            txn.put(keys.instance('system', inst.uuid), inst.SerializeToString())
            last = inst.uuid
        ok, _ = await store.commit(txn)
        assert ok
    return last


async def p7(plane: Plane, rounds: int, n: int) -> dict:
    """ListInstances(page_size=100) with 100 and with 10,000 instances stored. The
    instances are copies of one created through the API, written to etcd directly
    (creating 10,000 through the API would take minutes and measure creates)."""
    sides = {}
    for label, count in (('small', 100), ('large', 10_000)):
        prefix = f'/p7{label}'
        target, key, node_api = plane.controller(prefix)
        client = await login(target, key)
        node = await Node(node_api).start()
        template = await create_created(client, 'template')
        del template.interfaces[:]
        template.ClearField('node_unreachable')
        store = await Store.connect([plane.etcd.endpoint], prefix=prefix, tls=plane.etcd.client_tls)
        last = await _seed(store, template, count - 1)
        await store.close()
        for _ in range(200):
            try:
                await client.instances.GetInstance(api.GetInstanceRequest(instance_ref=last))
                break
            except grpc.aio.AioRpcError:      # not in its cache yet
                await asyncio.sleep(0.05)
        request = api.ListInstancesRequest(page_size=100)
        page = await client.instances.ListInstances(request)
        assert len(page.instances) == 100 and (page.next_page_token or count == 100)
        sides[label] = (client, node, request)
    calls = {label: (lambda c=c, rq=rq: c.instances.ListInstances(rq)) for label, (c, _, rq) in sides.items()}
    for call in calls.values():
        await timed(call, 50)
    out = {'small': [], 'large': [], 'P7': []}
    for r in range(rounds):
        got = {label: p50(times) for label, times in (await interleaved(calls, n)).items()}
        out['small'].append(got['small'])
        out['large'].append(got['large'])
        out['P7'].append(got['large'] / got['small'])
    for client, node, _ in sides.values():
        await node.stop()
        await client.close()
    return out


async def p8(plane: Plane, rounds: int, n: int) -> dict:
    """Event delivery on a WatchEvents stream. 'commit': an event put straight into
    etcd (as the controller's transactions put them), from the commit's reply to the
    event's arrival. 'api': from SetInstanceMetadata's return to its event's arrival
    (negative when the event arrives before the reply)."""
    prefix = '/p8'
    target, key, node_api = plane.controller(prefix)
    client = await login(target, key)
    node = await Node(node_api).start()
    inst = await create_created(client, 'watched')
    store = await Store.connect([plane.etcd.endpoint], prefix=prefix, tls=plane.etcd.client_tls)
    stream = client.events.WatchEvents(ev.WatchEventsRequest(object_type=INSTANCE, object_ref=inst.uuid))
    arrived: dict[str, asyncio.Future] = {}

    async def read():
        async for item in stream:
            t = now()
            fut = arrived.get(item.event.message)
            if fut is not None and not fut.done():
                fut.set_result(t)
    reader = asyncio.create_task(read())

    def expect(message):
        arrived[message] = asyncio.get_running_loop().create_future()
        return arrived[message]

    async def via_commit(i, timeout=10):
        """(arrival - the commit's reply, arrival - the commit's request): the commit
        happens in between, so these bound the delivery latency from below and above."""
        message = f'bench {i}'
        fut = expect(message)
        value = make_event('bench', INSTANCE, inst.uuid, event_pb2.EVENT_TYPE_STATUS, message)
        sent = now()
        ok, _ = await store.commit(Txn().put(keys.event('system', 'instance', inst.uuid),
                                             value.SerializeToString()))
        replied = now()
        arrived = await asyncio.wait_for(fut, timeout)
        return arrived - replied, arrived - sent

    async def via_api(i):
        fut = expect('set metadata')
        await client.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref=inst.uuid, key='n', value=struct_pb2.Value(number_value=i)))
        t = now()
        return await asyncio.wait_for(fut, 10) - t

    for attempt in range(50):          # the watch is live once an event gets through
        try:
            await via_commit(-1 - attempt, timeout=0.2)
            break
        except TimeoutError:
            pass
    for i in range(50):
        await via_commit(-10 - i)
        await via_api(-10 - i)
    out = {'commit': [], 'commit_sent': [], 'api': []}
    seq = 0
    for r in range(rounds):
        commit, sent, api_ = [], [], []
        for _ in range(n):
            seq += 1
            from_reply, from_request = await via_commit(seq)
            commit.append(from_reply)
            sent.append(from_request)
            api_.append(await via_api(seq))
        out['commit'].append(p50(commit))
        out['commit_sent'].append(p50(sent))
        out['api'].append(p50(api_))
    stream.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await store.close()
    await node.stop()
    await client.close()
    return out
