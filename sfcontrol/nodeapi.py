"""The node API's servicer (NodeControlService): says which node calls, then hands over to sfcontrol/nodes.py.

A node is the node its certificate names (caller.current().node, set by the
interceptor): a request naming another node is refused here, before any
logic runs. What the node may do with its instances, operations and blobs is
checked by NodeRegistry and NodeReports.
"""

from sfcommon import errors
from sfcontrol import caller
from sfcontrol.nodes import NodeRegistry, NodeReports
from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.node.v1alpha1 import node_pb2_grpc


def _me(claimed: str) -> str:
    """The calling node, which must be the node the request names."""
    node = caller.current().node
    if claimed != node:
        raise errors.PermissionDenied(f'this credential is node {node}\'s, not {claimed!r}\'s')
    return node


class NodeControl(node_pb2_grpc.NodeControlServiceServicer):
    def __init__(self, registry: NodeRegistry, reports: NodeReports):
        self.registry = registry
        self.reports = reports

    async def RegisterNode(self, request: pb.RegisterNodeRequest, context):
        _me(request.name)
        interval = await self.registry.register(request)
        return pb.RegisterNodeResponse(heartbeat_interval_seconds=interval)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context):
        await self.registry.heartbeat(_me(request.name))
        return pb.HeartbeatResponse()

    async def WatchDesiredInstances(self, request: pb.WatchDesiredInstancesRequest, context):
        async for message in self.registry.desired(_me(request.name)):
            yield message

    async def WatchDesiredNetworks(self, request: pb.WatchDesiredNetworksRequest, context):
        async for message in self.registry.desired_networks(_me(request.name)):
            yield message

    async def ReportInstanceStatus(self, request: pb.ReportInstanceStatusRequest, context):
        await self.reports.instance_status(_me(request.node), request)
        return pb.ReportInstanceStatusResponse()

    async def RecordEvents(self, request: pb.RecordEventsRequest, context):
        await self.reports.events(_me(request.node), request.events)
        return pb.RecordEventsResponse()

    async def UpdateAgentOperation(self, request: pb.UpdateAgentOperationRequest, context):
        await self.reports.agent_operation(_me(request.node), request)
        return pb.UpdateAgentOperationResponse()

    async def PutBlob(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof('part') != 'header':
            raise errors.InvalidArgument('a blob stream starts with its header')
        header = first.header

        async def chunks():
            async for part in request_iterator:
                if part.WhichOneof('part') != 'data':
                    raise errors.InvalidArgument('only the first message of a blob stream is a header')
                yield part.data
        blob = await self.reports.store_blob(_me(header.node), header.instance_uuid, chunks(),
                                             header.snapshot_blob_uuid)
        return pb.PutBlobResponse(blob_uuid=blob.uuid, size=blob.size, sha512=blob.sha512)

    async def GetBlob(self, request: pb.GetBlobRequest, context):
        # The request names no node: the one calling is the one asking.
        stream = self.reports.blob_stream(caller.current().node, request.blob_uuid, request.offset)
        async for chunk in stream:
            yield pb.GetBlobResponse(data=chunk)

    async def FailSnapshot(self, request: pb.FailSnapshotRequest, context):
        await self.reports.fail_snapshot(_me(request.node), request)
        return pb.FailSnapshotResponse()

    async def AuthorizeConsole(self, request: pb.AuthorizeConsoleRequest, context):
        namespace = self.reports.authorize_console(_me(request.node), request.instance_uuid,
                                                   request.token)
        return pb.AuthorizeConsoleResponse(namespace=namespace)
