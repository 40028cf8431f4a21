"""The in-process plane of the controller tests: controllers started in this process
on one etcd key prefix, their clients, and scripted nodes (tests/node_double.py).
(tests/plane.py is the other kind: the whole product under sf-up, in child processes.)"""

import dataclasses

from sfcontrol import server
from tests.conftest import system_key
from tests.grpc_client import Client
from tests.node_double import NodeApi, NodeDouble


class LocalPlane:
    def __init__(self, config: server.Config, pki):
        self.config = config
        self.pki = pki
        self.controllers: list[server.Controller] = []
        self.clients: list[Client] = []
        self.nodes: list[NodeDouble] = []
        self.token = None

    async def start(self):
        """One controller, with `ctl`, a system `client` and its `node_api`."""
        self.ctl = await self.start_controller()
        self.client = self.client_of(self.ctl)
        self.node_api = NodeApi.of(self.ctl, self.pki)
        return self

    async def start_controller(self, port=0, node_port=0) -> server.Controller:
        ctl = await server.start(dataclasses.replace(
            self.config, listen=f'127.0.0.1:{port}', node_listen=f'127.0.0.1:{node_port}'))
        self.controllers.append(ctl)
        if self.token is None:
            c = await Client(f'127.0.0.1:{ctl.port}').login('system', system_key(self.config.state_dir.parent))
            self.token = c.token
            await c.close()
        return ctl

    def client_of(self, ctl) -> Client:
        """A system client on a channel of its own; the token (signed with the key kept in
        etcd) is good at every controller of the prefix."""
        c = Client(f'127.0.0.1:{ctl.port}')
        c.token = self.token
        self.clients.append(c)
        return c

    async def node(self, ctl, name='node1', **capacity) -> NodeDouble:
        """A resilient, heartbeating node double of ample capacity, registered at ctl."""
        capacity = capacity or {'cpus': 10_000, 'memory_mib': 10_000_000, 'disk_gib': 100_000}
        n = await NodeDouble(NodeApi.of(ctl, self.pki), name, **capacity, resilient=True,
                             heartbeat_every=1.0).start()
        self.nodes.append(n)
        return n

    async def advance(self, seconds: float):
        """Move the controllers' clock (a ManualClock) on, and wait for what its timers started."""
        self.config.clock.advance(seconds)
        for ctl in self.controllers:
            await ctl.registry.tasks.wait_idle()

    async def stop_controller(self, ctl, grace=None):
        self.controllers.remove(ctl)
        await ctl.stop(grace)

    async def stop(self):
        for n in self.nodes:
            await n.stop()
        for c in self.clients:
            await c.close()
        for ctl in self.controllers:
            await ctl.stop(None)
        self.nodes, self.clients, self.controllers = [], [], []
