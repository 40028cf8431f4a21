"""InstanceService against a real etcd, with a scripted node (tests/node_double.py)."""

import grpc
import pytest
from google.protobuf import struct_pb2

from shakenfist.v1 import event_pb2, instance_pb2 as pb, instance_service_pb2 as api, specs_pb2
from tests.helpers import create, create_created, create_request, disk, get, network, raises, wait_state

C = grpc.StatusCode
CREATED, DELETED = pb.INSTANCE_STATE_CREATED, pb.INSTANCE_STATE_DELETED


async def count_instances(client, all=True):
    return len((await client.instances.ListInstances(api.ListInstancesRequest(all=all))).instances)


# -- create ------------------------------------------------------------------------

async def test_create_returns_initial_instance_with_defaults_and_interfaces(system, node):
    n = await network(system)
    inst = await create(system, networks=['net1'])
    assert inst.state == pb.INSTANCE_STATE_INITIAL
    assert inst.namespace == 'system' and inst.node == node.name
    assert list(inst.side_channels) == [pb.SIDE_CHANNEL_SF_AGENT, pb.SIDE_CHANNEL_SF_AGENT2]
    assert inst.video.model == specs_pb2.VIDEO_MODEL_CIRRUS and inst.video.memory == 16384
    assert inst.video.vdi == specs_pb2.VDI_TYPE_SPICE
    assert inst.configdrive == pb.CONFIG_DRIVE_OPENSTACK_DISK
    (iface,) = inst.interfaces
    assert iface.network_uuid == n.uuid and iface.order == 0
    assert iface.macaddr.startswith('02:00:00:')
    await wait_state(system, inst.uuid, CREATED)


async def test_empty_side_channel_list_means_no_agent(system, node):
    inst = await create(system, side_channels=pb.SideChannelList())
    assert list(inst.side_channels) == []


@pytest.mark.parametrize('change,message', [
    (dict(name='bad.name'), 'hostname'),
    (dict(name='x' * 64), 'name: at most 63 characters (got 64)'),
    (dict(cpus=0), 'cpu'),
    (dict(memory=0), 'memory'),
    (dict(secure_boot=True), 'secure boot requires UEFI'),
    (dict(disk=[]), 'at least one disk'),
    (dict(disk=[disk(bus=specs_pb2.DISK_BUS_IDE)]), 'ide'),
    (dict(disk=[disk(size=-1)]), 'negative'),
    (dict(disk=[specs_pb2.DiskSpec(type=specs_pb2.DISK_TYPE_CDROM)]), 'cdrom needs a base'),
    (dict(video=specs_pb2.VideoSpec(model=specs_pb2.VIDEO_MODEL_VGA)), 'model and memory'),
    (dict(metadata=struct_pb2.Struct(fields={'tags': struct_pb2.Value(string_value='x')})), 'tags'),
    (dict(metadata=struct_pb2.Struct(fields={'affinity': struct_pb2.Value(string_value='x')})), 'affinity'),
    (dict(user_data='not base64!'), 'base64'),
    (dict(network=[specs_pb2.NetworkSpec()]), 'network_uuid'),
])
async def test_bad_create_is_invalid_argument_and_creates_nothing(system, node, change, message):
    kw = dict(name='inst1')
    kw.update(change)
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', message):
        await system.instances.CreateInstance(create_request(**kw))
    assert await count_instances(system) == 0


async def test_create_on_unknown_network_is_not_found(system, node):
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'network not found'):
        await create(system, networks=['nope'])
    assert await count_instances(system) == 0


async def test_requested_address_outside_network_is_invalid(system, node):
    await network(system)
    async with raises(C.INVALID_ARGUMENT, match='not in the range'):
        await system.instances.CreateInstance(create_request(network=[specs_pb2.NetworkSpec(
            network_uuid='net1', address='10.9.9.9')]))


async def test_requested_address_in_use_is_already_exists(system, node):
    await network(system)
    spec = specs_pb2.NetworkSpec(network_uuid='net1', address='10.0.0.5')
    await system.instances.CreateInstance(create_request('a', network=[spec]))
    async with raises(C.ALREADY_EXISTS, 'ALREADY_EXISTS', 'in use'):
        await system.instances.CreateInstance(create_request('b', network=[spec]))
    assert await count_instances(system) == 1


async def test_no_node_is_resource_exhausted(system):
    async with raises(C.RESOURCE_EXHAUSTED, 'INSUFFICIENT_RESOURCES'):
        await create(system)
    assert await count_instances(system) == 0


async def test_placed_on_unknown_node_is_not_found(system, node):
    async with raises(C.NOT_FOUND, match='node nope not found'):
        await create(system, placed_on='nope')


async def test_same_request_id_creates_one_instance(system, node):
    req = create_request(request_id='req-1')
    first = await system.instances.CreateInstance(req)
    second = await system.instances.CreateInstance(req)
    assert first.instance.uuid == second.instance.uuid
    assert await count_instances(system) == 1


async def test_request_id_reused_for_another_request_is_refused(system, node):
    await system.instances.CreateInstance(create_request('a', request_id='req-1'))
    async with raises(C.INVALID_ARGUMENT, match='already used'):
        await system.instances.CreateInstance(create_request('b', request_id='req-1'))
    assert await count_instances(system) == 1


# -- references, get and list ------------------------------------------------------

async def test_get_by_name_or_uuid(system, node):
    inst = await create(system)
    assert (await get(system, 'inst1')).uuid == inst.uuid
    assert (await get(system, inst.uuid)).name == 'inst1'


async def test_unknown_instance_is_not_found(system):
    async with raises(C.NOT_FOUND, 'NOT_FOUND', 'instance not found'):
        await get(system, 'nope')


async def test_ambiguous_name_is_invalid_argument(system, node):
    await create(system)
    await create(system)
    async with raises(C.INVALID_ARGUMENT, match='multiple instances have the name'):
        await get(system, 'inst1')


async def test_list_shows_active_or_all_and_paginates(system, node):
    uuids = [(await create_created(system, f'i{n}')).uuid for n in range(5)]
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=uuids[0]))
    await wait_state(system, uuids[0], DELETED)
    assert await count_instances(system, all=False) == 4
    assert await count_instances(system, all=True) == 5
    seen, token = [], ''
    while True:
        page = await system.instances.ListInstances(api.ListInstancesRequest(
            all=True, page_size=2, page_token=token))
        assert len(page.instances) <= 2
        seen += [i.uuid for i in page.instances]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(uuids)


# -- delete ---------------------------------------------------------------------------

async def test_delete_goes_through_delete_wait_and_stays_readable_by_uuid(system, node):
    node.auto_create = True
    inst = await create_created(system)
    node.auto_create = False      # hold the node: the instance must wait in delete-wait
    before = await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='inst1'))
    assert before.instance.state == CREATED
    assert (await get(system, inst.uuid)).state == pb.INSTANCE_STATE_DELETE_WAIT
    await node.report(inst.uuid, state=DELETED)
    gone = await get(system, inst.uuid)
    assert gone.state == DELETED
    assert gone.interfaces == [] or all(i.state == 3 for i in gone.interfaces)
    async with raises(C.NOT_FOUND):
        await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))


async def test_delete_frees_addresses_and_node_capacity(system, node):
    await network(system, netblock='10.1.0.0/29')     # 5 assignable addresses
    spec = specs_pb2.NetworkSpec(network_uuid='net1', address='10.1.0.3')
    inst = await create_created(system, network=[spec], memory=node.capacity.memory_mib)
    async with raises(C.RESOURCE_EXHAUSTED):
        await create(system, 'other')
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref=inst.uuid))
    await wait_state(system, inst.uuid, DELETED)
    again = await create(system, 'again', network=[spec], memory=node.capacity.memory_mib)
    assert again.interfaces[0].ipv4 == '10.1.0.3'


async def test_delete_all_needs_confirm_and_system_needs_a_namespace(system, node):
    await create_created(system)
    async with raises(C.INVALID_ARGUMENT, match='confirm'):
        await system.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(namespace='system'))
    async with raises(C.INVALID_ARGUMENT, match='must specify parameter namespace'):
        await system.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(confirm=True))
    r = await system.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(
        confirm=True, namespace='system'))
    assert len(r.instance_uuids) == 1
    await wait_state(system, r.instance_uuids[0], DELETED)


def allocated(controller, node):
    from sfcontrol.store import keys
    a = controller.core.cache.get(keys.node(node.name)).value.allocated
    return a.cpus, a.memory_mib, a.disk_gib


async def test_delete_all_of_more_instances_than_one_transaction_holds(system, node, controller):
    """etcd takes 128 operations per transaction: one delete-all transaction failed past
    about 40 instances ("the state store is unavailable; retry", which a retry never cured)."""
    await network(system, netblock='10.2.0.0/24')
    made = {(await create(system, f'many{i}', memory=64, networks=['net1'])).uuid for i in range(60)}
    for uuid in made:
        await wait_state(system, uuid, CREATED)
    request = api.DeleteAllInstancesRequest(confirm=True, namespace='system', request_id='delete-them-all')
    r = await system.instances.DeleteAllInstances(request)
    assert len(r.instance_uuids) == 60 and set(r.instance_uuids) == made
    assert (await system.instances.DeleteAllInstances(request)).instance_uuids == r.instance_uuids
    for uuid in made:
        await wait_state(system, uuid, DELETED)
    assert allocated(controller, node) == (0, 0, 0)


async def test_failed_instances_give_their_node_capacity_back_once(system, node, controller):
    """An instance in error was freed when its node reported it gone; deleting it freed it
    again (the node showed negative use, so more could be placed on it than it holds), and
    two of them on one node could not be deleted together (one transaction wrote the
    node's record twice)."""
    node.auto_create = False
    failed = []
    for i in range(3):
        inst = await create(system, f'failed{i}', memory=64)
        await node.report(inst.uuid, state=pb.INSTANCE_STATE_PREFLIGHT)
        await node.report(inst.uuid, state=pb.INSTANCE_STATE_PREFLIGHT_ERROR, error_message='no disk')
        await node.report(inst.uuid, state=DELETED)
        assert (await get(system, inst.uuid)).state == pb.INSTANCE_STATE_ERROR
        failed.append(inst.uuid)
    assert allocated(controller, node) == (0, 0, 0)
    r = await system.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(confirm=True, namespace='system'))
    assert sorted(r.instance_uuids) == sorted(failed)
    assert [(await get(system, u)).state for u in failed] == [DELETED] * 3
    assert allocated(controller, node) == (0, 0, 0)


# -- power -------------------------------------------------------------------------------

async def test_power_calls_before_created_are_not_ready(system, node):
    node.auto_create = False
    await create(system)
    for call in ('PowerOffInstance', 'PowerOnInstance', 'PauseInstance', 'UnpauseInstance',
                 'SoftRebootInstance', 'HardRebootInstance'):
        request = getattr(api, call + 'Request')(instance_ref='inst1')
        async with raises(C.UNAVAILABLE, 'NOT_READY', 'is not ready (initial)'):
            await getattr(system.instances, call)(request)


async def test_power_off_then_on_reaches_the_node(system, node):
    inst = await create_created(system)
    await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref='inst1'))
    off = await get(system, inst.uuid)
    assert off.agent_state == pb.AGENT_STATE_NOT_READY_INSTANCE_POWERED_OFF
    await _power(system, inst.uuid, pb.POWER_STATE_OFF)
    assert node.desired[inst.uuid].desired_power_state == pb.POWER_STATE_OFF
    await system.instances.PowerOnInstance(api.PowerOnInstanceRequest(instance_ref='inst1'))
    await _power(system, inst.uuid, pb.POWER_STATE_ON)


async def test_a_power_call_that_asks_for_the_power_already_asked_still_reaches_the_node(system, node):
    """Power off twice, or power on a guest that shut itself down: the desired power is
    what it was, yet the node must look again and report (the power state showed
    transition-to-off or -on for good, and a guest off by itself could not be powered on)."""
    inst = await create_created(system)
    await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref='inst1'))
    await _power(system, inst.uuid, pb.POWER_STATE_OFF)
    await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref='inst1'))
    await _power(system, inst.uuid, pb.POWER_STATE_OFF)
    await system.instances.PowerOnInstance(api.PowerOnInstanceRequest(instance_ref='inst1'))
    await _power(system, inst.uuid, pb.POWER_STATE_ON)
    # The guest powers itself off: its node says so, and the desired power is still on.
    await node.report(inst.uuid, power_state=pb.POWER_STATE_OFF)
    await _power(system, inst.uuid, pb.POWER_STATE_OFF)
    seen = node.upserts[inst.uuid]
    await system.instances.PowerOnInstance(api.PowerOnInstanceRequest(instance_ref='inst1'))
    await _power(system, inst.uuid, pb.POWER_STATE_ON)
    assert node.upserts[inst.uuid] == seen + 1
    assert node.desired[inst.uuid].desired_power_state == pb.POWER_STATE_ON


async def _power(client, uuid, state):
    from tests.waiting import eventually

    async def check():
        return (await get(client, uuid)).power_state == state
    await eventually(check, what=f'power state {pb.PowerState.Name(state)}')


async def test_reboot_or_pause_of_powered_off_instance_is_state_conflict(system, node):
    inst = await create_created(system)
    await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(instance_ref='inst1'))
    await _power(system, inst.uuid, pb.POWER_STATE_OFF)
    async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT', 'cannot reboot a powered off'):
        await system.instances.SoftRebootInstance(api.SoftRebootInstanceRequest(instance_ref='inst1'))
    async with raises(C.FAILED_PRECONDITION, 'STATE_CONFLICT', 'cannot pause a powered off'):
        await system.instances.PauseInstance(api.PauseInstanceRequest(instance_ref='inst1'))


async def test_a_reboot_repeated_with_its_request_id_reboots_once(system, node):
    await create_created(system)
    request = api.HardRebootInstanceRequest(instance_ref='inst1', request_id='reboot-1')
    await system.instances.HardRebootInstance(request)
    await system.instances.HardRebootInstance(request)
    assert len([r for name, r in node.calls if name == 'RebootInstance']) == 1


async def test_reboots_are_routed_to_the_node(system, node):
    inst = await create_created(system)
    await system.instances.SoftRebootInstance(api.SoftRebootInstanceRequest(instance_ref='inst1'))
    await system.instances.HardRebootInstance(api.HardRebootInstanceRequest(instance_ref='inst1'))
    reboots = [r for name, r in node.calls if name == 'RebootInstance']
    assert [(r.instance_uuid, r.hard) for r in reboots] == [(inst.uuid, False), (inst.uuid, True)]


async def test_pause_and_unpause_set_agent_state(system, node):
    inst = await create_created(system)
    await system.instances.PauseInstance(api.PauseInstanceRequest(instance_ref='inst1'))
    assert (await get(system, inst.uuid)).agent_state == pb.AGENT_STATE_NOT_READY_INSTANCE_PAUSED
    await _power(system, inst.uuid, pb.POWER_STATE_PAUSED)
    await system.instances.UnpauseInstance(api.UnpauseInstanceRequest(instance_ref='inst1'))
    assert (await get(system, inst.uuid)).agent_state == pb.AGENT_STATE_NOT_READY_NO_CONTACT
    await _power(system, inst.uuid, pb.POWER_STATE_ON)


# -- consoles ----------------------------------------------------------------------------

async def test_console_data_is_the_tail_from_the_node(system, node):
    await create_created(system)
    node.console = b'0123456789'
    r = await system.instances.GetConsoleData(api.GetConsoleDataRequest(instance_ref='inst1', length=4))
    assert r.console.data == b'6789'
    r = await system.instances.GetConsoleData(api.GetConsoleDataRequest(instance_ref='inst1', length=-1))
    assert r.console.data == b'0123456789'
    await system.instances.DeleteConsoleData(api.DeleteConsoleDataRequest(instance_ref='inst1'))
    assert node.console == b''
    async with raises(C.INVALID_ARGUMENT):
        await system.instances.GetConsoleData(api.GetConsoleDataRequest(instance_ref='inst1', length=-5))


async def test_vdi_helper_names_the_node_and_port(system, node):
    await create_created(system, video=specs_pb2.VideoSpec(
        model=specs_pb2.VIDEO_MODEL_VGA, memory=16384, vdi=specs_pb2.VDI_TYPE_VNC))
    r = await system.instances.GetVdiConsoleHelper(api.GetVdiConsoleHelperRequest(instance_ref='inst1'))
    text = r.helper.data.decode()
    assert '[virt-viewer]' in text and 'type=vnc' in text and 'port=31001' in text
    assert 'host=127.0.0.1' in text and r.helper.content_type == 'application/x-virt-viewer'


# -- metadata ----------------------------------------------------------------------------

async def test_metadata_crud_with_tags_and_affinity_validated(system, node):
    await create(system)

    async def md():
        r = await system.instances.GetInstanceMetadata(api.GetInstanceMetadataRequest(instance_ref='inst1'))
        return dict(r.metadata)
    value = struct_pb2.Value(string_value='bar')
    await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
        instance_ref='inst1', key='foo', value=value))
    assert (await md())['foo'] == 'bar'
    tags = struct_pb2.Value()
    tags.list_value.values.add().string_value = 'web'
    await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
        instance_ref='inst1', key='tags', value=tags))
    async with raises(C.INVALID_ARGUMENT, match='tags'):
        await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref='inst1', key='tags', value=value))
    async with raises(C.INVALID_ARGUMENT, match='affinity'):
        await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref='inst1', key='affinity', value=value))
    async with raises(C.INVALID_ARGUMENT, match='no value'):
        await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref='inst1', key='empty', value=struct_pb2.Value(string_value='')))
    await system.instances.DeleteInstanceMetadata(api.DeleteInstanceMetadataRequest(
        instance_ref='inst1', key='foo'))
    assert 'foo' not in await md() and list((await md())['tags']) == ['web']
    async with raises(C.NOT_FOUND):
        await system.instances.DeleteInstanceMetadata(api.DeleteInstanceMetadataRequest(
            instance_ref='inst1', key='foo'))


# -- events --------------------------------------------------------------------------------

async def test_events_are_newest_first_limited_and_filterable(system, node):
    await create_created(system)
    for _ in range(3):
        await system.instances.SoftRebootInstance(api.SoftRebootInstanceRequest(instance_ref='inst1'))
    r = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref='inst1'))
    stamps = [e.timestamp for e in r.events]
    assert stamps == sorted(stamps, reverse=True)
    assert r.events[0].message == 'soft reboot'
    assert {e.message for e in r.events} >= {'create request from API', 'instance placed'}
    audit = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref='inst1', event_type=event_pb2.EVENT_TYPE_AUDIT, limit=2))
    assert len(audit.events) == 2 and all(e.type == event_pb2.EVENT_TYPE_AUDIT for e in audit.events)
    rest = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(
        instance_ref='inst1', event_type=event_pb2.EVENT_TYPE_AUDIT, limit=2,
        page_token=audit.next_page_token))
    assert rest.events and rest.events[0].timestamp <= audit.events[-1].timestamp
    assert {e.message for e in [*audit.events, *rest.events]} >= {'soft reboot', 'create request from API'}


async def test_events_default_to_100(system, node):
    await create_created(system)
    for _ in range(105):
        await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref='inst1', key='k', value=struct_pb2.Value(number_value=1)))
    r = await system.instances.ListInstanceEvents(api.ListInstanceEventsRequest(instance_ref='inst1'))
    assert len(r.events) == 100 and r.next_page_token


# -- interfaces ------------------------------------------------------------------------------

async def test_hot_plug_adds_an_ordered_interface_and_tells_the_node(system, node):
    await network(system)
    await network(system, 'net2', '10.2.0.0/24')
    inst = await create_created(system, networks=['net1'])
    r = await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
        instance_ref='inst1', network=specs_pb2.NetworkSpec(network_uuid='net2', address='10.2.0.9')))
    assert r.network_interface.order == 1 and r.network_interface.ipv4 == '10.2.0.9'
    ifaces = (await system.instances.ListInstanceInterfaces(
        api.ListInstanceInterfacesRequest(instance_ref='inst1'))).interfaces
    assert [i.order for i in ifaces] == [0, 1]
    from tests.waiting import eventually
    await eventually(lambda: len(node.desired[inst.uuid].instance.interfaces) == 2)


async def test_hot_unplug_frees_the_address_and_tells_the_node(system, node):
    await network(system)
    inst = await create_created(system, network=[specs_pb2.NetworkSpec(network_uuid='net1', address='10.0.0.7'),
                                                 specs_pb2.NetworkSpec(network_uuid='net1')])
    first = inst.interfaces[0]
    await system.instances.RemoveInstanceInterface(api.RemoveInstanceInterfaceRequest(
        instance_ref='inst1', interface_uuid=first.uuid))
    left = (await system.instances.ListInstanceInterfaces(
        api.ListInstanceInterfacesRequest(instance_ref='inst1'))).interfaces
    assert [i.uuid for i in left] == [inst.interfaces[1].uuid]
    from tests.waiting import eventually
    await eventually(lambda: len(node.desired[inst.uuid].instance.interfaces) == 1)
    again = await create(system, 'other', network=[specs_pb2.NetworkSpec(network_uuid='net1', address='10.0.0.7')])
    assert again.interfaces[0].ipv4 == '10.0.0.7'
    async with raises(C.NOT_FOUND):
        await system.instances.RemoveInstanceInterface(api.RemoveInstanceInterfaceRequest(
            instance_ref='inst1', interface_uuid=first.uuid))


async def test_agent_instances_get_a_cluster_unique_vsock_cid_freed_on_delete(system, node, controller):
    with_agent = [await create_created(system, f'a{i}') for i in range(3)]
    without = await create_created(system, 'quiet', side_channels=pb.SideChannelList())
    cids = [node.desired[i.uuid].vsock_cid for i in with_agent]
    assert all(3 <= c < 2**32 - 1 for c in cids) and len(set(cids)) == 3
    assert node.desired[without.uuid].vsock_cid == 0
    guards = await controller.core.store.get_prefix('vsock-cids/')
    assert sorted(int(k.rsplit('/', 1)[1]) for k, _, _ in guards) == sorted(cids)
    await system.instances.DeleteInstance(api.DeleteInstanceRequest(instance_ref='a0'))
    await wait_state(system, with_agent[0].uuid, DELETED)
    guards = await controller.core.store.get_prefix('vsock-cids/')
    assert sorted(int(k.rsplit('/', 1)[1]) for k, _, _ in guards) == sorted(cids[1:])
