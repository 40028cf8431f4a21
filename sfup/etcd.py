"""A private etcd child process: loopback ports, its own data dir, stopped by PID.

Used by sf-up (the one-command plane) and by the tests. With a pki (a
sfcommon.pki.LocalPki), clients and peers speak TLS and etcd takes only clients
with a certificate of the plane's etcd CA (--client-cert-auth): nobody else on
the host can read or write it.

    server = EtcdServer(tmp_path / "etcd", pki=LocalPki(tmp_path / "pki").ensure())
    server.start()            # or: await server.start_async()
    server.endpoint           # "127.0.0.1:PORT"
    server.restart()          # same data dir and ports
    server.stop()

A cluster of several members on loopback (each its own data dir and ports):

    members = EtcdServer.cluster(tmp_path, 3)
    await start_all_async(members)      # members wait for each other to elect a leader
    [m.endpoint for m in members]
    members[0].kill()                   # SIGKILL, as a crash
    await members[0].start_async()      # rejoins with its data dir
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from sfcommon.pki import LocalPki

ETCD = os.environ.get("SF_TEST_ETCD", "/usr/bin/etcd")
READY_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
STOP_GRACE = 10.0


def _die_with_parent() -> list[str]:
    """A command prefix that SIGTERMs etcd if the test process dies without stop().

    setpriv (util-linux) sets PR_SET_PDEATHSIG and execs etcd. Not a preexec_fn: that runs
    Python in the child between fork and exec, which in a process running gRPC crashed the
    child at random (SIGSEGV, or an abort in gRPC's fork handlers; seen with
    GRPC_ENABLE_FORK_SUPPORT on), leaving no etcd to restart.
    The kernel ties the signal to the launching *thread*: start from a long-lived thread
    (the main or event-loop thread), not from a short-lived worker."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []  # else: rely on stop()


def _free_ports(n: int) -> list[int]:
    """Bind n port-0 sockets at once (so they differ), note the ports, release them."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdServer:
    def __init__(self, data_dir: str | os.PathLike, name: str = "sftest",
                 ports: tuple[int, int] | None = None, initial_cluster: str | None = None,
                 cluster_token: str = "etcd-cluster", pki: LocalPki | None = None):
        """initial_cluster: "name=http://127.0.0.1:PEER,..." of every member, for a member
        of a cluster (default: a cluster of this one member). It only matters on the first
        start: a member that restarts with its data dir rejoins the cluster it was in."""
        self.data_dir = Path(data_dir)
        self.name = name
        self.pki = pki
        self.scheme = "https" if pki else "http"
        self.client_port, self.peer_port = ports or _free_ports(2)
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")

    @classmethod
    def cluster(cls, base_dir: str | os.PathLike, size: int = 3,
                pki: LocalPki | None = None) -> list[EtcdServer]:
        """size members (not started) of one new cluster, data in base_dir/m<i>."""
        ports = _free_ports(2 * size)
        names = [f"m{i}" for i in range(size)]
        scheme = "https" if pki else "http"
        initial = ",".join(f"{n}={scheme}://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
        token = f"sftest-{os.getpid()}-{ports[0]}"
        return [cls(Path(base_dir) / n, n, (ports[2 * i], ports[2 * i + 1]), initial, token, pki)
                for i, n in enumerate(names)]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    @property
    def client_tls(self):
        """What a client (the controller) connects with: a sfcommon.pki.EtcdTls, or None."""
        return self.pki.etcd_client() if self.pki else None

    def _tls_flags(self) -> list[str]:
        if not self.pki:
            return []
        tls = self.pki.etcd_server()
        files = ["--trusted-ca-file", str(tls.ca), "--cert-file", str(tls.cert),
                 "--key-file", str(tls.key), "--client-cert-auth"]
        peer = ["--peer-trusted-ca-file", str(tls.ca), "--peer-cert-file", str(tls.cert),
                "--peer-key-file", str(tls.key), "--peer-client-cert-auth"]
        return files + peer

    def _command(self) -> list[str]:
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer = self.peer_url
        return [
            ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-token", self.cluster_token, "--initial-cluster-state", "new",
            "--logger", "zap", "--log-level", "error", *self._tls_flags(),
        ]

    def _launch(self) -> float:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"etcd already running as PID {self.proc.pid}")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _die_with_parent() + self._command(), stdout=subprocess.DEVNULL, stderr=log,
                stdin=subprocess.DEVNULL)
        return time.monotonic() + READY_TIMEOUT

    def _ready_or_raise(self, deadline: float) -> bool:
        """One readiness probe: True once etcd answers GET /health with health "true".

        A bare TCP connect is not enough: etcd opens its client listener before it
        has a leader and serves requests.
        """
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"etcd exited with {self.proc.returncode}; log: {self.log_path}\n"
                + self.log_path.read_text(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            self.stop()
            raise TimeoutError(f"etcd not ready on {self.endpoint} after {READY_TIMEOUT}s")
        return self.healthy()

    def start(self) -> EtcdServer:
        deadline = self._launch()
        while not self._ready_or_raise(deadline):
            time.sleep(POLL_INTERVAL)
        return self

    async def start_async(self) -> EtcdServer:
        deadline = self._launch()
        while not self._ready_or_raise(deadline):
            await asyncio.sleep(POLL_INTERVAL)
        return self

    def stop(self) -> None:
        """SIGTERM the PID we started and wait; SIGKILL it after STOP_GRACE seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def stop_async(self) -> None:
        await asyncio.to_thread(self.stop)

    def kill(self) -> None:
        """SIGKILL the PID we started (a crash: no clean shutdown) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def _http(self, method: str, path: str, body: str | None = None) -> dict | None:
        """etcd's JSON answer to an HTTP request on the client port; None if it gives none."""
        if self.pki:
            # The member's own certificate doubles as a client one (etcd requires one).
            tls = self.pki.etcd_server()
            context = ssl.create_default_context(cafile=str(tls.ca))
            context.load_cert_chain(str(tls.cert), str(tls.key))
            conn = http.client.HTTPSConnection("127.0.0.1", self.client_port, timeout=0.5,
                                               context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=0.5)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return json.loads(resp.read()) if resp.status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def healthy(self) -> bool:
        """Whether this member answers GET /health with health "true" (it has a leader)."""
        return (self._http("GET", "/health") or {}).get("health") == "true"

    def is_leader(self) -> bool:
        """Whether this member is the cluster's leader (by its own maintenance status)."""
        status = self._http("POST", "/v3/maintenance/status", "{}") or {}
        return bool(status.get("leader")) and status.get("leader") == status.get("header", {}).get("member_id")

    def restart(self) -> EtcdServer:
        self.stop()
        return self.start()

    async def restart_async(self) -> EtcdServer:
        await self.stop_async()
        return await self.start_async()


async def start_all_async(members: list[EtcdServer]) -> list[EtcdServer]:
    """Start the members of a new cluster together: each is ready only once a quorum
    has started and elected a leader. Stops them all if one fails."""
    try:
        await asyncio.gather(*(m.start_async() for m in members))
    except BaseException:
        for m in members:
            m.stop()
        raise
    return members
