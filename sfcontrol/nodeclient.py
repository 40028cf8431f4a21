"""Calls from the controller to a node's NodeService, with deadlines."""

import grpc

from sfcommon import errors
from sfcontrol import keys
from sfcontrol.cache import ObjectCache
from shakenfist.node.v1alpha1 import node_pb2_grpc

DEFAULT_TIMEOUT = 30.0


class NodeClients:
    def __init__(self, cache: ObjectCache):
        self._cache = cache
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    def _stub(self, node_name: str) -> node_pb2_grpc.NodeServiceStub:
        entry = self._cache.get(keys.node(node_name))
        if entry is None:
            raise errors.unavailable(f'node {node_name} is not registered')
        if entry.value.unreachable:
            raise errors.unavailable(f'node {node_name} is unreachable')
        address = entry.value.address
        known = self._channels.get(node_name)
        if known is None or known[0] != address:
            self._channels[node_name] = (address, grpc.aio.insecure_channel(address))
        return node_pb2_grpc.NodeServiceStub(self._channels[node_name][1])

    async def call(self, node_name: str, method: str, request, timeout: float = DEFAULT_TIMEOUT):
        """Call method on the node; its ApiErrors pass through, other failures are UNAVAILABLE."""
        stub = self._stub(node_name)
        try:
            return await getattr(stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            carried = errors.from_rpc_error(e)
            if carried is not None:
                raise carried
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.FAILED_PRECONDITION):
                raise errors.conflict(f'node {node_name}: {e.details()}')
            raise errors.unavailable(f'node {node_name} did not answer {method}: {e.code().name}')

    async def close(self):
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
