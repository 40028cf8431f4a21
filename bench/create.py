"""P4 and P6, with the controller in this process: P4 reads its cache (when each state
becomes visible) and P6 its etcd request counter (Store.requests)."""

import asyncio
import json
import pathlib
import statistics
import tempfile
import time

from tests.node_double import NodeApi
from bench.common import PY, ROOT, Node, Plane, login, now, p50
from sfcontrol import server
from sfcommon import states
from sfcontrol.store import keys
from sfnode import configdrive, images
from sfnode.libvirt.hypervisor import Hypervisor
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api
from tests.helpers import create_created, create_request

IMAGE = ROOT / 'build' / 'guest' / 'sftest.qcow2'
STAGES = {states.PREFLIGHT: 'preflight', states.CREATING: 'creating', states.CREATED: 'created'}


async def _controller(plane: Plane, prefix: str):
    state = plane.dir / prefix.strip('/')
    ctl = await server.start(server.Config(
        etcd_endpoints=[plane.etcd.endpoint], etcd_tls=plane.etcd.client_tls,
        pki=plane.pki.controller(), state_dir=state, store_prefix=prefix))
    client = await login(f'127.0.0.1:{ctl.port}', (state / 'system.key').read_text().strip())
    return ctl, client, NodeApi.of(ctl, plane.pki)


class StateClock:
    """When the controller's cache first shows each state of the instances it is told of."""

    def __init__(self, cache):
        self.seen: dict[str, dict[int, float]] = {}
        self.done: dict[str, asyncio.Future] = {}
        cache.listen(keys.INSTANCES, self._changed)

    def expect(self, uuid):
        self.seen[uuid] = {}
        self.done[uuid] = asyncio.get_running_loop().create_future()

    def _changed(self, key, entry):
        if entry is None or entry.value.uuid not in self.seen:
            return
        t, inst = now(), entry.value
        self.seen[inst.uuid].setdefault(inst.state, t)
        if inst.state == states.CREATED and not self.done[inst.uuid].done():
            self.done[inst.uuid].set_result(t)


async def _sfnode(plane: Plane, ctl) -> None:
    """A real sfnode process on libvirt's test driver (test:///default): it builds the
    disks and config drive, defines and starts domains, and reports, as on QEMU."""
    plane.spawn('sfnode', [
        PY, '-m', 'sfnode.main', '--name', 'sfnode', '--controller', f'127.0.0.1:{ctl.node_port}',
        '--pki-dir', str(plane.pki.node('sfnode').directory), '--state-dir', str(plane.dir / 'node'),
        '--libvirt-uri', 'test:///default', '--domain-type', 'qemu', '--capacity', '4096,4194304,100000',
        '--images', json.dumps({'sftest': IMAGE.as_uri()}), '--usage-interval', '0',
        '--log-level', 'warning'])
    for _ in range(600):
        if ctl.core.cache.get(keys.node('sfnode')) is not None:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError('sfnode did not register')


async def _create(client, clock, name, node):
    """Seconds from the CreateInstance call to `created` in the controller's cache, and
    the instant of each state relative to the call."""
    t0 = now()
    r = await client.instances.CreateInstance(create_request(
        name, memory=128, placed_on=node, side_channels=instance_pb2.SideChannelList()))
    returned = now()
    clock.expect(r.instance.uuid)
    created = await asyncio.wait_for(clock.done[r.instance.uuid], 30)
    stages = {'returned': returned - t0, **{STAGES[s]: t - t0 for s, t in clock.seen[r.instance.uuid].items()
                                            if s in STAGES}}
    return created - t0, stages, r.instance.uuid


async def _domain_xml(client, uuid) -> str:
    events = await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref=uuid))
    return next(e.extra['xml'] for e in events.events if e.message == 'libvirt domain XML')


async def _define_start(hv: Hypervisor, xml: str) -> float:
    """libvirt's own part: define and start the domain sfnode defined, on this process's
    test:///default; then remove it."""
    t = now()
    info = await hv.define(xml, start=True)
    took = now() - t
    await hv.destroy(info.uuid)
    await hv.undefine(info.uuid)
    return took


async def _disk_prep(work: pathlib.Path, inst) -> float:
    """The node's subprocesses before the define: qemu-img info and create for the overlay,
    genisoimage for the config drive (as sfnode/instance.py _build runs them)."""
    t = now()
    await images.make_disk(work / f'{inst.uuid}.qcow2', IMAGE, 1)
    await configdrive.build(work / f'{inst.uuid}.iso', inst, {})
    return now() - t


async def p4(plane: Plane, rounds: int, n: int) -> dict:
    ctl, client, node_api = await _controller(plane, '/p4')
    clock = StateClock(ctl.core.cache)
    await _sfnode(plane, ctl)
    double = await Node(node_api, name='double').start()
    hv = await Hypervisor.connect(str(plane.dir / 'hv'), 'test:///default')
    work = pathlib.Path(tempfile.mkdtemp(dir=plane.dir))
    for i in range(3):                        # warm up: the first fetches the image
        await _create(client, clock, f'warm{i}', 'sfnode')
        await _create(client, clock, f'warmd{i}', 'double')
    out = {'created': [], 'define': [], 'prep': [], 'double': [], 'P4': [], 'P4b': [], 'stages': {}}
    stages = []
    for r in range(rounds):
        created, define, prep, double_ = [], [], [], []
        for i in range(n):
            took, stage, uuid = await _create(client, clock, f'r{r}-{i}', 'sfnode')
            created.append(took)
            stages.append(stage)
            define.append(await _define_start(hv, await _domain_xml(client, uuid)))
            inst = (await client.instances.GetInstance(api.GetInstanceRequest(instance_ref=uuid))).instance
            prep.append(await _disk_prep(work, inst))
            double_.append((await _create(client, clock, f'd{r}-{i}', 'double'))[0])
        out['created'].append(p50(created))
        out['define'].append(p50(define))
        out['prep'].append(p50(prep))
        out['double'].append(p50(double_))
        out['P4'].append(p50(created) - p50(define))
        out['P4b'].append(p50(created) - p50(define) - p50(prep))
    previous = 0.0
    for label in ('returned', 'preflight', 'creating', 'created'):
        at = statistics.median(s[label] for s in stages)
        out['stages'][label] = f'{at * 1000:.1f} ms (+{(at - previous) * 1000:.1f})'
        previous = at
    # Store requests per create, from the call to created (the double's reports included).
    before = dict(ctl.core.store.requests)
    for i in range(n):
        await _create(client, clock, f'tx{i}', 'double')
    after = ctl.core.store.requests
    out['requests_per_create'] = {k: (after[k] - before.get(k, 0)) / n for k in after
                                  if after[k] != before.get(k, 0)}
    hv.close()
    await double.stop()
    await client.close()
    await ctl.stop()
    return out


async def p6(plane: Plane, rounds: int, window: float) -> dict:
    """etcd requests made by the controller while 100 created instances sit on 3 healthy
    nodes (scripted, heartbeating every second) and nobody calls."""
    ctl, client, node_api = await _controller(plane, '/p6')
    nodes = [await Node(node_api, name=f'node{i}', beat=1.0, memory_mib=65536).start() for i in range(3)]
    for batch in range(0, 100, 10):
        await asyncio.gather(*(create_created(client, f'idle{i}', memory=64)
                               for i in range(batch, batch + 10)))
    placed = {n.name: len(n.desired) for n in nodes}
    await asyncio.sleep(1.0)
    out = {'P6': [], 'kinds': {}, 'placed': placed}
    for _ in range(rounds):
        before = dict(ctl.core.store.requests)
        t = time.monotonic()
        await asyncio.sleep(window)
        after = dict(ctl.core.store.requests)
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        # The blob-holder lease keepalive (a controller's liveness) is reported apart.
        out['P6'].append(sum(v for k, v in delta.items() if k != 'lease_keepalive') / (time.monotonic() - t))
        for k, v in delta.items():
            out['kinds'][k] = out['kinds'].get(k, 0) + v
    for node in nodes:
        await node.stop()
    await client.close()
    await ctl.stop()
    return out
