"""The node agent: registers with the controller, follows its desired state,
reconciles libvirt to it, and serves the controller's node actions."""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess

import grpc

from sfcommon import errors, pki, states
from sfcommon.backoff import Backoff
from sfcommon.clock import SYSTEM, Clock
from sfcommon.metrics import ServerMetrics, start_metrics_server
from sfcommon.tasks import Tasks, alongside
from sfcommon.urlpolicy import ImagePolicy
from sfnode import images, metrics, tail
from sfnode.agent.session import OperationFailed
from sfnode.instance import InstanceWorker
from sfnode.link import ControllerLink
from sfnode.network import ip as netip
from sfnode.network.carrier import Carrier
from sfnode.network.ip import NETWORK_MTU
from sfnode.network.mesh import MeshConfig
from shakenfist.node.v1alpha1 import node_pb2 as pb
from shakenfist.node.v1alpha1 import node_pb2_grpc
from shakenfist.v1 import agent_operation_service_pb2 as aos

VDI_CHUNK = 65536
log = logging.getLogger(__name__)


@dataclasses.dataclass
class NodeConfig:
    name: str
    controller: str                 # host:port of the controller's node port
    pki: pki.Bundle                 # ca.pem, node.pem, node.key (sfcommon/pki.py)
    state_dir: pathlib.Path
    libvirt_uri: str | None = None  # default: qemu:///embed?root=<state_dir>/libvirt
    listen: str = '127.0.0.1:0'     # NodeService
    console_listen: str = '127.0.0.1'
    bridge_prefix: str = 'sfb0-'
    image_table: str | None = None  # JSON {shorthand: url}, over the built-in table
    image_allow: tuple[str, ...] = ()   # URL prefixes tenants may fetch besides public http(s)
    extra_images: dict = dataclasses.field(default_factory=dict)
    capacity: pb.NodeCapacity | None = None
    usage_interval: float = 60.0    # seconds between usage events; 0 turns them off
    domain_type: str | None = None  # 'qemu' or 'kvm'; None probes
    console_open: bool = False      # serial consoles without a token (Shaken Fist's behaviour)
    metrics_listen: str | None = None   # host:port of GET /metrics (plain HTTP); None: off
    # Where this node's VXLANs live (sfnode/network/); no address: it carries no networks.
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(address=''))
    network_node: bool = False      # serves DHCP and DNS for the networks (a network node)
    edge_namespace: str | None = None   # a network node's outside, for NAT and floating addresses


class Bridges:
    """A Linux bridge per network on this node, named <prefix><vxlan id in hex>, at the
    network's MTU (set, so that it does not follow whichever port joined last, and
    libvirt gives the taps it makes the bridge's MTU).

    Made and removed one change at a time (a lock): two teardowns at once must not
    both remove one bridge, nor a teardown remove the bridge a build has just made."""

    def __init__(self, prefix: str, in_use):
        self.prefix = prefix
        self._in_use = in_use      # () -> set of network uuids used by instances here
        self._made: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def name(self, network) -> str:
        return f'{self.prefix}{network.vxlan_id:06x}'[:15]

    async def ensure(self, network) -> str:
        name = self.name(network)
        async with self._lock:
            if network.uuid in self._made:
                return name
            if not pathlib.Path(f'/sys/class/net/{name}').exists():
                await _ip('link', 'add', 'name', name, 'mtu', str(NETWORK_MTU), 'type', 'bridge')
            await _ip('link', 'set', name, 'mtu', str(NETWORK_MTU), 'up')
            self._made[network.uuid] = name
        return name

    async def release_unused(self):
        async with self._lock:
            used = self._in_use()
            for uuid, name in list(self._made.items()):
                if uuid not in used:
                    await _ip('link', 'del', name, check=False)
                    self._made.pop(uuid, None)

    async def release_orphans(self):
        """Remove this node's bridges that nothing here uses and that have no ports (left
        by a node that crashed; a bridge with a guest's tap on it stays)."""
        async with self._lock:
            made = set(self._made.values())
            for name in await netip.links(self.prefix):
                rest = name[len(self.prefix):]
                if len(rest) != 6 or name in made or any(c not in '0123456789abcdef' for c in rest):
                    continue
                if not json.loads(await netip.ip('-j', 'link', 'show', 'master', name) or '[]'):
                    await _ip('link', 'del', name, check=False)

    async def release_all(self):
        async with self._lock:
            for name in self._made.values():
                await _ip('link', 'del', name, check=False)
            self._made.clear()


async def _ip(*args, check=True):
    proc = await asyncio.create_subprocess_exec('ip', *args, stdout=subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise errors.Internal(f'ip {" ".join(args)} failed: {err.decode().strip()}')


# Shaken Fist's default overcommit ratios: vCPUs are cheap while idle, memory less so.
CPU_OVERCOMMIT, MEMORY_OVERCOMMIT = 16, 1.5


def host_capacity() -> pb.NodeCapacity:
    pages = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    st = os.statvfs('/')
    return pb.NodeCapacity(cpus=os.cpu_count() * CPU_OVERCOMMIT,
                           memory_mib=int(pages // 2**20 * MEMORY_OVERCOMMIT),
                           disk_gib=st.f_bavail * st.f_frsize // 2**30)


CONTROLLER_CN_PREFIX = 'controller:'


class ControllerOnly(grpc.aio.ServerInterceptor):
    """NodeService takes calls from controllers only: a client certificate of the
    cluster CA whose CN is controller:<name>. A node's certificate is refused, so
    one node cannot act on another's guests."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def checked(request, context):
            names = context.auth_context().get('x509_common_name') or [b'']
            if not names[0].startswith(CONTROLLER_CN_PREFIX.encode()):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    'only a controller of this cluster may call a node')
            return await behaviour(request, context)
        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class Node(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, config: NodeConfig, hypervisor, clock: Clock = SYSTEM):
        self.config = config
        self.clock = clock
        self.name = config.name
        self.hypervisor = hypervisor
        self.state_dir = pathlib.Path(config.state_dir)
        self.instances_dir = self.state_dir / 'instances'
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self.images = images.ImageCache(self.state_dir / 'images', ImagePolicy(config.image_allow))
        self.image_table = {**images.load_table(config.image_table), **config.extra_images}
        self.link = ControllerLink(config.controller, config.pki, config.name)
        self.workers: dict[str, InstanceWorker] = {}
        self.bridges = Bridges(config.bridge_prefix, self._networks_in_use)
        self.carrier = Carrier(self, config.mesh, config.network_node, config.edge_namespace)
        self.console_listen = config.console_listen
        self.domain_type = config.domain_type or 'qemu'
        self.vsock = os.path.exists('/dev/vhost-vsock')      # guests may have a vsock device
        self.server = None
        self.port = 0
        self.metrics = None     # the /metrics server, with config.metrics_listen
        self._tasks: list[asyncio.Task] = []
        self.tasks = Tasks(f'node {config.name}')     # reports and operations under way
        self.synced = asyncio.Event()

    def _networks_in_use(self) -> set[str]:
        return {i.network_uuid for w in self.workers.values() if not w.removed
                for i in w.desired.instance.interfaces} | self.carrier.in_use()

    # -- lifecycle -------------------------------------------------------------------
    async def start(self):
        self.server = grpc.aio.server(interceptors=[ServerMetrics(), ControllerOnly()])
        node_pb2_grpc.add_NodeServiceServicer_to_server(self, self.server)
        ca, cert, key = self.config.pki.read()
        self.port = self.server.add_secure_port(self.config.listen, grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True))
        await self.server.start()
        metrics.nodes.add(self)
        if self.config.metrics_listen:
            self.metrics = await start_metrics_server(self.config.metrics_listen)
        await self._kill_orphan_guests()
        r = await self.link.call('RegisterNode', self._registration())
        self.hypervisor.on_power_change(self._power_changed)
        self.hypervisor.add_listener(self._guest_reset)
        self._tasks = [asyncio.create_task(self._follow(), name='follow'),
                       asyncio.create_task(self._heartbeat(r.heartbeat_interval_seconds), name='heartbeat')]
        if self.config.usage_interval > 0:
            self._tasks.append(asyncio.create_task(self._usage(), name='usage'))
        await self.carrier.start()
        return self

    async def _kill_orphan_guests(self):
        """Kill the QEMU processes of this node's guests that libvirt does not know as
        running: a node killed while libvirt started one leaves it behind, holding its
        disk's lock, so that the guest could never start again. They are found by their
        disks under this node's instances directory."""
        active = {info.uuid for info in await self.hypervisor.list_domains() if info.active}
        ours = f'{self.instances_dir.resolve()}/'.encode()
        for proc in pathlib.Path('/proc').glob('[0-9]*'):
            try:
                argv = (proc / 'cmdline').read_bytes().split(b'\0')
            except OSError:
                continue
            if not (argv and pathlib.Path(argv[0].decode(errors='replace')).name.startswith('qemu-system')
                    and any(ours in a for a in argv) and b'-uuid' in argv):
                continue
            uuid = argv[argv.index(b'-uuid') + 1].decode(errors='replace')
            if uuid not in active:
                log.warning('killing an orphaned QEMU process', extra={'pid': int(proc.name), 'uuid': uuid})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)

    async def stop(self, stop_guests: bool = False):
        """Stop the agent. Guests keep running (a restarted node adopts them) unless
        stop_guests: then they are powered off, keeping their definitions and disks,
        and the node starts them again when it next starts."""
        for t in self._tasks:
            t.cancel()
        for w in self.workers.values():
            w.task.cancel()
            if w.agent is not None:
                await w.agent.stop()
            if w.console is not None:
                await w.console.stop()
        await asyncio.gather(*self._tasks, *(w.task for w in self.workers.values()),
                             self.tasks.close(), return_exceptions=True)
        await self.carrier.stop(remove=stop_guests)
        if stop_guests:     # at once: each destroy waits a second or two for QEMU to exit
            await asyncio.gather(*(self.hypervisor.destroy(info.name)
                                   for info in await self.hypervisor.list_domains() if info.active))
            await self.bridges.release_all()
        metrics.nodes.discard(self)
        if self.metrics is not None:
            await self.metrics.close()
        if self.server:
            await self.server.stop(1)
        await self.link.close()

    async def _heartbeat(self, interval: float):
        while True:
            await self.clock.sleep(interval)
            try:
                await self.link.call('Heartbeat', pb.HeartbeatRequest(name=self.name), retry=False)
            except grpc.aio.AioRpcError as e:
                log.warning('heartbeat failed: %s', e.code().name)
                if e.code() == grpc.StatusCode.NOT_FOUND:       # the controller forgot us
                    await self.link.call('RegisterNode', self._registration())

    def _registration(self) -> pb.RegisterNodeRequest:
        """Who this node is: the same at the first registration and every later one."""
        host = self.config.listen.rsplit(':', 1)[0]
        return pb.RegisterNodeRequest(
            name=self.name, address=f'{host}:{self.port}', console_host=self.console_listen,
            capacity=self.config.capacity or host_capacity(),
            features=pb.NodeFeatures(kvm=self.domain_type == 'kvm', vsock=self.vsock),
            mesh_address=self.config.mesh.address, network_node=self.config.network_node)

    async def _follow(self):
        """Follow the desired state; on a broken stream, reconnect and resync."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                stream = self.link.control.WatchDesiredInstances(
                    pb.WatchDesiredInstancesRequest(name=self.name))
                listed = set()
                async for change in stream:
                    backoff.reset()
                    kind = change.WhichOneof('change')
                    if kind == 'upsert':
                        listed.add(change.upsert.instance.uuid)
                        self._upsert(change.upsert)
                    elif kind == 'remove_uuid':
                        self._remove(change.remove_uuid)
                    else:
                        await self._sync_complete(listed)
            except grpc.aio.AioRpcError as e:
                log.warning('desired-state stream lost (%s); reconnecting', e.code().name)
            await backoff.sleep()

    def _upsert(self, desired):
        worker = self.workers.get(desired.instance.uuid)
        if worker is None or worker.task.done():
            self.workers[desired.instance.uuid] = InstanceWorker(self, desired)
        else:
            worker.update(desired)

    def _remove(self, uuid):
        worker = self.workers.get(uuid)
        if worker is not None:
            worker.remove()

    async def _sync_complete(self, listed: set[str]):
        """Remove what is here but no longer desired: domains and workers alike."""
        for uuid, worker in list(self.workers.items()):
            if uuid not in listed and not worker.removed:
                worker.remove()
        for info in await self.hypervisor.list_domains():
            uuid = info.instance_uuid
            if uuid not in listed and uuid not in self.workers:
                log.info('removing orphan domain %s', info.name)
                await self.hypervisor.destroy(info.name)
                await self.hypervisor.undefine(info.name)
                images.remove_tree(self.instances_dir / uuid)
        self.synced.set()

    def _guest_reset(self, event):
        worker = self.workers.get(event.uuid) if event.kind == 'reboot' else None
        if worker is not None and worker.agent is not None:
            worker.agent.guest_reset()

    def _power_changed(self, uuid: str, power_state: int):
        worker = self.workers.get(uuid)
        if worker is not None:
            from shakenfist.v1 import instance_pb2
            worker.power_state = power_state
            if worker.agent is not None:
                worker.agent.power_changed(power_state == instance_pb2.POWER_STATE_ON)
            # Not while stopping (with stop_guests: nobody to report to), nor while it is
            # built: the build reports the power state after `created`, and a report racing
            # `created` made one of them conflict and retry (bench P4: +8 ms).
            if not self.tasks.closed and worker.state == states.CREATED:
                self.tasks.spawn(self.link.report(uuid, power_state=power_state), name=f'power-{uuid}')

    async def _usage(self):
        from sfcommon.events import make_event
        from shakenfist.v1 import event_pb2
        while True:
            await asyncio.sleep(self.config.usage_interval)
            events = []
            for uuid, worker in list(self.workers.items()):
                stats = await self.hypervisor.usage(worker.name)
                if stats:
                    events.append(make_event(self.name, event_pb2.OBJECT_TYPE_INSTANCE, uuid,
                                             event_pb2.EVENT_TYPE_USAGE, 'usage', stats))
            if events:
                await self.link.record(*events)

    # -- NodeService ------------------------------------------------------------------
    def _worker(self, uuid) -> InstanceWorker:
        worker = self.workers.get(uuid)
        if worker is None:
            raise errors.NotFound(f'instance {uuid} is not on node {self.name}')
        return worker

    @errors.reported
    async def GetConsoleData(self, request, context):
        worker = self._worker(request.instance_uuid)
        path = worker.dir / 'console.log'
        if not path.exists():
            return pb.GetConsoleDataResponse()
        with open(path, 'rb') as f:
            size = f.seek(0, os.SEEK_END)
            if request.HasField('offset'):
                start = request.offset if request.offset <= size else 0     # cleared since
                f.seek(start)
                data = f.read(request.length)
            else:
                start = f.seek(0 if request.length < 0 else max(0, size - request.length))
                data = f.read()
            return pb.GetConsoleDataResponse(data=data, offset=start, end_offset=max(size, start + len(data)))

    @errors.reported_stream
    async def FollowConsole(self, request, context):
        worker = self._worker(request.instance_uuid)
        path = worker.dir / 'console.log'
        if not path.exists():
            raise errors.NotReady(f'instance {request.instance_uuid} has no console log yet')
        offset = request.offset if request.HasField('offset') else None
        async for position, data in tail.follow(str(path), offset, clears=lambda: worker.console_clears):
            yield pb.FollowConsoleResponse(data=data, offset=position)

    @errors.reported_stream
    async def AttachConsole(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        console = self._worker(first.instance_uuid).console
        if console is None:
            raise errors.NotReady(f'instance {first.instance_uuid} has no console yet')
        async with console.viewing() as viewer:
            async def typing():
                if first.data:
                    await console.to_guest(first.data)
                async for message in request_iterator:
                    if message.data:
                        await console.to_guest(message.data)
            async with alongside(typing()):
                while True:
                    yield pb.AttachConsoleResponse(data=await viewer.queue.get())

    @errors.reported_stream
    async def ConnectVdi(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        worker = self._worker(first.instance_uuid)
        if worker.console is None:
            raise errors.NotReady(f'instance {first.instance_uuid} is not running here yet')
        try:
            reader, writer = await asyncio.open_connection(self.console_listen, worker.ports()['vdi'])
        except OSError as e:
            raise errors.NotReady(f'the console of instance {first.instance_uuid} does not answer: {e}')
        try:
            async def sending():
                writer.write(first.data)
                async for message in request_iterator:
                    writer.write(message.data)
                    await writer.drain()
                writer.write_eof()
            async with alongside(sending()):
                while data := await reader.read(VDI_CHUNK):
                    yield pb.ConnectVdiResponse(data=data)
        finally:
            writer.close()

    @errors.reported
    async def ClearConsoleData(self, request, context):
        worker = self._worker(request.instance_uuid)
        path = worker.dir / 'console.log'
        if path.exists():
            os.truncate(path, 0)
            worker.console_clears += 1      # followers start again at 0 (sfnode/tail.py)
        return pb.ClearConsoleDataResponse()

    @errors.reported
    async def TakeScreenshot(self, request, context):
        worker = self._worker(request.instance_uuid)
        return pb.TakeScreenshotResponse(png=await self.hypervisor.screenshot(worker.name))

    @errors.reported
    async def RunAgentOperation(self, request, context):
        worker = self._worker(request.operation.instance_uuid)
        if worker.agent is None:
            raise errors.AgentNotReady('the instance has no agent side channel (sf-agent or sf-agent2)')
        # The operation reports its own progress and end; this call only hands it over.
        self.tasks.spawn(worker.agent.run_operation(request.operation),
                         name=f'operation-{request.operation.uuid}')
        return pb.RunAgentOperationResponse()

    @errors.reported_stream
    async def StreamCommand(self, request, context):
        worker = self._worker(request.instance_uuid)
        if worker.agent is None:
            raise errors.AgentNotReady('the instance has no agent side channel (sf-agent or sf-agent2)')
        stream = worker.agent.stream_command(request.command_line, request.deadline_seconds, request.stdin)
        try:
            async for kind, data in stream:
                if kind == 'exit':
                    await worker.agent.reporter.event(
                        f'streamed command {"timed out" if data.timed_out else "exited"} with code '
                        f'{data.exit_code} after {data.execution_seconds:.1f} s',
                        {'command_line': request.command_line[:200]})
                    yield pb.StreamCommandResponse(exit=aos.CommandExit(
                        exit_code=data.exit_code, timed_out=data.timed_out,
                        execution_seconds=data.execution_seconds))
                else:
                    yield pb.StreamCommandResponse(**{kind: data})
        except OperationFailed as e:
            raise errors.StateConflict(e.message) from None
        finally:
            await stream.aclose()

    @errors.reported
    async def RebootInstance(self, request, context):
        worker = self._worker(request.instance_uuid)
        if request.hard:
            await self.hypervisor.reset(worker.name)
        else:
            await self.hypervisor.reboot(worker.name)
        return pb.RebootInstanceResponse()
