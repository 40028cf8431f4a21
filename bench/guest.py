"""P5: a real guest (the sftest image, QEMU/TCG) from CreateInstance to agent `ready`,
against libvirt alone: define+start of the same domain to the agent's first reply.

The plane is sf-up in a child process (tests/plane.py: etcd, controller, gateway, one
sfnode on libvirt's embedded QEMU driver). The baseline opens an embedded driver of its
own in this process and builds the domain as sfnode does (sfnode/domain.py).
"""

import asyncio
import os
import pathlib
import signal
import subprocess
import uuid as uuidlib

from bench.common import ROOT, free_port, now
from sfnode import domain, images
from sfnode.agent.v2 import split_commands
from sfnode.libvirt.hypervisor import Hypervisor
from shakenfist.agent.v2 import agent_pb2 as apb
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_pb2 as ipb, instance_service_pb2 as api, specs_pb2
from tests.plane import Plane as SfUp

IMAGE = ROOT / 'build' / 'guest' / 'sftest.qcow2'
READY = (ipb.AGENT_STATE_READY, ipb.AGENT_STATE_READY_DEGRADED)
BOOT = 180.0


def unavailable() -> str | None:
    """Why P5 cannot run here, if it cannot."""
    if os.geteuid() != 0:
        return 'needs root (libvirt embedded QEMU, as sfnode runs it)'
    if not os.path.exists('/usr/bin/qemu-system-x86_64') or not IMAGE.exists():
        return 'needs qemu-system-x86_64 and the guest image (make guest-image)'
    return None


def _request(name):
    """A small guest: no network, no config drive, the sf-agent2 channel only."""
    return api.CreateInstanceRequest(
        name=name, cpus=1, memory=128, disk=[specs_pb2.DiskSpec(size=1, base='sftest')],
        configdrive=ipb.CONFIG_DRIVE_NONE,
        video=specs_pb2.VideoSpec(model=specs_pb2.VIDEO_MODEL_VGA, memory=16384, vdi=specs_pb2.VDI_TYPE_VNC),
        side_channels=ipb.SideChannelList(side_channels=[ipb.SIDE_CHANNEL_SF_AGENT2]))


async def _marker(path: pathlib.Path, t0: float) -> float:
    """Seconds from t0 until the guest's agent says on the console that it has started."""
    while b'SFTEST agent: ' not in (path.read_bytes() if path.exists() else b''):
        await asyncio.sleep(0.05)
    return now() - t0


async def _through_plane(plane: SfUp, client, name) -> dict:
    """Seconds from CreateInstance to: `created` (the domain is started), the agent's
    start on the console, and agent `ready`; and the instance. GetInstance every 50 ms."""
    t0 = now()
    inst = (await client.instances.CreateInstance(_request(name))).instance
    get = api.GetInstanceRequest(instance_ref=inst.uuid)
    marker = asyncio.create_task(_marker(
        plane.state / 'nodes' / inst.node / 'instances' / inst.uuid / 'console.log', t0))
    out = {}
    while now() - t0 < BOOT:
        inst = (await client.instances.GetInstance(get)).instance
        if inst.state == ipb.INSTANCE_STATE_CREATED:
            out.setdefault('started', now() - t0)
        if inst.agent_state in READY:
            out.update(ready=now() - t0, agent=await asyncio.wait_for(marker, 1), instance=inst)
            await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
            while (await client.instances.GetInstance(get)).instance.state != ipb.INSTANCE_STATE_DELETED:
                await asyncio.sleep(0.2)
            return out
        if inst.state in (ipb.INSTANCE_STATE_ERROR, ipb.INSTANCE_STATE_CREATING_ERROR):
            raise RuntimeError(f'{name}: {inst.error_message}')
        await asyncio.sleep(0.05)
    raise TimeoutError(f'{name}: agent not ready in {BOOT}s')


async def _first_reply(path: str, t0: float) -> None:
    """Ping over the sf-agent2 socket every 100 ms until the agent answers."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            break
        except OSError:
            if now() - t0 > BOOT:
                raise
            await asyncio.sleep(0.02)
    buf = bytearray()
    ping = apb.HypervisorToAgent(commands=[apb.HypervisorToAgentCommand(
        command_id='p', ping_request=apb.PingRequest())]).SerializeToString()
    try:
        while now() - t0 < BOOT:
            writer.write(ping)
            await writer.drain()
            try:
                buf += await asyncio.wait_for(reader.read(65536), 0.1)
            except TimeoutError:
                continue
            raw, used = split_commands(buf)
            del buf[:used]
            if any(apb.AgentToHypervisorCommand.FromString(r).WhichOneof('reply') == 'ping_reply'
                   for r in raw):
                return
        raise TimeoutError('no agent reply')
    finally:
        writer.close()


async def _bare(hv: Hypervisor, template: ipb.Instance, work: pathlib.Path) -> dict:
    """Seconds from define+start to: its return (started), the agent's start on the
    console, and the agent's first reply."""
    inst = ipb.Instance()
    inst.CopyFrom(template)
    inst.uuid = str(uuidlib.uuid4())
    directory = work / inst.uuid[:8]
    directory.mkdir()
    paths = domain.InstancePaths.under(str(directory), inst)
    await images.make_disk(pathlib.Path(paths.disks[0]), IMAGE, 1)
    xml = domain.build_domain_xml(
        node_pb2.DesiredInstance(instance=inst, desired_power_state=ipb.POWER_STATE_ON), paths,
        domain.DomainOptions(vdi_port=free_port(), domain_type="qemu"))
    t0 = now()
    marker = asyncio.create_task(_marker(pathlib.Path(paths.console_log), t0))
    await hv.define(xml, start=True)
    started = now() - t0
    await _first_reply(paths.agent_socket, t0)
    out = dict(started=started, ready=now() - t0, agent=await asyncio.wait_for(marker, 1))
    await hv.destroy(inst.uuid)
    await hv.undefine(inst.uuid)
    return out


def _stop(plane: SfUp):
    """Stop sf-up (it stops its nodes and their guests), by the PID this run started."""
    if plane.proc and plane.proc.poll() is None:
        plane.proc.send_signal(signal.SIGTERM)
        try:
            plane.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(plane.proc.pid, signal.SIGKILL)     # its own session, started above
            plane.proc.wait()
    subprocess.run(['rm', '-rf', str(plane.state)], check=False)


async def p5(rounds: int) -> dict:
    """Per round, one guest each way. P5 is the ratio of the two. The guest's own boot
    (start to its agent's console line) varies by seconds with the machine's load, so
    each round also gives what the plane adds that does not depend on the boot: before
    the domain starts (created, less libvirt's define+start), and after the agent starts
    (to ready, less the bare first reply); P5' = 1 + that / the round's bare time."""
    plane = SfUp(nodes=1).start()
    hv = None
    try:
        client = await plane.client()
        template = (await _through_plane(plane, client, 'warm'))['instance']   # fetches the image
        work = plane.state / 'bare'
        work.mkdir()
        hv = await Hypervisor.connect(str(work), caps_cache=str(plane.state / 'qemu-caps'))
        await _bare(hv, template, work)
        out = {'plane': [], 'bare': [], 'P5': [], 'added': [], "P5'": [], 'boot': []}
        for r in range(rounds):
            if r % 2:
                bare = await _bare(hv, template, work)
            sf = await _through_plane(plane, client, f'g{r}')
            if not r % 2:
                bare = await _bare(hv, template, work)
            added = (sf['started'] - bare['started']) + (
                (sf['ready'] - sf['agent']) - (bare['ready'] - bare['agent']))
            out['plane'].append(sf['ready'])
            out['bare'].append(bare['ready'])
            out['P5'].append(sf['ready'] / bare['ready'])
            out['added'].append(added)
            out["P5'"].append(1 + added / bare['ready'])
            out['boot'] += [sf['agent'] - sf['started'], bare['agent'] - bare['started']]
        await client.close()
        return out
    finally:
        if hv is not None:
            hv.close()
        _stop(plane)
