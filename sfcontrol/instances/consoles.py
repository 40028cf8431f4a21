"""Consoles: the serial console's data, the graphical console's .vv helper, screenshots."""

from sfcommon import errors, states
from sfcontrol.blobs import bytes_chunks
from sfcontrol.store import keys
from sfcontrol.store.etcd import Txn
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_service_pb2 as api
from shakenfist.v1 import specs_pb2

from .lifecycle import AUDIT, OBJ, Instances

CONSOLE_DEFAULT_LENGTH = 10240
READ_DEFAULT_LENGTH = 65536


class Consoles:
    def __init__(self, instances: Instances):
        self.instances = instances

    async def console_data(self, req: api.GetConsoleDataRequest):
        entry = self.instances.resolve(req.instance_ref)
        length = req.length if req.HasField('length') else CONSOLE_DEFAULT_LENGTH
        if length < -1:
            raise errors.InvalidArgument('length must be -1 (everything) or a number of bytes')
        if not entry.value.HasField('node') or entry.value.state in (states.DELETED,):
            return api.GetConsoleDataResponse(console={'content_type': 'application/octet-stream'})
        reply = await self.instances.nodes.call(entry.value.node, 'GetConsoleData', node_pb2.GetConsoleDataRequest(
            instance_uuid=entry.value.uuid, length=length))
        resp = api.GetConsoleDataResponse()
        resp.console.content_type = 'application/octet-stream'
        resp.console.data = reply.data
        return resp

    async def read_console(self, req: api.ReadConsoleRequest) -> api.ReadConsoleResponse:
        """From a byte offset: the bytes, where they start, and the log's end."""
        entry = self.instances.resolve(req.instance_ref)
        if not entry.value.HasField('node') or entry.value.state == states.DELETED:
            return api.ReadConsoleResponse()
        reply = await self.instances.nodes.call(entry.value.node, 'GetConsoleData', node_pb2.GetConsoleDataRequest(
            instance_uuid=entry.value.uuid, offset=req.offset,
            length=req.length if req.HasField('length') else READ_DEFAULT_LENGTH))
        return api.ReadConsoleResponse(data=reply.data, offset=reply.offset, end_offset=reply.end_offset)

    async def follow_console(self, req: api.FollowConsoleRequest):
        """The log as it grows, relayed from the node's FollowConsole."""
        inst = self.instances.active(req.instance_ref).value
        node_req = node_pb2.FollowConsoleRequest(instance_uuid=inst.uuid)
        if req.HasField('offset'):
            node_req.offset = req.offset
        async for piece in self.instances.nodes.stream(inst.node, 'FollowConsole', node_req):
            yield api.FollowConsoleResponse(data=piece.data, offset=piece.offset)

    async def attach_console(self, requests):
        """The interactive console: the caller's namespace must see the instance named
        in the first message; then bytes are relayed both ways to the node's shared console."""
        first, inst = await self._first(requests, 'AttachConsole')

        async def typed():
            async for message in requests:
                yield node_pb2.AttachConsoleRequest(data=message.data)
        yield api.AttachConsoleResponse()       # attached: the caller may start typing
        async for piece in self.instances.nodes.stream(inst.node, 'AttachConsole', _prefixed(
                node_pb2.AttachConsoleRequest(instance_uuid=inst.uuid, data=first.data), typed())):
            yield api.AttachConsoleResponse(data=piece.data)

    async def connect_vdi(self, requests):
        """The VNC byte stream, relayed to the node's ConnectVdi."""
        first, inst = await self._first(requests, 'ConnectVdi')
        if not inst.HasField('vdi_port'):
            raise errors.NotReady(f'instance {inst.uuid} has no graphical console')

        async def sent():
            async for message in requests:
                yield node_pb2.ConnectVdiRequest(data=message.data)
        async for piece in self.instances.nodes.stream(inst.node, 'ConnectVdi', _prefixed(
                node_pb2.ConnectVdiRequest(instance_uuid=inst.uuid, data=first.data), sent())):
            yield api.ConnectVdiResponse(data=piece.data)

    async def _first(self, requests, method):
        first = await anext(requests, None)
        if first is None or not first.instance_ref:
            raise errors.InvalidArgument(f'the first message of {method} must name the instance')
        return first, self.instances.active(first.instance_ref).value

    async def clear_console(self, req):
        entry = self.instances.resolve(req.instance_ref)

        async def act():
            await self.instances.nodes.call(entry.value.node, 'ClearConsoleData',
                                  node_pb2.ClearConsoleDataRequest(instance_uuid=entry.value.uuid))
        return await self.instances.node_action(req, entry, 'console log cleared', act,
                                       api.DeleteConsoleDataResponse())

    def vdi_helper(self, req):
        entry = self.instances.resolve(req.instance_ref)
        inst = entry.value
        if not inst.HasField('vdi_port'):
            raise errors.NotReady(f'instance {inst.uuid} has no console yet')
        node = self.instances.core.cache.get(keys.node(inst.node))
        vdi = 'vnc' if inst.video.vdi == specs_pb2.VDI_TYPE_VNC else 'spice'
        placement = self.instances.core.cache.get(keys.placement(inst.node, inst.uuid))
        lines = ['[virt-viewer]', f'type={vdi}', f'host={node.value.console_host if node else ""}',
                 f'port={inst.vdi_port}']
        if placement is not None and placement.value.console_password:
            lines.append(f'password={placement.value.console_password}')
        if inst.HasField('vdi_tls_port'):
            lines.append(f'tls-port={inst.vdi_tls_port}')
        lines += [f'title={inst.name}', 'delete-this-file=1']
        resp = api.GetVdiConsoleHelperResponse()
        resp.helper.content_type = 'application/x-virt-viewer'
        resp.helper.data = ('\n'.join(lines) + '\n').encode()
        return resp

    async def screenshot(self, req: api.GetScreenshotRequest):
        entry = self.instances.active(req.instance_ref)
        inst = entry.value
        reply = await self.instances.nodes.call(inst.node, 'TakeScreenshot',
                                      node_pb2.TakeScreenshotRequest(instance_uuid=inst.uuid))
        blob = await self.instances.blobs.store(bytes_chunks(reply.png), 'instance', inst.uuid, inst.namespace)

        def build():
            txn = Txn()
            self.instances.core.event(txn, inst.namespace, OBJ, inst.uuid, AUDIT,
                            'acquired screenshot of instance console', {'blob': blob.uuid})
            return txn, api.GetScreenshotResponse(blob_uuid=blob.uuid)
        return await self.instances.core.mutate(build)


async def _prefixed(first, rest):
    """first, then the messages of the async iterator rest."""
    yield first
    async for message in rest:
        yield message
