"""The schema is the product: these tests read the compiled descriptors."""

import filecmp
import re
import subprocess
import sys

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
import pytest

from shakenfist.agent.v2 import agent_pb2
from shakenfist.v1 import agent_operation_pb2, event_pb2, instance_pb2, specs_pb2, wire_pb2
from shakenfist.v1 import errors_pb2
from tests import schema_index

# Every REST call the seed (instances-api.md) lists, plus agent/get.
SEED_CALLS = [
    ('GET', '/instances'),
    ('GET', '/instances/{instance_ref}'),
    ('POST', '/instances/'),
    ('POST', '/instances/{instance_ref}/interfaces'),
    ('DELETE', '/instances/{instance_ref}'),
    ('DELETE', '/instances/'),
    ('POST', '/instances/{instance_ref}/rebootsoft'),
    ('POST', '/instances/{instance_ref}/reboothard'),
    ('POST', '/instances/{instance_ref}/poweron'),
    ('POST', '/instances/{instance_ref}/poweroff'),
    ('POST', '/instances/{instance_ref}/pause'),
    ('POST', '/instances/{instance_ref}/unpause'),
    ('GET', '/instances/{instance_ref}/interfaces'),
    ('GET', '/instances/{instance_ref}/events'),
    ('GET', '/instances/{instance_ref}/consoledata'),
    ('DELETE', '/instances/{instance_ref}/consoledata'),
    ('GET', '/instances/{instance_ref}/vdiconsolehelper'),
    ('POST', '/instances/{instance_ref}/agent/execute'),
    ('POST', '/instances/{instance_ref}/agent/put'),
    ('GET', '/instances/{instance_ref}/agentoperations'),
    ('GET', '/instances/{instance_ref}/screenshot'),
    ('GET', '/blobs/{blob_uuid}/data'),
    ('GET', '/instances/{instance_ref}/metadata'),
    ('POST', '/instances/{instance_ref}/metadata'),
    ('DELETE', '/instances/{instance_ref}/metadata/{key}'),
    ('PUT', '/instances/{instance_ref}/metadata/{key}'),
    ('POST', '/instances/{instance_ref}/agent/get'),
]

# Other paths sf-client 0.8.3 uses in instance workflows (wire reference §A-§B).
SF_CLIENT_CALLS = [
    ('GET', '/'),
    ('POST', '/auth'),
    ('GET', '/auth/namespaces'),
    ('POST', '/auth/namespaces'),
    ('GET', '/auth/namespaces/{namespace}'),
    ('DELETE', '/auth/namespaces/{namespace}'),
    ('GET', '/auth/namespaces/{namespace}/keys'),
    ('POST', '/auth/namespaces/{namespace}/keys'),
    ('PUT', '/auth/namespaces/{namespace}/keys'),
    ('DELETE', '/auth/namespaces/{namespace}/keys/{key_name}'),
    ('GET', '/instances/{instance_ref}/snapshot'),
    ('POST', '/instances/{instance_ref}/snapshot'),
    ('GET', '/agentoperations/{uuid}'),
    ('DELETE', '/agentoperations/{uuid}'),
    ('POST', '/networks'),
    ('GET', '/networks'),
    ('GET', '/networks/{network_ref}'),
    ('DELETE', '/networks/{network_ref}'),
    ('DELETE', '/networks'),
    ('GET', '/networks/{network_ref}/interfaces'),
    ('GET', '/networks/{network_ref}/metadata'),
    ('GET', '/interfaces/{uuid}'),
    ('GET', '/interfaces/{uuid}/metadata'),
    ('POST', '/interfaces/{uuid}/float'),
    ('POST', '/interfaces/{uuid}/defloat'),
    ('GET', '/blobs/{blob_uuid}'),
    ('GET', '/blob_checksums/sha512/{hash}'),
    ('POST', '/upload'),
    ('POST', '/upload/{uuid}'),
    ('POST', '/upload/{uuid}/truncate/{offset}'),
    ('POST', '/artifacts/upload/{name}'),
]


def bindings(verb, path):
    return [rpc for v, p, rpc in schema_index.routes()
            if v == verb and schema_index.normalise(p) == schema_index.normalise(path)]


def test_the_seed_lists_27_rest_calls():
    assert len(SEED_CALLS) == 27
    assert len(set(SEED_CALLS)) == 27


@pytest.mark.parametrize('verb,path', SEED_CALLS, ids=[f'{v} {p}' for v, p in SEED_CALLS])
def test_every_seed_rest_call_is_bound_to_exactly_one_rpc(verb, path):
    assert len(bindings(verb, path)) == 1, bindings(verb, path)


@pytest.mark.parametrize('verb,path', SF_CLIENT_CALLS, ids=[f'{v} {p}' for v, p in SF_CLIENT_CALLS])
def test_every_sf_client_workflow_path_is_bound_to_exactly_one_rpc(verb, path):
    assert len(bindings(verb, path)) == 1, bindings(verb, path)


def test_no_two_bindings_share_a_route():
    seen = {}
    for verb, path, rpc in schema_index.routes():
        key = (verb, schema_index.normalise(path))
        assert key not in seen, f'{key} is bound by {seen[key]} and {rpc}'
        seen[key] = rpc


def message(full_name):
    for f in schema_index.file_set().file:
        for m in f.message_type:
            if f'{f.package}.{m.name}' == full_name:
                return m
    raise KeyError(full_name)


def test_http_rules_name_real_fields():
    """Path variables, body and response_body must be fields, or transcoding fails at run time."""
    for f in schema_index.our_files():
        for svc in f.service:
            for m in svc.method:
                if not m.options.HasExtension(annotations_pb2.http):
                    continue
                req = {fd.name for fd in message(m.input_type.lstrip('.')).field}
                resp = {fd.name for fd in message(m.output_type.lstrip('.')).field}
                for rule in schema_index.http_rules(m.options.Extensions[annotations_pb2.http]):
                    path = getattr(rule, rule.WhichOneof('pattern'))
                    for var in re.findall(r'\{([^}=]*)', path):
                        assert var in req, f'{m.name}: {path} names {var}'
                    assert rule.body in ('', '*') or rule.body in req, m.name
                    assert rule.response_body == '' or rule.response_body in resp, m.name


def test_get_and_delete_bindings_have_no_body_field():
    # sf-client sends JSON bodies on GET and DELETE: the gateway reads them as
    # it reads query parameters, so the rule itself declares no body.
    for f in schema_index.our_files():
        for svc in f.service:
            for m in svc.method:
                if m.options.HasExtension(annotations_pb2.http):
                    for rule in schema_index.http_rules(m.options.Extensions[annotations_pb2.http]):
                        if rule.WhichOneof('pattern') in ('get', 'delete'):
                            assert rule.body == '', m.name


def test_node_and_agent_packages_have_no_http_annotations():
    for f in schema_index.our_files():
        if f.package != 'shakenfist.v1':
            for svc in f.service:
                for m in svc.method:
                    assert not m.options.HasExtension(annotations_pb2.http), m.name


# Exempt from request_id, with the reason: they change nothing that a retry
# could duplicate.
NO_REQUEST_ID = {
    'CreateToken': 'issues a token; a second token is harmless',
    'WriteUpload': 'retried by truncating and resending, as sf-client does',
    'TruncateUpload': 'idempotent by definition',
    'StreamCommand': 'its answer is the stream itself, which cannot be replayed: a retry runs the '
                     'command again (ExecuteCommand is the recorded, idempotent way)',
}


def test_every_mutating_rpc_takes_a_request_id():
    for f in schema_index.our_files():
        if f.package != 'shakenfist.v1':
            continue
        for svc in f.service:
            for m in svc.method:
                rule = m.options.Extensions[annotations_pb2.http]
                if rule.WhichOneof('pattern') in ('post', 'put', 'delete') and m.name not in NO_REQUEST_ID:
                    fields = {fd.name: fd for fd in message(m.input_type.lstrip('.')).field}
                    assert 'request_id' in fields, m.name
                    assert fields['request_id'].type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING


def test_every_list_rpc_is_paginated():
    lists = 0
    for f in schema_index.our_files():
        if f.package != 'shakenfist.v1':
            continue
        for svc in f.service:
            for m in svc.method:
                if m.name.startswith('List'):
                    lists += 1
                    req = {fd.name for fd in message(m.input_type.lstrip('.')).field}
                    resp = {fd.name for fd in message(m.output_type.lstrip('.')).field}
                    assert {'page_size', 'page_token'} <= req, m.name
                    assert 'next_page_token' in resp, m.name
    assert lists >= 8


def test_events_can_be_watched_by_a_server_streaming_rpc():
    from shakenfist.v1 import event_service_pb2
    watch = event_service_pb2.DESCRIPTOR.services_by_name['EventService'].methods_by_name['WatchEvents']
    assert watch.server_streaming and not watch.client_streaming


def wire_values(enum_descriptor):
    out = {}
    for v in enum_descriptor.values:
        opts = v.GetOptions()
        if opts.HasExtension(wire_pb2.wire_value):
            out[v.name] = opts.Extensions[wire_pb2.wire_value]
    return out


EXPECTED_WIRE_VALUES = {
    instance_pb2.InstanceState: [
        'initial', 'preflight', 'creating', 'created', 'delete-wait', 'deleted', 'error',
        'initial-error', 'preflight-error', 'creating-error', 'created-error',
        'delete-wait-error'],
    instance_pb2.PowerState: [
        'initial', 'on', 'off', 'paused', 'crashed', 'transition-to-on', 'transition-to-off',
        'transition-to-paused'],
    instance_pb2.AgentState: [
        'not ready (no contact)', 'not ready (agent startup)', 'not ready (agent stopped)',
        'not ready (agent too old)', 'not ready (unresponsive)', 'not ready (instance paused)',
        'not ready (instance powered off)', 'not ready (initializing)', 'not ready (starting)',
        'not ready (maintenance)', 'not ready (stopping)', 'not ready (offline)',
        'not ready (unknown)', 'ready', 'ready (degraded)'],
    agent_operation_pb2.AgentOperationState: [
        'initial', 'preflight', 'queued', 'executing', 'complete', 'error', 'expired', 'deleted'],
    agent_operation_pb2.AgentCommandType: ['execute', 'put-blob', 'chmod', 'get-file'],
    event_pb2.EventType: ['audit', 'mutate', 'status', 'usage', 'resources', 'prune', 'historic'],
    specs_pb2.DiskBus: ['sata', 'scsi', 'usb', 'virtio', 'nvme', 'ide'],
    specs_pb2.DiskType: ['disk', 'cdrom'],
    specs_pb2.NicModel: [
        'i82551', 'i82557b', 'i82559er', 'ne2k_pci', 'pcnet', 'rtl8139', 'e1000', 'virtio'],
    specs_pb2.VideoModel: ['vga', 'cirrus', 'qxl'],
    specs_pb2.VdiType: ['vnc', 'spice', 'spiceconcurrent'],
    instance_pb2.SideChannel: ['sf-agent', 'sf-agent2'],
    instance_pb2.ConfigDrive: ['openstack-disk', 'none'],
}


@pytest.mark.parametrize('enum', EXPECTED_WIRE_VALUES, ids=lambda e: e.DESCRIPTOR.name)
def test_each_enum_holds_the_seeds_wire_strings(enum):
    values = wire_values(enum.DESCRIPTOR)
    assert sorted(values.values()) == sorted(EXPECTED_WIRE_VALUES[enum])
    # Only the zero value lacks a wire string (it is rendered as null).
    unmapped = [v.name for v in enum.DESCRIPTOR.values if v.name not in values]
    assert unmapped == [enum.DESCRIPTOR.values_by_number[0].name]


def test_every_error_reason_fixes_a_grpc_code_and_an_http_status():
    statuses = set()
    for v in errors_pb2.ErrorReason.DESCRIPTOR.values[1:]:
        opts = v.GetOptions()
        assert 1 <= opts.Extensions[wire_pb2.grpc_code] <= 16, v.name
        statuses.add(opts.Extensions[wire_pb2.http_status])
    assert {400, 401, 403, 404, 406, 409, 413, 507} <= statuses


def test_public_and_system_only_rpcs_are_declared_in_the_schema():
    access = {}
    for f in schema_index.our_files():
        for svc in f.service:
            for m in svc.method:
                access[m.name] = m.options.Extensions[wire_pb2.access]
    assert access['CreateToken'] == wire_pb2.ACCESS_PUBLIC
    assert access['GetCapabilities'] == wire_pb2.ACCESS_PUBLIC
    for name in ('CreateNamespace', 'DeleteNamespace', 'AddNamespaceKey', 'ListNamespaces'):
        assert access[name] == wire_pb2.ACCESS_SYSTEM, name
    public = sorted(n for n, a in access.items() if a == wire_pb2.ACCESS_PUBLIC)
    assert public == ['CreateToken', 'GetCapabilities']


def commented_elements(f):
    """Yield (description, source path) for everything a user sees in describe/OpenAPI."""
    def enums(prefix, path, items):
        for i, e in enumerate(items):
            yield f'{prefix}{e.name}', path + [i]
            for j, v in enumerate(e.value):
                yield f'{prefix}{e.name}.{v.name}', path + [i, 2, j]

    def messages(prefix, path, items):
        for i, m in enumerate(items):
            name = f'{prefix}{m.name}'
            if m.options.map_entry:
                continue
            yield name, path + [i]
            for j, fd in enumerate(m.field):
                yield f'{name}.{fd.name}', path + [i, 2, j]
            for j, o in enumerate(m.oneof_decl):
                if not o.name.startswith('_'):     # synthetic oneofs of proto3 optional
                    yield f'{name}.{o.name}', path + [i, 8, j]
            yield from messages(f'{name}.', path + [i, 3], m.nested_type)
            yield from enums(f'{name}.', path + [i, 4], m.enum_type)

    yield from messages('', [4], f.message_type)
    yield from enums('', [5], f.enum_type)
    for i, s in enumerate(f.service):
        yield s.name, [6, i]
        for j, m in enumerate(s.method):
            yield f'{s.name}.{m.name}', [6, i, 2, j]
    for i, x in enumerate(f.extension):
        yield f'extension {x.name}', [7, i]


def test_every_message_field_enum_and_rpc_has_a_comment():
    missing = []
    for f in schema_index.our_files():
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
        for name, path in commented_elements(f):
            if not comments.get(tuple(path)):
                missing.append(f'{f.name}: {name}')
    assert not missing, '\n'.join(missing)


def test_generation_is_reproducible(tmp_path):
    gen = schema_index.ROOT / 'tools' / 'gen.py'
    for out in ('a', 'b'):
        subprocess.run([sys.executable, str(gen), '--out', str(tmp_path / out)], check=True)
    a, b = tmp_path / 'a' / 'shakenfist', tmp_path / 'b' / 'shakenfist'
    files = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
    assert len(files) > 50
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in files], shallow=False)
    assert not mismatch and not errors
    # And the package in use is what the schema generates now (never stale).
    _, stale, missing = filecmp.cmpfiles(a, schema_index.ROOT / 'shakenfist', [str(p) for p in files],
                                         shallow=False)
    assert not stale and not missing


# shakenfist-agent 1.0.1's envelopes (wire reference §E.2): (message, field) -> (number, type)
AGENT_ENVELOPE_FIELDS = {
    'HypervisorToAgentCommand': {
        'command_id': 1, 'hypervisor_welcome': 10, 'hypervisor_departure': 11, 'command_error': 20,
        'unknown_command': 21, 'ping_request': 30, 'execute_request': 40,
        'is_system_running_request': 41, 'gather_facts_request': 42, 'put_file_request': 43,
        'file_chunk': 44, 'chmod_request': 45, 'chown_request': 46, 'get_file_request': 47,
        'file_chunk_reply': 48},
    'AgentToHypervisorCommand': {
        'command_id': 1, 'agent_welcome': 10, 'command_error': 20, 'unknown_command': 21,
        'ping_reply': 30, 'execute_reply': 40, 'is_system_running_reply': 41,
        'gather_facts_reply': 42, 'file_chunk_reply': 43, 'chmod_reply': 44, 'chown_reply': 45,
        'file_chunk': 46, 'stat_result': 47},
    'PutFileRequest': {'path': 1, 'mode': 2, 'length': 3, 'first_chunk': 4},
    'FileChunk': {'offset': 1, 'encoding': 2, 'payload': 3},
    'StatResult': {'path': 1, 'mode': 2, 'size': 3, 'uid': 4, 'gid': 5, 'atime': 6, 'mtime': 7,
                   'ctime': 8},
    'ExecuteRequest': {'command': 1, 'environment_variables': 2, 'network_namespace': 3,
                       'io_priority': 4, 'working_directory': 5, 'request_id': 6,
                       'execution_id': 7},
    'ExecuteReply': {'stdout': 1, 'stderr': 2, 'exit_code': 3, 'request_id': 4,
                     'execution_id': 5, 'execution_seconds': 6},
    'IsSystemRunningReply': {'result': 1, 'message': 2, 'boot_time': 3},
}


@pytest.mark.parametrize('name', AGENT_ENVELOPE_FIELDS)
def test_agent_messages_keep_shakenfist_agent_field_numbers(name):
    """1.0.1's fields as they are; this plane's extensions (streamed commands) from 50 on,
    where 1.0.1 has nothing, so that either side skips what it does not know."""
    fields = {f.name: f.number for f in agent_pb2.DESCRIPTOR.message_types_by_name[name].fields}
    ours = {k: v for k, v in fields.items() if v >= EXTENSIONS_FROM}
    assert {k: v for k, v in fields.items() if k not in ours} == AGENT_ENVELOPE_FIELDS[name]
    assert max(AGENT_ENVELOPE_FIELDS[name].values()) < EXTENSIONS_FROM


EXTENSIONS_FROM = 50


def test_agent_envelopes_are_byte_identical_to_shakenfist_agent():
    # Golden bytes from the wire reference (§E.2), as the real agent writes them.
    welcome = agent_pb2.HypervisorToAgent(commands=[agent_pb2.HypervisorToAgentCommand(
        command_id='abc', hypervisor_welcome=agent_pb2.HypervisorWelcome(version='0.8'))])
    assert welcome.SerializeToString().hex() == '0a0c0a0361626352050a03302e38'

    reply = agent_pb2.AgentToHypervisor()
    reply.ParseFromString(bytes.fromhex(
        '0a1f0a0361626352180a0d76657273696f6e20312e302e311100000040fc54d941'))
    (cmd,) = reply.commands
    assert cmd.command_id == 'abc'
    assert cmd.agent_welcome.version == 'version 1.0.1'
    assert cmd.agent_welcome.boot_time == 1700000000.0


def test_concatenated_agent_envelopes_parse_as_one():
    # The v2 protocol has no framing; it relies on this property of proto3.
    one = agent_pb2.AgentToHypervisor(commands=[agent_pb2.AgentToHypervisorCommand(
        command_id='a', ping_reply=agent_pb2.PingReply())])
    two = agent_pb2.AgentToHypervisor(commands=[agent_pb2.AgentToHypervisorCommand(
        command_id='b', ping_reply=agent_pb2.PingReply())])
    merged = agent_pb2.AgentToHypervisor()
    merged.ParseFromString(one.SerializeToString() + two.SerializeToString())
    assert [c.command_id for c in merged.commands] == ['a', 'b']
