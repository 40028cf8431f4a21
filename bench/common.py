"""What the benchmarks share: statistics, the pieces of a plane as child processes,
and a scripted node that keeps heartbeating.

Servers under test (controller, gateway, echo server) run in child processes
of their own, as they are deployed, so that the benchmark's client work does
not share their event loop. Only P4 and P6 host the controller in this process,
because they read its cache and its etcd request counter.
"""

import contextlib
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sfcommon.pki import LocalPki  # noqa: E402
from sfup.etcd import EtcdServer  # noqa: E402
from tests.grpc_client import Client  # noqa: E402
from tests.node_double import NodeApi, NodeDouble  # noqa: E402

PY = sys.executable
now = time.perf_counter


# -- statistics -----------------------------------------------------------------------

def p50(values):
    return statistics.median(values)


def spread(values) -> str:
    return f'{min(values):.2f}-{max(values):.2f}'


async def timed(call, n: int) -> list[float]:
    """Seconds taken by each of n sequential awaits of call()."""
    out = []
    for _ in range(n):
        t = now()
        await call()
        out.append(now() - t)
    return out


async def interleaved(calls: dict, n: int, block: int = 10) -> dict[str, list[float]]:
    """n timed calls of each, in alternating blocks of `block`, so that each sees the same
    background load (this machine is shared: a noisy neighbour hits all alike)."""
    out = {name: [] for name in calls}
    names = list(calls)
    for i in range(0, n, block):
        for name in names if i // block % 2 == 0 else reversed(names):
            out[name] += await timed(calls[name], block)
    return out


# -- processes ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f'{proc.args[:4]} exited with {proc.returncode}')
        with contextlib.suppress(OSError), socket.create_connection(('127.0.0.1', port), 0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f'nothing listens on {port} after {timeout}s')
        time.sleep(0.05)


class Plane:
    """etcd, and the children this run started: each is stopped by its own PID."""

    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix='sfb', dir='/tmp'))
        self.pki = LocalPki(self.dir / 'pki').ensure()
        self.etcd = EtcdServer(self.dir / 'etcd', pki=self.pki).start()
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.dir / f'{name}.log', 'ab')
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def controller(self, prefix: str = '/sf') -> tuple[str, str, NodeApi]:
        """A controller (sfcontrol) on its own prefix: (target, system key, its node API)."""
        port, node_port, state = free_port(), free_port(), self.dir / f'ctl{len(self.procs)}'
        proc = self.spawn('sfcontrol', [PY, '-m', 'sfcontrol.main', '--etcd', self.etcd.endpoint,
                                        '--listen', f'127.0.0.1:{port}', '--state-dir', str(state),
                                        '--node-listen', f'127.0.0.1:{node_port}',
                                        '--pki-dir', str(self.pki.controller().directory),
                                        '--prefix', prefix, '--log-level', 'warning'])
        wait_port(port, proc)
        wait_port(node_port, proc)
        return (f'127.0.0.1:{port}', (state / 'system.key').read_text().strip(),
                NodeApi(f'127.0.0.1:{node_port}', self.pki))

    def gateway(self, target: str) -> str:
        port = free_port()
        proc = self.spawn('gateway', [PY, '-m', 'gateway', '--listen', f'127.0.0.1:{port}',
                                      '--grpc-target', target, '--log-level', 'WARNING'])
        wait_port(port, proc)
        return f'http://127.0.0.1:{port}'

    def echo(self) -> tuple[str, str]:
        """The bare servers of bench/echo.py: (gRPC target, HTTP URL)."""
        port, http = free_port(), free_port()
        proc = self.spawn('echo', [PY, str(ROOT / 'bench' / 'echo.py'), str(port), str(http)])
        wait_port(port, proc)
        wait_port(http, proc)
        return f'127.0.0.1:{port}', f'http://127.0.0.1:{http}/'

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.etcd.stop()
        subprocess.run(['rm', '-rf', str(self.dir)], check=False)


# -- a scripted node that stays healthy -------------------------------------------------

def Node(api: NodeApi, name='node1', beat=5.0, **capacity) -> NodeDouble:
    """tests/node_double.py's scripted node, unbounded, heartbeating as a real node
    does (every 5 s), so that the controller never marks it unreachable."""
    capacity.setdefault('cpus', 2**30)
    capacity.setdefault('memory_mib', 2**40)
    capacity.setdefault('disk_gib', 2**40)
    return NodeDouble(api, name, **capacity, heartbeat_every=beat)


async def login(target: str, key: str) -> Client:
    return await Client(target).login('system', key)
