"""Calls from the controller to a node's NodeService, with deadlines.

Over mutual TLS: the controller presents its certificate, and the node must
present the one the cluster CA issued for its name (checked as the TLS server
name <name>.node.shakenfist, whatever address it registered).
"""

import grpc

from sfcommon import errors, pki
from sfcontrol.store import keys
from sfcontrol.store.cache import ObjectCache
from shakenfist.node.v1alpha1 import node_pb2_grpc

DEFAULT_TIMEOUT = 30.0


class NodeClients:
    def __init__(self, cache: ObjectCache, bundle: pki.Bundle | None):
        self._cache = cache
        self._credentials = None
        if bundle is not None:
            ca, cert, key = bundle.read()
            self._credentials = grpc.ssl_channel_credentials(ca, key, cert)
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    def _stub(self, node_name: str) -> node_pb2_grpc.NodeServiceStub:
        entry = self._cache.get(keys.node(node_name))
        if entry is None:
            raise errors.Unavailable(f'node {node_name} is not registered')
        if entry.value.unreachable:
            raise errors.Unavailable(f'node {node_name} is unreachable')
        address = entry.value.address
        known = self._channels.get(node_name)
        if known is None or known[0] != address:
            if self._credentials is None:
                raise errors.Unavailable('this controller has no certificate to call nodes with')
            channel = grpc.aio.secure_channel(address, self._credentials, options=[
                ('grpc.ssl_target_name_override', pki.node_server_name(node_name))])
            self._channels[node_name] = (address, channel)
        return node_pb2_grpc.NodeServiceStub(self._channels[node_name][1])

    async def call(self, node_name: str, method: str, request, timeout: float = DEFAULT_TIMEOUT):
        """Call method on the node; its ApiErrors pass through, other failures are UNAVAILABLE."""
        stub = self._stub(node_name)
        try:
            return await getattr(stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._translated(node_name, method, e) from None

    @staticmethod
    def _translated(node_name, method, e: grpc.aio.AioRpcError) -> errors.ApiError:
        """The node's ApiError as it sent it; other failures as StateConflict or UNAVAILABLE."""
        carried = errors.from_rpc_error(e)
        if carried is not None:
            return carried
        if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.FAILED_PRECONDITION):
            return errors.StateConflict(f'node {node_name}: {e.details()}')
        return errors.Unavailable(f'node {node_name} did not answer {method}: {e.code().name}')

    async def stream(self, node_name: str, method: str, request):
        """A streaming call to the node (request: a message, or an async iterator of them
        for a client stream): yields its messages, failures translated as call's."""
        call = getattr(self._stub(node_name), method)(request)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as e:
            raise self._translated(node_name, method, e) from None
        finally:
            call.cancel()

    async def close(self):
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
