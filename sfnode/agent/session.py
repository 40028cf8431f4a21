"""The host side of the agent protocol v2 for one instance.

A virtio-serial port carries one byte stream, so the node keeps one
connection per instance: a monitor (welcome, keepalive, is-system-running)
and, one at a time, agent operations. Every wait has a deadline: a silent or
garbling agent ends an operation in `expired` or `error`, never `executing`
forever. An operation's deadline is wall-clock time on the session's clock, so a
test moves a ManualClock past it instead of waiting.
"""

import asyncio
import base64
import contextlib
import logging

from sfcommon.clock import SYSTEM, Clock
from sfnode.agent.v2 import AgentChannel, ProtocolError
from shakenfist.agent.v2 import agent_pb2 as apb
from shakenfist.v1 import agent_operation_pb2 as opb
from shakenfist.v1 import instance_pb2 as ipb

log = logging.getLogger(__name__)
VERSION = 'shakenfist-grpc 0.1.0'
KEEPALIVE = 2.0             # seconds of silence before a keepalive
REPLY_TIMEOUT = 6.0         # a keepalive unanswered this long: unresponsive
CHUNK = 100 * 1024          # file pieces, as shakenfist-agent uses
OUTSTANDING = 5             # put-file pieces in flight
INLINE_OUTPUT = 10 * 1024   # larger stdout/stderr goes to a blob
EXIT_GRACE = 10.0           # seconds past a streamed command's deadline to hear how it ended
KILL_WAIT = 5.0             # seconds to hear the end of a streamed command killed for its caller
S = opb.AgentOperationState

SYSTEM_STATES = {
    'initializing': ipb.AGENT_STATE_NOT_READY_INITIALIZING, 'starting': ipb.AGENT_STATE_NOT_READY_STARTING,
    'maintenance': ipb.AGENT_STATE_NOT_READY_MAINTENANCE, 'stopping': ipb.AGENT_STATE_NOT_READY_STOPPING,
    'offline': ipb.AGENT_STATE_NOT_READY_OFFLINE, 'running': ipb.AGENT_STATE_READY,
    'degraded': ipb.AGENT_STATE_READY_DEGRADED,
}


class OperationFailed(Exception):
    def __init__(self, state, message):
        super().__init__(message)
        self.state, self.message = state, message


class AgentSession:
    """The agent of one instance. `reporter` has:
        async state(agent_state); async boot_time(seconds); async event(message, extra)
        async put_blob(async iterator of bytes) -> blob uuid; get_blob(uuid) -> async iterator
        async update(op_uuid, state, results=None, error_message=None, last_progress=None)
    """

    def __init__(self, connect, reporter, clock: Clock = SYSTEM):
        self._connect = connect          # async () -> (reader, writer)
        self.reporter = reporter
        self.clock = clock
        self.channel: AgentChannel | None = None
        self.state = None
        self.boot_time = None
        self.quiet = False               # paused or powered off: silence is expected
        self._lock = asyncio.Lock()      # one operation at a time on the stream
        self._ready = asyncio.Event()
        self._task = None

    def start(self):
        self._task = asyncio.create_task(self._run(), name='agent-monitor')

    def power_changed(self, on: bool):
        """Paused or off: the agent's silence is expected (the controller already says
        why). Back on: forget what was known, so the next answer is reported."""
        self.quiet = not on
        if not on:
            self.state = None
            self._ready.clear()

    def guest_reset(self):
        """The guest was reset (libvirt's reboot event): its agent starts again, but a
        virtio-serial connection does not break, and a reboot quicker than REPLY_TIMEOUT
        went unseen (the new agent answered the ping). Drop the connection: the monitor
        connects again, and the agent's welcome says its new boot time."""
        if self.channel is not None:
            self.channel.closed.set()

    async def stop(self):
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.channel:
            await self.channel.close()

    async def _set(self, state):
        if state != self.state:
            self.state = state
            if state in (ipb.AGENT_STATE_READY, ipb.AGENT_STATE_READY_DEGRADED):
                self._ready.set()
            else:
                self._ready.clear()
            await self.reporter.state(state)
            return True
        return False

    # -- the monitor --------------------------------------------------------------------
    async def _run(self):
        while True:
            try:
                reader, writer = await self._connect()
            except OSError:
                await asyncio.sleep(0.5)        # the domain is not running yet
                continue
            self.channel = self._open(reader, writer)
            try:
                await self._monitor()
            except (ProtocolError, TimeoutError, ConnectionError, OSError) as e:
                log.info('agent connection lost: %s', e)
            finally:
                await self.channel.close()
            if not self.quiet:
                await self._set(ipb.AGENT_STATE_NOT_READY_UNRESPONSIVE)
            await asyncio.sleep(0.5)

    def _open(self, reader, writer):
        """The channel of this protocol (v2 here; sfnode/agent/v1.py has v1's)."""
        return AgentChannel(reader, writer)

    async def _welcome(self):
        """Say hello until the agent answers (it may still be booting)."""
        while True:
            try:
                reply = await self.channel.request(KEEPALIVE, hypervisor_welcome=apb.HypervisorWelcome(
                    version=VERSION))
            except TimeoutError:
                continue
            if reply.WhichOneof('reply') == 'agent_welcome':
                return reply.agent_welcome

    async def _monitor(self):
        welcome = await self._welcome()
        await self._set(ipb.AGENT_STATE_NOT_READY_AGENT_STARTUP)
        await self._boot_time(welcome.boot_time, welcome.version)
        while True:
            async with self._lock:
                if self.state in (ipb.AGENT_STATE_READY, ipb.AGENT_STATE_READY_DEGRADED):
                    reply = await self._ask(ping_request=apb.PingRequest())
                else:
                    reply = await self._ask(is_system_running_request=apb.IsSystemRunningRequest())
                    if reply.WhichOneof('reply') == 'is_system_running_reply':
                        r = reply.is_system_running_reply
                        state = SYSTEM_STATES.get(r.message.strip(), ipb.AGENT_STATE_NOT_READY_UNKNOWN)
                        if r.boot_time:
                            await self._boot_time(r.boot_time)
                        if await self._set(state):
                            await self._facts()
            try:        # the next keepalive, or sooner if an operation lost the connection
                await asyncio.wait_for(self.channel.closed.wait(), KEEPALIVE)
                raise ConnectionError('the agent connection closed')
            except TimeoutError:
                pass

    async def _ask(self, **command):
        """One monitor request: silence past REPLY_TIMEOUT ends the connection."""
        try:
            return await self.channel.request(REPLY_TIMEOUT, **command)
        except TimeoutError:
            if self.quiet:
                raise ConnectionError('the instance is paused or off')
            raise

    async def _boot_time(self, boot_time: float, version: str | None = None):
        if version is not None:
            await self.reporter.event('agent metrics', {'version': version, 'boot_time': boot_time})
        # boot_time is derived from uptime, so allow a little jitter.
        if self.boot_time is not None and abs(boot_time - self.boot_time) > 2:
            await self.reporter.event('reboot detected', {'previous': self.boot_time, 'now': boot_time})
        if self.boot_time is None or abs(boot_time - self.boot_time) > 2:
            self.boot_time = boot_time
            await self.reporter.boot_time(boot_time)

    async def _facts(self):
        reply = await self.channel.request(REPLY_TIMEOUT, gather_facts_request=apb.GatherFactsRequest())
        if reply.WhichOneof('reply') == 'gather_facts_reply':
            f = reply.gather_facts_reply
            await self.reporter.event('received system facts', {
                'distro': {x.name: x.value for x in f.distro_facts},
                'mounts': [m.mount_point for m in f.mount_points]})

    # -- streamed commands ---------------------------------------------------------------
    async def stream_command(self, command: str, deadline: float, stdin: bytes):
        """Yields ('stdout' | 'stderr', bytes) as the command runs in the guest, then
        ('exit', apb.ExecExit). The agent kills the command at deadline; the host gives up
        EXIT_GRACE later. Closed early (the caller left), it asks the agent to kill it."""
        give_up = self.clock.now() + deadline + EXIT_GRACE

        def left():
            remaining = give_up - self.clock.now()
            if remaining <= 0:
                raise OperationFailed(S.Value('AGENT_OPERATION_STATE_EXPIRED'),
                                      'the agent did not report the command ending')
            return remaining
        try:
            await asyncio.wait_for(self._ready.wait(), left())
        except TimeoutError:
            raise OperationFailed(S.Value('AGENT_OPERATION_STATE_EXPIRED'), 'the agent was not ready') from None
        async with self._lock:
            cid = await self.channel.send(exec_stream_request=apb.ExecStreamRequest(
                command=command, deadline_seconds=deadline))
            ended = False
            try:
                for i in range(0, len(stdin), CHUNK):
                    await self.channel.send_as(cid, exec_input=apb.ExecInput(data=stdin[i:i + CHUNK]))
                await self.channel.send_as(cid, exec_input=apb.ExecInput(eof=True))
                while True:
                    try:
                        reply = await self.channel.reply(cid, left())
                    except TimeoutError:
                        left()
                        continue
                    kind = reply.WhichOneof('reply')
                    if kind == 'exec_output':
                        yield ('stdout' if reply.exec_output.stream == 1 else 'stderr'), reply.exec_output.data
                    elif kind == 'exec_exit':
                        ended = True
                        yield 'exit', reply.exec_exit
                        return
                    elif kind == 'unknown_command':
                        ended = True
                        raise OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                              'this agent does not stream commands')
                    elif kind == 'command_error':
                        ended = True
                        raise OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                              f'the agent reported an error: {reply.command_error.error}')
            finally:
                if not ended and not self.channel.closed.is_set():
                    # Killed, and its end heard, before the next command may start.
                    with contextlib.suppress(Exception):
                        await self.channel.send_as(cid, exec_input=apb.ExecInput(kill=True))
                        while (await self.channel.reply(cid, KILL_WAIT)).WhichOneof('reply') != 'exec_exit':
                            pass
                self.channel.forget(cid)

    # -- operations -------------------------------------------------------------------------
    async def run_operation(self, op: opb.AgentOperation):
        """Run op's commands in order and report how it ends. Never raises."""
        try:
            await self._run_operation(op)
        except Exception:
            log.exception('agent operation %s could not be reported', op.uuid)

    async def _run_operation(self, op: opb.AgentOperation):
        try:
            async with self.clock.timeout_at(op.deadline):
                await self._ready.wait()
                async with self._lock:
                    await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_EXECUTING'),
                                               last_progress=self.clock.now())
                    results = {}
                    for i, command in enumerate(op.commands):
                        results[str(i)] = await self._command(op, command)
                        await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_EXECUTING'),
                                                   results={str(i): results[str(i)]},
                                                   last_progress=self.clock.now())
            await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_COMPLETE'))
        except TimeoutError:
            await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_EXPIRED'),
                                       error_message='the operation did not finish before its deadline')
        except OperationFailed as e:
            await self.reporter.update(op.uuid, e.state, error_message=e.message)
        except (ProtocolError, ConnectionError, OSError) as e:
            self._ready.clear()
            await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_ERROR'),
                                       error_message=f'the agent connection failed: {e}')
            if self.channel:
                await self.channel.close()          # the monitor reconnects

    async def _reply(self, op, command_id, progress=False):
        """The agent's next reply to command_id: within the operation's deadline (the
        block in _run_operation), and within its progress timeout if progress."""
        if progress and op.progress_timeout:
            async with self.clock.timeout(op.progress_timeout):
                reply = await self.channel.reply(command_id, None)
        else:
            reply = await self.channel.reply(command_id, None)
        kind = reply.WhichOneof('reply')
        if kind == 'command_error':
            raise OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                  f'the agent reported an error: {reply.command_error.error}')
        if kind == 'unknown_command':
            raise OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'),
                                  'the agent does not know this command')
        return reply

    async def _command(self, op, command) -> opb.AgentCommandResult:
        kind = command.command
        if kind == opb.AGENT_COMMAND_TYPE_EXECUTE:
            return await self._execute(op, command)
        if kind == opb.AGENT_COMMAND_TYPE_PUT_BLOB:
            return await self._put(op, command)
        if kind == opb.AGENT_COMMAND_TYPE_CHMOD:
            cid = await self.channel.send(chmod_request=apb.ChmodRequest(path=command.path, mode=command.mode & 0o7777))
            await self._reply(op, cid)
            return opb.AgentCommandResult(command='chmod-response', path=command.path)
        if kind == opb.AGENT_COMMAND_TYPE_GET_FILE:
            return await self._get(op, command)
        raise OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'), f'unknown command {kind}')

    async def _execute(self, op, command):
        cid = await self.channel.send(execute_request=apb.ExecuteRequest(command=command.commandline))
        try:
            r = (await self._reply(op, cid)).execute_reply
        finally:
            self.channel.forget(cid)
        result = opb.AgentCommandResult(command='execute-response', command_line=command.commandline,
                                        return_code=r.exit_code, execution_seconds=r.execution_seconds,
                                        result=r.exit_code == 0)
        for name in ('stdout', 'stderr'):
            text = getattr(r, name)
            if len(text.encode()) > INLINE_OUTPUT:
                setattr(result, f'{name}_blob', await self.reporter.put_blob(_once(text.encode())))
            else:
                setattr(result, name, text)
        return result

    async def _put(self, op, command):
        data = b''.join([chunk async for chunk in self.reporter.get_blob(command.blob_uuid)])
        pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b'']
        first = apb.FileChunk(offset=0, payload=base64.b64encode(pieces[0]).decode())
        cid = await self.channel.send(put_file_request=apb.PutFileRequest(
            path=command.path, length=len(data), first_chunk=first))
        pending = {0}
        offset = len(pieces[0])
        for piece in [*pieces[1:], b'']:
            while len(pending) >= OUTSTANDING:
                await self._ack(op, cid, pending)
            await self.channel.send_as(cid, file_chunk=apb.FileChunk(
                offset=offset, payload=base64.b64encode(piece).decode()))
            pending.add(offset)
            offset += len(piece)
        while pending:
            await self._ack(op, cid, pending)
        self.channel.forget(cid)
        return opb.AgentCommandResult(command='put-file-response', path=command.path)

    async def _ack(self, op, cid, pending):
        reply = await self._reply(op, cid, progress=True)
        if reply.WhichOneof('reply') == 'file_chunk_reply':
            pending.discard(reply.file_chunk_reply.offset)
            await self.reporter.update(op.uuid, S.Value('AGENT_OPERATION_STATE_EXECUTING'),
                                       last_progress=self.clock.now())

    async def _get(self, op, command):
        cid = await self.channel.send(get_file_request=apb.GetFileRequest(path=command.path))
        stat = (await self._reply(op, cid, progress=True))
        if stat.WhichOneof('reply') != 'stat_result':
            raise OperationFailed(S.Value('AGENT_OPERATION_STATE_ERROR'), 'the agent did not stat the file')
        st = stat.stat_result
        result = opb.AgentCommandResult(command='get-file-response', path=command.path)
        result.stat_result.CopyFrom(opb.StatResult(mode=st.mode, size=st.size, uid=st.uid, gid=st.gid,
                                                   atime=st.atime, mtime=st.mtime, ctime=st.ctime))

        async def chunks():
            while True:
                reply = await self._reply(op, cid, progress=True)
                if reply.WhichOneof('reply') != 'file_chunk':
                    continue
                chunk = reply.file_chunk
                await self.channel.send_as(cid, file_chunk_reply=apb.FileChunkReply(
                    path=command.path, offset=chunk.offset))
                if not chunk.payload:
                    return
                yield base64.b64decode(chunk.payload)
        blob = await self.reporter.put_blob(chunks())
        self.channel.forget(cid)
        if st.size:
            result.content_blob = blob
        return result


async def _once(data: bytes):
    yield data
