"""A private etcd child process: loopback ports, its own data dir, stopped by PID.

Used by sf-up (the one-command plane) and by the tests.

    server = EtcdServer(tmp_path / "etcd")
    server.start()            # or: await server.start_async()
    server.endpoint           # "127.0.0.1:PORT"
    server.restart()          # same data dir and ports
    server.stop()
"""

from __future__ import annotations

import asyncio
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ETCD = os.environ.get("SF_TEST_ETCD", "/usr/bin/etcd")
READY_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
STOP_GRACE = 10.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM etcd if the test process dies without stop().

    The kernel ties this to the launching *thread*: start from a long-lived thread (the
    main or event-loop thread), not from a short-lived worker."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: rely on stop()


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
                 ports: tuple[int, int] | None = None):
        self.data_dir = Path(data_dir)
        self.name = name
        self.client_port, self.peer_port = ports or _free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def _command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--logger", "zap", "--log-level", "error",
        ]

    def _launch(self) -> float:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"etcd already running as PID {self.proc.pid}")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=log,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
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
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=0.5)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()

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

    def restart(self) -> EtcdServer:
        self.stop()
        return self.start()

    async def restart_async(self) -> EtcdServer:
        await self.stop_async()
        return await self.start_async()
