"""Prometheus metrics: a real controller (on the tests' etcd) and gateway in this process,
and a real node on libvirt's test driver, scraped over HTTP as Prometheus would.

The registry is the process's, shared by every test in it, so each assertion compares
a scrape after the action with one before it."""

import asyncio
import uuid

import aiohttp
import grpc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from sfcommon.metrics import start_metrics_server
from sfcontrol import server
from sfcontrol.store.etcd import Txn
from sfnode.libvirt.hypervisor import Hypervisor
from sfnode.node import Node, NodeConfig
from sfup.nodes import TEST_IMAGE
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import event_pb2
from shakenfist.v1 import event_service_pb2 as ev
from shakenfist.v1 import instance_pb2 as pb
from shakenfist.v1 import instance_service_pb2 as api
from tests.conftest import controller_config, system_key
from tests.helpers import create, create_request, network, raises, wait_state
from tests.waiting import eventually

INSTANCE_SERVICE = 'shakenfist.v1.InstanceService'


class Scrape:
    """One scrape: sample values by name and labels."""

    def __init__(self, text: str):
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels) -> float:
        """The sum of the samples called name whose labels include labels (0 if none)."""
        return sum(s.value for s in self.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200, r.status
        assert r.headers['Content-Type'].startswith('text/plain'), r.headers['Content-Type']
        return Scrape(await r.text())


@pytest_asyncio.fixture
async def controller(etcd, tmp_path):
    """The test's controller, serving its metrics on a port of its own (this overrides
    conftest's, so that system, node and gateway use it)."""
    ctl = await server.start(controller_config(etcd, tmp_path, metrics_listen='127.0.0.1:0'))
    yield ctl
    await ctl.stop(None)


@pytest_asyncio.fixture
async def rest(gateway, tmp_path):
    """An HTTP session on the gateway, logged in as the system namespace."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f'{gateway}/auth', json={
                'namespace': 'system', 'key': system_key(tmp_path)}) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())['access_token']
        session.headers['Authorization'] = f'Bearer {token}'
        yield session


def grpc_handled(s: Scrape, method: str, code: str, service=INSTANCE_SERVICE) -> float:
    return s.value('grpc_server_handled_total', grpc_service=service, grpc_method=method,
                   grpc_code=code)


async def test_requests_through_the_gateway_are_counted_by_route_method_and_code(
        controller, gateway, rest):
    url = controller.metrics.url
    before = await scrape(url)
    async with rest.get(f'{gateway}/instances') as r:
        assert r.status == 200
    async with rest.get(f'{gateway}/instances/no-such-instance') as r:
        assert r.status == 404
    async with rest.get(f'{gateway}/no/such/route') as r:
        assert r.status == 404
    after = await scrape(url)

    # The controller: by gRPC method and status code, with latency.
    assert grpc_handled(after, 'ListInstances', 'OK') == grpc_handled(before, 'ListInstances', 'OK') + 1
    assert grpc_handled(after, 'GetInstance', 'NOT_FOUND') == \
        grpc_handled(before, 'GetInstance', 'NOT_FOUND') + 1
    assert grpc_handled(after, 'GetInstance', 'OK') == grpc_handled(before, 'GetInstance', 'OK')
    assert grpc_handled(after, 'CreateToken', 'OK', 'shakenfist.v1.AuthService') >= 1
    count = 'grpc_server_handling_seconds_count'
    assert after.value(count, grpc_method='GetInstance', grpc_type='unary') == \
        before.value(count, grpc_method='GetInstance', grpc_type='unary') + 1

    # The gateway: by route template (not the path), method and HTTP status.
    def gateway_requests(s, route, status):
        return s.value('sf_gateway_requests_total', route=route, method='GET', status=status)
    assert gateway_requests(after, '/instances/{instance_ref}', '404') == \
        gateway_requests(before, '/instances/{instance_ref}', '404') + 1
    assert gateway_requests(after, '/instances', '200') == gateway_requests(before, '/instances', '200') + 1
    assert gateway_requests(after, '(unmatched)', '404') == gateway_requests(before, '(unmatched)', '404') + 1
    assert not any(s.labels.get('route') == '/instances/no-such-instance' for s in after.samples)
    duration = 'sf_gateway_request_duration_seconds_count'
    assert after.value(duration, route='/instances/{instance_ref}', method='GET') == \
        before.value(duration, route='/instances/{instance_ref}', method='GET') + 1


async def test_the_gateway_serves_metrics_on_its_rest_port_without_a_token(controller, gateway):
    first = await scrape(f'{gateway}/metrics')
    second = await scrape(f'{gateway}/metrics')
    assert first.has('sf_gateway_requests_total') and first.has('grpc_server_handled_total')
    # The scrape itself is a request of the route /metrics.
    assert second.value('sf_gateway_requests_total', route='/metrics', status='200') == \
        first.value('sf_gateway_requests_total', route='/metrics', status='200') + 1
    async with aiohttp.ClientSession() as session, session.post(f'{gateway}/metrics') as r:
        assert r.status == 405


async def test_store_transactions_and_instances_by_state(controller, system, node):
    url = controller.metrics.url
    before = await scrape(url)
    net = await network(system, 'metrics-net', '10.91.0.0/24')
    inst = await create(system, 'counted', networks=[net.uuid])
    await wait_state(system, inst.uuid, pb.INSTANCE_STATE_CREATED)
    after = await scrape(url)
    txns = 'sf_controller_store_transactions_total'
    assert after.value(txns, outcome='committed') >= before.value(txns, outcome='committed') + 2
    assert after.value('sf_controller_store_transaction_seconds_count') > \
        before.value('sf_controller_store_transaction_seconds_count')
    instances = 'sf_controller_instances'
    assert after.value(instances, state='created') == before.value(instances, state='created') + 1
    assert after.value(instances, state='deleted') == before.value(instances, state='deleted')

    # A transaction whose check fails is a conflict.
    ok, _ = await controller.core.store.commit(Txn().check_revision('metrics-test', 12345)
                                               .put('metrics-test', b'x'))
    assert not ok
    conflicted = await scrape(url)
    assert conflicted.value(txns, outcome='conflict') == after.value(txns, outcome='conflict') + 1
    assert conflicted.value(txns, outcome='committed') == after.value(txns, outcome='committed')

    # A failing request: a second network of the same name.
    async with raises(grpc.StatusCode.ALREADY_EXISTS):
        await network(system, 'metrics-net', '10.92.0.0/24')
    refused = await scrape(url)
    assert grpc_handled(refused, 'CreateNetwork', 'ALREADY_EXISTS', 'shakenfist.v1.NetworkService') == \
        grpc_handled(after, 'CreateNetwork', 'ALREADY_EXISTS', 'shakenfist.v1.NetworkService') + 1

    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    await wait_state(system, inst.uuid, pb.INSTANCE_STATE_DELETED)
    gone = await scrape(url)
    assert gone.value(instances, state='created') == before.value(instances, state='created')
    assert gone.value(instances, state='deleted') == before.value(instances, state='deleted') + 1


async def test_open_watches_are_counted_while_open(controller, system, node):
    url = controller.metrics.url
    open_ = 'sf_controller_watches_open'

    async def watches(kind):
        return (await scrape(url)).value(open_, kind=kind)
    # The node double follows its desired state: one feed.
    assert await watches('node_desired_state') >= 1
    before = await watches('events')
    inst = await create(system, 'watched')
    stream = system.events.WatchEvents(ev.WatchEventsRequest(
        object_type=event_pb2.OBJECT_TYPE_INSTANCE, object_ref=inst.uuid))
    await stream.read()         # the first message: the watch is set up
    assert await watches('events') == before + 1
    stream.cancel()

    async def closed():
        return await watches('events') == before
    await eventually(closed, 10, what='the watch counted as closed')
    handled = (await scrape(url)).value('grpc_server_handled_total', grpc_method='WatchEvents',
                                        grpc_type='server_stream', grpc_code='CANCELLED')
    assert handled >= 1


async def test_the_metrics_server_serves_only_metrics_and_refuses_a_port_in_use(controller):
    other = controller.metrics.url.replace('/metrics', '/other')
    async with aiohttp.ClientSession() as session, session.get(other) as r:
        assert r.status == 404
    with pytest.raises(OSError):
        await start_metrics_server(f'127.0.0.1:{controller.metrics.port}')


# -- the node --------------------------------------------------------------------------

async def start_node(controller, pki, tmp_path, name):
    """A real node on libvirt's test driver (as tests/test_sfnode_node.py), with metrics."""
    state = tmp_path / name
    hv = await Hypervisor.connect(str(state), 'test:///default')
    config = NodeConfig(
        name=name, controller=f'127.0.0.1:{controller.node_port}', pki=pki.node(name),
        state_dir=state, libvirt_uri='test:///default', console_listen='127.0.0.1',
        bridge_prefix=f'sfm{uuid.uuid4().hex[:4]}-', extra_images={'sftest': TEST_IMAGE.as_uri()},
        capacity=node_pb2.NodeCapacity(cpus=64, memory_mib=65536, disk_gib=1000),
        usage_interval=0, domain_type='qemu', metrics_listen='127.0.0.1:0')
    node = await Node(config, hv).start()
    await asyncio.wait_for(node.synced.wait(), 30)
    return node, hv



async def test_node_metrics_convergence_power_states_and_its_calls(controller, pki, tmp_path, system):
    node, hv = await start_node(controller, pki, tmp_path, 'tm1')
    try:
        url = node.metrics.url
        before = await scrape(url)
        assert before.value('grpc_client_handled_total', grpc_method='RegisterNode', grpc_code='OK') >= 1
        inst = (await system.instances.CreateInstance(create_request('converged', placed_on='tm1'))).instance
        await wait_state(system, inst.uuid, pb.INSTANCE_STATE_CREATED, timeout=30)

        def by_power(s, state):
            return s.value('sf_node_instances', node='tm1', power_state=state)

        count = 'sf_node_convergence_seconds_count'

        async def built():
            s = await scrape(url)
            return s if s.value(count, kind='build') == before.value(count, kind='build') + 1 else None
        on = await eventually(built, 10, what='the build timed')
        assert by_power(on, 'on') == 1
        assert on.value('sf_node_convergence_seconds_sum', kind='build') > \
            before.value('sf_node_convergence_seconds_sum', kind='build')
        assert on.value('grpc_client_handled_total', grpc_method='ReportInstanceStatus', grpc_code='OK') > \
            before.value('grpc_client_handled_total', grpc_method='ReportInstanceStatus', grpc_code='OK')

        # A change to it: power off.
        await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref=inst.uuid))

        async def updated():
            s = await scrape(url)
            timed = s.value(count, kind='update') > on.value(count, kind='update')
            return s if timed and by_power(s, 'off') == 1 else None
        off = await eventually(updated, 10, what='the power-off timed')
        assert by_power(off, 'on') == 0

        await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
        await wait_state(system, inst.uuid, pb.INSTANCE_STATE_DELETED, timeout=30)

        async def removed():
            s = await scrape(url)
            return s if s.value(count, kind='remove') == off.value(count, kind='remove') + 1 else None
        gone = await eventually(removed, 10, what='the removal timed')
        assert by_power(gone, 'off') == 0 and by_power(gone, 'on') == 0
    finally:
        await node.stop(stop_guests=True)
        hv.close()
    # A stopped node is no longer reported, and its port is closed.
    assert not any(s.labels.get('node') == 'tm1' for s in (await scrape(controller.metrics.url)).samples)
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(url)
