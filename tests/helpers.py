"""Small helpers for controller tests."""

import asyncio
import contextlib

import grpc
import pytest

from sfcommon import errors
from sfcommon.clock import ManualClock  # noqa: F401 -- tests take it from here
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api, network_service_pb2 as net
from shakenfist.v1 import event_service_pb2 as ev
from shakenfist.v1 import specs_pb2
from tests.waiting import eventually


def disk(size=1, base='sftest', **kw):
    return specs_pb2.DiskSpec(size=size, base=base, **kw)


def create_request(name='inst1', cpus=1, memory=256, networks=(), **kw):
    kw.setdefault('disk', [disk()])
    kw.setdefault('network', [specs_pb2.NetworkSpec(network_uuid=n) for n in networks])
    return api.CreateInstanceRequest(name=name, cpus=cpus, memory=memory, **kw)


async def create(client, name='inst1', **kw):
    return (await client.instances.CreateInstance(create_request(name, **kw))).instance


async def get(client, ref):
    return (await client.instances.GetInstance(api.GetInstanceRequest(instance_ref=ref))).instance


async def wait_state(client, ref, state, timeout=10.0):
    async def check():
        return (await get(client, ref)).state == state
    await eventually(check, timeout, what=f'{ref} in {instance_pb2.InstanceState.Name(state)}')


async def create_created(client, name='inst1', **kw):
    inst = await create(client, name, **kw)
    await wait_state(client, inst.uuid, instance_pb2.INSTANCE_STATE_CREATED)
    return await get(client, inst.uuid)


async def network(client, name='net1', netblock='10.0.0.0/24', **kw):
    return (await client.networks.CreateNetwork(net.CreateNetworkRequest(
        name=name, netblock=netblock, **kw))).network


class Raises:
    """`async with raises(grpc.StatusCode.X, 'REASON'):` checks code, ErrorInfo reason and message."""

    def __init__(self, code, reason=None, match=None):
        self.code, self.reason, self.match = code, reason, match
        self.error = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if exc is None:
            pytest.fail(f'expected {self.code.name}, but the call succeeded')
        if not isinstance(exc, grpc.aio.AioRpcError):
            return False
        assert exc.code() == self.code, f'{exc.code().name}: {exc.details()}'
        if self.reason:
            carried = errors.from_rpc_error(exc)
            assert carried is not None and carried.reason_name == self.reason, carried
        if self.match:
            assert self.match in exc.details(), exc.details()
        assert 'Traceback' not in (exc.details() or '')
        self.error = exc
        return True


raises = Raises


@contextlib.asynccontextmanager
async def watching(client, object_type):
    """The events of object_type from now on, appended to the list this yields as they come."""
    seen = []
    call = client.events.WatchEvents(ev.WatchEventsRequest(object_type=object_type))

    async def collect():
        async for r in call:
            seen.append(r.event)
    task = asyncio.create_task(collect())
    await call.wait_for_connection()
    try:
        yield seen
    finally:
        task.cancel()
        call.cancel()

