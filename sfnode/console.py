"""An instance's interactive serial console, on its console_port.

QEMU serves the serial port on a unix socket in the instance directory (and
logs it to console.log, which consoledata reads). The node holds the one
connection QEMU allows and shares it: any number of viewers (on the port, or
through the node API's AttachConsole) see the output, and what any of them
types goes to the guest. A viewer that reads too slowly
loses output rather than slowing the guest.

A viewer first proves the right to the instance: it sends a bearer token
(from POST /auth) on the first line, which the controller checks
(NodeControlService.AuthorizeConsole). With open=True (the operator's opt-in
to Shaken Fist's behaviour) anyone who reaches the port is a viewer.
"""

import asyncio
import contextlib
import logging
import re

from sfcommon.backoff import Backoff

log = logging.getLogger(__name__)

PROMPT = b'Shaken Fist serial console of instance %s.\r\nToken: '
TOKEN_TIMEOUT = 30.0        # seconds to send the token line
MAX_TOKEN_LINE = 8192
VIEWER_BUFFER = 256         # chunks a viewer may be behind before it loses output
CHUNK = 4096
_TOKEN = re.compile(rb'[A-Za-z0-9_\-.]{16,}')       # a JWT, out of whatever a telnet client adds
_TELNET_COMMAND = re.compile(rb'\xff[\xfb-\xfe].|\xff[\xf0-\xfa]', re.S)


class Viewer:
    """One viewer's output queue: the guest's bytes, oldest dropped when it lags."""

    def __init__(self):
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(VIEWER_BUFFER)
        self.dropped = 0

    def offer(self, data: bytes):
        if self.queue.full():
            self.queue.get_nowait()         # the oldest goes: a slow viewer never blocks the guest
            self.dropped += 1
        self.queue.put_nowait(data)


class SerialConsole:
    """Shares one instance's serial port between viewers."""

    def __init__(self, instance_uuid: str, socket_path: str, authorize, open_access: bool = False):
        self.uuid = instance_uuid
        self.socket_path = socket_path
        self.authorize = authorize          # async (token) -> namespace; raises if refused
        self.open = open_access
        self.viewers: set[Viewer] = set()
        self._guest: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> 'SerialConsole':
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                  limit=MAX_TOKEN_LINE)
        return self

    async def stop(self):
        if self._server is not None:
            self._server.close()
        for task in [self._pump, *self._handlers]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._pump, *self._handlers] if t), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- the guest side: one connection, kept while anyone watches ---------------------
    def _ensure_pump(self):
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._follow_guest(), name=f'console-{self.uuid}')

    async def _follow_guest(self):
        backoff = Backoff(0.1, 2.0)
        while self.viewers:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                # The guest is off or QEMU restarts: try again while viewers wait.
                await backoff.sleep()
                continue
            backoff.reset()
            self._guest = writer
            self._connected.set()
            try:
                while data := await reader.read(CHUNK):
                    for viewer in list(self.viewers):
                        viewer.offer(data)
            except OSError:
                pass
            finally:
                self._connected.clear()
                self._guest = None
                writer.close()
        self._pump = None

    @contextlib.asynccontextmanager
    async def viewing(self):
        """A viewer for as long as the block lasts (the node API's AttachConsole, whose
        caller the controller has checked): read its queue, send with to_guest."""
        viewer = Viewer()
        self.viewers.add(viewer)
        self._ensure_pump()
        try:
            yield viewer
        finally:
            self.viewers.discard(viewer)

    async def to_guest(self, data: bytes):
        await self._connected.wait()
        if self._guest is not None:
            self._guest.write(data)
            with contextlib.suppress(OSError):
                await self._guest.drain()

    # -- the viewers -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._handlers.add(task)
        peer = writer.get_extra_info('peername')
        try:
            if not self.open and not await self._admitted(reader, writer, peer):
                return
            async with self.viewing() as viewer:
                sending = asyncio.create_task(self._send(viewer, writer))
                try:
                    while data := await reader.read(CHUNK):
                        await self.to_guest(data)
                finally:
                    sending.cancel()
                    await asyncio.gather(sending, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _admitted(self, reader, writer, peer) -> bool:
        writer.write(PROMPT % self.uuid.encode())
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readuntil(b'\n'), TOKEN_TIMEOUT)
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            writer.write(b'\r\nNo token.\r\n')
            return False
        found = _TOKEN.search(_TELNET_COMMAND.sub(b'', line[:MAX_TOKEN_LINE]))
        try:
            if found is None:
                raise PermissionError('no token')
            namespace = await self.authorize(found.group().decode())
        except Exception as e:   # noqa: BLE001 -- any refusal is the same to the viewer
            log.info('console of %s refused to %s: %s', self.uuid, peer, e)
            writer.write(b'\r\nThat token may not use this console.\r\n')
            await writer.drain()
            return False
        log.info('console of %s opened for namespace %s from %s', self.uuid, namespace, peer)
        writer.write(b'\r\nConnected.\r\n')
        return True

    async def _send(self, viewer: Viewer, writer: asyncio.StreamWriter):
        while True:
            data = await viewer.queue.get()
            writer.write(data)
            await writer.drain()
