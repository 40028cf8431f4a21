"""Snapshots of an instance's disks, as the controller orders them (DesiredInstance.snapshots).

A running (or paused) guest's disk is copied by libvirt's push-mode backup: a
copy of the disk as it was at one moment, while the guest runs on. A stopped
guest's disk is copied by qemu-img convert. Either way the copy is a whole
qcow2 (its backing chain flattened, so it stands alone as a base), stored on
the controller with PutBlob under the order's blob UUID, with events as it
goes. A snapshot that cannot be taken is reported with FailSnapshot. Orders
still there when the node restarts are taken again.
"""

import asyncio
import logging
import pathlib

import grpc

from sfcommon import errors
from sfnode import domain, images
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_pb2

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


class Snapshotter:
    """The snapshots of one instance worker: each order taken once, at most one at a time
    (a backup job is one per domain)."""

    def __init__(self, worker):
        self.worker = worker
        self.tasks: dict[str, asyncio.Task] = {}    # blob UUID -> its task
        self.done: set[str] = set()                 # taken, until the order disappears
        self._one = asyncio.Lock()

    def converge(self, desired: node_pb2.DesiredInstance):
        ordered = {o.blob_uuid: o for o in desired.snapshots}
        self.done &= set(ordered)
        for blob_uuid, order in ordered.items():
            if blob_uuid not in self.tasks and blob_uuid not in self.done:
                self.tasks[blob_uuid] = asyncio.create_task(
                    self._take(order), name=f'snapshot-{self.worker.uuid}-{order.device}')

    async def stop(self):
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _take(self, order: node_pb2.SnapshotOrder):
        worker = self.worker
        target = worker.dir / f'snapshot-{order.blob_uuid}.qcow2'
        try:
            async with self._one:
                await self._copy(order, target)
                await self._store(order, target)
            self.done.add(order.blob_uuid)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            message = e.message if isinstance(e, errors.ApiError) else str(e) or type(e).__name__
            log.warning('instance %s: snapshot of %s failed: %s', worker.uuid, order.device, message)
            try:
                await worker.node.link.call('FailSnapshot', node_pb2.FailSnapshotRequest(
                    node=worker.node.name, instance_uuid=worker.uuid, blob_uuid=order.blob_uuid,
                    error_message=message))
                self.done.add(order.blob_uuid)
            except grpc.aio.AioRpcError as reported:
                log.warning('instance %s: could not report the failed snapshot: %s',
                            worker.uuid, reported.details())
        finally:
            target.unlink(missing_ok=True)
            self.tasks.pop(order.blob_uuid, None)

    async def _copy(self, order, target: pathlib.Path):
        worker, hv = self.worker, self.worker.node.hypervisor
        inst = worker.desired.instance
        paths = domain.InstancePaths.under(str(worker.dir), inst)
        slot = next((s for s in domain.disk_layout(inst, paths) if s.device == order.device), None)
        if slot is None or slot.present_as != 'disk' or slot.config_drive:
            raise errors.InvalidArgument(f'{order.device} is not a disk of this instance')
        target.unlink(missing_ok=True)
        running = await hv.power_state(worker.name) != instance_pb2.POWER_STATE_OFF
        await worker._event('snapshot started', {'device': order.device, 'blob': order.blob_uuid,
                                                 'method': 'live backup' if running else 'copy'})
        if running:
            await hv.backup_disk(worker.name, order.device, str(target))
        else:
            await images.qemu_img('convert', '-q', '-O', 'qcow2', slot.path, str(target))

    async def _store(self, order, target: pathlib.Path):
        worker = self.worker
        size = target.stat().st_size

        async def chunks():
            sent, reported = 0, 0
            with open(target, 'rb') as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if (step := sent * 10 // max(size, 1) * 10) > reported:
                        reported = step
                        await worker._event('snapshot upload progress', {
                            'device': order.device, 'blob': order.blob_uuid, 'percent': step,
                            'size': size})
        inst = worker.desired.instance
        await worker.node.link.put_blob(node_pb2.PutBlobHeader(
            node=worker.node.name, namespace=inst.namespace, instance_uuid=inst.uuid,
            snapshot_blob_uuid=order.blob_uuid), chunks())
