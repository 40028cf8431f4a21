"""Our host side of the agent protocol v1 (sfnode/agent/v1.py) against the test image's
compiled agent speaking v1 (guest/agent/sf-agent.c --v1) on a unix socket, as it does on
the guest's `sf-agent` port. The real shakenfist-agent 0.7.0 is tested in a real guest
(tests/test_e2e_debian.py)."""

import asyncio
import os
import stat

import pytest_asyncio

from sfnode.agent.v1 import V1Session, encode, split_packets
from shakenfist.v1 import agent_operation_pb2 as opb
from shakenfist.v1 import instance_pb2 as ipb
from tests.test_agent_protocol import C_AGENT, Recorder, op
from tests.waiting import eventually

S = opb.AgentOperationState


@pytest_asyncio.fixture
async def agent(tmp_path):
    sock = tmp_path / 'v1.sock'
    # SF_AGENT_BINARY: another build, such as VARIANT=asan guest/agent/build.sh's
    binary = os.environ.get('SF_AGENT_BINARY', str(C_AGENT))
    proc = await asyncio.create_subprocess_exec(binary, '--v1', '--unix', str(sock),
                                                stdout=asyncio.subprocess.DEVNULL)
    await eventually(sock.exists, what='the agent socket')
    yield sock
    proc.terminate()
    await proc.wait()


@pytest_asyncio.fixture
async def session(agent):
    recorder = Recorder()
    s = V1Session(lambda: asyncio.open_unix_connection(str(agent)), recorder)
    s.start()
    await eventually(lambda: ipb.AGENT_STATE_READY in recorder.states, timeout=20, what='agent ready')
    yield s, recorder
    await s.stop()


async def exchange(sock, *packets: dict, want=1) -> list[dict]:
    """Send packets (or raw bytes) on a fresh connection: the agent-start, then the
    first `want` packets that come back."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        for packet in packets:
            writer.write(packet if isinstance(packet, bytes) else encode(packet))
        await writer.drain()
        buf, got = bytearray(), []
        while len(got) < want + 1:
            buf += await asyncio.wait_for(reader.read(65536), 10)
            got += split_packets(buf)
        return got
    finally:
        writer.close()


async def test_readiness_boot_time_and_facts(session):
    _, rec = session
    assert rec.states[:2] == [ipb.AGENT_STATE_NOT_READY_AGENT_STARTUP, ipb.AGENT_STATE_READY]
    assert rec.boot_times and rec.boot_times[0] > 1e9
    await eventually(lambda: 'received system facts' in [m for m, _ in rec.events], what='facts')
    facts = dict(rec.events)['received system facts']
    assert facts['distro']['id'] == 'sftest' and '/proc' in facts['mounts']


async def test_execute_with_the_seed_record_shape(session):
    s, rec = session
    line = 'printf "%s\\n" "quote\\" é ☃"; echo err >&2; exit 3'
    await s.run_operation(op('x', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_EXECUTE, commandline=line)))
    result = rec.updates['x']['results']['0']
    assert rec.updates['x']['states'][-1] == S.Value('AGENT_OPERATION_STATE_COMPLETE')
    assert (result.return_code, result.stdout, result.stderr) == (3, 'quote" é ☃\n', 'err\n')
    assert result.result is False       # 0.7.0: true only for exit code 0
    await s.run_operation(op('ok', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_EXECUTE, commandline='true')))
    assert rec.updates['ok']['results']['0'].result is True


async def test_output_that_is_not_utf8_is_repaired_and_big_output_goes_to_a_blob(session):
    s, rec = session
    await s.run_operation(op('bin', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_EXECUTE,
                                                     commandline='printf "a\\377b\\001"')))
    assert rec.updates['bin']['results']['0'].stdout == 'a\ufffdb\x01'
    await s.run_operation(op('big', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_EXECUTE,
                                                     commandline='head -c 300000 /dev/zero | tr "\\0" x')))
    result = rec.updates['big']['results']['0']
    assert rec.blobs[result.stdout_blob] == b'x' * 300000


async def test_put_file_then_chmod_then_get_file_round_trip(session, tmp_path):
    s, rec = session
    data = os.urandom(1024 * 1024 + 5)
    rec.blobs['src'] = data
    target = tmp_path / 'put.bin'
    await s.run_operation(op('put', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_PUT_BLOB,
                                                     blob_uuid='src', path=str(target)),
                             opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_CHMOD, path=str(target),
                                              mode=0o100600)))
    assert rec.updates['put']['states'][-1] == S.Value('AGENT_OPERATION_STATE_COMPLETE'), rec.updates['put']
    assert target.read_bytes() == data and stat.S_IMODE(target.stat().st_mode) == 0o600
    await s.run_operation(op('get', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_GET_FILE, path=str(target))))
    result = rec.updates['get']['results']['0']
    assert rec.updates['get']['states'][-1] == S.Value('AGENT_OPERATION_STATE_COMPLETE')
    assert result.stat_result.size == len(data) and rec.blobs[result.content_blob] == data
    assert stat.S_IMODE(result.stat_result.mode) == 0o600


async def test_a_missing_file_and_a_bad_chmod_end_in_error(session, tmp_path):
    s, rec = session
    await s.run_operation(op('missing', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_GET_FILE,
                                                         path='/no/such/file')))
    assert rec.updates['missing']['states'][-1] == S.Value('AGENT_OPERATION_STATE_ERROR')
    assert 'path does not exist' in rec.updates['missing']['error']
    await s.run_operation(op('chmod', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_CHMOD,
                                                       path='/no/such/file', mode=0o644)))
    assert rec.updates['chmod']['states'][-1] == S.Value('AGENT_OPERATION_STATE_ERROR')
    # and the session goes on
    await s.run_operation(op('after', opb.AgentCommand(command=opb.AGENT_COMMAND_TYPE_EXECUTE, commandline='echo on')))
    assert rec.updates['after']['results']['0'].stdout == 'on\n'


async def test_the_wire_answers_as_0_7_0_does(agent):
    start, pong = await exchange(agent, {'command': 'ping', 'unique': 4242})
    assert start['command'] == 'agent-start' and start['message'] == 'version sf-test-agent 1'
    assert start['system_boot_time'] > 1e9
    # a ping with a numeric unique (0.7.0's own pings) comes back with it
    assert pong == {'command': 'pong', 'unique': 4242}
    _, running = await exchange(agent, {'command': 'is-system-running', 'unique': 'u'})
    assert running['result'] is True and running['message'] == 'running' and running['unique'] == 'u'
    # noise before a preamble is skipped; an unknown command, bad JSON and a nested object
    _, unknown = await exchange(agent, b'boot noise', {'command': 'reboot-the-moon', 'unique': 'v'})
    assert unknown['command'] == 'unknown-command' and 'reboot-the-moon' in unknown['message']
    _, bad = await exchange(agent, b'*SFv001[00000005]{"a":')
    assert bad['command'] == 'json-decode-failure'
    _, nested = await exchange(agent, {'command': 'ping', 'unique': 'w', 'extra': {'deep': [1, {'x': None}]}})
    assert nested == {'command': 'pong', 'unique': 'w'}
    _, escaped = await exchange(agent, {'command': 'execute', 'command-line': 'echo "\u2603\t"',
                                       'unique': 'e'})
    assert escaped['stdout'] == '\u2603\t\n' and escaped['return-code'] == 0 and escaped['result'] is True
