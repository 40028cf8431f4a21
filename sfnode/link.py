"""The node's only connection: gRPC to the controller, authenticated as system.

Reports are retried until the controller takes them (with a capped backoff),
so a controller restart loses no observation. The token is renewed shortly
before it expires.
"""

import asyncio
import logging
import time

import grpc
import jwt

from shakenfist.node.v1alpha1 import node_pb2 as pb, node_pb2_grpc
from shakenfist.v1 import auth_service_pb2, auth_service_pb2_grpc

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNAUTHENTICATED}


class ControllerLink:
    def __init__(self, target: str, namespace: str, key: str, node_name: str):
        self.target = target
        self.node = node_name
        self._namespace, self._key = namespace, key
        self._token, self._expires = '', 0.0
        self.channel = grpc.aio.insecure_channel(target)
        self.control = node_pb2_grpc.NodeControlServiceStub(self.channel)
        self._auth = auth_service_pb2_grpc.AuthServiceStub(self.channel)

    async def metadata(self):
        if time.time() > self._expires - 60:
            r = await self._auth.CreateToken(auth_service_pb2.CreateTokenRequest(
                namespace=self._namespace, key=self._key), timeout=30)
            self._token = r.access_token
            self._expires = jwt.decode(r.access_token, options={'verify_signature': False})['exp']
        return (('authorization', f'Bearer {self._token}'),)

    async def call(self, method: str, request, *, timeout: float = 30.0, retry: bool = True):
        """Call a NodeControlService method; retry transient failures until it lands."""
        delay = 0.1
        while True:
            try:
                return await getattr(self.control, method)(
                    request, metadata=await self.metadata(), timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if not retry or e.code() not in RETRYABLE:
                    raise
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._expires = 0
                log.warning('controller call %s failed (%s); retrying in %.1fs',
                            method, e.code().name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def report(self, instance_uuid: str, **fields):
        await self.call('ReportInstanceStatus', pb.ReportInstanceStatusRequest(
            node=self.node, instance_uuid=instance_uuid, **fields))

    async def record(self, *events):
        await self.call('RecordEvents', pb.RecordEventsRequest(
            node=self.node, events=[pb.NodeEvent(event=e) for e in events]))

    async def close(self):
        await self.channel.close()
