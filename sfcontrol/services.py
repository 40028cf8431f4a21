"""The public gRPC services: thin adapters from RPCs to the domain objects.

Authentication, namespace scoping and error reporting happen in the
interceptor; the logic lives in instances/, networks.py, auth.py,
agentops.py and events.py.
"""

from sfcommon import errors
from sfcontrol import caller, validation
from shakenfist.v1 import (agent_operation_service_pb2 as aop, agent_operation_service_pb2_grpc,
                           blob_service_pb2 as blob, blob_service_pb2_grpc,
                           auth_service_pb2, auth_service_pb2_grpc, event_service_pb2_grpc,
                           instance_service_pb2_grpc, network_service_pb2 as net,
                           network_service_pb2_grpc, server_service_pb2 as server,
                           server_service_pb2_grpc)

VERSION = '0.1.0'
# What GET / advertises: only what is implemented (wire reference §A.6). sf-client
# tests these as substrings of the body.
CAPABILITIES = [
    'events-by-type', 'get-instance-namespace', 'get-network-namespace', 'provide-dns',
    'interface-metadata', 'hot-plug-interface', 'vdi-console-helper', 'instance-execute',
    'instance-get', 'agentoperations-crud', 'instance-agentoperations-all',
    'agentoperation-deadlines', 'instance-put-blob', 'instance-screenshot', 'blob-search-by-hash',
    'blob-data-limit',
]


class InstanceService(instance_service_pb2_grpc.InstanceServiceServicer):
    def __init__(self, instances, power, consoles, snapshots):
        self.i, self.power, self.consoles, self.snapshots = instances, power, consoles, snapshots

    async def ListInstances(self, request, context): return self.i.list(request)
    async def CreateInstance(self, request, context): return await self.i.create(request)
    async def GetInstance(self, request, context): return self.i.get(request)
    async def DeleteInstance(self, request, context): return await self.i.delete(request)
    async def DeleteAllInstances(self, request, context): return await self.i.delete_all(request)
    async def ListInstanceInterfaces(self, request, context): return self.i.list_interfaces(request)
    async def AddInstanceInterface(self, request, context): return await self.i.add_interface(request)
    async def RemoveInstanceInterface(self, request, context): return await self.i.remove_interface(request)
    async def GetInstanceMetadata(self, request, context): return self.i.get_metadata(request)
    async def SetInstanceMetadata(self, request, context): return await self.i.set_metadata(request)
    async def DeleteInstanceMetadata(self, request, context): return await self.i.delete_metadata(request)
    async def ListInstanceEvents(self, request, context): return await self.i.list_events(request)
    async def SoftRebootInstance(self, request, context): return await self.power.reboot(request, hard=False)
    async def HardRebootInstance(self, request, context): return await self.power.reboot(request, hard=True)
    async def PowerOffInstance(self, request, context): return await self.power.power_off(request)
    async def PowerOnInstance(self, request, context): return await self.power.power_on(request)
    async def PauseInstance(self, request, context): return await self.power.pause(request)
    async def UnpauseInstance(self, request, context): return await self.power.unpause(request)
    async def GetConsoleData(self, request, context): return await self.consoles.console_data(request)
    async def ReadConsole(self, request, context): return await self.consoles.read_console(request)
    def FollowConsole(self, request, context): return self.consoles.follow_console(request)
    def AttachConsole(self, request_iterator, context): return self.consoles.attach_console(request_iterator)
    def ConnectVdi(self, request_iterator, context): return self.consoles.connect_vdi(request_iterator)
    async def DeleteConsoleData(self, request, context): return await self.consoles.clear_console(request)
    async def GetVdiConsoleHelper(self, request, context): return self.consoles.vdi_helper(request)
    async def GetScreenshot(self, request, context): return await self.consoles.screenshot(request)
    async def SnapshotInstance(self, request, context): return await self.snapshots.snapshot(request)
    async def ListInstanceSnapshots(self, request, context): return self.snapshots.list(request)


class NetworkService(network_service_pb2_grpc.NetworkServiceServicer):
    def __init__(self, networks, metadata):
        self.n = networks
        self.m = metadata

    async def CreateNetwork(self, request, context): return await self.n.create(request)
    async def ListNetworks(self, request, context): return self.n.list(request)

    async def GetNetwork(self, request, context):
        ns = request.namespace if request.HasField('namespace') else None
        return net.GetNetworkResponse(network=self.n.view(self.n.resolve(request.network_ref, ns).value))

    async def DeleteNetwork(self, request, context): return await self.n.delete(request)
    async def DeleteAllNetworks(self, request, context): return await self.n.delete_all(request)

    async def ListNetworkInterfaces(self, request, context):
        network = self.n.resolve(request.network_ref).value
        ifaces = self.n.interfaces_on(network.uuid)
        start = validation.page_start(request.page_token)
        end = start + (request.page_size or 1000)
        return net.ListNetworkInterfacesResponse(
            interfaces=ifaces[start:end], next_page_token=str(end) if end < len(ifaces) else '')

    async def GetNetworkMetadata(self, request, context):
        return net.GetNetworkMetadataResponse(metadata=self.n.resolve(request.network_ref).value.metadata)

    async def SetNetworkMetadata(self, request, context):
        entry = self.n.resolve(request.network_ref)
        return await self.m.set(entry.key, request, net.SetNetworkMetadataResponse())

    async def DeleteNetworkMetadata(self, request, context):
        entry = self.n.resolve(request.network_ref)
        return await self.m.delete(entry.key, request, net.DeleteNetworkMetadataResponse())


class InterfaceService(network_service_pb2_grpc.InterfaceServiceServicer):
    def __init__(self, networks, metadata):
        self.n = networks
        self.m = metadata

    async def GetInterface(self, request, context):
        return net.GetInterfaceResponse(network_interface=self.n.interface(request.interface_uuid).value)

    async def GetInterfaceMetadata(self, request, context):
        return net.GetInterfaceMetadataResponse(
            metadata=self.n.interface(request.interface_uuid).value.metadata)

    async def SetInterfaceMetadata(self, request, context):
        entry = self.n.interface(request.interface_uuid)
        return await self.m.set(entry.key, request, net.SetInterfaceMetadataResponse())

    async def DeleteInterfaceMetadata(self, request, context):
        entry = self.n.interface(request.interface_uuid)
        return await self.m.delete(entry.key, request, net.DeleteInterfaceMetadataResponse())

    async def FloatInterface(self, request, context): return await self.n.float(request, True)
    async def DefloatInterface(self, request, context): return await self.n.float(request, False)


class AgentOperationService(agent_operation_service_pb2_grpc.AgentOperationServiceServicer):
    def __init__(self, agentops):
        self.a = agentops

    async def ExecuteCommand(self, request, context): return await self.a.execute(request)
    async def PutFile(self, request, context): return await self.a.put_file(request)
    async def GetFile(self, request, context): return await self.a.get_file(request)
    def StreamCommand(self, request, context): return self.a.stream_command(request)
    async def ListInstanceAgentOperations(self, request, context): return self.a.list(request)

    async def GetAgentOperation(self, request, context):
        return aop.GetAgentOperationResponse(agent_operation=self.a.get(request.agent_operation_uuid).value)

    async def DeleteAgentOperation(self, request, context): return await self.a.delete(request)


class AuthService(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth):
        self.a = auth

    async def RotateSigningKey(self, request, context):
        return await self.a.rotate_signing_key(request)

    async def CreateToken(self, request, context):
        return await self.a.create_token(request, caller.current().address)
    async def ListNamespaces(self, request, context): return self.a.list_namespaces(request)

    async def CreateNamespace(self, request, context): return await self.a.create_namespace(request)

    async def GetNamespace(self, request, context):
        return auth_service_pb2.GetNamespaceResponse(namespace=self.a.view(request.namespace))

    async def DeleteNamespace(self, request, context): return await self.a.delete_namespace(request)
    async def ListNamespaceKeys(self, request, context): return self.a.list_keys(request)
    async def AddNamespaceKey(self, request, context): return await self.a.set_key(request, create=True)
    async def UpdateNamespaceKey(self, request, context): return await self.a.set_key(request, create=False)
    async def DeleteNamespaceKey(self, request, context): return await self.a.delete_key(request)


class EventService(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, instances, events):
        self.i = instances
        self.e = events

    async def WatchEvents(self, request, context):
        prefix, object_type = self.i.events_prefix(request)
        async for item in self.e.watch(prefix, request.event_types, request.cursor,
                                       object_type=object_type):
            yield item


class ServerService(server_service_pb2_grpc.ServerServiceServicer):
    async def GetCapabilities(self, request, context):
        return server.GetCapabilitiesResponse(capabilities=CAPABILITIES, version=VERSION)


class BlobService(blob_service_pb2_grpc.BlobServiceServicer):
    def __init__(self, blobs):
        self.b = blobs

    async def GetBlob(self, request, context):
        return blob.GetBlobResponse(blob=self.b.get(request.blob_uuid))

    async def GetBlobBySha512(self, request, context):
        found = self.b.by_sha512(request.sha512)
        return blob.GetBlobBySha512Response(blob=found) if found else blob.GetBlobBySha512Response()

    async def ReadBlobData(self, request, context):
        async for chunk in self.b.read(request.blob_uuid, request.offset, request.limit):
            response = blob.ReadBlobDataResponse()
            response.data.content_type = 'application/octet-stream'
            response.data.data = chunk
            yield response


class UploadService(blob_service_pb2_grpc.UploadServiceServicer):
    def __init__(self, blobs):
        self.b = blobs

    async def CreateUpload(self, request, context):
        return blob.CreateUploadResponse(upload=await self.b.create_upload(request))

    async def WriteUpload(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None:
            raise errors.InvalidArgument('an upload write needs at least one message')

        async def chunks():
            yield first.data.data
            async for message in request_iterator:
                if message.upload_uuid and message.upload_uuid != first.upload_uuid:
                    raise errors.InvalidArgument('every message of an upload write names the same upload')
                yield message.data.data
        declared = dict(context.invocation_metadata() or ()).get('x-body-length')   # from the gateway
        expected = int(declared) if declared and declared.isdigit() and len(declared) < 20 else None
        return blob.WriteUploadResponse(size=await self.b.write_upload(
            first.upload_uuid, chunks(), expected))

    async def TruncateUpload(self, request, context):
        await self.b.truncate_upload(request.upload_uuid, request.offset)
        return blob.TruncateUploadResponse()


class ArtifactService(blob_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, blobs):
        self.b = blobs

    async def UploadArtifact(self, request, context):
        return blob.UploadArtifactResponse(artifact=await self.b.upload_artifact(request))
