"""Settings, the serve scaffold and the log format, as every entry point has them:
a flag wins over its SF_* variable, which wins over the default; every flag the parts,
sf-up and the tests have always given still parses; a bad value is one line and exit
code 2; and every part logs the same JSON keys."""

import asyncio
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import uuid

import pytest

from gateway import main as gateway_main
from gateway.settings import EnvoySettings, GatewaySettings
from sfcommon import logs, serve
from sfcommon.pki import LocalPki
from sfcommon.settings import parse
from sfcontrol import main as sfcontrol_main
from sfcontrol.settings import ControllerSettings
from sfnode import main as sfnode_main
from sfnode.settings import NodeSettings
from sfup import main as sfup_main
from sfup.nodes import node_command
from sfup.settings import UpSettings

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No SF_* variable of the machine's reaches these tests."""
    for name in list(os.environ):
        if name.startswith('SF_'):
            monkeypatch.delenv(name)


# ---------------------------------------------------------------- precedence

@pytest.mark.parametrize('cls, field, flag, env, value, other', [
    (ControllerSettings, 'token_ttl', '--token-ttl', 'SF_TOKEN_TTL', 60, 30),
    (ControllerSettings, 'prefix', '--prefix', 'SF_ETCD_PREFIX', '/a', '/b'),
    (NodeSettings, 'usage_interval', '--usage-interval', 'SF_NODE_USAGE_INTERVAL', 5.0, 7.5),
    (NodeSettings, 'controller', '--controller', 'SF_NODE_CONTROLLER', 'ctl:1', 'ctl:2'),
    (GatewaySettings, 'max_connections', '--max-connections', 'SF_GATEWAY_MAX_CONNECTIONS', 50, 6),
    (GatewaySettings, 'grpc_target', '--grpc-target', 'SF_GRPC_TARGET', 'ctl:5000', 'ctl:6000'),
    (UpSettings, 'nodes', '--nodes', 'SF_UP_NODES', 3, 2),
    (UpSettings, 'log_level', '--log-level', 'SF_LOG_LEVEL', 'debug', 'warning'),
])
def test_a_flag_beats_its_variable_which_beats_the_default(monkeypatch, cls, field, flag, env, value, other):
    base = ['--state-dir', '/tmp/x'] if cls is UpSettings else []
    default = cls.model_fields[field].get_default(call_default_factory=True)
    assert getattr(parse(cls, base, prog='t'), field) == default
    monkeypatch.setenv(env, str(other))
    assert getattr(parse(cls, base, prog='t'), field) == other
    assert getattr(parse(cls, [*base, flag, str(value)], prog='t'), field) == value


def test_image_allow_repeats_as_a_flag_and_is_comma_separated_in_its_variable(monkeypatch):
    for cls in (ControllerSettings, NodeSettings):
        assert parse(cls, [], prog='t').image_allow == ()
        monkeypatch.setenv('SF_IMAGE_ALLOW', 'file:///srv/images/, http://10.0.0.5/,')
        assert parse(cls, [], prog='t').image_allow == ('file:///srv/images/', 'http://10.0.0.5/')
        flags = ['--image-allow', 'file:///a/', '--image-allow=http://b/']
        assert parse(cls, flags, prog='t').image_allow == ('file:///a/', 'http://b/')
        monkeypatch.delenv('SF_IMAGE_ALLOW')


def test_switches_are_flags_without_a_value_and_1_or_0_in_their_variable(monkeypatch):
    assert not parse(NodeSettings, [], prog='t').stop_guests_on_exit
    assert parse(NodeSettings, ['--stop-guests-on-exit'], prog='t').stop_guests_on_exit
    monkeypatch.setenv('SF_NODE_CONSOLE_OPEN', '1')
    assert parse(NodeSettings, [], prog='t').console_open
    monkeypatch.setenv('SF_NODE_CONSOLE_OPEN', '0')
    assert not parse(NodeSettings, [], prog='t').console_open


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv('SF_TOKEN_TTL', '')
    monkeypatch.setenv('SF_NODE_DOMAIN_TYPE', '')
    assert parse(ControllerSettings, [], prog='t').token_ttl == 900
    assert parse(NodeSettings, [], prog='t').domain_type is None


def test_a_flag_only_setting_is_not_read_from_a_variable_named_after_it(monkeypatch):
    monkeypatch.setenv('out', '/elsewhere')
    monkeypatch.setenv('OUT', '/elsewhere')
    assert parse(EnvoySettings, ['--out', '/here'], prog='t').out == pathlib.Path('/here')


# ---------------------------------------------------------------- every flag there was

def test_every_controller_flag_is_accepted():
    s = sfcontrol_main.settings_from([
        '--etcd', 'a:1, b:2', '--listen', '0.0.0.0:1', '--tls-cert', '/c.pem', '--tls-key', '/c.key',
        '--node-listen', '127.0.0.1:2', '--pki-dir', '/pki', '--state-dir', '/state', '--prefix', '/p',
        '--token-ttl', '60', '--floating-netblock', '10.0.0.0/24', '--image-allow', 'file:///x/',
        '--image-allow', 'http://y/', '--max-blob-size', '100', '--namespace-quota', '1000',
        '--peer-address', 'ctl1:13002', '--blob-copies', '3', '--blob-holder-ttl', '30',
        '--metrics-listen', '127.0.0.1:9100', '--log-level', 'warning'])
    config = sfcontrol_main.config_from(s)
    assert (config.peer_address, config.blob_copies, config.blob_holder_ttl, config.metrics_listen) == \
        ('ctl1:13002', 3, 30, '127.0.0.1:9100')
    assert config.etcd_endpoints == ['a:1', 'b:2'] and config.listen == '0.0.0.0:1'
    assert config.tls_cert == pathlib.Path('/c.pem') and config.tls_key == pathlib.Path('/c.key')
    assert config.node_listen == '127.0.0.1:2' and config.state_dir == pathlib.Path('/state')
    assert config.pki.directory == pathlib.Path('/pki') and config.store_prefix == '/p'
    assert config.etcd_tls.ca == pathlib.Path('/pki/etcd-ca.pem')
    assert (config.token_ttl, config.floating_netblock, config.max_blob_size, config.namespace_quota) == \
        (60, '10.0.0.0/24', 100, 1000)
    assert config.image_allow == ('file:///x/', 'http://y/') and s.log_level == 'warning'


def test_the_controller_listens_on_loopback_unless_it_has_a_certificate():
    assert sfcontrol_main.config_from(sfcontrol_main.settings_from([])).listen == '127.0.0.1:13001'
    tls = sfcontrol_main.settings_from(['--tls-cert', '/c', '--tls-key', '/k'])
    assert sfcontrol_main.config_from(tls).listen == '0.0.0.0:13001'


def test_every_node_flag_is_accepted():
    s = sfnode_main.settings_from([
        '--name', 'n1', '--controller', 'ctl:13002', '--pki-dir', '/pki', '--state-dir', '/srv/n1',
        '--libvirt-uri', 'qemu:///system', '--listen', '127.0.0.1:0', '--console-listen', '10.0.0.1',
        '--bridge-prefix', 'sfx-', '--image-table', '/t.json', '--image-allow', 'file:///i/',
        '--images', '{"sftest": "file:///sftest.qcow2"}', '--capacity', '4,8192,100',
        '--usage-interval', '0', '--domain-type', 'kvm', '--caps-cache', '/caps',
        '--stop-guests-on-exit', '--console-open', '--log-level', 'DEBUG'])
    assert (s.name, s.controller, s.pki_dir, s.state_dir) == \
        ('n1', 'ctl:13002', pathlib.Path('/pki'), pathlib.Path('/srv/n1'))
    assert (s.libvirt_uri, s.listen, s.console_listen, s.bridge_prefix, s.image_table) == \
        ('qemu:///system', '127.0.0.1:0', '10.0.0.1', 'sfx-', '/t.json')
    assert s.image_allow == ('file:///i/',) and s.images == {'sftest': 'file:///sftest.qcow2'}
    assert (s.capacity, s.usage_interval, s.domain_type, s.caps_cache) == ((4, 8192, 100), 0.0, 'kvm', '/caps')
    assert s.stop_guests_on_exit and s.console_open and s.log_level == 'debug'


def test_the_node_command_sf_up_runs_parses_to_what_it_says(tmp_path):
    pki = LocalPki(tmp_path / 'pki').ensure()
    command = node_command(2, tmp_path, pki, '127.0.0.1:4000', '127.0.0.1', ['file:///a/', 'http://b/'])
    assert command[1:3] == ['-m', 'sfnode.main']
    s = sfnode_main.settings_from(command[3:])
    assert (s.name, s.controller, s.listen, s.console_listen) == ('node2', '127.0.0.1:4000', '127.0.0.1:0',
                                                                  '127.0.0.1')
    assert s.state_dir == tmp_path / 'nodes' / 'node2' and s.pki_dir == pki.node('node2').directory
    assert s.stop_guests_on_exit and s.image_allow == ('file:///a/', 'http://b/')
    assert s.caps_cache == str(tmp_path / 'qemu-caps') and s.bridge_prefix.endswith('2-')


def test_every_gateway_flag_is_accepted():
    s, options = gateway_main.serve_arguments([
        '--listen', '[::1]:8080', '--tls-cert', '/c.pem', '--tls-key', '/c.key', '--grpc-ca', '/ca.pem',
        '--grpc-server-name', 'controller', '--grpc-target', 'ctl:13001', '--max-body', '1024',
        '--timeout', '5', '--stream-timeout', '50', '--header-timeout', '2.5', '--body-timeout', '7',
        '--idle-timeout', '9', '--max-connections', '50', '--ui-vendor', '/nm', '--log-level', 'WARNING'])
    assert s.address == ('::1', 8080) and s.grpc_target == 'ctl:13001' and s.log_level == 'warning'
    assert options == {'max_body': 1024, 'timeout': 5.0, 'stream_timeout': 50.0, 'tls_cert': '/c.pem',
                       'tls_key': '/c.key', 'grpc_ca': '/ca.pem', 'grpc_server_name': 'controller',
                       'header_timeout': 2.5, 'body_timeout': 7.0, 'idle_timeout': 9.0, 'max_connections': 50,
                       'ui_vendor': '/nm'}
    assert gateway_main.serve_arguments([])[0].address == ('127.0.0.1', 13000)


def test_the_gateway_subcommands_keep_their_flags(tmp_path, capsys):
    gateway_main.main(['envoy', '--out', str(tmp_path / 'envoy'), '--grpc-upstream', 'ctl:5000',
                       '--listen-port', '14000'])
    assert 'ctl' in (tmp_path / 'envoy' / 'envoy.yaml').read_text()
    gateway_main.main(['openapi', '--out', str(tmp_path / 'openapi.json')])
    assert json.loads((tmp_path / 'openapi.json').read_text())['openapi'].startswith('3.')
    capsys.readouterr()
    gateway_main.main(['openapi'])
    assert json.loads(capsys.readouterr().out)['openapi'].startswith('3.')


def test_every_sf_up_flag_is_accepted():
    s = sfup_main.settings_from(['--state-dir', '/tmp/sfe1', '--nodes', '3', '--grpc-port', '0',
                                 '--rest-port', '0', '--host', '127.0.0.1', '--image-allow=file:///a/',
                                 '--image-allow=http://b/', '--log-level', 'info'])
    assert (s.state_dir, s.nodes, s.grpc_port, s.rest_port, s.host) == \
        (pathlib.Path('/tmp/sfe1'), 3, 0, 0, '127.0.0.1')
    assert s.image_allow == ('file:///a/', 'http://b/')


# ---------------------------------------------------------------- bad values

@pytest.mark.parametrize('module, argv, env, expected', [
    ('sfcontrol.main', ['--token-ttl', 'soon'], {}, "sfcontrol: error: --token-ttl 'soon': "),
    ('sfcontrol.main', [], {'SF_MAX_BLOB_SIZE': '-1'}, "sfcontrol: error: SF_MAX_BLOB_SIZE='-1': "),
    ('sfcontrol.main', ['--tls-cert', '/c.pem'], {}, 'sfcontrol: error: --tls-cert and --tls-key'),
    ('sfcontrol.main', ['--no-such-flag'], {}, 'sfcontrol: error: unrecognized arguments: --no-such-flag'),
    ('sfnode.main', ['--capacity', '4,8192'], {}, "sfnode: error: --capacity '4,8192': expected cpus,"),
    ('sfnode.main', [], {'SF_NODE_DOMAIN_TYPE': 'xen'}, "sfnode: error: SF_NODE_DOMAIN_TYPE='xen': "),
    ('sfnode.main', [], {'SF_NODE_STOP_GUESTS_ON_EXIT': 'maybe'}, 'sfnode: error: SF_NODE_STOP_GUESTS_ON_EXIT='),
    ('gateway', ['--listen', 'localhost'], {}, "sf-gateway: error: --listen 'localhost': expected HOST:PORT"),
    ('gateway', [], {'SF_GATEWAY_IDLE_TIMEOUT': 'long'}, "sf-gateway: error: SF_GATEWAY_IDLE_TIMEOUT='long': "),
    ('gateway', ['envoy'], {}, 'python -m gateway envoy: error: --out is required'),
    ('sfup.main', ['--state-dir', '/tmp/x', '--nodes', 'two'], {}, "sf-up: error: --nodes 'two': "),
    ('sfup.main', [], {}, 'sf-up: error: --state-dir is required (or SF_UP_STATE_DIR)'),
])
def test_a_bad_value_is_one_line_naming_it_and_exit_code_2(module, argv, env, expected):
    proc = subprocess.run([sys.executable, '-m', module, *argv], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(expected) and proc.stderr.count('\n') == 1, proc.stderr
    assert 'Traceback' not in proc.stderr and not proc.stdout


# ---------------------------------------------------------------- one log format

def test_a_record_has_the_same_keys_whichever_part_formats_it():
    def record(name, **extra):
        r = logging.LogRecord(name, logging.WARNING, __file__, 1, 'hello %s', ('there',), None)
        r.__dict__.update(extra)
        return json.loads(logs.JsonFormatter(name.split('.')[0]).format(r))
    control = record('sfcontrol.server', node='node0')
    gateway = record('gateway', request_id='r-1')
    assert list(control)[:5] == list(gateway)[:5] == list(logs.KEYS)
    assert control['message'] == gateway['message'] == 'hello there'
    assert control['level'] == 'warning' and control['time'].endswith('Z')
    assert control['node'] == 'node0' and gateway['request_id'] == 'r-1'


async def _log_lines_until(proc, wanted: str, timeout=60) -> list[dict]:
    lines = []
    async with asyncio.timeout(timeout):
        while not any(line.get('message') == wanted for line in lines):
            raw = await proc.stderr.readline()
            assert raw, f'exited with {await proc.wait()}: {lines}'
            lines.append(json.loads(raw))
    return lines


async def _stopped(proc) -> list[dict]:
    proc.send_signal(signal.SIGTERM)
    _, rest = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return [json.loads(line) for line in rest.splitlines()]


async def test_the_controller_and_the_gateway_log_the_same_keys_and_stop_on_sigterm(etcd, tmp_path):
    controller = await asyncio.create_subprocess_exec(
        sys.executable, '-m', 'sfcontrol.main', '--etcd', etcd.endpoint, '--listen', '127.0.0.1:0',
        '--node-listen', '127.0.0.1:0', '--state-dir', str(tmp_path / 'state'),
        '--pki-dir', str(etcd.pki.controller().directory), '--prefix', f'/sftest/{uuid.uuid4().hex}',
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, '-m', 'gateway', '--listen', '127.0.0.1:0', '--grpc-target', '127.0.0.1:9',
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        found = {}
        for name, proc in (('sfcontrol', controller), ('sf-gateway', gateway)):
            lines = await _log_lines_until(proc, 'started')
            lines += await _stopped(proc)
            assert [line['message'] for line in lines][-2:] == ['stopping ' + ('controller' if name == 'sfcontrol'
                                                                             else 'REST gateway'), 'stopped']
            for line in lines:
                assert list(line)[:5] == list(logs.KEYS), line
                assert line['process'] == name
            found[name] = lines
        assert any('REST gateway on 127.0.0.1:' in line['message'] for line in found['sf-gateway'])
    finally:
        for proc in (controller, gateway):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------- the serve scaffold

class _Part:
    def __init__(self):
        self.stopped = []

    def stopper(self, name):
        async def stop():
            self.stopped.append(name)
        return stop


async def test_a_signal_stops_what_started_in_reverse_order():
    part = _Part()

    async def start(settings, stops):
        stops.add('first', part.stopper('first'))
        stops.add('second', lambda: part.stopped.append('second'))      # a plain function too
        os.kill(os.getpid(), signal.SIGTERM)
    assert await serve.serve(None, start) == 0
    assert part.stopped == ['second', 'first']


async def test_a_part_that_fails_after_starting_stops_everything_and_exits_1():
    part = _Part()

    async def start(settings, stops):
        stops.add('etcd', part.stopper('etcd'))
        stops.add('nodes', part.stopper('nodes'))
        asyncio.get_running_loop().call_soon(stops.fail, 'etcd could not be kept up')
    assert await serve.serve(None, start) == 1
    assert part.stopped == ['nodes', 'etcd']


async def test_a_signal_while_starting_cancels_the_start_and_stops_what_it_had_started():
    part = _Part()
    cancelled = asyncio.Event()

    async def start(settings, stops):
        stops.add('etcd', part.stopper('etcd'))
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.Event().wait()       # a node that never registers
        except asyncio.CancelledError:
            cancelled.set()
            raise
    assert await serve.serve(None, start) == 0
    assert cancelled.is_set() and part.stopped == ['etcd']


async def test_a_failed_start_stops_what_it_had_started_and_exits_1():
    part = _Part()

    async def start(settings, stops):
        stops.add('etcd', part.stopper('etcd'))
        stops.add('broken', lambda: 1 / 0)      # a stop that fails does not stop the rest
        raise RuntimeError('no controller')
    assert await serve.serve(None, start) == 1
    assert part.stopped == ['etcd']
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # the handlers are gone
