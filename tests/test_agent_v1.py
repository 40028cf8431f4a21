"""The agent protocol v1's framing (sfnode/agent/v1.py; wire: shared/reference/
shakenfist-rest-api.md §E.4), also against the framing code of the real
shakenfist-agent 0.7.0 (its protocol.py, from the wheel the Debian image build
caches). The protocol against the real agent in a real guest is
tests/test_e2e_debian.py."""

import json
import pathlib
import types
import zipfile

import pytest

from sfnode.agent.v1 import encode, split_packets
from sfnode.agent.v2 import ProtocolError


def test_a_packet_is_the_preamble_an_eight_digit_length_and_json():
    data = encode({'command': 'ping', 'unique': 7})
    body = json.dumps({'command': 'ping', 'unique': 7}).encode()
    assert data == b'*SFv001[' + f'{len(body):08d}'.encode() + b']' + body


def test_packets_split_across_reads_and_joined_in_one_are_all_found():
    stream = encode({'command': 'a', 'unique': 1}) + encode({'command': 'b', 'unique': 2})
    buf, found = bytearray(), []
    for i in range(0, len(stream), 5):
        buf += stream[i:i + 5]
        found += split_packets(buf)
    assert [p['command'] for p in found] == ['a', 'b'] and not buf
    buf = bytearray(stream)
    assert [p['command'] for p in split_packets(buf)] == ['a', 'b']


def test_bytes_before_a_preamble_are_skipped_and_a_partial_preamble_kept():
    buf = bytearray(b'boot noise *SF')
    assert split_packets(buf) == [] and buf.endswith(b'*SF') and len(buf) < 7
    buf += encode({'command': 'pong', 'unique': 1})[3:]
    assert split_packets(buf) == [{'command': 'pong', 'unique': 1}]


@pytest.mark.parametrize('bad', [b'*SFv001[0000000x]{}', b'*SFv001[00000002]no',
                                 b'*SFv001[00000002][]', b'*SFv001[00000002]{}'])
def test_a_malformed_packet_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        split_packets(bytearray(bad))


def test_a_packet_beyond_the_protocol_limit_is_refused():
    with pytest.raises(ValueError):
        encode({'command': 'put-file', 'chunk': 'x' * 100_000_000})


WHEELS = pathlib.Path(__file__).resolve().parent.parent / 'build' / 'guest' / 'cache' / 'debian-wheels-0.7.0'


@pytest.fixture(scope='module')
def real():
    """shakenfist-agent 0.7.0's protocol module (stdlib only), from its wheel."""
    [wheel] = WHEELS.glob('shakenfist_agent-0.7.0-*.whl')
    module = types.ModuleType('shakenfist_agent_070_protocol')
    source = zipfile.ZipFile(wheel).read('shakenfist_agent/protocol.py')
    exec(compile(source, 'shakenfist_agent/protocol.py', 'exec'), module.__dict__)  # noqa: S102 -- its own code
    return module


def test_the_real_agent_reads_what_we_write_and_we_read_what_it_writes(real):
    agent = real.Agent()
    agent._read = lambda: None
    agent.buffer = encode({'command': 'is-system-running', 'unique': 'u1'}) + encode({'command': 'ping', 'unique': 2})
    assert list(agent.find_packets()) == [{'command': 'is-system-running', 'unique': 'u1'},
                                          {'command': 'ping', 'unique': 2}]
    written = []
    agent._write = written.append
    agent.send_v1_packet({'command': 'execute-response', 'stdout': 'x' * 5000, 'unique': 'u1'})
    agent.send_pong({'unique': 2})
    buf = bytearray(b''.join(written))
    assert split_packets(buf) == [{'command': 'execute-response', 'stdout': 'x' * 5000, 'unique': 'u1'},
                                  {'command': 'pong', 'unique': 2}]
