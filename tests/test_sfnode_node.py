"""The real node agent (sfnode.node.Node) in this process, on libvirt's test driver
(test:///default: domains without QEMU), against a real controller: how it handles
failing steps, many deletes at once, and being forgotten by the controller."""

import asyncio
import json
import os
import subprocess
import uuid

import pytest_asyncio

from sfcommon import states
from sfnode.libvirt.hypervisor import Hypervisor
from sfnode.node import Node, NodeConfig
from sfup.nodes import TEST_IMAGE
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import instance_pb2 as pb, instance_service_pb2 as api
from shakenfist.v1 import network_service_pb2 as net, specs_pb2
from sfcontrol.store import keys
from tests.helpers import create_request, get, network, wait_state
from tests.waiting import eventually


def host_address() -> str:
    """An address of this host that is not loopback (the node must keep it)."""
    out = subprocess.run(['ip', '-j', '-4', 'addr'], capture_output=True, text=True).stdout
    for link in json.loads(out or '[]'):
        for a in link.get('addr_info', []):
            if a.get('scope') == 'global':
                return a['local']
    return '127.0.0.2'


def bridges(prefix: str) -> list[str]:
    return [name for name in os.listdir('/sys/class/net') if name.startswith(prefix)]


async def start_node(controller, pki, tmp_path, name='tn1', listen='127.0.0.1:0'):
    state = tmp_path / name
    hv = await Hypervisor.connect(str(state), 'test:///default')
    config = NodeConfig(
        name=name, controller=f'127.0.0.1:{controller.node_port}', pki=pki.node(name),
        state_dir=state, libvirt_uri='test:///default', listen=listen, console_listen='127.0.0.1',
        bridge_prefix=f'sft{uuid.uuid4().hex[:4]}-', extra_images={'sftest': TEST_IMAGE.as_uri()},
        capacity=node_pb2.NodeCapacity(cpus=64, memory_mib=65536, disk_gib=1000),
        usage_interval=0, domain_type='qemu')
    node = await Node(config, hv).start()
    await asyncio.wait_for(node.synced.wait(), 30)
    return node, hv


@pytest_asyncio.fixture
async def real_node(controller, pki, tmp_path):
    node, hv = await start_node(controller, pki, tmp_path)
    yield node
    await node.stop(stop_guests=True)
    hv.close()
    assert bridges(node.bridges.prefix) == []


async def events_of(client, ref):
    return (await client.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref=ref, page_size=200))).events


async def test_a_step_that_fails_after_creation_is_retried_not_an_error(system, real_node):
    """The test driver cannot hot-plug: the instance stays created, the node says so
    in events and keeps trying, with backoff."""
    first = await network(system, 'n1', '10.7.0.0/24')
    second = await network(system, 'n2', '10.8.0.0/24')
    inst = (await system.instances.CreateInstance(create_request(
        'plug', networks=[first.uuid], placed_on='tn1'))).instance
    await wait_state(system, inst.uuid, pb.INSTANCE_STATE_CREATED, timeout=30)
    await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
        instance_ref=inst.uuid, network=specs_pb2.NetworkSpec(network_uuid=second.uuid)))

    async def retried_twice():
        failed = [e for e in await events_of(system, inst.uuid) if e.message == 'step failed, retrying']
        return failed if len(failed) >= 2 else None
    failed = await eventually(retried_twice, 30, interval=0.2, what='two retries of the hot-plug')
    assert all('error' in e.extra for e in failed)
    shown = await get(system, inst.uuid)
    assert shown.state == pb.INSTANCE_STATE_CREATED and not shown.error_message
    assert real_node.workers[inst.uuid].state == states.CREATED


async def test_many_deletes_at_once_all_finish_and_free_their_networks(system, real_node):
    nets = [await network(system, f'd{i}', f'10.{20 + i}.0.0/24') for i in range(2)]
    uuids = []
    for i in range(10):
        r = await system.instances.CreateInstance(create_request(
            f'del{i}', networks=[nets[i % 2].uuid], placed_on='tn1'))
        uuids.append(r.instance.uuid)
    for u in uuids:
        await wait_state(system, u, pb.INSTANCE_STATE_CREATED, timeout=30)
    assert len(bridges(real_node.bridges.prefix)) == 2
    # Half one by one at once, the rest with delete-all, at the same time.
    await asyncio.gather(
        *(system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=u)) for u in uuids[:5]),
        system.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(confirm=True, namespace='system')),
        return_exceptions=True)
    for u in uuids:
        await wait_state(system, u, pb.INSTANCE_STATE_DELETED, timeout=30)
    for n in nets:
        await system.networks.DeleteNetwork(net.DeleteNetworkRequest(network_ref=n.uuid))
    await eventually(lambda: bridges(real_node.bridges.prefix) == [], 10, what='no bridge left')


async def test_a_node_the_controller_forgot_registers_again_as_itself(controller, pki, tmp_path):
    address = host_address()
    node, hv = await start_node(controller, pki, tmp_path, name='tn2', listen=f'{address}:0')
    try:
        before = controller.core.cache.get(keys.node('tn2')).value
        assert before.address == f'{address}:{node.port}'
        await controller.core.store.delete(keys.node('tn2'))        # the controller forgets it
        await controller.core.cache.wait_for(await controller.core.store.put('x', b''))

        async def registered_again():
            entry = controller.core.cache.get(keys.node('tn2'))
            return entry.value if entry is not None else None
        after = await eventually(registered_again, 30, interval=0.1, what='the node registered again')
        assert after.address == before.address
        assert after.features == before.features and after.capacity == before.capacity
    finally:
        await node.stop(stop_guests=True)
        hv.close()


async def test_a_started_node_kills_orphaned_qemu_of_its_guests(tmp_path):
    """A QEMU that libvirt does not know as running (left by a node killed while starting
    it) holds its disk's lock: a starting node kills it; others' processes it leaves."""
    import signal
    import subprocess
    import types

    from sfnode.node import Node
    instances = tmp_path / 'instances'
    (instances / 'u1').mkdir(parents=True)
    qemu = tmp_path / 'qemu-system-x86_64'
    qemu.symlink_to('/bin/sh')      # a shell named like QEMU, blocked reading its stdin

    def fake(disk, uuid):
        return subprocess.Popen([str(qemu), '-c', 'read x', 'qemu', disk, '-uuid', uuid],
                                stdin=subprocess.PIPE)
    orphan = fake(f'{instances}/u1/disk0.qcow2', 'u1')
    known = fake(f'{instances}/u2/disk0.qcow2', 'u2')
    stranger = fake('/elsewhere/disk0.qcow2', 'u3')

    async def list_domains():
        return [types.SimpleNamespace(uuid='u2', active=True)]
    node = types.SimpleNamespace(instances_dir=instances, hypervisor=types.SimpleNamespace(list_domains=list_domains))
    try:
        await Node._kill_orphan_guests(node)
        assert orphan.wait(10) == -signal.SIGKILL
        assert known.poll() is None and stranger.poll() is None
    finally:
        for p in (orphan, known, stranger):
            p.kill()
            p.wait()


async def test_a_domain_defined_before_its_node_restarted_is_started_then_said_created(system, controller,
                                                                                      pki, tmp_path):
    """A node killed after it defined a domain and before it said created (libvirt kills a
    guest it finds half started) adopts the domain when it starts again: it starts it, then
    says created with the ports and disks a build reports. It used to say created first,
    with none of them (the instance showed no console port), and start the guest after."""
    node, hv = await start_node(controller, pki, tmp_path)
    inst = (await system.instances.CreateInstance(create_request('adopted', placed_on='tn1'))).instance
    await wait_state(system, inst.uuid, pb.INSTANCE_STATE_CREATED, timeout=30)
    await node.stop()
    # As the killed node left it: the domain defined and shut off, the instance creating.
    # (The first connection stays open: the test driver's domains live while one is.)
    first_hv = hv
    await first_hv.destroy(inst.uuid)
    entry = controller.core.cache.get(keys.instance('system', inst.uuid))
    left = pb.Instance()
    left.CopyFrom(entry.value)
    left.state = pb.INSTANCE_STATE_CREATING
    for field in ('console_port', 'vdi_port', 'power_state', 'disks'):
        left.ClearField(field)
    await controller.core.cache.wait_for(await controller.core.store.put(entry.key, left.SerializeToString()))

    node, hv = await start_node(controller, pki, tmp_path)
    try:
        await wait_state(system, inst.uuid, pb.INSTANCE_STATE_CREATED, timeout=30)
        assert (await hv.domain_info(inst.uuid)).active
        defined = [e for e in await events_of(system, inst.uuid) if e.message == 'libvirt domain XML']
        assert len(defined) == 1        # adopted, not built and defined again
        shown = await get(system, inst.uuid)
        assert shown.console_port and shown.vdi_port and [d.device for d in shown.disks][:1] == ['vda']
        assert shown.power_state == pb.POWER_STATE_ON
    finally:
        await node.stop(stop_guests=True)
        hv.close()
        first_hv.close()
