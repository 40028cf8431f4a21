"""Node agents as child processes of sf-up: one sfnode each, with its own state
directory, libvirt root and bridge-name prefix, so several run on one machine."""

import asyncio
import json
import logging
import os
import pathlib
import signal
import sys

from sfup.supervise import Supervised
from sfup.underlay import NodeUnderlay, plane_prefix

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parent.parent
TEST_IMAGE = REPO / 'build' / 'guest' / 'sftest.qcow2'
DEBIAN_IMAGE = REPO / 'build' / 'guest' / 'debian-sftest.qcow2'    # make debian-image (guest/debian)


def bridge_prefix(state: pathlib.Path, i: int) -> str:
    """Node i's device-name prefix: distinct per plane (from its state directory) and
    per node, and short, as a link name is at most 15 characters."""
    return f'{plane_prefix(state)}{i}-'


def node_command(i: int, state: pathlib.Path, pki, node_target: str, host: str,
                 image_allow=(), underlay: NodeUnderlay | None = None) -> list[str]:
    """Node i's command line; node 0 is the network node. With an underlay (sfup/underlay.py)
    the node carries networks over it."""
    images = {name: path.as_uri() for name, path in (('sftest', TEST_IMAGE), ('debian-sftest', DEBIAN_IMAGE))
              if path.exists()}
    mesh = [] if underlay is None else [
        '--mesh-address', underlay.address, '--mesh-namespace', underlay.netns,
        '--mesh-device', underlay.device, *(['--network-node'] if i == 0 else []),
        *(['--edge-namespace', underlay.edge] if underlay.edge else [])]
    return [sys.executable, '-m', 'sfnode.main', '--name', f'node{i}', '--controller', node_target,
            '--pki-dir', str(pki.node(f'node{i}').directory),
            '--state-dir', str(state / 'nodes' / f'node{i}'),
            '--bridge-prefix', bridge_prefix(state, i), '--listen', f'{host}:0', '--console-listen', host,
            '--metrics-listen', f'{host}:0',
            '--images', json.dumps(images), '--caps-cache', str(state / 'qemu-caps'),
            '--stop-guests-on-exit', *(f'--image-allow={prefix}' for prefix in image_allow), *mesh]


class Nodes:
    """The node processes, each supervised (sfup/supervise.py): one that dies is
    started again with the same command, its log appended to."""

    def __init__(self, supervised: list[Supervised]):
        self.supervised = supervised

    @property
    def procs(self):
        return [s.child for s in self.supervised if s.child is not None]

    async def stop(self):
        for s in self.supervised:
            await s.stop()
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 60)
            except TimeoutError:
                p.kill()
                await p.wait()


async def start_nodes(state: pathlib.Path, pki, n: int, node_target: str, host: str, image_allow,
                      registered, underlays=()) -> Nodes:
    """Start n nodes and return once each has registered (registered(name) awaits that)."""
    def starter(i):
        async def start():
            with open(state / f'node{i}.log', 'ab') as log_file:  # noqa: ASYNC230 -- a local file, at once
                return await asyncio.create_subprocess_exec(
                    *node_command(i, state, pki, node_target, host, image_allow,
                                  underlays[i] if underlays else None), stdout=log_file, stderr=log_file,
                    stdin=asyncio.subprocess.DEVNULL, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        return start
    nodes = Nodes([Supervised(f'node{i}', starter(i)) for i in range(n)])
    try:
        for s in nodes.supervised:
            await s.start()
        await asyncio.gather(*(registered(f'node{i}') for i in range(n)))
    except BaseException:
        await nodes.stop()
        raise
    return nodes
