"""A scripted node for controller tests.

It speaks the real node API over gRPC: it registers with the controller,
heartbeats, watches its desired instances and reports status, and it serves
NodeService so that the controller's routed calls (console, reboot, agent
operations) can be checked. It runs no guests: sfnode, tested against real
libvirt/QEMU, is the node that does.
"""

import asyncio
import collections
import dataclasses

import grpc

from sfcommon import pki as pkilib
from shakenfist.node.v1alpha1 import node_pb2 as pb, node_pb2_grpc
from shakenfist.v1 import instance_pb2


@dataclasses.dataclass
class NodeApi:
    """Where nodes reach a controller (its node port), and the plane's certificates."""
    target: str
    pki: pkilib.LocalPki

    @classmethod
    def of(cls, controller, pki: pkilib.LocalPki) -> 'NodeApi':
        return cls(f'127.0.0.1:{controller.node_port}', pki)

    def channel(self, name: str) -> grpc.aio.Channel:
        """A channel to the node API with node name's certificate, as sfnode has."""
        ca, cert, key = self.pki.node(name).read()
        return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(ca, key, cert), options=[
            ('grpc.ssl_target_name_override', pkilib.CONTROLLER_SERVER_NAME)])

    def server_credentials(self, name: str):
        """What node name's NodeService serves with: its certificate, controllers only."""
        ca, cert, key = self.pki.node(name).read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


class NodeDouble(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, api: NodeApi, name='node1', cpus=64, memory_mib=65536, disk_gib=2000):
        self.api = api
        self.channel = api.channel(name)
        self.node_control = node_pb2_grpc.NodeControlServiceStub(self.channel)
        self.name = name
        self.capacity = pb.NodeCapacity(cpus=cpus, memory_mib=memory_mib, disk_gib=disk_gib)
        self.desired: dict[str, pb.DesiredInstance] = {}
        self.upserts: collections.Counter[str] = collections.Counter()   # upserts received, by uuid
        self.synced = asyncio.Event()
        self.changed = asyncio.Condition()
        self.calls: list[tuple[str, object]] = []
        self.console = b''
        self.screen = b'\x89PNG\r\n\x1a\n' + b'fake screen of a scripted node'
        self.server = None
        self.port = 0
        self._watch = None

    async def start(self, auto_create=True):
        """Serve NodeService, register, and follow the desired state. With auto_create,
        report every new instance created and powered on, as a healthy node would."""
        self.auto_create = auto_create
        from sfnode.node import ControllerOnly
        self.server = grpc.aio.server(interceptors=[ControllerOnly()])
        node_pb2_grpc.add_NodeServiceServicer_to_server(self, self.server)
        self.port = self.server.add_secure_port('127.0.0.1:0', self.api.server_credentials(self.name))
        await self.server.start()
        await self.node_control.RegisterNode(pb.RegisterNodeRequest(
            name=self.name, address=f'127.0.0.1:{self.port}', capacity=self.capacity,
            console_host='127.0.0.1'))
        self._watch = asyncio.create_task(self._follow())
        await asyncio.wait_for(self.synced.wait(), 10)
        return self

    async def stop(self):
        if self._watch:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.server:
            await self.server.stop(None)
        await self.channel.close()

    async def _follow(self):
        stream = self.node_control.WatchDesiredInstances(
            pb.WatchDesiredInstancesRequest(name=self.name))
        async for change in stream:
            kind = change.WhichOneof('change')
            if kind == 'upsert':
                uuid = change.upsert.instance.uuid
                self.upserts[uuid] += 1
                new = uuid not in self.desired
                self.desired[uuid] = change.upsert
                if new and self.auto_create:
                    for state in (instance_pb2.INSTANCE_STATE_PREFLIGHT,
                                  instance_pb2.INSTANCE_STATE_CREATING):
                        await self.report(uuid, state=state)
                    await self.report(uuid, state=instance_pb2.INSTANCE_STATE_CREATED,
                                      power_state=instance_pb2.POWER_STATE_ON,
                                      console_port=31000, vdi_port=31001)
                elif self.auto_create:
                    await self.report(uuid, power_state=change.upsert.desired_power_state)
            elif kind == 'remove_uuid':
                self.desired.pop(change.remove_uuid, None)
                if self.auto_create:
                    await self.report(change.remove_uuid, state=instance_pb2.INSTANCE_STATE_DELETED)
            else:
                self.synced.set()
            async with self.changed:
                self.changed.notify_all()

    async def report(self, uuid, **fields):
        await self.node_control.ReportInstanceStatus(pb.ReportInstanceStatusRequest(
            node=self.name, instance_uuid=uuid, **fields))

    async def heartbeat(self):
        await self.node_control.Heartbeat(pb.HeartbeatRequest(name=self.name))

    # -- NodeService ----------------------------------------------------------
    async def GetConsoleData(self, request, context):
        self.calls.append(('GetConsoleData', request))
        data = self.console if request.length < 0 else self.console[-request.length:]
        return pb.GetConsoleDataResponse(data=data)

    async def ClearConsoleData(self, request, context):
        self.calls.append(('ClearConsoleData', request))
        self.console = b''
        return pb.ClearConsoleDataResponse()

    async def TakeScreenshot(self, request, context):
        self.calls.append(('TakeScreenshot', request))
        return pb.TakeScreenshotResponse(png=self.screen)

    async def RebootInstance(self, request, context):
        self.calls.append(('RebootInstance', request))
        return pb.RebootInstanceResponse()

    async def RunAgentOperation(self, request, context):
        self.calls.append(('RunAgentOperation', request))
        return pb.RunAgentOperationResponse()
