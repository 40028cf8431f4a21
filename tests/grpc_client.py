"""A gRPC client for tests: every stub of the public API on one channel, with a token."""

import grpc

from shakenfist.node.v1alpha1 import node_pb2_grpc
from shakenfist.v1 import (agent_operation_service_pb2_grpc, auth_service_pb2, blob_service_pb2_grpc,
                           auth_service_pb2_grpc, event_service_pb2_grpc,
                           instance_service_pb2_grpc, network_service_pb2_grpc,
                           server_service_pb2_grpc)


class _Token:
    """The token every call carries (grpc.aio sorts an interceptor into one kind only,
    so each kind below is its own object sharing this)."""

    def __init__(self):
        self.value = None

    def details(self, details):
        md = list(details.metadata or [])
        if self.value:
            md.append(('authorization', f'Bearer {self.value}'))
        return details._replace(metadata=md)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token):
        self.token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self.token.details(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token):
        self.token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self.token.details(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token):
        self.token = token

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self.token.details(details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token):
        self.token = token

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self.token.details(details), request_iterator)


class Client:
    def __init__(self, target: str):
        self._token = _Token()
        self.channel = grpc.aio.insecure_channel(target, interceptors=[
            _UnaryUnary(self._token), _UnaryStream(self._token), _StreamUnary(self._token),
            _StreamStream(self._token)])
        c = self.channel
        self.instances = instance_service_pb2_grpc.InstanceServiceStub(c)
        self.networks = network_service_pb2_grpc.NetworkServiceStub(c)
        self.interfaces = network_service_pb2_grpc.InterfaceServiceStub(c)
        self.agentops = agent_operation_service_pb2_grpc.AgentOperationServiceStub(c)
        self.auth = auth_service_pb2_grpc.AuthServiceStub(c)
        self.events = event_service_pb2_grpc.EventServiceStub(c)
        self.server = server_service_pb2_grpc.ServerServiceStub(c)
        self.node_control = node_pb2_grpc.NodeControlServiceStub(c)
        self.blobs = blob_service_pb2_grpc.BlobServiceStub(c)
        self.uploads = blob_service_pb2_grpc.UploadServiceStub(c)
        self.artifacts = blob_service_pb2_grpc.ArtifactServiceStub(c)

    @property
    def token(self):
        return self._token.value

    @token.setter
    def token(self, value):
        self._token.value = value

    async def login(self, namespace: str, key: str) -> 'Client':
        r = await self.auth.CreateToken(auth_service_pb2.CreateTokenRequest(namespace=namespace, key=key))
        self.token = r.access_token
        return self

    async def close(self):
        await self.channel.close()
