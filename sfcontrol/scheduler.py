"""Placement of instances on nodes.

Candidates are reachable nodes with room for the instance. Affinity (instance
metadata `affinity`, {tag: weight}, against the `tags` of the caller's
instances already on each node) keeps only the best-scoring nodes; among
those the node with the most free memory wins, which spreads load. The
placement is committed in the create transaction, which checks the node
record's revision: two controllers cannot both spend the same capacity.
"""

from sfcommon import errors
from sfcommon.disks import UNSIZED_DISK_GIB
from sfcontrol.store import keys
from sfcontrol.store.cache import Entry, ObjectCache, untracked
from sfcontrol.store.etcd import Txn
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.store.v1alpha1 import records_pb2
from shakenfist.v1 import specs_pb2


def size_of(cpus: int, memory_mib: int, disk_gib: int) -> node_pb2.NodeCapacity:
    return node_pb2.NodeCapacity(cpus=cpus, memory_mib=memory_mib, disk_gib=disk_gib)


def size_of_instance(cpus: int, memory_mib: int, disks) -> node_pb2.NodeCapacity:
    """What an instance uses of a node; its disks are DiskSpecs (cdroms do not count:
    they are their image; a disk of no size is made UNSIZED_DISK_GIB big)."""
    return size_of(cpus, memory_mib, sum(d.size if d.HasField('size') and d.size else UNSIZED_DISK_GIB
                                         for d in disks if d.type != specs_pb2.DISK_TYPE_CDROM))


def _free(node: records_pb2.NodeRecord) -> node_pb2.NodeCapacity:
    c, a = node.capacity, node.allocated
    return size_of(c.cpus - a.cpus, c.memory_mib - a.memory_mib, c.disk_gib - a.disk_gib)


def _fits(node, size) -> bool:
    free = _free(node)
    return (free.cpus >= size.cpus and free.memory_mib >= size.memory_mib
            and free.disk_gib >= size.disk_gib)


def affinity_score(cache: ObjectCache, node_name: str, namespace: str, affinity: dict) -> float:
    score = 0.0
    for entry in cache.range(keys.placements(node_name))[0]:
        found = cache.by_uuid(keys.INSTANCES, entry.value.instance_uuid)
        if found is None:
            continue
        inst = found.value
        if inst.namespace != namespace or not inst.HasField('metadata'):
            continue
        tags = inst.metadata['tags'] if 'tags' in inst.metadata else []
        score += sum(affinity.get(tag, 0) for tag in tags)
    return score


def choose(cache: ObjectCache, size, namespace: str, affinity: dict,
           placed_on: str | None = None) -> Entry:
    """The node to place an instance on; NOT_FOUND or RESOURCE_EXHAUSTED otherwise.

    Only the chosen node's record guards the create (it is read again, tracked, and
    allocate() writes it): the others only ranked it, and a create must not conflict
    with every change to any node."""
    with untracked():
        best = _choose(cache, size, namespace, affinity, placed_on)
    return cache.get(best.key)


def _choose(cache: ObjectCache, size, namespace: str, affinity: dict, placed_on: str | None) -> Entry:
    if placed_on:
        entry = cache.get(keys.node(placed_on))
        if entry is None:
            raise errors.NotFound(f'node {placed_on} not found')
        if entry.value.unreachable or not _fits(entry.value, size):
            raise errors.InsufficientResources(f'node {placed_on} does not have the capacity for this instance')
        return entry
    nodes = [e for e in cache.range(keys.NODES)[0] if not e.value.unreachable and _fits(e.value, size)]
    if not nodes:
        raise errors.InsufficientResources('no node has the capacity for this instance')
    if affinity:
        scores = {e.key: affinity_score(cache, e.value.name, namespace, affinity) for e in nodes}
        best = max(scores.values())
        nodes = [e for e in nodes if scores[e.key] == best]
    return max(nodes, key=lambda e: (_free(e.value).memory_mib, _free(e.value).cpus, e.key))


def allocate(txn: Txn, node: Entry, size, release: bool = False) -> records_pb2.NodeRecord:
    """Add (or with release, give back) size to the node's allocation, checking its revision."""
    record = records_pb2.NodeRecord()
    record.CopyFrom(node.value)
    sign = -1 if release else 1
    record.allocated.cpus += sign * size.cpus
    record.allocated.memory_mib += sign * size.memory_mib
    record.allocated.disk_gib += sign * size.disk_gib
    txn.check_revision(node.key, node.mod_revision).put(node.key, record.SerializeToString())
    return record
