"""Tests of gateway.codec: protobuf <-> the Shaken Fist REST JSON wire."""

import copy
import json

import pytest

from gateway.codec import WireError, from_wire, to_wire
from shakenfist.node.v1alpha1 import node_pb2
from shakenfist.v1 import agent_operation_pb2 as ao
from shakenfist.v1 import blob_service_pb2
from shakenfist.v1 import instance_pb2 as inst
from shakenfist.v1 import instance_service_pb2 as svc
from shakenfist.v1 import specs_pb2

SF_CLIENT_CREATE = {
    'configdrive': 'openstack-disk', 'cpus': 1,
    'disk': [{'base': 'debian:12', 'bus': None, 'size': 8, 'type': 'disk'}],
    'memory': 1024, 'metadata': {'tags': ['a']}, 'name': 'inst1', 'namespace': None,
    'network': [{'macaddress': None, 'model': 'virtio', 'network_uuid': 'net1'}],
    'nvram_template': None, 'secure_boot': False, 'side_channels': None,
    'ssh_key': 'ssh-ed25519 AAAAC3Nz test\n', 'uefi': False, 'user_data': None,
    'video': {'memory': 16384, 'model': 'cirrus'},
}

FULL_INSTANCE = {
    'uuid': 'i-1', 'state': 'created', 'version': 12,
    'metadata': {'tags': ['a', 'b'], 'affinity': {'cpu': {'web': 5, 'db': -2.5}},
                 'nested': [[1, [2, None]], {'x': None}], 'flag': True, 'none': None},
    'name': 'inst1', 'namespace': 'ns1', 'cpus': 2, 'memory': 2048,
    'disk_spec': [{'size': 8, 'base': 'debian:12', 'bus': 'nvme', 'type': 'disk'},
                  {'size': None, 'base': None, 'bus': None, 'type': 'cdrom'}],
    'disks': [{'device': 'vda', 'bus': 'virtio', 'size': 8, 'blob_uuid': 'b-1',
               'snapshot_ignores': False},
              {'device': 'vdb', 'bus': 'virtio', 'size': None, 'blob_uuid': None,
               'snapshot_ignores': True}],
    'ssh_key': 'ssh-ed25519 AAAA', 'user_data': 'aGVsbG8=',
    'video': {'model': 'qxl', 'memory': 65536, 'vdi': 'spiceconcurrent'},
    'uefi': True, 'secure_boot': True, 'nvram_template': 'label:ovmf', 'vtpm': False,
    'configdrive': 'none', 'machine_type': 'q35',
    'side_channels': ['sf-agent', 'sf-agent2'],
    'agent_state': 'ready (degraded)', 'agent_start_time': 1700000000.25,
    'agent_system_boot_time': 1700000001.5, 'error_message': 'it broke',
    'last_cluster_operation': {'op_type': 'migrate', 'op_uuid': 'op-1'},
    'requested_placement': 'node1', 'node': 'node2', 'power_state': 'transition-to-on',
    'console_port': 0, 'vdi_port': 5901, 'vdi_tls_port': 5902,
    'interfaces': [{'uuid': 'if-1', 'state': 'created', 'version': 3,
                    'metadata': {'k': 'v'}, 'network_uuid': 'net1',
                    'instance_uuid': 'i-1', 'macaddr': '02:00:00:00:00:01',
                    'ipv4': '10.0.0.5', 'order': 0, 'model': 'e1000',
                    'floating': '192.0.2.7'}],
    'agent_operations_queue': ['ao-1', 'ao-2'],
    'references_to': {'blob': ['b-1']}, 'references_from': {},
    'node_unreachable': True,
}


def error_of(cls, data, **kwargs):
    with pytest.raises(WireError) as e:
        from_wire(cls, data, **kwargs)
    return str(e.value)


# ------------------------------------------------------------------ rendering

def test_instance_state_delete_wait_renders_wire_value():
    assert to_wire(inst.Instance(state=inst.INSTANCE_STATE_DELETE_WAIT))['state'] == 'delete-wait'


def test_unset_enum_renders_null():
    out = to_wire(inst.Instance())
    assert 'power_state' in out and out['power_state'] is None
    assert out['agent_state'] is None


def test_unknown_enum_number_renders_null():
    assert to_wire(inst.Instance(power_state=99))['power_state'] is None


def test_optional_int_unset_is_null_but_zero_is_zero():
    assert to_wire(inst.Instance())['console_port'] is None
    assert to_wire(inst.Instance(console_port=0))['console_port'] == 0


def test_plain_scalars_render_defaults():
    out = to_wire(inst.Instance())
    assert out['cpus'] == 0 and out['uuid'] == '' and out['uefi'] is False
    assert out['disks'] == [] and out['side_channels'] == []


def test_unset_message_and_struct_render_null():
    out = to_wire(inst.Instance())
    assert out['video'] is None and out['metadata'] is None
    assert out['last_cluster_operation'] is None


def test_agent_state_ready_degraded():
    msg = inst.Instance(agent_state=inst.AGENT_STATE_READY_DEGRADED)
    assert to_wire(msg)['agent_state'] == 'ready (degraded)'


def test_agent_command_result_uses_wire_names():
    out = to_wire(ao.AgentCommandResult(return_code=3, command_line='ls'))
    assert out['return-code'] == 3 and out['command-line'] == 'ls'
    assert 'return_code' not in out and 'command_line' not in out


def test_agent_operation_results_map_keyed_by_index():
    op = ao.AgentOperation(uuid='ao-1', state=ao.AGENT_OPERATION_STATE_COMPLETE)
    op.results['0'].return_code = 0
    op.results['0'].stdout = 'hi\n'
    out = to_wire(op)
    assert out['state'] == 'complete'
    assert list(out['results']) == ['0']
    assert out['results']['0']['return-code'] == 0
    assert out['results']['0']['stdout'] == 'hi\n'
    assert out['results']['0'] == {'return-code': 0, 'stdout': 'hi\n'}     # no null placeholders


def test_agent_records_have_only_the_keys_of_their_kind_as_the_seed_shows():
    op = ao.AgentOperation(uuid='ao-1', state=ao.AGENT_OPERATION_STATE_COMPLETE, commands=[
        ao.AgentCommand(command=ao.AGENT_COMMAND_TYPE_EXECUTE, commandline='cat /etc/os-release',
                        block_for_result=True),
        ao.AgentCommand(command=ao.AGENT_COMMAND_TYPE_CHMOD, path='/tmp/README.md', mode=33188)])
    op.results['0'].CopyFrom(ao.AgentCommandResult(command_line='cat /etc/os-release', result=True,
                                                   return_code=0, stdout='x', stderr=''))
    out = to_wire(op)
    assert out['commands'] == [
        {'block-for-result': True, 'command': 'execute', 'commandline': 'cat /etc/os-release'},
        {'command': 'chmod', 'mode': 33188, 'path': '/tmp/README.md'}]
    assert out['results']['0'] == {'command-line': 'cat /etc/os-release', 'result': True, 'return-code': 0,
                                   'stderr': '', 'stdout': 'x'}
    assert out['error_message'] is None          # the operation itself keeps Shaken Fist's nulls


def test_int64_renders_as_json_number():
    out = to_wire(blob_service_pb2.WriteUploadResponse(size=2**40 + 1))
    assert out == {'size': 2**40 + 1}
    assert json.dumps(out) == '{"size": 1099511627777}'


def test_wire_list_renders_bare_list_or_null():
    req = svc.CreateInstanceRequest()
    assert to_wire(req)['side_channels'] is None
    req.side_channels.SetInParent()
    assert to_wire(req)['side_channels'] == []
    req.side_channels.side_channels.append(inst.SIDE_CHANNEL_SF_AGENT2)
    assert to_wire(req)['side_channels'] == ['sf-agent2']


def test_oneof_renders_only_the_set_member_and_bytes_as_base64():
    out = to_wire(node_pb2.PutBlobRequest(data=b'\x00\xffhi'))
    assert out == {'data': 'AP9oaQ=='}
    assert to_wire(node_pb2.PutBlobRequest()) == {}


def test_metadata_integers_render_as_ints():
    msg = inst.Instance()
    msg.metadata.update({'n': 5, 'f': 2.5})
    out = to_wire(msg)['metadata']
    assert json.dumps(out, sort_keys=True) == '{"f": 2.5, "n": 5}'


# -------------------------------------------------------------------- parsing

def test_sf_client_create_body():
    req = from_wire(svc.CreateInstanceRequest, copy.deepcopy(SF_CLIENT_CREATE))
    assert req.name == 'inst1' and req.cpus == 1 and req.memory == 1024
    assert req.configdrive == inst.CONFIG_DRIVE_OPENSTACK_DISK
    assert len(req.disk) == 1
    disk = req.disk[0]
    assert disk.base == 'debian:12' and disk.size == 8
    assert disk.bus == specs_pb2.DISK_BUS_UNSPECIFIED and disk.type == specs_pb2.DISK_TYPE_DISK
    assert req.network[0].network_uuid == 'net1'
    assert req.network[0].model == specs_pb2.NIC_MODEL_VIRTIO
    assert not req.network[0].HasField('macaddress')
    assert not req.HasField('namespace') and not req.HasField('user_data')
    assert not req.HasField('nvram_template')
    assert req.ssh_key == 'ssh-ed25519 AAAAC3Nz test\n'
    assert req.video.model == specs_pb2.VIDEO_MODEL_CIRRUS and req.video.memory == 16384
    assert to_wire(req.metadata) == {'tags': ['a']}
    assert req.uefi is False and req.secure_boot is False


def test_side_channels_null_empty_and_given():
    body = dict(SF_CLIENT_CREATE)
    assert not from_wire(svc.CreateInstanceRequest, body).HasField('side_channels')
    body['side_channels'] = []
    req = from_wire(svc.CreateInstanceRequest, body)
    assert req.HasField('side_channels') and list(req.side_channels.side_channels) == []
    body['side_channels'] = ['sf-agent2']
    req = from_wire(svc.CreateInstanceRequest, body)
    assert list(req.side_channels.side_channels) == [inst.SIDE_CHANNEL_SF_AGENT2]


def test_side_channels_must_be_a_list():
    body = dict(SF_CLIENT_CREATE, side_channels='sf-agent')
    assert error_of(svc.CreateInstanceRequest, body) == \
        "side_channels: expected a list, got 'sf-agent'"


def test_video_memory_string_from_sf_client():
    req = from_wire(svc.CreateInstanceRequest,
                    {'video': {'model': 'qxl', 'memory': '65536'}})
    assert req.video.model == specs_pb2.VIDEO_MODEL_QXL and req.video.memory == 65536


def test_diskspec_strings_from_sf_client():
    req = from_wire(svc.CreateInstanceRequest, {
        'disk': [{'size': '20', 'base': 'label:x', 'bus': 'nvme', 'type': 'disk'}]})
    disk = req.disk[0]
    assert disk.size == 20 and disk.base == 'label:x'
    assert disk.bus == specs_pb2.DISK_BUS_NVME and disk.type == specs_pb2.DISK_TYPE_DISK


def test_ide_bus_parses_validation_is_the_controllers_job():
    req = from_wire(svc.CreateInstanceRequest, {'disk': [{'bus': 'ide'}]})
    assert req.disk[0].bus == specs_pb2.DISK_BUS_IDE


def test_enum_accepts_proto_name_and_number():
    req = from_wire(svc.CreateInstanceRequest,
                    {'disk': [{'bus': 'DISK_BUS_SCSI'}, {'bus': 3}]})
    assert [d.bus for d in req.disk] == [specs_pb2.DISK_BUS_SCSI, specs_pb2.DISK_BUS_USB]


def test_bad_enum_lists_accepted_values():
    assert error_of(svc.CreateInstanceRequest, {'disk': [{'bus': 'foo'}]}) == \
        "disk[0].bus: 'foo' is not one of sata, scsi, usb, virtio, nvme, ide"
    assert 'is not one of' in error_of(svc.CreateInstanceRequest, {'disk': [{'bus': 42}]})


def test_unknown_field_rejected_unless_ignored():
    assert error_of(svc.CreateInstanceRequest, {'name': 'x', 'colour': 'red'}) == \
        "unknown field 'colour'"
    assert error_of(svc.CreateInstanceRequest, {'disk': [{'sise': 1}]}) == \
        "disk[0]: unknown field 'sise'"
    req = from_wire(svc.CreateInstanceRequest, {'name': 'x', 'colour': 'red'},
                    ignore=('colour',))
    assert req.name == 'x'


def test_wrong_types_rejected():
    assert error_of(svc.CreateInstanceRequest, {'cpus': 'abc'}) == \
        "cpus: expected an integer, got 'abc'"
    assert error_of(svc.CreateInstanceRequest, {'name': ['a']}) == \
        'name: expected a string, got a list'
    assert error_of(svc.CreateInstanceRequest, {'name': 5}) == \
        'name: expected a string, got 5'
    assert error_of(svc.CreateInstanceRequest, {'cpus': 1.5}) == \
        'cpus: expected an integer, got 1.5'
    assert error_of(svc.CreateInstanceRequest, {'cpus': True}) == \
        'cpus: expected an integer, got true'
    assert error_of(svc.CreateInstanceRequest, {'disk': {'size': 1}}) == \
        'disk: expected a list, got an object'
    assert error_of(svc.CreateInstanceRequest, {'video': 'qxl'}) == \
        "video: expected an object, got 'qxl'"
    assert error_of(svc.CreateInstanceRequest, {'metadata': [1]}) == \
        'metadata: expected an object, got a list'
    assert error_of(svc.CreateInstanceRequest, {'uefi': 'yes'}) == \
        "uefi: expected true or false, got 'yes'"
    assert error_of(svc.CreateInstanceRequest, ['x']) == 'expected an object, got a list'


def test_int32_range_checked():
    assert 'out of range' in error_of(svc.CreateInstanceRequest, {'memory': 2**31})
    assert from_wire(svc.CreateInstanceRequest, {'memory': 2**31 - 1}).memory == 2**31 - 1


def test_lenient_scalars():
    req = from_wire(svc.CreateInstanceRequest, {'cpus': 2.0, 'memory': '-1', 'uefi': 'TRUE'})
    assert req.cpus == 2 and req.memory == -1 and req.uefi is True
    op = from_wire(ao.AgentOperation, {'deadline': '12.5', 'progress_timeout': 3})
    assert op.deadline == 12.5 and op.progress_timeout == 3.0


def test_wire_name_and_proto_name_both_accepted():
    assert from_wire(ao.AgentCommand, {'block-for-result': True}).block_for_result
    assert from_wire(ao.AgentCommand, {'block_for_result': True}).block_for_result
    assert 'same field' in error_of(ao.AgentCommand,
                                    {'block-for-result': True, 'block_for_result': True})


def test_metadata_struct_round_trips_arbitrary_json():
    metadata = {'tags': ['a', 'b'], 'n': 3, 'f': 0.5, 'none': None,
                'nested': {'l': [1, [2, [None, 'x']], {'y': False}]}}
    req = from_wire(svc.CreateInstanceRequest, {'metadata': copy.deepcopy(metadata)})
    assert to_wire(req)['metadata'] == metadata


def test_value_null_sets_null_value():
    req = from_wire(svc.SetInstanceMetadataRequest, {'key': 'k', 'value': None})
    assert req.HasField('value') and req.value.WhichOneof('kind') == 'null_value'
    req = from_wire(svc.SetInstanceMetadataRequest, {'key': 'k', 'value': {'a': [1]}})
    assert to_wire(req)['value'] == {'a': [1]}


def test_list_events_limit_string():
    req = from_wire(svc.ListInstanceEventsRequest, {'instance_ref': 'i', 'limit': '5'})
    assert req.limit == 5


def test_bytes_and_oneof_parse():
    assert from_wire(node_pb2.PutBlobRequest, {'data': 'AP9oaQ=='}).data == b'\x00\xffhi'
    assert 'base64' in error_of(node_pb2.PutBlobRequest, {'data': '!!'})
    assert 'only one of' in error_of(node_pb2.PutBlobRequest,
                                     {'data': 'AA==', 'header': {}})


def test_map_parse():
    op = from_wire(ao.AgentOperation, {'results': {'0': {'return-code': '1'}}})
    assert op.results['0'].return_code == 1
    assert error_of(ao.AgentOperation, {'results': {'0': {'return-code': 'x'}}}) == \
        "results['0'].return-code: expected an integer, got 'x'"


def test_full_instance_round_trip():
    msg = from_wire(inst.Instance, copy.deepcopy(FULL_INSTANCE))
    assert to_wire(msg) == FULL_INSTANCE
    # and every field of Instance is covered by the fixture
    assert set(FULL_INSTANCE) == {f.name for f in inst.Instance.DESCRIPTOR.fields}


def test_from_wire_merges_into_instance_given():
    msg = inst.Instance(uuid='keep')
    assert from_wire(msg, {'name': 'n'}) is msg
    assert msg.uuid == 'keep' and msg.name == 'n'
