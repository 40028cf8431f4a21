"""An idle plane makes no etcd requests (but its blob-holder lease keepalive); grpcurl works through reflection."""

import asyncio
import json
import pathlib
import sys
import time

from sfcontrol import server
from tests.helpers import create_created

GRPCURL = str(pathlib.Path(sys.executable).parent / 'grpcurl')


async def test_an_idle_plane_makes_no_etcd_requests(system, node, controller):
    for i in range(50):
        await create_created(system, f'idle{i}', memory=64)
    before = dict(controller.core.store.requests)
    # Observe a 5 s window in which only heartbeats arrive (they cost nothing in etcd).
    window = 5
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        await node.heartbeat()
        await asyncio.sleep(1)
    after = dict(controller.core.store.requests)
    made = {kind: n - before.get(kind, 0) for kind, n in after.items() if n != before.get(kind, 0)}
    # The one exception: the controller keeps its blob-holder lease alive (its liveness
    # for the other controllers), every third of the lease's TTL.
    keepalives = made.pop('lease_keepalive', 0)
    assert made == {}
    assert keepalives <= window // (server.Config.blob_holder_ttl / 3) + 1


async def grpcurl(*args):
    proc = await asyncio.create_subprocess_exec(GRPCURL, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_grpcurl_lists_describes_and_invokes_through_reflection(system, node, controller):
    target = f'127.0.0.1:{controller.port}'
    rc, out, err = await grpcurl('-plaintext', target, 'list')
    assert rc == 0, err
    services = out.split()
    for name in ('shakenfist.v1.InstanceService', 'shakenfist.v1.EventService',
                 'grpc.health.v1.Health', 'shakenfist.node.v1alpha1.NodeControlService'):
        assert name in services
    rc, out, err = await grpcurl('-plaintext', target, 'describe', 'shakenfist.v1.InstanceService')
    assert rc == 0 and 'post:"/instances"' in out, out + err
    rc, out, err = await grpcurl('-plaintext', target, 'describe', 'shakenfist.v1.CreateInstanceRequest')
    assert 'request_id' in out and 'side_channels' in out
    await create_created(system)
    rc, out, err = await grpcurl('-plaintext', '-H', f'authorization: Bearer {system.token}',
                                 '-d', '{"all": true}', target, 'shakenfist.v1.InstanceService/ListInstances')
    assert rc == 0, err
    listed = json.loads(out)
    assert [i['name'] for i in listed['instances']] == ['inst1']
    rc, out, err = await grpcurl('-plaintext', '-d', '{}', target, 'shakenfist.v1.InstanceService/ListInstances')
    assert rc == 64 + 16 and 'Unauthenticated' in err
