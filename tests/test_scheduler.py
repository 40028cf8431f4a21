"""Placement across three registered nodes: capacity, spreading, placed_on, affinity."""

import collections
import grpc
import pytest_asyncio
from google.protobuf import struct_pb2

from tests.helpers import create, raises
from tests.node_double import NodeDouble


@pytest_asyncio.fixture
async def three_nodes(node_api):
    nodes = [await NodeDouble(node_api, f'node{i}', cpus=16, memory_mib=mem).start()
             for i, mem in enumerate((4096, 2048, 1024))]
    yield nodes
    for n in nodes:
        await n.stop()


def metadata(**values):
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def test_instances_spread_by_free_memory_and_never_overbook(system, three_nodes):
    placed = collections.Counter()
    for i in range(7):
        placed[(await create(system, f'i{i}', memory=512)).node] += 1
    # Each goes to the node with the most free memory (4096, 2048, 1024 MiB at first):
    # node0 takes four, then node0 and node1 alternate at equal free memory.
    assert placed == {'node0': 5, 'node1': 2}
    for i in range(7, 14):
        await create(system, f'i{i}', memory=512)
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(system, 'one-too-many', memory=512)


async def test_cpus_are_capacity_too(system, three_nodes):
    for i in range(3):
        await create(system, f'big{i}', cpus=16, memory=64)
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED):
        await create(system, 'big3', cpus=1, memory=64)


async def test_placed_on_is_honoured_and_checked(system, three_nodes):
    assert (await create(system, 'pinned', placed_on='node2', memory=512)).node == 'node2'
    async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED):
        await create(system, 'too-big', placed_on='node2', memory=1024)


async def test_affinity_attracts_and_repels_by_tags(system, three_nodes):
    web = await create(system, 'web1', memory=256, placed_on='node2',
                       metadata=metadata(tags=['web']))
    near = await create(system, 'cache', memory=256, metadata=metadata(affinity={'web': 10}))
    assert near.node == web.node == 'node2'
    apart = await create(system, 'web2', memory=256, metadata=metadata(
        tags=['web'], affinity={'web': -10}))
    assert apart.node not in ('node2',)


async def test_disks_without_a_size_count_as_the_size_the_node_makes_them(system, node_api):
    from shakenfist.v1 import specs_pb2
    from sfcommon.disks import UNSIZED_DISK_GIB
    node = await NodeDouble(node_api, 'small', cpus=16, memory_mib=4096, disk_gib=2 * UNSIZED_DISK_GIB).start()
    try:
        unsized = [specs_pb2.DiskSpec(base='sftest')]
        await create(system, 'a', disk=unsized)
        await create(system, 'b', disk=[specs_pb2.DiskSpec()])          # blank, no size
        async with raises(grpc.StatusCode.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
            await create(system, 'c', disk=unsized)
    finally:
        await node.stop()
