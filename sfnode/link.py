"""The node's only connection: gRPC to the controller's node port.

Mutual TLS: the node presents its own certificate (node:<name>, from the
cluster CA) and accepts only a controller's (server name
controller.shakenfist). The node holds no namespace key and no token, so its
credential reaches nothing of the public API.

Reports are retried until the controller takes them (with a capped backoff),
so a controller restart loses no observation.
"""

import asyncio
import logging

import grpc

from sfcommon import pki
from sfcommon.backoff import Backoff
from sfcommon.metrics import ClientMetrics
from shakenfist.node.v1alpha1 import node_pb2 as pb, node_pb2_grpc

log = logging.getLogger(__name__)
BLOB_PART = 1024 * 1024     # under gRPC's message limit
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ControllerLink:
    def __init__(self, target: str, bundle: pki.Bundle, node_name: str):
        self.target = target
        self.node = node_name
        ca, cert, key = bundle.read()
        self.channel = grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(ca, key, cert),
            options=[('grpc.ssl_target_name_override', pki.CONTROLLER_SERVER_NAME)],
            interceptors=[ClientMetrics()])     # unary calls, by method and code
        self.control = node_pb2_grpc.NodeControlServiceStub(self.channel)

    async def call(self, method: str, request, *, timeout: float = 30.0, retry: bool = True):
        """Call a NodeControlService method; retry transient failures until it lands."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                return await getattr(self.control, method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if not retry or e.code() not in RETRYABLE:
                    raise
                delay = backoff.next()
                log.warning('controller call %s failed (%s); retrying in %.1fs',
                            method, e.code().name, delay)
                await asyncio.sleep(delay)

    async def report(self, instance_uuid: str, **fields):
        await self.call('ReportInstanceStatus', pb.ReportInstanceStatusRequest(
            node=self.node, instance_uuid=instance_uuid, **fields))

    async def record(self, *events):
        await self.call('RecordEvents', pb.RecordEventsRequest(
            node=self.node, events=[pb.NodeEvent(event=e) for e in events]))

    async def put_blob(self, header: pb.PutBlobHeader, chunks) -> pb.PutBlobResponse:
        """Store what chunks yields as a blob (not retried: the stream is used up)."""
        async def parts():
            yield pb.PutBlobRequest(header=header)
            async for chunk in chunks:
                for i in range(0, len(chunk), BLOB_PART):
                    yield pb.PutBlobRequest(data=chunk[i:i + BLOB_PART])
        return await self.control.PutBlob(parts(), timeout=3600)

    async def close(self):
        await self.channel.close()
