"""The error model: one class per schema reason, carried across a real gRPC call."""

import grpc
import pytest

from sfcommon import errors
from sfnode.libvirt import errors as hv_errors
from shakenfist.v1 import errors_pb2
from shakenfist.v1 import server_service_pb2 as server_svc
from shakenfist.v1 import server_service_pb2_grpc as server_grpc


def test_every_reason_has_its_class():
    reasons = {v.number for v in errors_pb2.ErrorReason.DESCRIPTOR.values} - {0}
    assert set(errors.BY_REASON) == reasons
    for reason, cls in errors.BY_REASON.items():
        assert cls('x').reason == reason
        assert errors_pb2.ErrorReason.Name(reason) == 'ERROR_REASON_' + cls('x').reason_name


def test_hypervisor_errors_are_their_reason():
    assert isinstance(hv_errors.DomainNotFound('gone'), errors.NotFound)
    assert hv_errors.DomainNotFound('gone').code == grpc.StatusCode.NOT_FOUND
    assert hv_errors.InvalidDomainState('no').reason_name == 'STATE_CONFLICT'
    assert hv_errors.HypervisorError('boom').reason_name == 'INTERNAL'


class _Failing(server_grpc.ServerServiceServicer):
    def __init__(self, error):
        self.error = error

    @errors.reported
    async def GetCapabilities(self, request, context):
        raise self.error


@pytest.fixture
async def call():
    async def failing_with(error):
        server = grpc.aio.server()
        server_grpc.add_ServerServiceServicer_to_server(_Failing(error), server)
        port = server.add_insecure_port('127.0.0.1:0')
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f'127.0.0.1:{port}') as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await server_grpc.ServerServiceStub(channel).GetCapabilities(
                        server_svc.GetCapabilitiesRequest())
                return e.value
        finally:
            await server.stop(None)
    return failing_with


@pytest.mark.parametrize('cls', sorted(errors.BY_REASON.values(), key=lambda c: c.reason))
async def test_each_class_crosses_the_wire_as_itself(call, cls):
    err = await call(cls('it failed', instance='i-1'))
    assert err.code() == cls('x').code
    carried = errors.from_rpc_error(err)
    assert type(carried) is cls
    assert carried.message == 'it failed' and carried.metadata == {'instance': 'i-1'}


async def test_an_unexpected_exception_is_internal_without_its_text(call):
    err = await call(RuntimeError('secret path /etc/x'))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert 'secret' not in err.details()
    assert isinstance(errors.from_rpc_error(err), errors.Internal)


async def test_a_bare_status_carries_no_error(call):
    class Bare(server_grpc.ServerServiceServicer):
        async def GetCapabilities(self, request, context):
            await context.abort(grpc.StatusCode.NOT_FOUND, 'plain')

    server = grpc.aio.server()
    server_grpc.add_ServerServiceServicer_to_server(Bare(), server)
    port = server.add_insecure_port('127.0.0.1:0')
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f'127.0.0.1:{port}') as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await server_grpc.ServerServiceStub(channel).GetCapabilities(server_svc.GetCapabilitiesRequest())
        assert errors.from_rpc_error(e.value) is None
    finally:
        await server.stop(None)
