"""sf-up: the whole plane on one machine, in the foreground.

It starts a private etcd (data in STATE_DIR/etcd), the controller, the REST
gateway and N node agents (each with an underlay namespace that its VXLANs use,
sfup/underlay.py; node0 serves the networks' DHCP and DNS), writes STATE_DIR/endpoints.json and
STATE_DIR/shakenfist.json (sf-client's configuration format) once everything
is ready, and stops all of it on SIGTERM or Ctrl-C. It supervises what it started
(sfup/supervise.py): a node or etcd that dies is started again with backoff; if etcd
cannot be kept up, sf-up stops everything and exits 1. The controller and the
gateway run in sf-up's own process.
"""

import asyncio
import json
import logging
import os
import pathlib

from gateway.app import start_gateway
from sfcommon import serve
from sfcommon.pki import LocalPki
from sfcommon.settings import parse
from sfcontrol import server
from sfcontrol.store import keys
from sfup.etcd import EtcdServer
from sfup.nodes import start_nodes
from sfup.settings import UpSettings
from sfup.supervise import Supervised
from sfup.underlay import FLOATING, Underlay

log = logging.getLogger('sf-up')
ETCD_ATTEMPTS = 5       # etcd ended or failed to start this many times in a row: sf-up gives up


def settings_from(argv=None) -> UpSettings:
    return parse(UpSettings, argv, prog='sf-up', description=__doc__.splitlines()[0])


def _write_private(path: pathlib.Path, data: dict):
    tmp = path.with_suffix('.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)


def _etcd(state: pathlib.Path, pki: LocalPki) -> EtcdServer:
    """The plane's etcd, on the ports it used before (its data dir records them)."""
    ports_file = state / 'etcd-ports.json'
    ports = tuple(json.loads(ports_file.read_text())) if ports_file.exists() else None
    etcd = EtcdServer(state / 'etcd' / 'data', name='sf', ports=ports, pki=pki)
    ports_file.write_text(json.dumps([etcd.client_port, etcd.peer_port]))
    return etcd


class _Exit:
    """A subprocess.Popen's exit, to await."""

    def __init__(self, proc):
        self.proc, self.pid = proc, proc.pid

    async def wait(self) -> int:
        return await asyncio.to_thread(self.proc.wait)


async def _started(etcd: EtcdServer) -> _Exit:
    await etcd.start_async()
    return _Exit(etcd.proc)


async def start(settings: UpSettings, stops: serve.Stops):
    """Each part in turn, each added to stops as it is up (serve stops them in reverse)."""
    host = settings.host
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    stops.add('endpoints', lambda: (state / 'endpoints.json').unlink(missing_ok=True))
    pki = LocalPki(state / 'pki').ensure()
    etcd = _etcd(state, pki)
    watched = Supervised('etcd', lambda: _started(etcd), give_up_after=ETCD_ATTEMPTS, failed=stops.fail)
    await watched.start()

    async def stop_etcd():
        await watched.stop()
        await etcd.stop_async()
    stops.add('etcd', stop_etcd)
    controller = await server.start(server.Config(
        etcd_endpoints=[etcd.endpoint], etcd_tls=etcd.client_tls, pki=pki.controller(),
        listen=f'{host}:{settings.grpc_port}', node_listen=f'{host}:0', state_dir=state,
        image_allow=settings.image_allow, metrics_listen=f'{host}:0', floating_netblock=str(FLOATING)))
    stops.add('controller', controller.stop)
    grpc_target = f'{host}:{controller.port}'
    node_target = f'{host}:{controller.node_port}'
    key = (state / 'system.key').read_text().strip()

    runner, rest_port = await start_gateway(grpc_target, host, settings.rest_port)
    stops.add('gateway', runner.cleanup)
    rest = f'http://{host}:{rest_port}'

    underlay = Underlay(state, settings.nodes, host_route=settings.host_route)
    if os.geteuid() == 0:       # namespaces need root; without them, nodes carry no networks
        await underlay.start()
        stops.add('underlay', underlay.stop)     # after the nodes: it takes their VXLANs with it
    else:
        log.warning('not root: the nodes get no underlay, and networks carry no packets')
        underlay.nodes = []
    nodes = await start_nodes(state, pki, settings.nodes, node_target, host, settings.image_allow,
                              lambda name: _registered(controller, name), underlay.nodes)
    stops.add('nodes', nodes.stop)

    _write_private(state / 'shakenfist.json', {'namespace': 'system', 'key': key, 'apiurl': rest})
    _write_private(state / 'endpoints.json', {'grpc': grpc_target, 'rest': rest,
                                              'node_api': node_target,
                                              'metrics': {'controller': controller.metrics.url,
                                                          'gateway': f'{rest}/metrics'},
                                              'namespace': 'system', 'key': key})
    print(_usage(state, grpc_target, rest), flush=True)


async def _registered(controller, name, timeout=180.0):
    """Wait until the node has registered (the controller's cache shows it)."""
    seen = asyncio.Event()
    if controller.core.cache.get(keys.node(name)) is None:
        controller.core.cache.listen(keys.node(name), lambda key, entry: seen.set())
        await asyncio.wait_for(seen.wait(), timeout)


def _usage(state, grpc_target, rest) -> str:
    cfg = state / 'shakenfist.json'
    return f"""
The plane is up. State: {state}

  sf-client:  SHAKENFIST_API_URL={rest} SHAKENFIST_NAMESPACE=system \\
              SHAKENFIST_KEY=$(jq -r .key {cfg}) sf-client instance list
              (or: cp {cfg} ~/.shakenfist)
  curl:       TOKEN=$(curl -s {rest}/auth -d "{{\\"namespace\\": \\"system\\", \\"key\\": \\"$(jq -r .key {cfg})\\"}}" | jq -r .access_token)
              curl -H "Authorization: Bearer $TOKEN" {rest}/instances
  grpcurl:    grpcurl -plaintext {grpc_target} list
              grpcurl -plaintext -H "authorization: Bearer $TOKEN" {grpc_target} shakenfist.v1.InstanceService/ListInstances

Stop with Ctrl-C (or SIGTERM).
"""


def main(argv=None):
    serve.run('sf-up', settings_from(argv), start)


if __name__ == '__main__':
    main()
