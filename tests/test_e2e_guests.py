"""End to end on real QEMU/TCG guests: sf-up (etcd, controller, gateway, one sfnode
on libvirt) driven through gRPC and the real sf-client, as users do."""

import asyncio
import base64
import functools
import hashlib
import http.server
import json
import os
import pathlib
import re
import struct
import subprocess
import threading

import grpc
import pytest
import pytest_asyncio

from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net, specs_pb2
from tests.helpers import get
from tests.plane import Plane
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGE_DIR = ROOT / 'build' / 'guest'
BOOT = 90          # seconds a boot may take on a busy 2-core runner under TCG


@pytest.fixture(scope='module')
def image_url():
    """The test image over HTTP, as offline tests fetch base images. It is on loopback,
    an internal address: the plane's operator allow-lists it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(IMAGE_DIR))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}/sftest.qcow2'
    server.shutdown()


@pytest.fixture(scope='module')
def plane(image_url):
    p = Plane(nodes=1, image_allow=[image_url.rsplit('/', 1)[0] + '/']).start()
    yield p
    p.stop()


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def client(plane):
    c = await plane.client()
    yield c
    await c.close()


async def until(client, ref, what, check, timeout=BOOT):
    async def probe():
        return check(await get(client, ref))
    await eventually(probe, timeout, interval=0.25, what=f'{ref}: {what}')


def boots(plane, inst) -> list[str]:
    return re.findall(r'SFTEST boot-id: (\S+)', plane.console(inst.node, inst.uuid))


async def console_has(plane, inst, text, timeout=BOOT):
    await eventually(lambda: text in plane.console(inst.node, inst.uuid), timeout, interval=0.25,
                     what=f'{text!r} on the console')


@pytest_asyncio.fixture(scope='module', loop_scope='module')
async def guest(plane, client, image_url):
    """A guest from the image served over HTTP, on two networks, with vga and vnc."""
    for name, block in (('net1', '10.10.0.0/24'), ('net2', '10.20.0.0/24')):
        await client.networks.CreateNetwork(net.CreateNetworkRequest(name=name, netblock=block))
    await client.instances.CreateInstance(api.CreateInstanceRequest(
        name='guest', cpus=1, memory=256, disk=[specs_pb2.DiskSpec(size=1, base=image_url)],
        network=[specs_pb2.NetworkSpec(network_uuid='net1'), specs_pb2.NetworkSpec(network_uuid='net2')],
        video=specs_pb2.VideoSpec(model=specs_pb2.VIDEO_MODEL_VGA, memory=16384, vdi=specs_pb2.VDI_TYPE_VNC)))
    await until(client, 'guest', 'created', lambda i: i.state == pb.INSTANCE_STATE_CREATED)
    inst = await get(client, 'guest')
    await console_has(plane, inst, 'SFTEST init: ready')
    return inst


async def test_a_guest_boots_from_an_image_fetched_over_http_with_two_nics(plane, client, guest):
    text = plane.console(guest.node, guest.uuid)
    macs = {i.macaddr for i in guest.interfaces}
    assert {m for m in re.findall(r'SFTEST nic-added: eth\d (\S+)', text)} == macs
    assert 'SFTEST config-drive: hostname=guest' in text
    events = (await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref='guest', limit=200))).events
    fetched = [e.message for e in events if e.message.startswith('Fetching required blob')]
    assert any(m.endswith('100% complete') for m in fetched)
    assert guest.console_port and guest.vdi_port and guest.power_state == pb.POWER_STATE_ON
    assert [d.device for d in guest.disks][:1] == ['vda']


async def test_usage_events_carry_cpu_disk_and_network_statistics(client, guest):
    from shakenfist.v1 import event_pb2

    async def usage():
        events = (await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
            instance_ref='guest', event_type=event_pb2.EVENT_TYPE_USAGE, limit=1))).events
        return events[0] if events else None
    # The plane's nodes report usage every 5 s (SF_NODE_USAGE_INTERVAL in tests/plane.py).
    event = await eventually(usage, 30, interval=0.5, what='a usage event')
    extra = dict(event.extra)
    assert set(extra) >= {'cpu usage', 'disk usage', 'network usage'}, extra
    assert extra['cpu usage']['cpu time ns'] > 0
    assert 'vda' in extra['disk usage']


async def test_the_agent_becomes_ready(client, guest):
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    assert (await get(client, 'guest')).agent_system_boot_time > 1e9


async def test_power_off_and_on_soft_and_hard_reboot_pause_and_unpause(plane, client, guest):
    ref = api.PowerOffInstanceRequest(instance_ref='guest')
    await client.instances.PowerOffInstance(ref)
    await until(client, 'guest', 'off', lambda i: i.power_state == pb.POWER_STATE_OFF)
    await client.instances.PowerOffInstance(ref)      # again: it shows off, not on its way there
    await until(client, 'guest', 'off again', lambda i: i.power_state == pb.POWER_STATE_OFF)
    seen = len(boots(plane, guest))
    await client.instances.PowerOnInstance(api.PowerOnInstanceRequest(instance_ref='guest'))
    await until(client, 'guest', 'on', lambda i: i.power_state == pb.POWER_STATE_ON)
    await eventually(lambda: len(boots(plane, guest)) > seen, BOOT, what='a boot after power on')
    for call, request in (('SoftRebootInstance', api.SoftRebootInstanceRequest),
                          ('HardRebootInstance', api.HardRebootInstanceRequest)):
        await console_has(plane, guest, 'SFTEST init: ready')
        await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
        seen = len(boots(plane, guest))
        await getattr(client.instances, call)(request(instance_ref='guest'))
        await eventually(lambda: len(boots(plane, guest)) > seen, BOOT, what=f'a boot after {call}')
    await client.instances.PauseInstance(api.PauseInstanceRequest(instance_ref='guest'))
    await until(client, 'guest', 'paused', lambda i: i.power_state == pb.POWER_STATE_PAUSED
                and i.agent_state == pb.AGENT_STATE_NOT_READY_INSTANCE_PAUSED)
    await client.instances.UnpauseInstance(api.UnpauseInstanceRequest(instance_ref='guest'))
    await until(client, 'guest', 'running and ready', lambda i: i.power_state == pb.POWER_STATE_ON
                and i.agent_state == pb.AGENT_STATE_READY)


async def test_a_guest_that_powered_itself_off_powers_on_again(plane, client, guest):
    from shakenfist.v1 import agent_operation_service_pb2 as aop
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    await client.agentops.ExecuteCommand(aop.ExecuteCommandRequest(instance_ref='guest',
                                                                   command_line='poweroff -f'))
    await until(client, 'guest', 'off by itself', lambda i: i.power_state == pb.POWER_STATE_OFF)
    seen = len(boots(plane, guest))
    # The desired power was on all along: the power on still reaches the node.
    await client.instances.PowerOnInstance(api.PowerOnInstanceRequest(instance_ref='guest'))
    await eventually(lambda: len(boots(plane, guest)) > seen, BOOT, what='a boot after power on')
    await until(client, 'guest', 'on and ready', lambda i: i.power_state == pb.POWER_STATE_ON
                and i.agent_state == pb.AGENT_STATE_READY)


async def test_hot_plug_a_nic_the_guest_notices_then_unplug_it(plane, client, guest):
    await console_has(plane, guest, 'SFTEST init: ready')
    r = await client.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
        instance_ref='guest', network=specs_pb2.NetworkSpec(network_uuid='net1')))
    mac = r.network_interface.macaddr
    await console_has(plane, guest, f'SFTEST nic-added: eth2 {mac}')
    await client.instances.RemoveInstanceInterface(api.RemoveInstanceInterfaceRequest(
        instance_ref='guest', interface_uuid=r.network_interface.uuid))
    await console_has(plane, guest, 'SFTEST nic-removed: eth2')


async def test_a_screenshot_is_a_png_of_the_screen(client, guest):
    from shakenfist.v1 import blob_service_pb2 as b
    r = await client.instances.GetScreenshot(api.GetScreenshotRequest(instance_ref='guest'))
    data = b''
    async for part in client.blobs.ReadBlobData(b.ReadBlobDataRequest(blob_uuid=r.blob_uuid)):
        data += part.data.data
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = struct.unpack('>II', data[16:24])
    assert (width, height) == (720, 400)        # the VGA text console


async def test_console_tail_and_clear(plane, client, guest):
    tail = (await client.instances.GetConsoleData(api.GetConsoleDataRequest(
        instance_ref='guest', length=200))).console.data
    whole = plane.console(guest.node, guest.uuid).encode()
    assert len(tail) == 200 and whole.endswith(tail)
    await client.instances.DeleteConsoleData(api.DeleteConsoleDataRequest(instance_ref='guest'))
    after = (await client.instances.GetConsoleData(api.GetConsoleDataRequest(
        instance_ref='guest', length=-1))).console.data
    assert len(after) < len(whole) and b'SFTEST init: started' not in after


async def open_console(guest, token=None):
    """A connection to the guest's serial console port; with a token, admitted."""
    reader, writer = await asyncio.open_connection('127.0.0.1', guest.console_port)
    assert b'Token: ' in await asyncio.wait_for(reader.readuntil(b'Token: '), 10)
    if token is not None:
        writer.write(token.encode() + b'\n')
        await writer.drain()
    return reader, writer


async def read_until_text(reader, text: bytes, timeout=30):
    seen = b''
    async def more():
        nonlocal seen
        while text not in seen:
            chunk = await reader.read(4096)
            if not chunk:
                raise EOFError(seen.decode(errors='replace'))
            seen += chunk
    await asyncio.wait_for(more(), timeout)
    return seen


async def test_the_serial_console_admits_token_holders_only_and_is_shared(plane, client, guest):
    from shakenfist.v1 import auth_service_pb2 as auth
    from tests.grpc_client import Client
    # No token, a bad one, or one of a namespace that cannot see the instance: refused.
    await client.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='stranger'))
    await client.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='stranger', key_name='k', key='sk'))
    stranger = await Client(plane.endpoints['grpc']).login('stranger', 'sk')
    for token in ('', 'not-a-token-at-all', stranger.token):
        reader, writer = await open_console(guest, token)
        answer = await read_until_text(reader, b'may not use this console', 10)
        assert b'Connected' not in answer
        assert await reader.read() == b''           # and the connection is closed
        writer.close()
    await stranger.close()
    # Two viewers with the owner's token: both see what either makes the guest print.
    (r1, w1), (r2, w2) = [await open_console(guest, client.token) for _ in range(2)]
    try:
        for reader in (r1, r2):
            await read_until_text(reader, b'Connected.')
        w1.write(b'\necho console-$((6 * 7))-works\n')
        await w1.drain()
        for reader in (r1, r2):
            await read_until_text(reader, b'console-42-works')
        # What was typed ran in the guest, and the log (consoledata) has it too.
        await console_has(plane, guest, 'console-42-works')
    finally:
        for w in (w1, w2):
            w.close()


class Attached:
    """An AttachConsole stream: send() types, until_text() reads what the guest printed."""

    def __init__(self, client, ref='guest'):
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.outbox.put_nowait(api.AttachConsoleRequest(instance_ref=ref))
        self.call = client.instances.AttachConsole(self._requests())
        self.seen = b''

    async def _requests(self):
        while (message := await self.outbox.get()) is not None:
            yield message

    def send(self, text: str):
        self.outbox.put_nowait(api.AttachConsoleRequest(data=text.encode()))

    async def until_text(self, text: bytes, timeout=30):
        async def more():
            while text not in self.seen:
                reply = await self.call.read()
                assert reply is not grpc.aio.EOF, self.seen
                self.seen += reply.data
        await asyncio.wait_for(more(), timeout)

    def close(self):
        self.outbox.put_nowait(None)
        self.call.cancel()


async def follow(client, pieces: list, **kw):
    """Append FollowConsole's messages to pieces until cancelled."""
    async for piece in client.instances.FollowConsole(api.FollowConsoleRequest(instance_ref='guest', **kw)):
        pieces.append(piece)


def followed(pieces) -> bytes:
    """What a follower got, checked to be contiguous from its first message's offset."""
    if not pieces:
        return b''
    position = pieces[0].offset
    for piece in pieces:
        assert piece.offset == position, [(p.offset, len(p.data)) for p in pieces]
        position += len(piece.data)
    return b''.join(p.data for p in pieces)


async def test_the_console_by_offset_follow_and_attach_with_two_viewers_each(plane, client, guest):
    from shakenfist.v1 import auth_service_pb2 as auth
    from tests.grpc_client import Client
    # By offset: a piece from 0, then from where it ended; the end offset is the log's size.
    whole = plane.console(guest.node, guest.uuid).encode()      # the log only grows from here
    n = len(whole) // 2
    assert n > 10
    first = await client.instances.ReadConsole(api.ReadConsoleRequest(instance_ref='guest', offset=0, length=n))
    assert (first.offset, first.data) == (0, whole[:n])
    rest = await client.instances.ReadConsole(api.ReadConsoleRequest(
        instance_ref='guest', offset=n, length=1048576))
    assert rest.offset == n and rest.end_offset == n + len(rest.data)
    assert (first.data + rest.data).startswith(whole)
    beyond = await client.instances.ReadConsole(api.ReadConsoleRequest(instance_ref='guest', offset=10**9))
    assert beyond.offset == 0                       # past the end (cleared since): from 0

    # Two followers from the end and two interactive viewers at once: what one viewer
    # types runs, and both viewers and both followers see its output.
    pieces = [[], []]
    followers = [asyncio.create_task(follow(client, p)) for p in pieces]
    viewers = [Attached(client), Attached(client)]
    try:
        await eventually(lambda: all(pieces), 30, interval=0.1, what='both followers started')
        viewers[0].send('\necho attach-$((6 * 7))-works\n')
        for v in viewers:
            await v.until_text(b'attach-42-works')
        for p in pieces:
            await eventually(lambda p=p: b'attach-42-works' in followed(p), 30, interval=0.1,
                             what='the output reached a follower')
        # A follower's bytes are the log's, at the offsets it said.
        start, got = pieces[0][0].offset, followed(pieces[0])
        again = await client.instances.ReadConsole(api.ReadConsoleRequest(
            instance_ref='guest', offset=start, length=len(got)))
        assert again.data == got
    finally:
        for f in followers:
            f.cancel()
        for v in viewers:
            v.close()
    # A follower may start at an offset: it gets the log from there.
    tail = []
    task = asyncio.create_task(follow(client, tail, offset=start))
    try:
        await eventually(lambda: len(followed(tail)) >= len(got), 30, interval=0.1, what='replay')
        assert followed(tail).startswith(got)
    finally:
        task.cancel()

    # Another namespace's token attaches to nothing and follows nothing.
    await client.auth.CreateNamespace(auth.CreateNamespaceRequest(namespace='outsider'))
    await client.auth.AddNamespaceKey(auth.AddNamespaceKeyRequest(namespace='outsider', key_name='k', key='ok'))
    outsider = await Client(plane.endpoints['grpc']).login('outsider', 'ok')
    try:
        stranger = Attached(outsider, guest.uuid)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stranger.until_text(b'anything', 10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        stranger.close()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await follow(outsider, [], offset=0)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await outsider.close()


async def test_the_console_and_vnc_as_websockets_through_the_gateway(plane, client, guest):
    import aiohttp
    base = plane.endpoints['rest'].replace('http', 'ws', 1)
    bearer = {'authorization': f'Bearer {client.token}'}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        # A browser's way: the token in the first frame, then keys as text frames.
        async with session.ws_connect(f'{base}/instances/guest/console:attach') as ws:
            await ws.send_json(bearer)
            await ws.send_str('\necho websocket-$((6 * 7))-works\n')
            seen = b''
            async with asyncio.timeout(30):
                while b'websocket-42-works' not in seen:
                    frame = await ws.receive()
                    assert frame.type == aiohttp.WSMsgType.BINARY, frame
                    seen += frame.data
        # No token, or a wrong one: an error frame, then a close saying 401.
        for first in ({'nothing': 1}, {'authorization': 'Bearer not-a-token'}):
            async with session.ws_connect(f'{base}/instances/guest/console:attach') as ws:
                await ws.send_json(first)
                frame = await ws.receive()
                assert frame.type == aiohttp.WSMsgType.TEXT and json.loads(frame.data)['status'] == 401
                assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4401
        # A plain GET is told to upgrade.
        async with session.get(plane.endpoints['rest'] + '/instances/guest/console:attach') as r:
            assert r.status == 426 and (await r.json())['status'] == 426
        # The VNC server through ConnectVdi: it speaks RFB first.
        async with session.ws_connect(f'{base}/instances/guest/vdi:connect') as ws:
            await ws.send_json(bearer)
            frame = await ws.receive(timeout=30)
            assert frame.type == aiohttp.WSMsgType.BINARY and frame.data.startswith(b'RFB 003.'), frame


async def stream(client, command, ref='guest', **kw):
    """(stdout, stderr, exit, when the first stdout came) of a StreamCommand."""
    from shakenfist.v1 import agent_operation_service_pb2 as aos
    out, err, first_out = b'', b'', None
    async for piece in client.agentops.StreamCommand(aos.StreamCommandRequest(
            instance_ref=ref, command_line=command, **kw)):
        if piece.stdout and first_out is None:
            first_out = (out + piece.stdout, err)
        out, err = out + piece.stdout, err + piece.stderr
        if piece.HasField('exit'):
            return out, err, piece.exit, first_out
    raise AssertionError('the stream ended without an exit')


async def test_a_streamed_command_with_stdin_and_a_deadline_that_kills_its_tree(plane, client, guest):
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    # Output arrives while the command runs: the first line comes before what it
    # prints after reading all of its stdin.
    out, err, end, first = await stream(
        client, 'echo one; cat > /tmp/in; echo two >&2; sha256sum /tmp/in; exit 4', stdin=b'x' * 300000)
    assert first == (b'one\n', b'')
    assert err == b'two\n' and end.exit_code == 4 and not end.timed_out
    assert out == b'one\n' + hashlib.sha256(b'x' * 300000).hexdigest().encode() + b'  /tmp/in\n'
    # The deadline kills the command and what it started.
    out, err, end, _ = await stream(client, '(sleep 300; echo late) & sleep 301', deadline_seconds=2)
    assert end.timed_out and end.exit_code == -9 and end.execution_seconds < 10
    out, _, end, _ = await stream(client, 'ps')
    assert b'sleep 30' not in out, out
    # A caller that leaves kills its command.
    from shakenfist.v1 import agent_operation_service_pb2 as aos
    call = client.agentops.StreamCommand(aos.StreamCommandRequest(
        instance_ref='guest', command_line='echo up; sleep 302', deadline_seconds=600))
    assert (await call.read()).stdout == b'up\n'
    call.cancel()

    async def killed():
        return b'sleep 302' not in (await stream(client, 'ps'))[0]
    await eventually(killed, 30, interval=0.5, what='the abandoned command killed')
    # Over REST: NDJSON, the bytes base64; and the end is an event of the instance.
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(plane.endpoints['rest'] + '/instances/guest/agent/exec',
                             json={'command_line': 'echo rest; exit 2'},
                             headers={'Authorization': f'Bearer {client.token}'}) as r:
            assert r.status == 200 and r.content_type == 'application/x-ndjson'
            lines = [json.loads(line) for line in (await r.text()).splitlines()]
    assert base64.b64decode(lines[0]['stdout']) == b'rest\n' and lines[-1]['exit']['exit_code'] == 2
    events = (await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref='guest'))).events
    assert any(e.message == 'streamed command exited with code 2 after ' + e.message.split('after ')[-1]
               for e in events), [e.message for e in events[:10]]


async def test_sf_client_execute_upload_download_screenshot(plane, client, guest, tmp_path):
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    sf = plane.sf()
    _, out, _ = await sf.run('instance', 'execute', 'guest', 'echo hello; echo oops >&2; exit 3')
    assert 'exit code     : 3' in out and 'hello' in out and 'oops' in out
    src, back = tmp_path / 'random.bin', tmp_path / 'back.bin'
    src.write_bytes(os.urandom(1024 * 1024))
    await sf.run('instance', 'upload', 'guest', str(src), '/tmp/random.bin')
    await sf.run('instance', 'download', 'guest', '/tmp/random.bin', str(back))
    assert back.read_bytes() == src.read_bytes()
    shot = tmp_path / 'shot.png'
    await sf.run('instance', 'screenshot', 'guest', str(shot))
    assert shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


async def test_boot_time_changes_after_a_hard_reboot(client, guest):
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    before = (await get(client, 'guest')).agent_system_boot_time
    await client.instances.HardRebootInstance(api.HardRebootInstanceRequest(instance_ref='guest'))
    await until(client, 'guest', 'a new boot time', lambda i: i.agent_state == pb.AGENT_STATE_READY
                and abs(i.agent_system_boot_time - before) > 2)
    events = (await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref='guest'))).events
    assert 'reboot detected' in [e.message for e in events]


async def test_a_50_mib_command_ends_in_error_and_the_next_operation_works(client, guest):
    from shakenfist.v1 import agent_operation_service_pb2 as aop
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    op = (await client.agentops.ExecuteCommand(aop.ExecuteCommandRequest(
        instance_ref='guest', command_line='head -c 52428800 /dev/zero', deadline_seconds=120))).agent_operation

    async def ended(uuid):
        r = (await client.agentops.GetAgentOperation(aop.GetAgentOperationRequest(
            agent_operation_uuid=uuid))).agent_operation
        return r if r.state in (5, 6, 7) else None
    done = await eventually(lambda: ended(op.uuid), 150, interval=0.5, what='the big command ended')
    assert done.state == 6 and 'limit' in done.error_message
    await until(client, 'guest', 'agent ready', lambda i: i.agent_state == pb.AGENT_STATE_READY)
    nxt = (await client.agentops.ExecuteCommand(aop.ExecuteCommandRequest(
        instance_ref='guest', command_line='echo still here'))).agent_operation
    done = await eventually(lambda: ended(nxt.uuid), 60, interval=0.5, what='the next command')
    assert done.state == 5 and done.results['0'].stdout == 'still here\n'


async def test_delete_leaves_nothing_behind(plane, client, guest):
    node_dir = plane.state / 'nodes' / guest.node
    taps = [f'tap-{i.uuid[:8]}' for i in guest.interfaces]
    await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='guest'))
    await until(client, guest.uuid, 'deleted', lambda i: i.state == pb.INSTANCE_STATE_DELETED)
    assert not (node_dir / 'instances' / guest.uuid).exists()
    qemus = subprocess.run(['pgrep', '-f', f'guest=sf-{guest.uuid}'], capture_output=True, text=True)
    assert qemus.stdout.strip() == ''
    links = subprocess.run(['ip', '-o', 'link'], capture_output=True, text=True).stdout
    assert not any(t in links for t in taps)
    from sfup.nodes import bridge_prefix
    # Nothing of the guest's is left on its networks' bridges; the bridges (and their
    # VXLANs) stay while the networks exist: node0, the network node, carries them.
    bridges = {f'{bridge_prefix(plane.state, 0)}{n.vxlan_id:06x}' for n in (
        await client.networks.ListNetworks(net.ListNetworksRequest())).networks}
    for bridge in bridges:
        ports = subprocess.run(['ip', '-o', 'link', 'show', 'master', bridge], capture_output=True,
                               text=True, check=False).stdout
        assert 'tap-' not in ports, ports
    # The base image stays in the content cache: it is shared by whatever uses it next.
    assert list((node_dir / 'images' / 'content').iterdir())
