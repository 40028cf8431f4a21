"""A scripted node for controller tests.

It speaks the real node API over gRPC: it registers with the controller,
heartbeats, watches its desired instances and reports status, and it serves
NodeService so that the controller's routed calls (console, reboot, agent
operations) can be checked. It runs no guests: sfnode, tested against real
libvirt/QEMU, is the node that does.

A resilient double survives controller and etcd outages as sfnode does: when its
watch breaks it registers again (heartbeat timers live in one controller's memory)
and watches again, it retries its reports and heartbeats, and it drives each
instance on to created from whatever state it finds it in.
"""

import asyncio
import collections
import dataclasses
import time

import grpc

from sfcommon import pki as pkilib
from shakenfist.node.v1alpha1 import node_pb2 as pb, node_pb2_grpc
from shakenfist.v1 import instance_pb2, specs_pb2

C = grpc.StatusCode
S = instance_pb2
# What a client retries (with the same request_id): the controller or etcd is away, or
# the call was cut off; any of these may or may not have been applied.
RETRY = frozenset({C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.CANCELLED})
CALL_TIMEOUT = 5.0          # per attempt (wait_for_ready: rides out a reconnect)
FAULT_BUDGET = 60.0         # all retries of one request, at most
# How a healthy node takes an instance to created.
NEXT = {S.INSTANCE_STATE_INITIAL: S.INSTANCE_STATE_PREFLIGHT,
        S.INSTANCE_STATE_PREFLIGHT: S.INSTANCE_STATE_CREATING,
        S.INSTANCE_STATE_CREATING: S.INSTANCE_STATE_CREATED}


def disks_of(inst) -> list:
    """The disks a node reports: vda, vdb... as requested, then the config drive."""
    disks = [S.Disk(device='vd' + chr(ord('a') + i), snapshot_ignores=spec.type == specs_pb2.DISK_TYPE_CDROM)
             for i, spec in enumerate(inst.disk_spec)]
    disks.append(S.Disk(device='vd' + chr(ord('a') + len(disks)), snapshot_ignores=True))
    return disks


async def retrying(method, request, stats=None, budget=FAULT_BUDGET):
    """method(request), retried on RETRY codes until it answers, for at most budget seconds."""
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return await method(request, timeout=CALL_TIMEOUT, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            if e.code() not in RETRY or time.monotonic() > deadline:
                raise
            if stats is not None:
                stats[e.code().name] += 1
            attempt += 1
            await asyncio.sleep(min(0.02 * attempt, 0.5))      # backoff, not synchronisation


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
    def __init__(self, api: NodeApi, name='node1', cpus=64, memory_mib=65536, disk_gib=2000, *,
                 resilient=False, heartbeat_every: float | None = None):
        self.api = api
        self.channel = api.channel(name)
        self.node_control = node_pb2_grpc.NodeControlServiceStub(self.channel)
        self.name = name
        self.capacity = pb.NodeCapacity(cpus=cpus, memory_mib=memory_mib, disk_gib=disk_gib)
        self.resilient = resilient
        self.heartbeat_every = heartbeat_every
        self.desired: dict[str, pb.DesiredInstance] = {}
        self.upserts: collections.Counter[str] = collections.Counter()   # upserts received, by uuid
        self.created: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.rewatches = 0                                                # resilient: watches broken
        self.retries: collections.Counter[str] = collections.Counter()   # resilient: retried calls
        self.failure: BaseException | None = None
        self.synced = asyncio.Event()
        self.changed = asyncio.Condition()
        self.calls: list[tuple[str, object]] = []
        self.console = b''
        self.screen = b'\x89PNG\r\n\x1a\n' + b'fake screen of a scripted node'
        self.server = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self, auto_create=True):
        """Serve NodeService, register, and follow the desired state. With auto_create,
        take every instance on to created and to its desired power, as a healthy node would."""
        self.auto_create = auto_create
        from sfnode.node import ControllerOnly
        self.server = grpc.aio.server(interceptors=[ControllerOnly()])
        node_pb2_grpc.add_NodeServiceServicer_to_server(self, self.server)
        self.port = self.server.add_secure_port('127.0.0.1:0', self.api.server_credentials(self.name))
        await self.server.start()
        if not self.resilient:
            await self._register()
        self._tasks.append(asyncio.create_task(self._run()))
        await asyncio.wait_for(self.synced.wait(), 10)
        if self.heartbeat_every:
            self._tasks.append(asyncio.create_task(self._heartbeats()))
        return self

    async def stop(self):
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server:
            await self.server.stop(None)
        await self.channel.close()

    def check(self):
        """Fail if the double has failed or stopped following."""
        assert self.failure is None, f'node {self.name} failed: {self.failure!r}'
        for task in self._tasks:
            assert not task.done(), task

    async def _register(self):
        await self._call(self.node_control.RegisterNode, pb.RegisterNodeRequest(
            name=self.name, address=f'127.0.0.1:{self.port}', capacity=self.capacity,
            console_host='127.0.0.1'))

    async def _call(self, method, request):
        if self.resilient:
            return await retrying(method, request, self.retries)
        return await method(request)

    async def _run(self):
        try:
            if not self.resilient:
                return await self._follow()
            while True:
                await self._register()
                try:
                    await self._follow()
                except grpc.aio.AioRpcError as e:
                    if e.code() not in RETRY:
                        raise
                    self.retries['watch ' + e.code().name] += 1
                self.rewatches += 1
                await asyncio.sleep(0.05)       # backoff before watching again
        except asyncio.CancelledError:
            raise
        except BaseException as e:      # noqa: BLE001 -- reported by check()
            self.failure = e

    async def _heartbeats(self):
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                await self.node_control.Heartbeat(pb.HeartbeatRequest(name=self.name), timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError:
                if not self.resilient:
                    raise
                # the controller is away; the watch loop registers again

    async def _follow(self):
        stream = self.node_control.WatchDesiredInstances(
            pb.WatchDesiredInstancesRequest(name=self.name), wait_for_ready=self.resilient)
        async for change in stream:
            kind = change.WhichOneof('change')
            if kind == 'upsert':
                inst = change.upsert.instance
                self.upserts[inst.uuid] += 1
                self.desired[inst.uuid] = change.upsert
                if self.auto_create:
                    await self._converge(inst, change.upsert.desired_power_state)
            elif kind == 'remove_uuid':
                self.desired.pop(change.remove_uuid, None)
                if self.auto_create:
                    await self.report(change.remove_uuid, state=S.INSTANCE_STATE_DELETED)
            else:
                self.synced.set()
            async with self.changed:
                self.changed.notify_all()

    async def _converge(self, inst, desired_power):
        state = inst.state
        while state in NEXT:
            state = NEXT[state]
            extra = {} if state != S.INSTANCE_STATE_CREATED else {
                'power_state': S.POWER_STATE_ON, 'console_port': 31000, 'vdi_port': 31001,
                'disks': disks_of(inst), 'disks_set': True}
            await self.report(inst.uuid, state=state, **extra)
        if inst.state == S.INSTANCE_STATE_CREATED and inst.power_state != desired_power:
            await self.report(inst.uuid, power_state=desired_power)

    async def report(self, uuid, **fields):
        await self._call(self.node_control.ReportInstanceStatus, pb.ReportInstanceStatusRequest(
            node=self.name, instance_uuid=uuid, **fields))
        if fields.get('state') == S.INSTANCE_STATE_CREATED:
            self.created[uuid].set()

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

    async def FollowConsole(self, request, context):
        """The console as it is, then nothing more: the double's guest prints nothing."""
        self.calls.append(('FollowConsole', request))
        start = len(self.console)
        if request.HasField('offset'):
            start = request.offset if request.offset <= start else 0
        yield pb.FollowConsoleResponse(offset=start)
        if start < len(self.console):
            yield pb.FollowConsoleResponse(data=self.console[start:], offset=start)
        await asyncio.Event().wait()

    async def AttachConsole(self, request_iterator, context):
        """An echoing console."""
        async for message in request_iterator:
            self.calls.append(('AttachConsole', message))
            if message.data:
                yield pb.AttachConsoleResponse(data=message.data)

    async def ConnectVdi(self, request_iterator, context):
        """A VNC server that says its version, then echoes."""
        yield pb.ConnectVdiResponse(data=b'RFB 003.008\n')
        async for message in request_iterator:
            self.calls.append(('ConnectVdi', message))
            if message.data:
                yield pb.ConnectVdiResponse(data=message.data)

    async def StreamCommand(self, request, context):
        """The command line echoed as stdout, stdin as stderr, then exit 0."""
        self.calls.append(('StreamCommand', request))
        yield pb.StreamCommandResponse(stdout=request.command_line.encode())
        if request.stdin:
            yield pb.StreamCommandResponse(stderr=request.stdin)
        exit_ = pb.StreamCommandResponse()
        exit_.exit.execution_seconds = 0.01
        yield exit_

    async def TakeScreenshot(self, request, context):
        self.calls.append(('TakeScreenshot', request))
        return pb.TakeScreenshotResponse(png=self.screen)

    async def RebootInstance(self, request, context):
        self.calls.append(('RebootInstance', request))
        return pb.RebootInstanceResponse()

    async def RunAgentOperation(self, request, context):
        self.calls.append(('RunAgentOperation', request))
        return pb.RunAgentOperationResponse()
