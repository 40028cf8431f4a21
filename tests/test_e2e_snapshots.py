"""Snapshots of real TCG guests: a file written in a running guest is in the snapshot
(libvirt's live backup) and in a new instance booted from it; a stopped guest's disk
is copied too; the real sf-client takes and lists snapshots."""

import json

import pytest

from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api, specs_pb2
from tests.helpers import get
# The image over HTTP and a plane of one node, as the guests' tests have them.
from tests.test_e2e_guests import BOOT, client, image_url, plane, stream, until  # noqa: F401
from tests.waiting import eventually

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope='module')]
# The sftest disk's first partition is FAT (syslinux's): the guest can write a file there.
WRITE = ('mkdir -p /mnt/boot && mount -t vfat /dev/vda1 /mnt/boot && echo {text} > /mnt/boot/MARKER.TXT '
         '&& umount /mnt/boot && sync && echo written')
READ = 'mkdir -p /mnt/boot && mount -o ro -t vfat /dev/vda1 /mnt/boot && cat /mnt/boot/MARKER.TXT'


async def booted(plane, client, name, image):
    await client.instances.CreateInstance(api.CreateInstanceRequest(
        name=name, cpus=1, memory=256, disk=[specs_pb2.DiskSpec(size=1, base=image)]))

    async def ready():
        inst = await get(client, name)
        assert inst.state != pb.INSTANCE_STATE_ERROR, inst.error_message
        return inst.agent_state == pb.AGENT_STATE_READY
    try:
        await eventually(ready, BOOT, interval=0.25, what=f'{name}: agent ready')
    except AssertionError:
        inst = await get(client, name)
        print(f'{name}: {inst}\nconsole:\n{plane.console(inst.node, inst.uuid)[-3000:]}')
        raise


async def run(client, name, command) -> str:
    out, err, end, _ = await stream(client, command, ref=name, deadline_seconds=60)
    assert end.exit_code == 0, (out, err)
    return out.decode()


async def created(client, name, blob_uuid):
    async def done():
        shots = (await client.instances.ListInstanceSnapshots(
            api.ListInstanceSnapshotsRequest(instance_ref=name))).snapshots
        mine = [s for s in shots if s.blob_uuid == blob_uuid]
        assert mine and mine[0].state != 'error', shots
        return mine[0].state == 'created'
    await eventually(done, 120, interval=0.25, what=f'snapshot {blob_uuid} created')


async def test_a_live_snapshot_round_trips_into_a_new_instance(plane, client, image_url):  # noqa: F811
    await booted(plane, client, 'origin', image_url)
    assert 'written' in await run(client, 'origin', WRITE.format(text='before-the-snapshot'))
    target = (await client.instances.SnapshotInstance(
        api.SnapshotInstanceRequest(instance_ref='origin'))).snapshots['vda']
    await created(client, 'origin', target.blob_uuid)
    # Written after: not in the snapshot.
    await run(client, 'origin', WRITE.format(text='after-the-snapshot'))

    await booted(plane, client, 'clone', f'sf://blob/{target.blob_uuid}')
    assert (await run(client, 'clone', READ)).strip() == 'before-the-snapshot'
    clone = await get(client, 'clone')
    assert clone.disks[0].blob_uuid == target.blob_uuid
    events = [e.message for e in (await client.instances.ListInstanceEvents(
        api.ListInstanceEventsRequest(instance_ref='origin'))).events]
    assert {'snapshot requested', 'snapshot started', 'snapshot upload progress',
            'snapshot created'} <= set(events)
    for name in ('clone',):
        await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=name))


async def test_a_stopped_guest_is_snapshotted_with_sf_client(plane, client):  # noqa: F811
    await run(client, 'origin', WRITE.format(text='while-it-was-on'))
    await client.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref='origin'))
    await until(client, 'origin', 'off', lambda i: i.power_state == pb.POWER_STATE_OFF, 60)
    sf = plane.sf()
    _, out, _ = await sf.run('--json', 'instance', 'snapshot', 'origin')     # waits until created
    taken = json.loads(out)
    assert taken['vda']['source_url'].endswith('/vda') and taken['vda']['artifact_index'] == 2
    _, out, _ = await sf.run('instance', 'show', '-s', 'origin')
    assert taken['vda']['artifact_uuid'] in out
    _, out, _ = await sf.run('--json', 'instance', 'show', '-s', 'origin')
    listed = json.loads(out)['snapshots']      # sf-client shows uuid, device and created
    assert [(s['uuid'], s['device']) for s in listed] == [(taken['vda']['artifact_uuid'], 'vda')] * 2
    assert listed[0]['created'] < listed[1]['created']

    await booted(plane, client, 'from-off', f'sf://snapshot/{taken["vda"]["artifact_uuid"]}')
    assert (await run(client, 'from-off', READ)).strip() == 'while-it-was-on'
    for name in ('from-off', 'origin'):
        await client.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=name))
