"""The host side of the legacy agent protocol v1, on the `sf-agent` virtio-serial
port (shared/reference/shakenfist-rest-api.md §E.4): what shakenfist-agent 0.7.0
and older speak, and what the seed's examples create with
`side_channels=['sf-agent']`.

Packets are `*SFv001[%08d]` and that many bytes of UTF-8 JSON (as 0.7.0's
protocol.py writes them: the reference's `*SFv001*[` has one `*` too many, and
0.7.0's reader thread dies on it); each request
carries a `unique` that its response repeats (errors do not: command-error and
unknown-command end whatever is waiting). The agent announces itself with
`agent-start` (version, boot time) only when it starts, so a host that connects
later asks `is-system-running`. The agent answers one packet at a time: while it
runs a command it answers nothing else, which the session's one-operation lock
already respects (the monitor does not ping during an operation).

V1Session is AgentSession (sfnode/agent/session.py) with this wire: the same
reporter, states, deadlines, reboot detection and results as v2.
"""

import asyncio
import base64
import json
import logging
import uuid as uuidlib

from sfnode.agent import session as base
from sfnode.agent.v2 import ProtocolError
from shakenfist.v1 import agent_operation_pb2 as opb
from shakenfist.v1 import instance_pb2 as ipb

log = logging.getLogger(__name__)
PREAMBLE = b'*SFv001'
HEADER = len(PREAMBLE) + 10             # the preamble, then [%08d]
MAX_PACKET = 99_999_999                 # the protocol's own limit (8 digits)
MAX_WRITE = 2048                        # writes in pieces, as the agent does
CHUNK = 64 * 1024                       # put-file pieces (base64 in JSON)
S = opb.AgentOperationState
ERRORS = ('command-error', 'unknown-command', 'json-decode-failure')


def encode(packet: dict) -> bytes:
    data = json.dumps(packet).encode()
    if len(data) > MAX_PACKET:
        raise ValueError(f'a v1 packet is at most {MAX_PACKET} bytes')
    return PREAMBLE + f'[{len(data):08d}]'.encode() + data


def split_packets(buf: bytearray) -> list[dict]:
    """The whole packets at the front of buf (removed from it), decoded. Bytes
    before a preamble are skipped; a malformed header or body is a ProtocolError."""
    out = []
    while True:
        start = buf.find(PREAMBLE)
        if start < 0:
            del buf[:max(0, len(buf) - len(PREAMBLE) + 1)]     # keep a preamble's possible start
            return out
        del buf[:start]
        if len(buf) < HEADER:
            return out
        head = bytes(buf[len(PREAMBLE):HEADER])
        if head[:1] != b'[' or head[-1:] != b']' or not head[1:-1].isdigit():
            raise ProtocolError(f'bad v1 header {head!r}')
        length = int(head[1:-1])
        if len(buf) < HEADER + length:
            return out
        body = bytes(buf[HEADER:HEADER + length])
        del buf[:HEADER + length]
        try:
            packet = json.loads(body)
        except ValueError as e:
            raise ProtocolError(f'a v1 packet is not JSON: {e}') from e
        if not isinstance(packet, dict) or not isinstance(packet.get('command'), str):
            raise ProtocolError('a v1 packet without a command')
        out.append(packet)


class V1Channel:
    """One connection: packets out, packets in (a queue filled by a reader task)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.packets: asyncio.Queue[dict] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.error: Exception | None = None
        self._task = asyncio.create_task(self._read(), name='agent-v1-read')

    async def send(self, command: str, **fields) -> str:
        unique = fields.pop('unique', None) or uuidlib.uuid4().hex
        data = encode({'command': command, **fields, 'unique': unique})
        for i in range(0, len(data), MAX_WRITE):
            self.writer.write(data[i:i + MAX_WRITE])
        await self.writer.drain()
        return unique

    async def next(self, timeout: float | None) -> dict:
        if self.closed.is_set() and self.packets.empty():
            raise ConnectionError(f'the agent connection closed ({self.error or "EOF"})')
        get = asyncio.ensure_future(self.packets.get())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait({get, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        if closed in done:
            raise ConnectionError(f'the agent connection closed ({self.error or "EOF"})')
        raise TimeoutError('no packet from the agent')

    async def _read(self):
        buf = bytearray()
        try:
            while data := await self.reader.read(65536):
                buf += data
                if len(buf) > MAX_PACKET + HEADER:
                    raise ProtocolError('a v1 packet beyond the protocol limit')
                for packet in split_packets(buf):
                    self.packets.put_nowait(packet)
        except (ProtocolError, OSError) as e:
            self.error = e
        finally:
            self.closed.set()

    async def close(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.closed.set()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ConnectionError):
            pass


class V1Session(base.AgentSession):
    """AgentSession over protocol v1."""

    def _open(self, reader, writer):
        return V1Channel(reader, writer)

    async def stream_command(self, command, deadline, stdin):
        raise base.OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                   'the v1 agent protocol cannot stream a command (use ExecuteCommand)')
        yield       # an async generator, as AgentSession's

    async def _response(self, unique: str, timeout: float | None = None) -> dict:
        """The next packet answering unique; agent-start and stale answers are taken
        in passing; an error packet raises OperationFailed."""
        while True:
            packet = await self.channel.next(timeout)
            command = packet['command']
            if command == 'agent-start':
                await self._started(packet)
            elif command in ERRORS:
                raise base.OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                           f'the agent reported {command}: {packet.get("message", "")}')
            elif command == 'ping':
                await self.channel.send('pong', unique=packet.get('unique'))
            elif packet.get('unique') == unique:
                return packet

    async def _started(self, packet: dict):
        boot_time = packet.get('system_boot_time')
        if isinstance(boot_time, (int, float)):
            await self._boot_time(float(boot_time), str(packet.get('message', '')).removeprefix('version '))

    async def _monitor(self):
        await self._set(ipb.AGENT_STATE_NOT_READY_AGENT_STARTUP)
        while True:
            async with self._lock:
                if self.state in (ipb.AGENT_STATE_READY, ipb.AGENT_STATE_READY_DEGRADED):
                    await self._ask('ping')
                else:
                    r = await self._ask('is-system-running')
                    state = base.SYSTEM_STATES.get(str(r.get('message', '')).strip(),
                                                   ipb.AGENT_STATE_NOT_READY_UNKNOWN)
                    if isinstance(r.get('system_boot_time'), (int, float)):
                        await self._boot_time(float(r['system_boot_time']))
                    if await self._set(state):
                        await self._facts()
            try:
                await asyncio.wait_for(self.channel.closed.wait(), base.KEEPALIVE)
                raise ConnectionError('the agent connection closed')
            except TimeoutError:
                pass

    async def _ask(self, command: str, **fields) -> dict:
        unique = await self.channel.send(command, **fields)
        try:
            return await self._response(unique, base.REPLY_TIMEOUT)
        except base.OperationFailed as e:
            raise ProtocolError(e.message) from e
        except TimeoutError:
            if self.quiet:
                raise ConnectionError('the instance is paused or off')
            raise

    async def _facts(self):
        r = await self._ask('gather-facts')
        facts = r.get('result') if isinstance(r.get('result'), dict) else {}
        await self.reporter.event('received system facts', {
            'distro': facts.get('distribution', {}),
            'mounts': [m.get('mount_point') for m in facts.get('mounts', []) if isinstance(m, dict)]})

    # -- operations ----------------------------------------------------------------------
    async def _command(self, op, command) -> opb.AgentCommandResult:
        kind = command.command
        if kind == opb.AGENT_COMMAND_TYPE_EXECUTE:
            return await self._execute(op, command)
        if kind == opb.AGENT_COMMAND_TYPE_PUT_BLOB:
            return await self._put(op, command)
        if kind == opb.AGENT_COMMAND_TYPE_CHMOD:
            unique = await self.channel.send('chmod', path=command.path, mode=command.mode & 0o7777)
            await self._checked(await self._response(unique))
            return opb.AgentCommandResult(command='chmod-response', path=command.path)
        if kind == opb.AGENT_COMMAND_TYPE_GET_FILE:
            return await self._get(op, command)
        raise base.OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'), f'unknown command {kind}')

    @staticmethod
    async def _checked(packet: dict) -> dict:
        if packet.get('result') is False and 'return-code' not in packet:
            raise base.OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                       f'the agent said: {packet.get("message", "failed")}')
        return packet

    async def _execute(self, op, command):
        unique = await self.channel.send('execute', **{'command-line': command.commandline,
                                                       'block-for-result': True})
        r = await self._checked(await self._response(unique))
        code = int(r.get('return-code') or 0)
        result = opb.AgentCommandResult(command='execute-response', command_line=command.commandline,
                                        return_code=code, result=r.get('result', code == 0) is True)
        for name in ('stdout', 'stderr'):
            text = r.get(name) or ''
            if len(text.encode()) > base.INLINE_OUTPUT:
                setattr(result, f'{name}_blob', await self.reporter.put_blob(base._once(text.encode())))
            else:
                setattr(result, name, text)
        return result

    async def _put(self, op, command):
        data = b''.join([chunk async for chunk in self.reporter.get_blob(command.blob_uuid)])
        unique = uuidlib.uuid4().hex
        await self.channel.send('put-file', path=command.path, unique=unique,
                                stat_result={'size': len(data)})
        for i in range(0, len(data), CHUNK):
            await self.channel.send('put-file', path=command.path, unique=unique,
                                    chunk=base64.b64encode(data[i:i + CHUNK]).decode())
            await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_EXECUTING'),
                                       last_progress=self.clock.now())
        await self.channel.send('put-file', path=command.path, unique=unique, chunk=None)
        await self._checked(await self._progress(op, unique))
        return opb.AgentCommandResult(command='put-file-response', path=command.path)

    async def _progress(self, op, unique: str) -> dict:
        """The next answer to unique, within the operation's progress timeout."""
        if op.progress_timeout:
            async with self.clock.timeout(op.progress_timeout):
                return await self._response(unique)
        return await self._response(unique)

    async def _get(self, op, command):
        unique = await self.channel.send('get-file', path=command.path)
        first = await self._checked(await self._progress(op, unique))
        st = first.get('stat_result')
        if not isinstance(st, dict):
            raise base.OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'), 'the agent did not stat the file')
        result = opb.AgentCommandResult(command='get-file-response', path=command.path)
        numbers = {k: st[k] for k in ('mode', 'size', 'uid', 'gid', 'atime', 'mtime', 'ctime')
                   if isinstance(st.get(k), (int, float))}
        result.stat_result.CopyFrom(opb.StatResult(**{k: int(v) if k in ('mode', 'size', 'uid', 'gid') else v
                                                      for k, v in numbers.items()}))

        async def chunks():
            while True:
                packet = await self._checked(await self._progress(op, unique))
                if packet.get('chunk') is None:
                    return
                await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_EXECUTING'),
                                           last_progress=self.clock.now())
                yield base64.b64decode(packet['chunk'])
        blob = await self.reporter.put_blob(chunks())
        if result.stat_result.size:
            result.content_blob = blob
        return result
