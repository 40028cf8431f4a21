"""Namespace isolation: another namespace's objects are NOT_FOUND on every RPC,
and never leak through a list, a watch or an event listing."""

import asyncio

import grpc
import pytest
from google.protobuf import struct_pb2

from shakenfist.v1 import agent_operation_service_pb2 as aop, event_pb2, event_service_pb2
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api, network_service_pb2 as net
from shakenfist.v1 import specs_pb2
from tests import schema_index
from tests.helpers import create_created, network, raises

VALUE = struct_pb2.Value(string_value='x')


def requests(o):
    """Every namespace-scoped RPC, aimed at system's objects in o."""
    ref = dict(instance_ref=o['instance'])
    return {
        'InstanceService.GetInstance': api.GetInstanceRequest(**ref),
        'InstanceService.DeleteInstance': api.DeleteInstanceRequest(**ref),
        'InstanceService.ListInstanceInterfaces': api.ListInstanceInterfacesRequest(**ref),
        'InstanceService.AddInstanceInterface': api.AddInstanceInterfaceRequest(
            network=specs_pb2.NetworkSpec(network_uuid=o['network']), **ref),
        'InstanceService.RemoveInstanceInterface': api.RemoveInstanceInterfaceRequest(
            interface_uuid=o['interface'], **ref),
        'InstanceService.GetInstanceMetadata': api.GetInstanceMetadataRequest(**ref),
        'InstanceService.SetInstanceMetadata': api.SetInstanceMetadataRequest(key='k', value=VALUE, **ref),
        'InstanceService.DeleteInstanceMetadata': api.DeleteInstanceMetadataRequest(key='k', **ref),
        'InstanceService.ListInstanceEvents': api.ListInstanceEventsRequest(**ref),
        'InstanceService.SoftRebootInstance': api.SoftRebootInstanceRequest(**ref),
        'InstanceService.HardRebootInstance': api.HardRebootInstanceRequest(**ref),
        'InstanceService.PowerOffInstance': api.PowerOffInstanceRequest(**ref),
        'InstanceService.PowerOnInstance': api.PowerOnInstanceRequest(**ref),
        'InstanceService.PauseInstance': api.PauseInstanceRequest(**ref),
        'InstanceService.UnpauseInstance': api.UnpauseInstanceRequest(**ref),
        'InstanceService.GetConsoleData': api.GetConsoleDataRequest(**ref),
        'InstanceService.ReadConsole': api.ReadConsoleRequest(**ref),
        'InstanceService.FollowConsole': api.FollowConsoleRequest(**ref),
        # Two-way streams: a list of one message is their request stream.
        'InstanceService.AttachConsole': [api.AttachConsoleRequest(**ref)],
        'InstanceService.ConnectVdi': [api.ConnectVdiRequest(**ref)],
        'InstanceService.DeleteConsoleData': api.DeleteConsoleDataRequest(**ref),
        'InstanceService.GetVdiConsoleHelper': api.GetVdiConsoleHelperRequest(**ref),
        'InstanceService.GetScreenshot': api.GetScreenshotRequest(**ref),
        'InstanceService.SnapshotInstance': api.SnapshotInstanceRequest(**ref),
        'InstanceService.ListInstanceSnapshots': api.ListInstanceSnapshotsRequest(**ref),
        'InstanceService.CreateInstance': api.CreateInstanceRequest(
            name='x', cpus=1, memory=64, disk=[specs_pb2.DiskSpec(size=1)],
            network=[specs_pb2.NetworkSpec(network_uuid=o['network'])]),
        'AgentOperationService.ExecuteCommand': aop.ExecuteCommandRequest(command_line='id', **ref),
        'AgentOperationService.PutFile': aop.PutFileRequest(blob_uuid='b', path='/x', **ref),
        'AgentOperationService.GetFile': aop.GetFileRequest(path='/x', **ref),
        'AgentOperationService.StreamCommand': aop.StreamCommandRequest(command_line='id', **ref),
        'AgentOperationService.ListInstanceAgentOperations': aop.ListInstanceAgentOperationsRequest(**ref),
        'AgentOperationService.GetAgentOperation': aop.GetAgentOperationRequest(
            agent_operation_uuid=o['agentop']),
        'AgentOperationService.DeleteAgentOperation': aop.DeleteAgentOperationRequest(
            agent_operation_uuid=o['agentop']),
        'NetworkService.GetNetwork': net.GetNetworkRequest(network_ref=o['network']),
        'NetworkService.DeleteNetwork': net.DeleteNetworkRequest(network_ref=o['network']),
        'NetworkService.ListNetworkInterfaces': net.ListNetworkInterfacesRequest(network_ref=o['network']),
        'NetworkService.GetNetworkMetadata': net.GetNetworkMetadataRequest(network_ref=o['network']),
        'NetworkService.SetNetworkMetadata': net.SetNetworkMetadataRequest(
            network_ref=o['network'], key='k', value=VALUE),
        'NetworkService.DeleteNetworkMetadata': net.DeleteNetworkMetadataRequest(
            network_ref=o['network'], key='k'),
        'InterfaceService.GetInterface': net.GetInterfaceRequest(interface_uuid=o['interface']),
        'InterfaceService.GetInterfaceMetadata': net.GetInterfaceMetadataRequest(interface_uuid=o['interface']),
        'InterfaceService.SetInterfaceMetadata': net.SetInterfaceMetadataRequest(
            interface_uuid=o['interface'], key='k', value=VALUE),
        'InterfaceService.DeleteInterfaceMetadata': net.DeleteInterfaceMetadataRequest(
            interface_uuid=o['interface'], key='k'),
        'InterfaceService.FloatInterface': net.FloatInterfaceRequest(interface_uuid=o['interface']),
        'InterfaceService.DefloatInterface': net.DefloatInterfaceRequest(interface_uuid=o['interface']),
        'EventService.WatchEvents': event_service_pb2.WatchEventsRequest(
            object_type=event_pb2.OBJECT_TYPE_INSTANCE, object_ref=o['instance']),
    }


# Lists answer with the caller's own objects rather than NOT_FOUND; they are
# checked for leaks below. Blobs, uploads and artifacts have their own isolation
# tests (test_blobs.py), disk bases from snapshots too (test_snapshots.py).
LISTS = {'InstanceService.ListInstances', 'InstanceService.DeleteAllInstances',
         'NetworkService.ListNetworks', 'NetworkService.DeleteAllNetworks', 'NetworkService.CreateNetwork'}
NOT_YET = {'BlobService', 'UploadService', 'ArtifactService'}


def namespace_scoped_rpcs():
    from shakenfist.v1 import wire_pb2
    out = set()
    for f in schema_index.our_files():
        if f.package != 'shakenfist.v1':
            continue
        for svc in f.service:
            for m in svc.method:
                if m.options.Extensions[wire_pb2.access] in (0, wire_pb2.ACCESS_NAMESPACE):
                    out.add(f'{svc.name}.{m.name}')
    return out


def test_the_matrix_covers_every_namespace_scoped_rpc():
    covered = set(requests({'instance': '', 'network': '', 'interface': '', 'agentop': ''}))
    missing = {r for r in namespace_scoped_rpcs() - covered - LISTS - NOT_YET
               if r.split('.')[0] not in NOT_YET}
    assert not missing


@pytest.fixture
async def system_objects(system, node):
    await network(system)
    inst = await create_created(system, networks=['net1'])
    await node.report(inst.uuid, agent_state=instance_pb2.AGENT_STATE_READY)
    op = await system.agentops.ExecuteCommand(aop.ExecuteCommandRequest(instance_ref='inst1', command_line='id'))
    return {'instance': inst.uuid, 'network': inst.interfaces[0].network_uuid,
            'interface': inst.interfaces[0].uuid, 'agentop': op.agent_operation.uuid}


async def test_foreign_objects_are_not_found_on_every_rpc(system, tenant, system_objects):
    for name, request in requests(system_objects).items():
        service, method = name.split('.')
        stub = {'InstanceService': tenant.instances, 'AgentOperationService': tenant.agentops,
                'NetworkService': tenant.networks, 'InterfaceService': tenant.interfaces,
                'EventService': tenant.events}[service]
        call = getattr(stub, method)
        async with raises(grpc.StatusCode.NOT_FOUND) as r:
            result = call(request)
            if hasattr(result, '__aiter__'):
                async for _ in result:
                    pass
            else:
                await result
        assert 'permission' not in r.error.details().lower(), name
    # And nothing changed: the instance is still there, unmodified.
    inst = (await system.instances.GetInstance(api.GetInstanceRequest(instance_ref='inst1'))).instance
    assert inst.state == instance_pb2.INSTANCE_STATE_CREATED and 'k' not in inst.metadata


async def test_lists_and_names_do_not_leak(system, tenant, system_objects):
    assert not (await tenant.instances.ListInstances(api.ListInstancesRequest(all=True))).instances
    assert not (await tenant.networks.ListNetworks(net.ListNetworksRequest(all=True))).networks
    async with raises(grpc.StatusCode.NOT_FOUND):
        await tenant.instances.GetInstance(api.GetInstanceRequest(instance_ref='inst1'))
    async with raises(grpc.StatusCode.NOT_FOUND):
        await tenant.instances.GetInstance(api.GetInstanceRequest(instance_ref='inst1', namespace='system'))
    # Delete-all of the tenant's own namespace touches nothing of system's.
    r = await tenant.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(confirm=True))
    assert list(r.instance_uuids) == []
    async with raises(grpc.StatusCode.UNAUTHENTICATED, match='cannot delete other namespaces'):
        await tenant.instances.DeleteAllInstances(api.DeleteAllInstancesRequest(confirm=True, namespace='system'))


async def test_a_watch_sees_only_its_own_namespace(system, tenant, node):
    seen = []
    watch = tenant.events.WatchEvents(event_service_pb2.WatchEventsRequest())

    established = asyncio.Event()

    async def collect():
        async for item in watch:
            if item.HasField('event'):
                seen.append(item.event)
            else:
                established.set()
    task = asyncio.create_task(collect())
    try:
        await asyncio.wait_for(established.wait(), 10)
        await create_created(system, 'theirs')
        await tenant.networks.CreateNetwork(net.CreateNetworkRequest(name='mine', netblock='10.5.0.0/24'))
        from tests.waiting import eventually
        await eventually(lambda: seen, what='the tenant sees its own event')
        assert all(e.object_type == event_pb2.OBJECT_TYPE_NETWORK for e in seen)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
