"""sf-up: the whole plane on one machine, in the foreground.

It starts a private etcd (data in STATE_DIR/etcd), the controller, the REST
gateway and N node agents, writes STATE_DIR/endpoints.json and
STATE_DIR/shakenfist.json (sf-client's configuration format) once everything
is ready, and stops all of it on SIGTERM or Ctrl-C.
"""

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import sys

from gateway.app import start_gateway
from sfcommon import logs
from sfcommon.pki import LocalPki
from sfcontrol import server
from sfcontrol.store import keys
from sfup.etcd import EtcdServer
from sfup.nodes import start_nodes

log = logging.getLogger('sf-up')


def parser():
    p = argparse.ArgumentParser(prog='sf-up', description=__doc__.splitlines()[0])
    p.add_argument('--state-dir', type=pathlib.Path, required=True)
    p.add_argument('--nodes', type=int, default=1, help='node agents to run (default 1)')
    p.add_argument('--grpc-port', type=int, default=13001, help='0 picks a free port')
    p.add_argument('--rest-port', type=int, default=13000, help='0 picks a free port')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on')
    p.add_argument('--image-allow', action='append', default=[],
                   help='a URL prefix tenants may use as an image though it is a local file or an '
                        'internal address (repeatable; the sftest shorthand needs none)')
    p.add_argument('--log-level', default=os.environ.get('SF_LOG_LEVEL', 'info'))
    return p


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


async def run(args):
    state = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    stack = []           # (name, async stop) in start order
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        pki = LocalPki(state / 'pki').ensure()
        etcd = _etcd(state, pki)
        await etcd.start_async()
        stack.append(('etcd', etcd.stop_async))
        controller = await server.start(server.Config(
            etcd_endpoints=[etcd.endpoint], etcd_tls=etcd.client_tls, pki=pki.controller(),
            listen=f'{args.host}:{args.grpc_port}', node_listen=f'{args.host}:0', state_dir=state,
            image_allow=tuple(args.image_allow)))
        stack.append(('controller', controller.stop))
        grpc_target = f'{args.host}:{controller.port}'
        node_target = f'{args.host}:{controller.node_port}'
        key = (state / 'system.key').read_text().strip()

        runner, rest_port = await start_gateway(grpc_target, args.host, args.rest_port)
        stack.append(('gateway', runner.cleanup))
        rest = f'http://{args.host}:{rest_port}'

        nodes = await start_nodes(state, pki, args.nodes, node_target, args.host, args.image_allow,
                                  lambda name: _registered(controller, name))
        stack.append(('nodes', nodes.stop))

        _write_private(state / 'shakenfist.json', {'namespace': 'system', 'key': key, 'apiurl': rest})
        _write_private(state / 'endpoints.json', {'grpc': grpc_target, 'rest': rest,
                                                  'node_api': node_target,
                                                  'namespace': 'system', 'key': key})
        print(_usage(state, grpc_target, rest), flush=True)
        await stop.wait()
    finally:
        for name, stopper in reversed(stack):
            log.info('stopping %s', name)
            try:
                await stopper()
            except Exception:   # noqa: BLE001 -- keep stopping the rest
                log.exception('stopping %s failed', name)
        for f in ('endpoints.json',):
            (state / f).unlink(missing_ok=True)


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


def main():
    args = parser().parse_args()
    os.umask(0o077)     # keys, disks, blobs and logs are the plane's alone
    logs.setup('sf-up', args.log_level)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == '__main__':
    main()
