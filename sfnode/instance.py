"""One instance on this node: builds it, converges it to its desired state, tears it down.

Each instance has a worker task that works on the latest desired state it was
given (changes coalesce), with every step idempotent: after a crash and a
restart the same steps adopt what already exists instead of repeating it.
"""

import asyncio
import json
import logging
import pathlib
import socket
import time

from sfcommon import errors, states
from sfcommon.backoff import Backoff
from sfcommon.events import make_event
from sfnode import configdrive, domain, images, metrics
from sfnode.agent.session import AgentSession
from sfnode.agent.v1 import V1Session
from sfnode.console import SerialConsole
from sfnode.snapshots import Snapshotter
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import event_pb2, network_pb2, specs_pb2
from shakenfist.v1 import instance_pb2 as ipb

log = logging.getLogger(__name__)
S = ipb.InstanceState
P = ipb.PowerState
_ORDER = states.BUILD_ORDER
RETRY_FIRST, RETRY_CAP = 0.5, 60.0     # seconds between retries of a failed step


async def _vsock_connection(cid: int, port: int = 1025):
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (cid, port))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def free_port(host='127.0.0.1') -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class InstanceWorker:
    def __init__(self, node, desired: node_pb2.DesiredInstance):
        self.node = node
        self.uuid = desired.instance.uuid
        self.desired = desired
        self.dir = node.instances_dir / self.uuid
        self.state = desired.instance.state
        self.removed = False
        self.agent = None                # AgentSession (v2) or V1Session, with a side channel
        self.console = None              # SerialConsole, once the domain exists
        self.console_clears = 0          # ClearConsoleData calls, for console followers
        self.snapshots = Snapshotter(self)
        self.power_state = P.Value('POWER_STATE_UNSPECIFIED')  # as last seen, for metrics
        self._since = time.perf_counter()   # when the oldest change not yet converged came
        self._wake = asyncio.Event()
        self._wake.set()
        self.task = asyncio.create_task(self._run(), name=f'instance-{self.uuid}')

    @property
    def name(self):
        return domain.domain_name(self.uuid)

    def update(self, desired: node_pb2.DesiredInstance):
        self.desired = desired
        if self._since is None:
            self._since = time.perf_counter()
        self._wake.set()

    def remove(self):
        self.removed = True
        self._since = time.perf_counter()
        self._wake.set()

    # -- the loop ------------------------------------------------------------------
    async def _run(self):
        """Converge (or tear down) until done, on the latest desired state. A build that
        fails is an error (the instance never existed here); any later step that fails
        (power, hot-plug, console, teardown) is reported as an event and retried with
        backoff, as the kubelet's pod workers do: it never destroys the instance."""
        retry = Backoff(RETRY_FIRST, RETRY_CAP)
        while True:
            await self._wake.wait()
            self._wake.clear()
            since, self._since = self._since, None
            try:
                if self.removed:
                    await self._teardown()
                    metrics.converged(metrics.REMOVE, since)
                    return
                building = self.state in _ORDER[:-1]
                await self._converge(self.desired)
                if self.state in _ORDER:    # an error state converges to nothing
                    metrics.converged(metrics.BUILD if building else metrics.UPDATE, since)
                retry.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._since is None:     # a retry still converges the oldest change
                    self._since = since
                message = e.message if isinstance(e, errors.ApiError) else str(e) or type(e).__name__
                if self.state in _ORDER[:-1] and not self.removed:
                    log.exception('instance %s failed to build', self.uuid)
                    await self._fail(message)
                    continue
                delay = retry.next()
                log.warning('instance %s: %s; retrying in %.1f s', self.uuid, message, delay)
                await self._event('step failed, retrying', {'error': message, 'retry_in': round(delay, 2)})
                self.node.clock.call_later(delay, self._wake.set)

    async def _fail(self, message: str):
        error_state = states.ERROR_OF[self.state]
        self.state = error_state
        await self.node.link.report(self.uuid, state=error_state, error_message=message)

    async def _advance(self, state, **fields):
        """Report each state from where the instance is up to state (the controller
        refuses skipped steps); fields go with the last report."""
        if self.state not in _ORDER:
            return
        for step in _ORDER[_ORDER.index(self.state) + 1:_ORDER.index(state) + 1]:
            await self.node.link.report(self.uuid, state=step, **(fields if step == state else {}))
            self.state = step

    async def _event(self, message, extra=None, event_type=event_pb2.EVENT_TYPE_STATUS):
        await self.node.link.record(make_event(self.node.name, event_pb2.OBJECT_TYPE_INSTANCE,
                                               self.uuid, event_type, message, extra))

    # -- build and converge ------------------------------------------------------------
    async def _converge(self, desired: node_pb2.DesiredInstance):
        if self.state not in _ORDER:
            return      # an error state: the controller will remove us
        hv = self.node.hypervisor
        exists = await hv.exists(self.name)
        if not exists:
            await self._build(desired)
        elif self.state != _ORDER[-1]:
            # Defined by a node that was restarted before it said created (libvirt may
            # have killed its guest half started): power it as the build would have,
            # then say created with what a build says.
            await self._converge_power(desired)
            await self._advance(_ORDER[-1], **self._created(desired))
        await self._start_console(desired)
        await self._converge_power(desired)
        await self._converge_interfaces(desired)
        self._start_agent(desired)
        self.snapshots.converge(desired)

    async def _start_console(self, desired):
        if self.console is not None:
            return
        paths = domain.InstancePaths.under(str(self.dir), desired.instance)
        console = SerialConsole(self.uuid, paths.console_socket, self._authorize_console,
                                open_access=self.node.config.console_open)
        await console.start(self.node.console_listen, self.ports()['console'])
        self.console = console

    async def _authorize_console(self, token: str) -> str:
        reply = await self.node.link.call('AuthorizeConsole', node_pb2.AuthorizeConsoleRequest(
            node=self.node.name, instance_uuid=self.uuid, token=token), retry=False)
        return reply.namespace

    def _vsock(self, desired) -> bool:
        """The agent's transport: vsock where this node has vhost-vsock and the
        controller gave the instance a CID, otherwise a virtio-serial port."""
        return self.node.vsock and bool(desired.vsock_cid)

    def _start_agent(self, desired):
        """The agent session on the better channel the instance has: v2 on sf-agent2, else
        v1 on sf-agent (sfnode/agent/v1.py)."""
        channels = desired.instance.side_channels
        if self.agent is not None or not {ipb.SIDE_CHANNEL_SF_AGENT2, ipb.SIDE_CHANNEL_SF_AGENT} & set(channels):
            return
        if ipb.SIDE_CHANNEL_SF_AGENT2 not in channels:
            path = domain.InstancePaths.under(str(self.dir), desired.instance).legacy_agent_socket
            self.agent = V1Session(lambda: asyncio.open_unix_connection(path), AgentReporter(self), self.node.clock)
            self.agent.start()
            self.node.tasks.spawn(self._event('agent side channel', {
                'transport': 'virtio-serial', 'port': domain.AGENT1_CHANNEL, 'protocol': 'v1'}),
                name=f'event-{self.uuid}')
            return
        if self._vsock(desired):
            cid = desired.vsock_cid
            connect = lambda: _vsock_connection(cid)
            transport = {'transport': 'vsock', 'cid': cid}
        else:
            path = domain.InstancePaths.under(str(self.dir), desired.instance).agent_socket
            connect = lambda: asyncio.open_unix_connection(path)
            transport = {'transport': 'virtio-serial', 'port': domain.AGENT2_CHANNEL,
                         'why': 'this node has no vhost-vsock' if not self.node.vsock else
                         'the instance has no vsock CID'}
        self.agent = AgentSession(connect, AgentReporter(self), self.node.clock)
        self.agent.start()
        self.node.tasks.spawn(self._event('agent side channel', transport), name=f'event-{self.uuid}')

    async def _build(self, desired):
        inst = desired.instance
        await self._advance(S.Value('INSTANCE_STATE_PREFLIGHT'))
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = domain.InstancePaths.under(str(self.dir), inst)
        bases = []
        for i, spec in enumerate(inst.disk_spec):
            if blob_uuid := self._base_blob(desired, i):
                bases.append(await self.node.images.fetch_blob(
                    blob_uuid, lambda: self._read_blob(blob_uuid)))
                continue
            source = images.resolve(spec.base if spec.HasField('base') else None, self.node.image_table)
            if source is None:
                bases.append(None)
                continue
            url, trusted = source
            progress = images.Progress(url, self._event)
            bases.append(await self.node.images.fetch(url, progress, trusted=trusted))
        template = None
        if inst.nvram_template:
            template = await self.node.images.fetch_blob(
                inst.nvram_template, lambda: self._read_blob(inst.nvram_template))
        await self._advance(S.Value('INSTANCE_STATE_CREATING'))
        steps = []      # disks and the config drive are independent: make them at once
        for i, spec in enumerate(inst.disk_spec):
            path = pathlib.Path(paths.disks[i])
            if spec.type == specs_pb2.DISK_TYPE_CDROM:
                if not path.exists():
                    path.symlink_to(bases[i])
            else:
                steps.append(images.make_disk(path, bases[i], spec.size if spec.HasField('size') else None))
        if paths.config_drive:
            steps.append(configdrive.build(pathlib.Path(paths.config_drive), inst,
                                           {n.uuid: n for n in desired.networks}))
        await asyncio.gather(*steps)
        ports = self.ports()
        bridges = {n.uuid: await self.node.bridges.ensure(n) for n in desired.networks}
        options = domain.DomainOptions(
            vdi_port=ports['vdi'], vdi_password=desired.console_password,
            domain_type=self.node.domain_type, bridges=bridges, vsock=self._vsock(desired),
            console_listen=self.node.console_listen, vdi_listen=self.node.console_listen,
            nvram_template=str(template) if template else None)
        xml = domain.build_domain_xml(desired, paths, options)
        shown = xml.replace(f"passwd=\"{desired.console_password}\"", 'passwd="(hidden)"') \
            if desired.console_password else xml
        event = self.node.tasks.spawn(      # recorded while the domain is defined
            self._event('libvirt domain XML', {'xml': shown}, event_pb2.EVENT_TYPE_MUTATE),
            name=f'event-{self.uuid}')
        start = desired.desired_power_state != P.Value('POWER_STATE_OFF')
        await self.node.hypervisor.define(xml, start=start)
        await self._advance(S.Value('INSTANCE_STATE_CREATED'), **self._created(desired))
        await event

    def _created(self, desired) -> dict:
        """What the report of created says: ports, disks, interfaces, the agent."""
        inst = desired.instance
        ports = self.ports()
        slots = domain.disk_layout(inst, domain.InstancePaths.under(str(self.dir), inst))
        return dict(
            console_port=ports['console'], vdi_port=ports['vdi'], disks_set=True,
            disks=[s.to_pb(self._base_blob(desired, s.index) if s.index is not None else None)
                   for s in slots],
            interface_states={i.uuid: network_pb2.NETWORK_INTERFACE_STATE_CREATED
                              for i in inst.interfaces},
            **({'agent_state': ipb.AGENT_STATE_NOT_READY_NO_CONTACT} if inst.side_channels else {}))

    @staticmethod
    def _base_blob(desired, i: int) -> str:
        return desired.base_blobs[i] if i < len(desired.base_blobs) else ''

    async def _read_blob(self, blob_uuid: str):
        stream = self.node.link.control.GetBlob(node_pb2.GetBlobRequest(blob_uuid=blob_uuid), timeout=3600)
        async for part in stream:
            yield part.data

    def ports(self) -> dict:
        """The instance's console and VDI ports, chosen once and kept across restarts."""
        f = self.dir / 'ports.json'
        if f.exists():
            return json.loads(f.read_text())
        ports = {'console': free_port(), 'vdi': free_port()}
        f.write_text(json.dumps(ports))
        return ports

    async def _converge_power(self, desired):
        hv = self.node.hypervisor
        want = desired.desired_power_state
        have = await hv.power_state(self.name)
        if want == P.Value('POWER_STATE_OFF') and have != P.Value('POWER_STATE_OFF'):
            await hv.destroy(self.name)
            await self._event('poweroff')
        elif want == P.Value('POWER_STATE_ON') and have == P.Value('POWER_STATE_OFF'):
            paths = domain.InstancePaths.under(str(self.dir), desired.instance)
            if paths.config_drive:       # power on rebuilds the config drive (seed)
                await configdrive.build(pathlib.Path(paths.config_drive), desired.instance,
                                        {n.uuid: n for n in desired.networks})
            await hv.start(self.name)
            await self._event('poweron')
        elif want == P.Value('POWER_STATE_ON') and have == P.Value('POWER_STATE_PAUSED'):
            await hv.resume(self.name)
            await self._event('unpause')
        elif want == P.Value('POWER_STATE_PAUSED') and have == P.Value('POWER_STATE_ON'):
            await hv.suspend(self.name)
            await self._event('pause')
        self.power_state = await hv.power_state(self.name)
        await self.node.link.report(self.uuid, power_state=self.power_state)

    async def _converge_interfaces(self, desired):
        hv = self.node.hypervisor
        wanted = {i.macaddr: i for i in desired.instance.interfaces}
        present = set(await hv.interface_macs(self.name))
        added = {}
        for mac, iface in wanted.items():
            if mac not in present:
                net = next(n for n in desired.networks if n.uuid == iface.network_uuid)
                bridge = await self.node.bridges.ensure(net)
                await hv.attach_interface(self.name, domain.interface_xml(iface, bridge))
                added[iface.uuid] = network_pb2.NETWORK_INTERFACE_STATE_CREATED
                await self._event('hot plugged interface', {'interface': iface.uuid, 'mac': mac})
        for mac in present - set(wanted):
            await hv.detach_interface(self.name, mac)
            await self._event('hot unplugged interface', {'mac': mac})
        if added:
            await self.node.link.report(self.uuid, interface_states=added)

    async def _teardown(self):
        await self.snapshots.stop()
        if self.agent is not None:
            await self.agent.stop()
        if self.console is not None:
            await self.console.stop()
        hv = self.node.hypervisor
        if await hv.exists(self.name):
            await hv.destroy(self.name)
            await hv.undefine(self.name)
        images.remove_tree(self.dir)
        await self.node.bridges.release_unused()
        await self.node.link.report(self.uuid, state=S.Value('INSTANCE_STATE_DELETED'))


class AgentReporter:
    """Where an instance's AgentSession reports: the controller, over the node API."""

    def __init__(self, worker: InstanceWorker):
        self.worker = worker
        self.link = worker.node.link

    async def state(self, agent_state):
        await self.link.report(self.worker.uuid, agent_state=agent_state)

    async def boot_time(self, seconds):
        await self.link.report(self.worker.uuid, agent_system_boot_time=seconds)

    async def event(self, message, extra=None):
        await self.worker._event(message, extra)

    async def update(self, op_uuid, state, results=None, error_message=None, last_progress=None):
        request = node_pb2.UpdateAgentOperationRequest(node=self.worker.node.name, uuid=op_uuid,
                                                       state=state, results=results or {})
        if error_message is not None:
            request.error_message = error_message
        if last_progress is not None:
            request.last_progress = last_progress
        await self.link.call('UpdateAgentOperation', request)

    async def put_blob(self, chunks) -> str:
        inst = self.worker.desired.instance
        reply = await self.link.put_blob(node_pb2.PutBlobHeader(
            node=self.worker.node.name, namespace=inst.namespace, instance_uuid=inst.uuid), chunks)
        return reply.blob_uuid

    def get_blob(self, blob_uuid):
        return self.worker._read_blob(blob_uuid)
