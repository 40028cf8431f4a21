"""The sftest guest's in-guest agent (guest/agent/sf-agent.c), driven over protocol v2 without a VM.

The agent is built (or build/guest/agent/sf-agent reused when newer than its source) and run
with --stdio on a socketpair, --unix or --device on a pty. The driver below frames like the
reference host: it parses its whole receive buffer as one AgentToHypervisor after every read,
and a DecodeError means "read more".

SF_AGENT_VARIANT=asan builds the agent with AddressSanitizer and UBSan instead, and
SF_AGENT_VARIANT=debug SF_AGENT_WRAPPER="valgrind -q --error-exitcode=99 --leak-check=full"
runs it under valgrind; SF_AGENT_BINARY tests a given binary. Either way every test checks
that the agent exits 0 at EOF.
"""

import base64
import collections
import hashlib
import json
import os
import select
import shlex
import shutil
import socket
import stat
import subprocess
import time
import tty
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from shakenfist.agent.v2 import agent_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / 'guest' / 'agent' / 'sf-agent.c'
BUILD_SCRIPT = ROOT / 'guest' / 'agent' / 'build.sh'
PREBUILT = ROOT / 'build' / 'guest' / 'agent' / 'sf-agent'
CHUNK = 102400
TIMEOUT = 20.0


@pytest.fixture(scope='session')
def agent_binary(tmp_path_factory) -> str:
    if os.environ.get('SF_AGENT_BINARY'):
        return os.environ['SF_AGENT_BINARY']
    variant = os.environ.get('SF_AGENT_VARIANT', 'static')
    if (variant == 'static' and PREBUILT.exists()
            and PREBUILT.stat().st_mtime >= max(SOURCE.stat().st_mtime, BUILD_SCRIPT.stat().st_mtime)):
        return str(PREBUILT)
    if not shutil.which(os.environ.get('CC', 'gcc')):
        pytest.skip('no C compiler to build the agent with')
    out = tmp_path_factory.mktemp('sf-agent') / 'sf-agent'
    env = dict(os.environ, VARIANT=variant)
    r = subprocess.run([str(BUILD_SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f'build failed:\n{r.stdout}{r.stderr}'
    return str(out)


def agent_command(binary: str, *args: str) -> list[str]:
    return [*shlex.split(os.environ.get('SF_AGENT_WRAPPER', '')), binary, *args]


class Conn:
    """The host end of one agent connection, on a file descriptor."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.replies = collections.deque()

    def send_raw(self, data: bytes):
        view = memoryview(data)
        while view:
            assert select.select([], [self.fd], [], TIMEOUT)[1], 'the agent reads nothing'
            view = view[os.write(self.fd, view):]

    def send(self, *commands: pb.HypervisorToAgentCommand):
        self.send_raw(pb.HypervisorToAgent(commands=commands).SerializeToString())

    def recv(self, timeout: float = TIMEOUT) -> pb.AgentToHypervisorCommand:
        deadline = time.monotonic() + timeout
        while not self.replies:
            if self.buf:
                envelope = pb.AgentToHypervisor()
                try:
                    with memoryview(self.buf) as view:  # no copy: a partial 50 MiB fails fast
                        envelope.ParseFromString(view)
                except DecodeError:
                    pass  # partial: read more
                else:
                    self.buf.clear()
                    self.replies.extend(envelope.commands)
                    continue
            left = deadline - time.monotonic()
            assert left > 0, f'no reply within {timeout}s ({len(self.buf)} bytes buffered)'
            if select.select([self.fd], [], [], left)[0]:
                data = os.read(self.fd, 4 << 20)
                if not data:
                    raise EOFError('the agent closed the connection')
                self.buf += data
        return self.replies.popleft()

    def expect(self, kind: str, command_id: str, timeout: float = TIMEOUT):
        r = self.recv(timeout)
        assert r.WhichOneof('reply') == kind, r
        assert r.command_id == command_id
        return getattr(r, kind)

    def call(self, kind: str, command_id: str, **request):
        self.send(pb.HypervisorToAgentCommand(command_id=command_id, **request))
        return self.expect(kind, command_id)


def welcome(cid='w'):
    return pb.HypervisorToAgentCommand(command_id=cid, hypervisor_welcome=pb.HypervisorWelcome(version='t'))


def ping(cid):
    return pb.HypervisorToAgentCommand(command_id=cid, ping_request=pb.PingRequest())


@pytest.fixture
def agent(agent_binary, tmp_path):
    """An agent on --stdio over a socketpair; the host end is closed at teardown and the
    agent must then exit 0 (a sanitizer or valgrind error makes it exit non-zero)."""
    host, guest = socket.socketpair()
    log = tmp_path / 'agent.stderr'
    with open(log, 'wb') as err:
        proc = subprocess.Popen(agent_command(agent_binary, '--stdio'), stdin=guest, stdout=guest, stderr=err)
    guest.close()
    yield Conn(host.fileno())
    host.close()
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, f'agent exited {rc}:\n{log.read_text(errors="replace")[-5000:]}'


def uptime() -> float:
    return float(Path('/proc/uptime').read_text().split()[0])


# --- the conversation --------------------------------------------------------------

def test_welcome_reports_version_and_boot_time(agent):
    r = agent.call('agent_welcome', 'abcdefgh12345678', hypervisor_welcome=pb.HypervisorWelcome(version='0.8'))
    assert r.version == 'sf-test-agent 1'
    assert abs(r.boot_time - (time.time() - uptime())) < 5


def test_ping_and_is_system_running(agent):
    agent.send(welcome())
    boot = agent.expect('agent_welcome', 'w').boot_time
    agent.call('ping_reply', 'p1', ping_request=pb.PingRequest())
    r = agent.call('is_system_running_reply', 'isr', is_system_running_request=pb.IsSystemRunningRequest())
    assert (r.result, r.message, r.boot_time) == (True, 'running', boot)


def test_gather_facts_has_distro_and_mounts(agent):
    r = agent.call('gather_facts_reply', 'gf', gather_facts_request=pb.GatherFactsRequest())
    facts = {f.name: json.loads(f.value) for f in r.distro_facts}
    assert facts
    if Path('/etc/os-release').exists():
        os_release = dict(line.split('=', 1) for line in Path('/etc/os-release').read_text().splitlines()
                          if '=' in line and not line.startswith('#'))
        assert facts['id'] == os_release['ID'].strip('"\'')
    mounts = {m.mount_point: m for m in r.mount_points}
    assert mounts['/proc'].vfs_type == 'proc'
    assert [m.mount_point for m in r.mount_points] == [
        line.split()[1] for line in Path('/proc/mounts').read_text().splitlines()]


def test_concatenated_envelopes_in_one_write_are_all_answered(agent):
    agent.send_raw(b''.join(pb.HypervisorToAgent(commands=[c]).SerializeToString()
                            for c in (welcome('a'), ping('b'), ping('c'))))
    assert [agent.recv().command_id for _ in range(3)] == ['a', 'b', 'c']


def test_envelope_split_across_writes_is_reassembled(agent):
    for byte in pb.HypervisorToAgent(commands=[ping('split-ping-0001')]).SerializeToString():
        agent.send_raw(bytes([byte]))
    agent.expect('ping_reply', 'split-ping-0001')


def test_departure_ignores_the_rest_of_the_buffer(agent):
    # one small write, so one read: the reply to 'before' shows the whole buffer was handled
    agent.send(ping('before'),
               pb.HypervisorToAgentCommand(command_id='d', hypervisor_departure=pb.HypervisorDeparture()),
               ping('ignored'))
    agent.expect('ping_reply', 'before')
    agent.send(ping('after'))
    agent.expect('ping_reply', 'after')


def test_unknown_and_unhandled_commands_get_unknown_command(agent):
    chown = pb.HypervisorToAgentCommand(command_id='ch', chown_request=pb.ChownRequest(path='/x', user='root'))
    agent.send(chown)
    r = agent.expect('unknown_command', 'ch')
    assert list(r.last_envelope.commands) == [chown]
    agent.send(pb.HypervisorToAgentCommand(command_id='empty'))
    agent.expect('unknown_command', 'empty')
    # the host's acks of our file chunks, and its own errors, need no answer
    agent.send(pb.HypervisorToAgentCommand(command_id='ack', file_chunk_reply=pb.FileChunkReply(path='/x')),
               pb.HypervisorToAgentCommand(command_id='err', command_error=pb.CommandError(error='x')),
               ping('p'))
    agent.expect('ping_reply', 'p')


@pytest.mark.parametrize('garbage', [b'\xff' * 16, b'not protobuf at all\n', b'\x0f\x00', b'\x00'],
                         ids=['long-varint', 'text', 'bad-wire-type', 'field-zero'])
def test_garbage_is_dropped_and_the_agent_keeps_serving(agent, garbage):
    # The agent answers garbage with a command_error without command_id: that tells
    # the test the garbage was dropped before the ping is sent.
    agent.send(ping('before-garbage'))
    agent.expect('ping_reply', 'before-garbage')
    agent.send_raw(garbage)
    assert agent.expect('command_error', '').error == f'unparseable input, {len(garbage)} bytes dropped'
    agent.send(ping('after-garbage'))
    agent.expect('ping_reply', 'after-garbage')


def test_malformed_request_body_is_a_command_error(agent):
    # command_id "id", then execute_request (field 40) whose body claims a 5-byte string
    command = b'\x0a\x02id' + b'\xc2\x02\x03' + b'\x0a\x05a'
    agent.send_raw(b'\x0a' + bytes([len(command)]) + command)
    assert agent.expect('command_error', 'id').error == 'malformed command'
    # an envelope holding a command that is itself not a message (field 0, wire type 7)
    agent.send_raw(b'\x0a\x01\x07')
    assert agent.expect('command_error', '').error == 'malformed command'
    agent.send(ping('p'))
    agent.expect('ping_reply', 'p')


# --- execute -----------------------------------------------------------------------

def execute(agent, command, cid='x', **kwargs):
    return agent.call('execute_reply', cid, execute_request=pb.ExecuteRequest(command=command, **kwargs))


def test_execute_separates_stdout_and_stderr_and_returns_the_exit_code(agent):
    r = execute(agent, 'echo out; echo err >&2; cat; exit 3', request_id='req', execution_id='exe')
    assert (r.stdout, r.stderr, r.exit_code) == ('out\n', 'err\n', 3)
    assert (r.request_id, r.execution_id) == ('req', 'exe')
    assert 0 < r.execution_seconds < 10


def test_execute_reports_a_signal_as_a_negative_exit_code(agent):
    assert execute(agent, 'kill -9 $$').exit_code == -9


def test_execute_honours_environment_and_working_directory(agent, tmp_path):
    r = execute(agent, 'echo "$FOO/$BAR"; pwd; echo "${HOME:-nohome}"', working_directory=str(tmp_path),
                environment_variables=[pb.EnvironmentVariable(name='FOO', value='foo value'),
                                       pb.EnvironmentVariable(name='BAR', value='')])
    assert r.stdout == f'foo value/\n{tmp_path}\nnohome\n'
    agent.send(pb.HypervisorToAgentCommand(command_id='nodir', execute_request=pb.ExecuteRequest(
        command='true', working_directory=str(tmp_path / 'missing'))))
    assert 'No such file or directory' in agent.expect('command_error', 'nodir').error


def test_execute_output_that_is_not_utf8_is_repaired(agent):
    r = execute(agent, r"printf 'a\377b'; printf '\300' >&2")
    assert (r.stdout, r.stderr) == ('a\ufffdb', '\ufffd')


def test_execute_returns_50_mib_of_output(agent):
    size = 50 << 20
    started = time.monotonic()
    r = execute(agent, f'head -c {size} /dev/zero | tr "\\000" x; echo done >&2')
    elapsed = time.monotonic() - started
    assert len(r.stdout) == size and r.stdout.count('x') == size
    assert (r.stderr, r.exit_code) == ('done\n', 0)
    assert elapsed < 60


# --- files -------------------------------------------------------------------------

def put_file(agent, path: Path, data: bytes, window: int = 5) -> list[int]:
    """Write data as the host does: a put_file_request carrying the first 100 KiB, then
    file_chunks with at most `window` unacknowledged, then an empty chunk. Returns the
    acknowledged offsets."""
    offsets = list(range(0, len(data), CHUNK)) or [0]

    def chunk(offset):
        return pb.FileChunk(offset=offset, payload=base64.b64encode(data[offset:offset + CHUNK]).decode())

    agent.send(pb.HypervisorToAgentCommand(command_id='put0', put_file_request=pb.PutFileRequest(
        path=str(path), length=len(data), first_chunk=chunk(0))))
    acked, sent, outstanding = [], 1, 1
    while outstanding:
        while outstanding < window and sent < len(offsets):
            agent.send(pb.HypervisorToAgentCommand(command_id=f'put{sent}', file_chunk=chunk(offsets[sent])))
            sent, outstanding = sent + 1, outstanding + 1
        r = agent.expect('file_chunk_reply', f'put{len(acked)}')
        assert r.path == str(path)
        acked.append(r.offset)
        outstanding -= 1
    agent.send(pb.HypervisorToAgentCommand(command_id='putend', file_chunk=pb.FileChunk(offset=len(data))))
    assert agent.expect('file_chunk_reply', 'putend').offset == len(data)
    return acked


def get_file(agent, path: str):
    """Read a file as the host does, acking every chunk. Returns (stat_result, bytes)."""
    agent.send(pb.HypervisorToAgentCommand(command_id='get', get_file_request=pb.GetFileRequest(path=path)))
    st = agent.expect('stat_result', 'get')
    data = bytearray()
    while True:
        chunk = agent.expect('file_chunk', 'get')
        assert chunk.offset == len(data) and chunk.encoding == pb.FileChunk.ENCODING_BASE64
        agent.send(pb.HypervisorToAgentCommand(command_id='ack', file_chunk_reply=pb.FileChunkReply(
            path=path, offset=chunk.offset)))
        if not chunk.payload:
            return st, bytes(data)
        data += base64.b64decode(chunk.payload)


def exec_stream(agent, cid, command, deadline=0.0, stdin=None):
    agent.send(pb.HypervisorToAgentCommand(command_id=cid, exec_stream_request=pb.ExecStreamRequest(
        command=command, deadline_seconds=deadline)))
    if stdin is not None:
        agent.send(pb.HypervisorToAgentCommand(command_id=cid, exec_input=pb.ExecInput(data=stdin, eof=True)))


def exec_replies(agent, cid, timeout=TIMEOUT, seen=None):
    """(stdout, stderr, ExecExit) of a streamed command; seen(kind, data) for each piece."""
    out = {1: b'', 2: b''}
    while True:
        r = agent.recv(timeout)
        assert r.command_id == cid, r
        if r.WhichOneof('reply') == 'exec_exit':
            return out[1], out[2], r.exec_exit
        assert r.WhichOneof('reply') == 'exec_output', r
        out[r.exec_output.stream] += r.exec_output.data
        if seen:
            seen(r.exec_output.stream, r.exec_output.data)


def test_a_streamed_command_sends_its_output_as_it_runs_and_then_its_exit(agent):
    # The first line arrives while the command still waits for its stdin: streamed, not at the end.
    exec_stream(agent, 'st1', 'echo first; read line; echo "got $line"; echo err >&2; exit 3')
    first = agent.recv()
    assert (first.exec_output.stream, first.exec_output.data) == (1, b'first\n')
    # Other commands are answered meanwhile.
    agent.call('ping_reply', 'p-during', ping_request=pb.PingRequest())
    agent.send(pb.HypervisorToAgentCommand(command_id='st1', exec_input=pb.ExecInput(data=b'hello\n')))
    agent.send(pb.HypervisorToAgentCommand(command_id='st1', exec_input=pb.ExecInput(eof=True)))
    out, err, end = exec_replies(agent, 'st1')
    assert (out, err, end.exit_code, end.timed_out) == (b'got hello\n', b'err\n', 3, False)
    assert end.execution_seconds > 0


def test_a_streamed_command_reads_binary_stdin_to_its_end(agent):
    data = bytes(range(256)) * 1024     # more than a pipe holds: written as it is read
    exec_stream(agent, 'st2', 'sha256sum', stdin=data)
    out, err, end = exec_replies(agent, 'st2')
    assert end.exit_code == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_the_deadline_kills_the_whole_process_tree(agent, tmp_path):
    marker = tmp_path / 'grandchild.pid'
    exec_stream(agent, 'st3', f'(sleep 300; echo late) & echo $! > {marker}; echo started; wait', deadline=1.0)
    out, err, end = exec_replies(agent, 'st3', timeout=30)
    assert out == b'started\n' and end.timed_out and end.exit_code == -9
    grandchild = int(marker.read_text())
    assert not Path(f'/proc/{grandchild}').exists() or 'Z' in Path(f'/proc/{grandchild}/stat').read_text().split()[2]
    # The session goes on, and the next streamed command runs.
    exec_stream(agent, 'st4', 'echo next', stdin=b'')
    assert exec_replies(agent, 'st4')[0] == b'next\n'


def test_a_streamed_command_is_killed_when_asked(agent):
    exec_stream(agent, 'st7', 'echo up; sleep 300')
    assert agent.recv().exec_output.data == b'up\n'
    agent.send(pb.HypervisorToAgentCommand(command_id='st7', exec_input=pb.ExecInput(kill=True)))
    out, err, end = exec_replies(agent, 'st7')
    assert end.exit_code == -9 and not end.timed_out


def test_one_streamed_command_at_a_time_and_input_for_no_command_is_an_error(agent):
    exec_stream(agent, 'st5', 'sleep 30', deadline=20)
    exec_stream(agent, 'st6', 'echo no')
    assert 'already running' in agent.expect('command_error', 'st6').error
    agent.send(pb.HypervisorToAgentCommand(command_id='other', exec_input=pb.ExecInput(data=b'x')))
    assert 'no streamed command' in agent.expect('command_error', 'other').error


def test_put_file_in_chunks_then_chmod(agent, tmp_path):
    data = os.urandom(1 << 20)
    path = tmp_path / 'blob'
    assert put_file(agent, path, data) == list(range(0, len(data), CHUNK))
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    r = agent.call('chmod_reply', 'chmod', chmod_request=pb.ChmodRequest(path=str(path), mode=0o600))
    assert r.path == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_put_file_truncates_and_honours_mode(agent, tmp_path):
    path = tmp_path / 'small'
    path.write_bytes(b'x' * 500000)
    agent.send(pb.HypervisorToAgentCommand(command_id='p', put_file_request=pb.PutFileRequest(
        path=str(path), mode=0o640, length=5, first_chunk=pb.FileChunk(payload=base64.b64encode(b'hello')))))
    assert agent.expect('file_chunk_reply', 'p').offset == 0
    agent.send(pb.HypervisorToAgentCommand(command_id='e', file_chunk=pb.FileChunk(offset=5)))
    agent.expect('file_chunk_reply', 'e')
    assert path.read_bytes() == b'hello'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    # with no file open, a chunk is an error; a bad path is reported as Python would
    agent.send(pb.HypervisorToAgentCommand(command_id='late', file_chunk=pb.FileChunk(offset=5, payload='eA==')))
    assert agent.expect('command_error', 'late').error == 'no file is being written'
    agent.send(pb.HypervisorToAgentCommand(command_id='bad', put_file_request=pb.PutFileRequest(
        path=str(tmp_path / 'no' / 'dir'))))
    assert agent.expect('command_error', 'bad').error.startswith('[Errno 2] No such file or directory')


@pytest.mark.parametrize('size', [(1 << 20) + 12345, 20 << 20], ids=['1MiB', '20MiB'])
def test_get_file_round_trip(agent, tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / 'roundtrip'
    put_file(agent, path, data)
    st, got = get_file(agent, str(path))
    assert got == data
    real = path.stat()
    assert (st.path, st.size, st.mode, st.uid, st.gid) == (str(path), len(data), real.st_mode, real.st_uid, real.st_gid)
    assert abs(st.mtime - real.st_mtime) < 0.001
    # the acks sent while reading needed no answer
    agent.send(ping('after-get'))
    agent.expect('ping_reply', 'after-get')


def test_get_file_of_an_empty_file(agent, tmp_path):
    (tmp_path / 'empty').write_bytes(b'')
    st, got = get_file(agent, str(tmp_path / 'empty'))
    assert (st.size, got) == (0, b'')


def test_get_file_of_a_missing_file_is_file_not_found(agent, tmp_path):
    path = str(tmp_path / 'missing')
    agent.send(pb.HypervisorToAgentCommand(command_id='gm', get_file_request=pb.GetFileRequest(path=path)))
    r = agent.expect('command_error', 'gm')
    assert r.error == 'file not found'
    assert r.last_envelope.commands[0].get_file_request.path == path


# --- other transports --------------------------------------------------------------

def wait_for_connect(path: Path, proc, timeout: float = TIMEOUT) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            assert proc.poll() is None, f'agent exited {proc.returncode}'
            assert time.monotonic() < deadline, f'no agent listening on {path}'
            select.select([], [], [], 0.02)


def test_unix_socket_serves_connections_one_after_another(agent_binary, tmp_path):
    path = tmp_path / 'agent.sock'
    proc = subprocess.Popen(agent_command(agent_binary, '--unix', str(path)))
    try:
        for n in range(2):
            s = wait_for_connect(path, proc)
            conn = Conn(s.fileno())
            conn.send(welcome(f'w{n}'))
            conn.expect('agent_welcome', f'w{n}')
            assert execute(conn, f'echo {n}').stdout == f'{n}\n'
            s.close()
        # a host that goes away while a big reply is being written
        s = wait_for_connect(path, proc)
        Conn(s.fileno()).send(pb.HypervisorToAgentCommand(command_id='big', execute_request=pb.ExecuteRequest(
            command='head -c 30000000 /dev/zero')))
        select.select([s], [], [], TIMEOUT)  # the reply has started
        s.close()
        s = wait_for_connect(path, proc)
        conn = Conn(s.fileno())
        conn.send(welcome('again'))
        conn.expect('agent_welcome', 'again')
        s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_device_mode_on_a_pty(agent_binary):
    master, slave = os.openpty()
    tty.setraw(slave)  # the agent makes its device raw too, but data may arrive before that
    path = os.ttyname(slave)
    proc = subprocess.Popen(agent_command(agent_binary, '--device', path, '--no-vsock'),
                            stderr=subprocess.PIPE)
    try:  # the slave stays open here too: a pty master reads EIO while no slave is open
        conn = Conn(master)
        conn.send(welcome())
        conn.expect('agent_welcome', 'w')
        r = execute(conn, 'printf "a\\nb\\r\\n\\000\\377"')
        assert r.stdout == 'a\nb\r\n\x00\ufffd'
        conn.send(ping('p'))
        conn.expect('ping_reply', 'p')
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        os.close(master)
        os.close(slave)
    assert b'SFTEST agent: sf-test-agent 1 on ' + path.encode() in err
