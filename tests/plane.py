"""A whole plane for end-to-end tests: sf-up in a child process (etcd, controller,
gateway and real sfnode processes on libvirt/QEMU), driven like a user would."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.grpc_client import Client
from tests.sfclient import SfClient

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Plane:
    def __init__(self, nodes=1, image_allow=(), env=None):
        # Short: libvirt's embed root (under it) must stay under about 50 characters.
        self.state = pathlib.Path(tempfile.mkdtemp(prefix='sfe', dir='/tmp'))
        self.nodes = nodes
        self.image_allow = list(image_allow)
        self.env = dict(env or {})      # for sf-up and what it starts (SF_NODE_CAPACITY, ...)
        self.proc = None

    def start(self, timeout=240):
        env = {**os.environ, 'SF_NODE_DOMAIN_TYPE': os.environ.get('SF_NODE_DOMAIN_TYPE', 'qemu'),
               'SF_NODE_USAGE_INTERVAL': '5', **self.env}
        self.log = open(self.state / 'sf-up.log', 'wb')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'sfup.main', '--state-dir', str(self.state), '--nodes',
             str(self.nodes), '--grpc-port', '0', '--rest-port', '0',
             *(f'--image-allow={prefix}' for prefix in self.image_allow)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (self.state / 'endpoints.json').exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError('sf-up did not come up:\n' + (self.state / 'sf-up.log').read_text()[-3000:])
            time.sleep(0.2)
        self.endpoints = json.loads((self.state / 'endpoints.json').read_text())
        return self

    def stop(self):
        # What to kill if it outlives sf-up: every process sf-up started (and theirs), and
        # the guests libvirt started, by the PID files it keeps under this plane's state.
        started = _descendants(self.proc.pid) if self.proc else set()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in started | self._guest_pids():
            if str(self.state) in _cmdline(pid):     # still ours, not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._sweep_network()
        shutil.rmtree(self.state, ignore_errors=True)

    def _sweep_network(self):
        """Whatever network namespaces and links of this plane are left (a plane whose
        nodes were killed): by the plane's prefix, which no other plane shares."""
        from sfup.underlay import plane_prefix
        prefix = plane_prefix(self.state)
        namespaces = json.loads(subprocess.run(['ip', '-j', 'netns', 'list'], capture_output=True,
                                               text=True, check=False).stdout or '[]')
        for ns in namespaces:
            if ns['name'].startswith(prefix):
                subprocess.run(['ip', 'netns', 'del', ns['name']], capture_output=True, check=False)
        for link in json.loads(subprocess.run(['ip', '-j', 'link'], capture_output=True, text=True, check=False).stdout):
            if link['ifname'].startswith(prefix):
                subprocess.run(['ip', 'link', 'del', link['ifname']], capture_output=True, check=False)

    def _guest_pids(self) -> set[int]:
        pids = set()
        for f in (self.state / 'nodes').glob('*/**/*.pid'):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(f.read_text().strip()))
        return pids

    async def client(self) -> Client:
        return await Client(self.endpoints['grpc']).login('system', self.endpoints['key'])

    def sf(self) -> SfClient:
        home = self.state / 'home'
        home.mkdir(exist_ok=True)
        return SfClient(self.endpoints['rest'], 'system', self.endpoints['key'], home)

    def node_pids(self, name) -> list[int]:
        """The sfnode process sf-up started as node `name`."""
        return [pid for pid in _children(self.proc.pid) if f'--name {name} ' in _cmdline(pid)]

    def kill_node(self, name) -> int:
        """SIGKILL node `name` (sf-up starts it again); returns its log's length before."""
        log = self.state / f'{name}.log'
        offset = log.stat().st_size if log.exists() else 0
        for pid in self.node_pids(name):
            os.kill(pid, signal.SIGKILL)
        return offset

    def log_text(self) -> str:
        """What sf-up has logged."""
        return (self.state / 'sf-up.log').read_bytes().decode(errors='replace')

    def node_log(self, name, offset=0) -> str:
        """Node `name`'s log (all its runs: sf-up appends), from offset."""
        return (self.state / f'{name}.log').read_bytes()[offset:].decode(errors='replace')

    def console(self, node, uuid) -> str:
        path = self.state / 'nodes' / node / 'instances' / uuid / 'console.log'
        return path.read_bytes().decode(errors='replace') if path.exists() else ''


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in pathlib.Path(f'/proc/{pid}/task/{pid}/children').read_text().split()}
    except OSError:
        return set()


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''

