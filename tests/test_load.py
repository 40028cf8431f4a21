"""Load: 50 concurrent clients run 2,000 mixed instance operations against one controller
(with a scripted node), with no errors; latency per kind of operation is reported.

The numbers are printed (pytest -s) and written to latency.json in the test's tmp dir.
The controller runs as `sfcontrol` in a child process, as it is deployed, so that the
clients' work does not share its event loop; the 50 clients and the node double share
this process, and etcd is the session's. Latencies are measured by the clients, so
they include the clients' own queueing on this event loop.
"""

import asyncio
import collections
import json
import math
import pathlib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2

from shakenfist.v1 import instance_pb2
from shakenfist.v1 import instance_service_pb2 as api
from tests.grpc_client import Client
from tests.helpers import create_request
from tests.node_double import NodeApi, NodeDouble
from tests.waiting import eventually

CLIENTS = 50
# Per client: 2 creates, then these 38 in a random order (50 x 40 = 2,000 operations).
MIX = {'get': 8, 'list': 4, 'events': 6, 'metadata_set': 8, 'metadata_get': 6,
       'power_off': 3, 'power_on': 3}
CREATES = 2
CALL_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def controller_process(etcd, tmp_path):
    """`sfcontrol` in a child process, on its own prefix: (process, target, key file, node API)."""
    with socket.socket() as s, socket.socket() as n:
        s.bind(('127.0.0.1', 0))
        n.bind(('127.0.0.1', 0))
        port, node_port = s.getsockname()[1], n.getsockname()[1]
    state = tmp_path / 'state'
    setpriv = shutil.which('setpriv')       # SIGTERM it if this process dies
    die_with_us = [setpriv, '--pdeathsig', 'TERM', '--'] if setpriv else []
    with open(tmp_path / 'sfcontrol.log', 'ab') as log:
        proc = subprocess.Popen(
            die_with_us + [sys.executable, '-m', 'sfcontrol.main', '--etcd', etcd.endpoint,
                           '--listen', f'127.0.0.1:{port}', '--state-dir', str(state),
                           '--node-listen', f'127.0.0.1:{node_port}',
                           '--pki-dir', str(etcd.pki.controller().directory),
                           '--prefix', f'/sftest/{uuid.uuid4().hex}', '--log-level', 'warning'],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=pathlib.Path(__file__).resolve().parent.parent)
    try:
        yield proc, f'127.0.0.1:{port}', state / 'system.key', NodeApi(f'127.0.0.1:{node_port}', etcd.pki)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def serving(proc, target, key_file, log):
    """Wait until the controller answers; a logged-in system client."""
    async def up():
        assert proc.poll() is None, f'sfcontrol exited with {proc.returncode}: {log.read_text()[-2000:]}'
        if not key_file.exists() or not key_file.read_text().strip():
            return None
        client = Client(target)
        try:
            return await client.login('system', key_file.read_text().strip())
        except grpc.aio.AioRpcError:
            await client.close()
            return None
    return await eventually(up, timeout=30, interval=0.1, what='sfcontrol serving')


def percentile(values, p):
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class LoadClient:
    def __init__(self, n, client, node, latencies, rng):
        self.n = n
        self.c = client
        self.node = node
        self.latencies = latencies
        self.rng = rng
        self.mine: list[str] = []
        self.md = 0

    async def timed(self, kind, method, request):
        t = time.perf_counter()
        try:
            resp = await method(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise AssertionError(f'{kind} failed: {e.code().name}: {e.details()}') from None
        self.latencies[kind].append(time.perf_counter() - t)
        return resp

    async def run(self):
        i = self.c.instances
        for k in range(CREATES):
            resp = await self.timed('create', i.CreateInstance, create_request(
                f'load-{self.n}-{k}', memory=64, request_id=f'load-{self.n}-{k}'))
            self.mine.append(resp.instance.uuid)

        for made in self.mine:      # the node reports each one created (not timed)
            await asyncio.wait_for(self.node.created[made].wait(), 60)

        plan = [kind for kind, count in MIX.items() for _ in range(count)]
        self.rng.shuffle(plan)
        for kind in plan:
            await getattr(self, kind)(kind, self.rng.choice(self.mine))

    async def get(self, kind, uuid):
        r = await self.timed(kind, self.c.instances.GetInstance, api.GetInstanceRequest(instance_ref=uuid))
        assert r.instance.uuid == uuid

    async def list(self, kind, uuid):
        r = await self.timed(kind, self.c.instances.ListInstances, api.ListInstancesRequest(page_size=100))
        assert len(r.instances) > 0

    async def events(self, kind, uuid):
        r = await self.timed(kind, self.c.instances.ListInstanceEvents,
                             api.ListInstanceEventsRequest(instance_ref=uuid, limit=20))
        assert r.events

    async def metadata_set(self, kind, uuid):
        self.md += 1
        value = struct_pb2.Value(string_value=f'v{self.md}')
        await self.timed(kind, self.c.instances.SetInstanceMetadata, api.SetInstanceMetadataRequest(
            instance_ref=uuid, key=f'k{self.md % 3}', value=value,
            request_id=f'md-{self.n}-{self.md}'))

    async def metadata_get(self, kind, uuid):
        await self.timed(kind, self.c.instances.GetInstanceMetadata,
                         api.GetInstanceMetadataRequest(instance_ref=uuid))

    async def power_off(self, kind, uuid):
        await self.timed(kind, self.c.instances.PowerOffInstance,
                         api.PowerOffInstanceRequest(instance_ref=uuid))

    async def power_on(self, kind, uuid):
        await self.timed(kind, self.c.instances.PowerOnInstance,
                         api.PowerOnInstanceRequest(instance_ref=uuid))


async def test_mixed_load_of_50_clients(controller_process, tmp_path):
    proc, target, key_file, node_api = controller_process
    system = await serving(proc, target, key_file, tmp_path / 'sfcontrol.log')
    node = await NodeDouble(node_api, cpus=10_000, memory_mib=10_000_000, disk_gib=100_000,
                            heartbeat_every=1.0).start()   # reachable for the whole run
    clients = []
    for _ in range(CLIENTS):
        c = Client(target)
        c.token = system.token
        clients.append(c)
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    try:
        t0 = time.perf_counter()
        workers = [LoadClient(n, c, node, latencies, random.Random(n)) for n, c in enumerate(clients)]
        results = await asyncio.gather(*(w.run() for w in workers), return_exceptions=True)
        elapsed = time.perf_counter() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f'{len(errors)} clients failed: {collections.Counter(map(str, errors))}'
        node.check()
        # What the clients did is what the controller holds.
        listing = await system.instances.ListInstances(api.ListInstancesRequest(page_size=1000))
        listing_size = len(listing.instances)
        created = sum(i.state == instance_pb2.INSTANCE_STATE_CREATED for i in listing.instances)
    finally:
        for c in clients:
            await c.close()
        await node.stop()
        await system.close()

    total = sum(len(v) for v in latencies.values())
    assert total == CLIENTS * (CREATES + sum(MIX.values())) == 2000
    assert listing_size == CLIENTS * CREATES
    assert created == CLIENTS * CREATES

    summary = {
        'clients': CLIENTS, 'operations': total, 'seconds': round(elapsed, 2),
        'operations_per_second': round(total / elapsed, 1),
        'latency_ms': {kind: {'count': len(v), 'p50': round(percentile(v, 50) * 1000, 2),
                              'p99': round(percentile(v, 99) * 1000, 2),
                              'mean': round(statistics.mean(v) * 1000, 2)}
                       for kind, v in sorted(latencies.items())},
    }
    (tmp_path / 'latency.json').write_text(json.dumps(summary, indent=2) + '\n')
    print(f'\n{total} operations by {CLIENTS} clients in {elapsed:.1f}s '
          f'({total / elapsed:.0f}/s); written to {tmp_path / "latency.json"}')
    print(f'{"operation":<14}{"count":>7}{"p50 ms":>10}{"p99 ms":>10}')
    for kind, s in summary['latency_ms'].items():
        print(f'{kind:<14}{s["count"]:>7}{s["p50"]:>10.1f}{s["p99"]:>10.1f}')


async def test_concurrent_creates_contending_for_one_node_all_get_an_answer(controller, system, node_api):
    """60 creates at once for a node with room for 50: every create checks the node's
    record, so all but one conflict on each round. Exactly 50 are created and 10 refused
    RESOURCE_EXHAUSTED; none gives up with UNAVAILABLE ("conflicted too often"), as 22 of
    50 did before conflicting retries were queued within the controller (Core.mutate)."""
    node = await NodeDouble(node_api, cpus=50, memory_mib=50 * 64, disk_gib=50).start()
    clients = []
    for _ in range(60):
        c = Client(f'127.0.0.1:{controller.port}')
        c.token = system.token
        clients.append(c)

    async def one(n, c):
        try:
            await c.instances.CreateInstance(create_request(f'c{n}', memory=64), timeout=CALL_TIMEOUT)
            return 'created'
        except grpc.aio.AioRpcError as e:
            return e.code().name
    try:
        outcome = collections.Counter(await asyncio.gather(*(one(n, c) for n, c in enumerate(clients))))
    finally:
        for c in clients:
            await c.close()
        await node.stop()
    assert outcome == {'created': 50, 'RESOURCE_EXHAUSTED': 10}, outcome
