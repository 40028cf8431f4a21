"""P3: acknowledged creates per second from 16 concurrent gRPC clients, against the
rate of small sequential etcd transactions from one Python client."""

import asyncio
import ssl

import aiohttp
import grpc

from bench.common import Node, Plane, login, now
from sfcontrol.store.etcd import Store, Txn
from tests.helpers import create_request

CLIENTS = 16


async def _commits(store: Store, seconds: float, start: int) -> float:
    """Sequential small transactions (one 100-byte put each) per second."""
    value, i, t0 = b'x' * 100, start, now()
    while now() - t0 < seconds:
        ok, _ = await store.commit(Txn().put(f'raw/{i}', value))
        assert ok
        i += 1
    return (i - start) / (now() - t0)


async def _creates(clients, seconds: float, tag: str) -> tuple[int, int, float]:
    """(CreateInstance calls answered OK, calls failed, seconds): 16 clients, each with its
    own channel, calling back to back."""
    done, failed = 0, 0
    deadline = now() + seconds

    async def worker(j, client):
        nonlocal done, failed
        i = 0
        while now() < deadline:
            i += 1
            try:
                await client.instances.CreateInstance(create_request(f'{tag}-{j}-{i}', memory=64))
                done += 1
            except grpc.aio.AioRpcError:
                failed += 1
    t0 = now()
    await asyncio.gather(*(worker(j, c) for j, c in enumerate(clients)))
    return done, failed, now() - t0


async def etcd_txns(plane: Plane) -> int:
    """Txn RPCs etcd has answered (a transaction whose checks fail is answered too)."""
    tls = plane.etcd.client_tls
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    async with aiohttp.ClientSession() as s:
        async with s.get(f'https://{plane.etcd.endpoint}/metrics', ssl=context) as r:
            text = await r.text()
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith('grpc_server_handled_total{') and 'grpc_method="Txn"' in line)


async def p3(plane: Plane, rounds: int, seconds: float) -> dict:
    target, key, node_api = plane.controller('/p3')
    first = await login(target, key)
    node = await Node(node_api, cpus=2**31 - 1).start(auto_create=False)    # follows, never builds
    clients = [first] + [await login(target, key) for _ in range(CLIENTS - 1)]
    store = await Store.connect([plane.etcd.endpoint], prefix='/p3raw', tls=plane.etcd.client_tls)
    await _commits(store, 0.5, 10**9)                                       # warm up
    await _creates(clients, 0.5, 'warm')
    out = {'commits': [], 'creates': [], 'P3': [], 'failed': 0, 'retries': []}
    for r in range(rounds):          # the baseline goes first in even rounds, last in odd ones
        if r % 2:
            commits = await _commits(store, seconds, r * 10**6)
        before = await etcd_txns(plane)
        done, failed, elapsed = await _creates(clients, seconds, f'r{r}')
        txns = await etcd_txns(plane) - before
        if not r % 2:
            commits = await _commits(store, seconds, r * 10**6)
        out['commits'].append(commits)
        out['creates'].append(done / elapsed)
        out['P3'].append(done / elapsed / commits)
        out['failed'] += failed
        # A create is one transaction; each conflict (a checked revision moved) one more.
        out['retries'].append(txns / done - 1 if done else 0.0)
    await store.close()
    await node.stop()
    for c in clients:
        await c.close()
    return out
