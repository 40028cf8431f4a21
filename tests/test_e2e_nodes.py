"""End to end with three real nodes: placement across them, and a node killed
with SIGKILL in the middle of creates, then restarted."""

import os
import re
import signal
import subprocess

import pytest
import pytest_asyncio

from sfcommon.pki import LocalPki
from sfup.nodes import node_command
from sfup.underlay import Underlay
from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api, specs_pb2
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
            for pid in plane.node_pids('node0'):
                os.kill(pid, signal.SIGKILL)
    # Restart it the way sf-up started it.
    log = open(plane.state / 'node0-restart.log', 'ab')
    command = node_command(0, plane.state, LocalPki(plane.state / 'pki'), plane.endpoints['node_api'],
                           '127.0.0.1', underlay=Underlay(plane.state, 3).nodes[0])
    proc = subprocess.Popen(command, stdout=log,
                            stderr=log, env={**os.environ, 'SF_NODE_DOMAIN_TYPE': 'qemu'},
                            start_new_session=True)
    try:
        await all_created(client, uuids)
        running = domains()
        wrong = {u: running.get(u, 0) for u in uuids if running.get(u) != 1}
        assert not wrong, f'QEMU processes per instance, where not one: {wrong}'
        ours = {u for u in running if (plane.state / 'nodes' / 'node0' / 'instances' / u).exists()}
        assert ours == set(uuids), 'an orphan or missing domain on node0'
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
