"""Fault injection: creates keep flowing through a controller restart, an etcd restart,
two controllers sharing one etcd, and the loss of one member of a 3-member etcd cluster.

Clients retry with a request_id (AIP-155) on UNAVAILABLE and the like, as a real client
must. Afterwards each request_id made exactly one instance, every create a client saw
acknowledged exists, nodes are not overbooked, and the controller's cache agrees with
etcd (and with a fresh controller on the same prefix).
"""

import asyncio
import collections
import time

import grpc
import pytest
import pytest_asyncio

from sfup.etcd import EtcdServer, start_all_async
from sfcontrol.store.etcd import Store
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import instance_pb2
from shakenfist.v1 import instance_service_pb2 as api
from tests.conftest import controller_config
from tests.helpers import create_request
from tests.local_plane import LocalPlane
from tests.node_double import FAULT_BUDGET, retrying
from tests.waiting import eventually

C = grpc.StatusCode
S = instance_pb2
CLIENTS = 4

pytestmark = pytest.mark.timeout(120)


# -- the plane ------------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def make_plane(pki):
    planes = []

    def make(config):
        planes.append(LocalPlane(config, pki))
        return planes[-1]
    yield make
    for p in planes:
        await p.stop()


# -- the load and what must hold after it ------------------------------------------------------------

class Creates:
    """Client tasks, each making instances one after another until finish(), every create
    with a request_id of its own (also the instance's name), retried until acknowledged."""

    def __init__(self, clients, tag='c', **size):
        self.clients = clients
        self.tag = tag
        self.size = size or {'memory': 64}
        self.request_ids: set[str] = set()             # every request_id sent
        self.acked: dict[str, str] = {}                 # request_id -> uuid in the response
        self.retries: collections.Counter[str] = collections.Counter()
        self.tasks = []
        self._stopping = False

    def start(self):
        self.tasks = [asyncio.create_task(self._client(i, c)) for i, c in enumerate(self.clients)]
        return self

    async def _client(self, i, client):
        n = 0
        while not self._stopping:
            rid = f'{self.tag}{i}-{n}'
            n += 1
            self.request_ids.add(rid)
            resp = await retrying(client.instances.CreateInstance,
                                  create_request(rid, request_id=rid, **self.size), self.retries)
            assert resp.instance.name == rid
            self.acked[rid] = resp.instance.uuid

    async def acknowledged(self, more, what):
        """Wait until `more` creates more than now are acknowledged."""
        n = len(self.acked) + more
        await eventually(lambda: self._alive() and len(self.acked) >= n, timeout=30,
                         what=f'{more} more creates acknowledged {what}')

    def _alive(self):
        for t in self.tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        return True

    async def finish(self):
        """Stop after the creates in flight; each request_id sent was acknowledged."""
        self._stopping = True
        await asyncio.wait_for(asyncio.gather(*self.tasks), FAULT_BUDGET + 10)
        assert set(self.acked) == self.request_ids


async def instances_in_etcd(store: Store) -> dict[str, list[instance_pb2.Instance]]:
    by_name = collections.defaultdict(list)
    for _, value, _ in await store.get_prefix('instances/'):
        inst = instance_pb2.Instance.FromString(value)
        by_name[inst.name].append(inst)
    return by_name


async def check_outcome(store: Store, creates: Creates, nodes):
    """One instance per request_id, each acknowledged create exists with the uuid its
    client was told, each has one placement, and no node is overbooked."""
    by_name = await instances_in_etcd(store)
    mine = {name: insts for name, insts in by_name.items() if name in creates.request_ids}
    duplicates = {name: [i.uuid for i in insts] for name, insts in mine.items() if len(insts) != 1}
    assert not duplicates, f'request_ids that made more than one instance: {duplicates}'
    lost = {rid: uuid for rid, uuid in creates.acked.items()
            if rid not in mine or mine[rid][0].uuid != uuid}
    assert not lost, f'acknowledged creates not in etcd (or with another uuid): {lost}'
    await check_placements(store, nodes)


async def check_placements(store: Store, nodes):
    """Every instance placed once; each node's allocation is the sum of its placements
    and within its capacity."""
    placements = collections.defaultdict(list)
    per_node = collections.defaultdict(lambda: [0, 0, 0])
    for key, value, _ in await store.get_prefix('placements/'):
        _, node_name, uuid = key.split('/')
        size = records_pb2.Placement.FromString(value).size
        placements[uuid].append(node_name)
        used = per_node[node_name]
        used[0] += size.cpus
        used[1] += size.memory_mib
        used[2] += size.disk_gib
    live = {i.uuid for insts in (await instances_in_etcd(store)).values() for i in insts
            if i.state not in (S.INSTANCE_STATE_DELETED, S.INSTANCE_STATE_ERROR)}
    assert set(placements) == live
    assert all(len(where) == 1 for where in placements.values()), placements
    for key, value, _ in await store.get_prefix('nodes/'):
        record = records_pb2.NodeRecord.FromString(value)
        used, cap, alloc = per_node[record.name], record.capacity, record.allocated
        assert used == [alloc.cpus, alloc.memory_mib, alloc.disk_gib], (record.name, used, alloc)
        assert alloc.cpus <= cap.cpus and alloc.memory_mib <= cap.memory_mib \
            and alloc.disk_gib <= cap.disk_gib, f'{record.name} overbooked: {alloc} > {cap}'
    return placements, per_node


async def list_all(client) -> list[instance_pb2.Instance]:
    """Every instance (deleted ones too), page by page."""
    out, token = [], ''
    while True:
        page = await retrying(client.instances.ListInstances,
                              api.ListInstancesRequest(all=True, page_size=500, page_token=token))
        out.extend(page.instances)
        if not (token := page.next_page_token):
            return out


async def all_created(client, names, timeout=30):
    waiting = {}

    async def check():
        states = {i.name: i.state for i in await list_all(client) if i.name in names}
        waiting.clear()
        waiting.update({n: S.InstanceState.Name(states[n]) if n in states else 'missing'
                        for n in names if states.get(n) != S.INSTANCE_STATE_CREATED})
        return not waiting
    try:
        await eventually(check, timeout, interval=0.1, what='every instance created')
    except AssertionError as e:     # which, and where they stopped (a rare CI failure)
        raise AssertionError(f'{e}; not created: {waiting}') from None


def cached(ctl, prefix):
    return {e.key: (e.mod_revision, e.value.SerializeToString(deterministic=True))
            for e in ctl.core.cache.range(prefix)[0]}


async def in_etcd(store, prefix, kind):
    return {key: (mod, kind.FromString(value).SerializeToString(deterministic=True))
            for key, value, mod in await store.get_prefix(prefix)}


async def check_cache_agrees(plane: LocalPlane, ctl):
    """ctl's cache holds exactly what etcd holds (key, revision and value), and a fresh
    controller on the same prefix lists the same instances as ctl."""
    store = ctl.core.store
    kinds = [('instances/', instance_pb2.Instance), ('placements/', records_pb2.Placement),
             ('nodes/', records_pb2.NodeRecord)]

    async def agrees():
        now = (await store.get_prefix('', limit=1)).revision
        await ctl.core.cache.wait_for(now)
        for prefix, kind in kinds:
            if cached(ctl, prefix) != await in_etcd(store, prefix, kind):
                return False
        return True
    await eventually(agrees, timeout=10, interval=0.1, what='the cache agrees with etcd')

    fresh = await plane.start_controller()
    try:
        a, b = plane.client_of(ctl), plane.client_of(fresh)

        async def same():
            return (await list_all(a)) == (await list_all(b))
        await eventually(same, timeout=10, interval=0.1,
                         what='a fresh controller lists what the running one lists')
        assert len(await list_all(a)) > 0
    finally:
        await plane.stop_controller(fresh)


def report(what, creates, nodes, elapsed):
    node_retries = sum((n.retries for n in nodes), collections.Counter())
    print(f'\n{what}: {len(creates.acked)} creates in {elapsed:.1f}s; client retries '
          f'{dict(creates.retries)}; node re-watches {[n.rewatches for n in nodes]}, '
          f'node retries {dict(node_retries)}')


# -- 1. a controller restart ----------------------------------------------------------------------

async def test_creates_survive_a_controller_restart(etcd, tmp_path, make_plane):
    plane = make_plane(controller_config(etcd, tmp_path))
    ctl = await plane.start_controller()
    port, node_port = ctl.port, ctl.node_port
    node = await plane.node(ctl)
    t0 = time.monotonic()
    creates = Creates([plane.client_of(ctl) for _ in range(CLIENTS)]).start()
    await creates.acknowledged(2 * CLIENTS, 'before the restart')
    await plane.stop_controller(ctl)            # no grace: in-flight creates are cut off
    ctl = await plane.start_controller(port, node_port)    # same ports and prefix: clients reconnect
    await creates.acknowledged(2 * CLIENTS, 'after the restart')
    await creates.finish()
    elapsed = time.monotonic() - t0
    await all_created(plane.clients[0], creates.request_ids)
    node.check()
    assert node.rewatches >= 1, 'the node never lost its watch: no restart happened?'
    assert sum(creates.retries.values()) > 0, 'no client saw the restart'
    await check_outcome(ctl.core.store, creates, [node])
    await check_cache_agrees(plane, ctl)
    report('controller restart', creates, [node], elapsed)


# -- 2. an etcd restart ---------------------------------------------------------------------------

@pytest.mark.parametrize('how', ['restart', 'crash'])
async def test_creates_survive_an_etcd_restart(private_etcd, tmp_path, make_plane, how):
    """restart: SIGTERM and start again (restart_async); crash: SIGKILL, then start."""
    plane = make_plane(controller_config(private_etcd, tmp_path))
    ctl = await plane.start_controller()
    node = await plane.node(ctl)
    t0 = time.monotonic()
    creates = Creates([plane.client_of(ctl) for _ in range(CLIENTS)]).start()
    await creates.acknowledged(2 * CLIENTS, 'before the restart')
    before = ctl.core.store.requests['watch_create']
    if how == 'restart':
        await private_etcd.restart_async()
    else:
        private_etcd.kill()
        await private_etcd.start_async()
    await creates.acknowledged(2 * CLIENTS, 'after the restart')
    await creates.finish()
    elapsed = time.monotonic() - t0
    await all_created(plane.clients[0], creates.request_ids)
    node.check()
    assert ctl.core.store.requests['watch_create'] > before, 'the cache watch never reconnected'
    await check_outcome(ctl.core.store, creates, [node])
    await check_cache_agrees(plane, ctl)
    report(f'etcd {how}', creates, [node], elapsed)


# -- 3. two controllers on one etcd -----------------------------------------------------------------

async def test_two_controllers_never_overbook_a_node(etcd, tmp_path, make_plane):
    plane = make_plane(controller_config(etcd, tmp_path))
    a = await plane.start_controller()
    b = await plane.start_controller()
    per_node = 8                    # instances of 256 MiB on a node of 2 GiB
    nodes = [await plane.node(a, 'node-a', cpus=64, memory_mib=per_node * 256, disk_gib=1000),
             await plane.node(b, 'node-b', cpus=64, memory_mib=per_node * 256, disk_gib=1000)]
    capacity = per_node * len(nodes)
    attempts = 3 * capacity
    clients = [plane.client_of(a), plane.client_of(b)]
    retries = collections.Counter()

    async def one(i):
        rid = f'x{i}'
        try:
            resp = await retrying(clients[i % 2].instances.CreateInstance,
                                  create_request(rid, memory=256, request_id=rid), retries)
            return rid, resp.instance.uuid
        except grpc.aio.AioRpcError as e:
            assert e.code() == C.RESOURCE_EXHAUSTED, f'{rid}: {e.code().name}: {e.details()}'
            return rid, None
    outcome = dict(await asyncio.gather(*(one(i) for i in range(attempts))))
    made = {rid: uuid for rid, uuid in outcome.items() if uuid}
    assert len(made) == capacity, f'{len(made)} created on {capacity} slots'
    assert len(outcome) - len(made) == attempts - capacity    # the rest: RESOURCE_EXHAUSTED

    await all_created(clients[0], set(made))
    placements, used = await check_placements(a.core.store, nodes)
    assert set(placements) == set(made.values())
    assert all(used[n.name][1] == per_node * 256 for n in nodes), dict(used)
    # Each node was told of exactly its own instances, once each; no instance went to both.
    seen = [set(n.upserts) for n in nodes]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(made.values())
    assert all(count == 1 for n in nodes for count in n.upserts.values()), \
        [dict(n.upserts) for n in nodes]
    for n in nodes:
        n.check()
        assert set(n.upserts) == {u for u, where in placements.items() if where == [n.name]}
    for c in clients:                   # full, as seen through either controller
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.instances.CreateInstance(create_request('one-more', memory=256))
        assert e.value.code() == C.RESOURCE_EXHAUSTED
    await check_cache_agrees(plane, a)
    await check_cache_agrees(plane, b)
    print(f'\ntwo controllers: {len(made)} created, {attempts - len(made)} refused; '
          f'retries {dict(retries)}')


# -- 4. a 3-member etcd cluster losing a member --------------------------------------------------------

@pytest.fixture
def etcd_cluster(tmp_path, pki):
    members = EtcdServer.cluster(tmp_path / 'cluster', 3, pki=pki)
    yield members
    for m in members:
        m.stop()


async def answers(member, prefix):
    """The number of instances one member reports for prefix, by a linearizable read
    (served only by a member that is in the cluster and caught up)."""
    store = await Store.connect([member.endpoint], prefix=prefix, timeout=3, tls=member.client_tls)
    try:
        return await store.count('instances/')
    finally:
        await store.close()


async def test_creates_survive_losing_an_etcd_cluster_member(etcd_cluster, tmp_path, make_plane):
    await start_all_async(etcd_cluster)
    config = controller_config(etcd_cluster[0], tmp_path)
    config.etcd_endpoints = [m.endpoint for m in etcd_cluster]
    plane = make_plane(config)
    ctl = await plane.start_controller()
    node = await plane.node(ctl)
    t0 = time.monotonic()
    creates = Creates([plane.client_of(ctl) for _ in range(CLIENTS)]).start()
    await creates.acknowledged(2 * CLIENTS, 'before the first kill')
    # First the member the controller's channel is on (pick_first takes the first
    # endpoint): the store must fail over to another. Then the leader: an election.
    killed = []
    for victim in (etcd_cluster[0], None):
        if victim is None:
            victim = await eventually(
                lambda: next((m for m in etcd_cluster if m.is_leader()), None), timeout=10,
                what='a leader')
        killed.append(victim.name)
        victim.kill()
        assert not victim.healthy()
        await creates.acknowledged(2 * CLIENTS, f'with {victim.name} down')
        await victim.start_async()                  # rejoins with its data dir
        await creates.acknowledged(CLIENTS, f'after {victim.name} rejoined')
    await creates.finish()
    elapsed = time.monotonic() - t0
    await all_created(plane.clients[0], creates.request_ids)
    node.check()
    await check_outcome(ctl.core.store, creates, [node])

    # They rejoined: every member is healthy and serves a linearizable read of the same data.
    await eventually(lambda: all(m.healthy() for m in etcd_cluster), timeout=15,
                     what='all three members healthy')
    total = await ctl.core.store.count('instances/')
    counts = [await answers(m, config.store_prefix) for m in etcd_cluster]
    assert counts == [total] * 3
    # And creates still work.
    more = Creates([plane.client_of(ctl)], tag='after').start()
    await more.acknowledged(3, 'after the members rejoined')
    await more.finish()
    await check_cache_agrees(plane, ctl)
    report(f'etcd members killed ({", ".join(killed)})', creates, [node], elapsed)
