"""The agent protocol v2 on a byte stream: framing and request/reply matching.

There is no framing on the wire: each write is one serialized envelope, and
concatenated envelopes parse as one. Rather than re-parsing a growing buffer
after every read (quadratic for large replies), the reader walks protobuf's
own top-level field headers: an envelope's only field is `commands` (field 1,
length-delimited), so each command's extent is known from its header, and
complete commands are parsed as soon as they have arrived.
"""

import asyncio
import logging
import os
import string

from shakenfist.agent.v2 import agent_pb2 as pb

log = logging.getLogger(__name__)
MAX_COMMAND = 16 * 1024 * 1024      # the largest single reply accepted
_ID_CHARS = string.ascii_letters + string.digits


class ProtocolError(Exception):
    """The peer sent something that is not the v2 protocol, or too much of it."""


def new_command_id() -> str:
    return ''.join(_ID_CHARS[b % len(_ID_CHARS)] for b in os.urandom(16))


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(buf):
        b = buf[pos]
        value |= (b & 0x7f) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ProtocolError('malformed varint')
    return None


def split_commands(buf: bytearray) -> tuple[list[bytes], int]:
    """Complete `commands` fields at the start of buf, and how many bytes they use."""
    out, pos = [], 0
    while True:
        head = _varint(buf, pos)
        if head is None:
            return out, pos
        tag, p = head
        if tag != 0x0a:             # field 1, wire type 2
            raise ProtocolError(f'unexpected field tag {tag}')
        length = _varint(buf, p)
        if length is None:
            return out, pos
        size, p = length
        if size > MAX_COMMAND:
            raise ProtocolError(f'a reply of {size} bytes is over the {MAX_COMMAND} byte limit')
        if p + size > len(buf):
            return out, pos
        out.append(bytes(buf[p:p + size]))
        pos = p + size


class AgentChannel:
    """One v2 conversation. Replies are routed to waiters by command_id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self._queues: dict[str, asyncio.Queue] = {}
        self.closed = asyncio.Event()
        self.error: Exception | None = None
        self.last_heard = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._read())

    async def send(self, **command) -> str:
        """Send one command (e.g. ping_request=pb.PingRequest()); returns its command_id."""
        command_id = new_command_id()
        await self.send_as(command_id, **command)
        return command_id

    async def send_as(self, command_id: str, **command):
        """Send a command under an existing id: the pieces of one file transfer share
        their request's id, so their acknowledgements come back to one waiter."""
        envelope = pb.HypervisorToAgent(commands=[pb.HypervisorToAgentCommand(
            command_id=command_id, **command)])
        self._queues.setdefault(command_id, asyncio.Queue())
        self.writer.write(envelope.SerializeToString())
        await self.writer.drain()

    async def reply(self, command_id: str, timeout: float | None) -> pb.AgentToHypervisorCommand:
        """The next reply to command_id; TimeoutError, or ProtocolError if the stream broke.
        timeout None: the caller's deadline (a clock's timeout_at) bounds the wait."""
        queue = self._queues[command_id]
        getter = asyncio.ensure_future(queue.get())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait({getter, closed}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not getter.done():       # timed out, closed or cancelled: take no reply later
                getter.cancel()
        if getter in done:
            return getter.result()
        if self.closed.is_set():
            raise self.error or ProtocolError('the agent connection closed')
        raise TimeoutError

    def forget(self, command_id: str):
        self._queues.pop(command_id, None)

    async def request(self, timeout: float, **command) -> pb.AgentToHypervisorCommand:
        command_id = await self.send(**command)
        try:
            return await self.reply(command_id, timeout)
        finally:
            self.forget(command_id)

    async def _read(self):
        buf = bytearray()
        try:
            while True:
                data = await self.reader.read(256 * 1024)
                if not data:
                    raise ProtocolError('the agent connection closed')
                buf += data
                self.last_heard = asyncio.get_running_loop().time()
                raw, used = split_commands(buf)
                del buf[:used]
                for item in raw:
                    cmd = pb.AgentToHypervisorCommand.FromString(item)
                    queue = self._queues.get(cmd.command_id)
                    if queue is not None:
                        queue.put_nowait(cmd)
                    else:
                        log.debug('agent reply to an unknown command %s', cmd.command_id)
        except (ProtocolError, ConnectionError, OSError) as e:
            self.error = e if isinstance(e, ProtocolError) else ProtocolError(str(e))
        except Exception as e:   # noqa: BLE001 -- a reply that does not parse
            self.error = ProtocolError(f'unparsable reply: {e}')
        finally:
            self.closed.set()

    async def close(self):
        self._task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        self.closed.set()
