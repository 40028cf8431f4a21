"""Reflection comes from the generated descriptor set: the real grpcurl describes
services, methods, messages, fields and nested types with their .proto comments,
and grpc.reflection.v1 answers as v1alpha does (grpcurl 1.8.6 speaks only v1alpha,
so v1 is checked with a plain gRPC stream)."""

import asyncio
import pathlib
import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

GRPCURL = str(pathlib.Path(sys.executable).parent / 'grpcurl')


async def grpcurl(controller, *args):
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, '-plaintext', f'127.0.0.1:{controller.port}', *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def describe(controller, symbol):
    rc, out, err = await grpcurl(controller, 'describe', symbol)
    assert rc == 0, err
    return out


async def test_grpcurl_describes_a_method_with_its_comment(controller):
    out = await describe(controller, 'shakenfist.v1.InstanceService.CreateInstance')
    assert 'shakenfist.v1.InstanceService.CreateInstance is a method' in out
    assert '// Creates an instance. It is validated, recorded and placed on a node in one' in out
    assert 'rpc CreateInstance ( .shakenfist.v1.CreateInstanceRequest )' in out
    # The service shows the comments of its methods too.
    out = await describe(controller, 'shakenfist.v1.InstanceService')
    assert '// Creates an instance.' in out and 'post:"/instances"' in out


async def test_grpcurl_describes_messages_fields_and_nested_types_with_comments(controller):
    out = await describe(controller, 'shakenfist.v1.CreateInstanceRequest')
    assert '// Request of CreateInstance.' in out
    assert '// Idempotency key (AIP-155): a repeated create with the same request_id' in out
    assert 'string request_id = 17' in out
    out = await describe(controller, 'shakenfist.v1.CreateInstanceRequest.request_id')
    assert 'is a field' in out and '// Idempotency key (AIP-155)' in out
    out = await describe(controller, 'shakenfist.v1.PowerState')
    assert "// The power state of an instance's domain, as libvirt reports it." in out
    out = await describe(controller, 'shakenfist.agent.v2.FileChunk.Encoding')
    assert 'is an enum' in out and '// How the payload is encoded.' in out


async def test_grpcurl_describes_v1alpha_services_with_comments(controller):
    out = await describe(controller, 'shakenfist.node.v1alpha1.NodeControlService')
    assert "// The controller's side of the controller-to-node API, called by sfnode." in out
    out = await describe(controller, 'shakenfist.node.v1alpha1.NodeControlService.RegisterNode')
    assert '// Registers (or re-registers after a restart) a node with its capacity' in out
    out = await describe(controller, 'shakenfist.peer.v1alpha1.BlobPeerService')
    assert 'is a service' in out and '//' in out


async def test_grpcurl_lists_the_services_and_both_reflection_versions(controller):
    rc, out, err = await grpcurl(controller, 'list')
    assert rc == 0, err
    services = out.split()
    for name in ('shakenfist.v1.InstanceService', 'shakenfist.v1.NetworkService',
                 'shakenfist.node.v1alpha1.NodeControlService', 'shakenfist.peer.v1alpha1.BlobPeerService',
                 'grpc.health.v1.Health', 'grpc.reflection.v1alpha.ServerReflection',
                 'grpc.reflection.v1.ServerReflection'):
        assert name in services
    out = await describe(controller, 'grpc.reflection.v1.ServerReflection')
    assert 'rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )' in out


async def test_grpcurl_unknown_symbol_is_not_found(controller):
    rc, _, err = await grpcurl(controller, 'describe', 'shakenfist.v1.InstanceService.NoSuchMethod')
    assert rc != 0 and 'Symbol not found: shakenfist.v1.InstanceService.NoSuchMethod' in err
    rc, _, err = await grpcurl(controller, 'describe', 'shakenfist.v1.NoSuchMessage')
    assert rc != 0 and 'Symbol not found: shakenfist.v1.NoSuchMessage' in err
    # A method of that service is found (the old reflection did not find methods).
    await describe(controller, 'shakenfist.v1.InstanceService.GetInstance')


def _comments(fd: descriptor_pb2.FileDescriptorProto) -> str:
    return '\n'.join(loc.leading_comments for loc in fd.source_code_info.location)


async def test_v1_reflection_answers_files_with_comments_and_dependencies(controller):
    R = reflection_pb2
    requests = [
        R.ServerReflectionRequest(list_services=''),
        R.ServerReflectionRequest(file_containing_symbol='shakenfist.v1.InstanceService.CreateInstance'),
        R.ServerReflectionRequest(file_by_filename='shakenfist/v1/wire.proto'),
        R.ServerReflectionRequest(file_containing_extension=R.ExtensionRequest(
            containing_type='google.protobuf.FieldOptions', extension_number=50101)),
        R.ServerReflectionRequest(all_extension_numbers_of_type='google.protobuf.FieldOptions'),
        R.ServerReflectionRequest(file_containing_symbol='shakenfist.v1.NoSuchThing'),
        R.ServerReflectionRequest(file_containing_symbol='shakenfist.v1.PowerState'),
    ]
    async with grpc.aio.insecure_channel(f'127.0.0.1:{controller.port}') as channel:
        call = channel.stream_stream('/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
                                     request_serializer=R.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=R.ServerReflectionResponse.FromString)
        answers = [a async for a in call(iter(requests))]     # no token: reflection is public
    listed, method, wire, extension, numbers, unknown, enum = answers

    assert 'grpc.reflection.v1.ServerReflection' in [s.name for s in listed.list_services_response.service]

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in method.file_descriptor_response.file_descriptor_proto]
    assert files[0].name == 'shakenfist/v1/instance_service.proto'
    assert 'Creates an instance. It is validated' in _comments(files[0])
    names = [f.name for f in files]
    assert len(names) == len(set(names))
    # Every transitive dependency comes along.
    for f in files:
        assert set(f.dependency) <= set(names)
    assert {'shakenfist/v1/wire.proto', 'google/api/annotations.proto',
            'google/protobuf/descriptor.proto'} <= set(names)

    wire_files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in wire.file_descriptor_response.file_descriptor_proto]
    assert [f.name for f in wire_files] == ['shakenfist/v1/wire.proto', 'google/protobuf/descriptor.proto']
    assert 'The JSON key for this field' in _comments(wire_files[0])

    ext = descriptor_pb2.FileDescriptorProto.FromString(
        extension.file_descriptor_response.file_descriptor_proto[0])
    assert ext.name == 'shakenfist/v1/wire.proto'
    assert numbers.all_extension_numbers_response.base_type_name == 'google.protobuf.FieldOptions'
    assert {50100, 50101} <= set(numbers.all_extension_numbers_response.extension_number)

    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert unknown.original_request.file_containing_symbol == 'shakenfist.v1.NoSuchThing'
    # The stream goes on after an error.
    enum_file = descriptor_pb2.FileDescriptorProto.FromString(
        enum.file_descriptor_response.file_descriptor_proto[0])
    assert enum_file.name == 'shakenfist/v1/instance.proto'
