"""End to end with three real nodes: placement across them, and a node killed
with SIGKILL in the middle of creates, which sf-up notices and starts again."""

import re
import subprocess

import pytest
import pytest_asyncio

from shakenfist.v1 import instance_pb2 as pb
from shakenfist.v1 import instance_service_pb2 as api
from shakenfist.v1 import specs_pb2
from tests.plane import Plane
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]


@pytest.fixture(scope='module')
def plane():
    p = Plane(nodes=3).start()
    yield p
    p.stop()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def client(plane):
    c = await plane.client()
    yield c
    await c.close()


def request(name, **kw):
    return api.CreateInstanceRequest(name=name, cpus=1, memory=128,
                                     disk=[specs_pb2.DiskSpec(size=1, base='sftest')], **kw)


def domains() -> dict[str, int]:
    """Running QEMU processes by instance uuid."""
    out = subprocess.run(['ps', '-eo', 'args'], capture_output=True, text=True).stdout
    found = {}
    for uuid in re.findall(r'guest=sf-([0-9a-f-]{36})', out):
        found[uuid] = found.get(uuid, 0) + 1
    return found


async def all_created(client, uuids, timeout=240):
    waiting = {}

    async def check():
        waiting.clear()
        for u in uuids:
            state = (await client.instances.GetInstance(api.GetInstanceRequest(instance_ref=u))).instance.state
            if state != pb.INSTANCE_STATE_CREATED:
                waiting[u] = pb.InstanceState.Name(state)
        return not waiting
    try:
        await eventually(check, timeout, interval=1, what='every instance created')
    except AssertionError as e:
        raise AssertionError(f'{e}; not created: {waiting}') from None


async def test_instances_spread_over_the_nodes_and_placed_on_is_honoured(client):
    placed = [(await client.instances.CreateInstance(request(f'spread{i}'))).instance for i in range(3)]
    assert sorted(i.node for i in placed) == ['node0', 'node1', 'node2']
    pinned = (await client.instances.CreateInstance(request('pinned', placed_on='node1'))).instance
    assert pinned.node == 'node1'
    await all_created(client, [i.uuid for i in placed + [pinned]])
    r = await client.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(confirm=True, namespace='system'))

    async def gone():
        for u in r.instance_uuids:
            i = (await client.instances.GetInstance(api.GetInstanceRequest(instance_ref=u))).instance
            if i.state != pb.INSTANCE_STATE_DELETED:
                return False
        return True
    await eventually(gone, 120, interval=1, what='all deleted')


async def test_a_node_killed_during_creates_recovers_them_all_without_duplicates(plane, client):
    uuids = []
    for i in range(20):
        r = await client.instances.CreateInstance(request(f'k{i}', placed_on='node0'))
        uuids.append(r.instance.uuid)
        if i == 9:
            killed = set(plane.node_pids('node0'))
            plane.kill_node('node0')
    # sf-up notices and starts it again, as it started it.
    await eventually(lambda: re.search(r'node0 killed by SIGKILL; restarting it in', plane.log_text()), 30,
                     interval=0.2, what='sf-up restarting node0')
    await all_created(client, uuids)
    [restarted] = plane.node_pids('node0')
    assert restarted not in killed
    running = domains()
    wrong = {u: running.get(u, 0) for u in uuids if running.get(u) != 1}
    log = (plane.state / 'node0.log').read_text(errors='replace') if wrong else ''
    assert not wrong, (f'QEMU processes per instance, where not one: {wrong}; node0 said of them:\n'
                       + '\n'.join(line for line in log.splitlines() if any(u in line for u in wrong))[-4000:])
    ours = {u for u in running if (plane.state / 'nodes' / 'node0' / 'instances' / u).exists()}
    assert ours == set(uuids), 'an orphan or missing domain on node0'
