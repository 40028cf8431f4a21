"""Server reflection answered from the generated descriptor set, with comments.

grpcio-reflection's servicer answers from the Python descriptor pool, which
holds no source info: `grpcurl describe` showed no comments, and methods
("pkg.Service.Method") were "Symbol not found". This serves the
FileDescriptorProtos of shakenfist/descriptors.binpb (written by tools/gen.py
with --include_imports --include_source_info) as they are, comments kept, under
both grpc.reflection.v1alpha.ServerReflection and grpc.reflection.v1 (the same
messages on the wire; grpcio-reflection ships only v1alpha's). Services whose
files are not in the set (health, reflection) come from the Python pool.
"""

import pathlib
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import shakenfist

DESCRIPTORS = pathlib.Path(shakenfist.__file__).parent / 'descriptors.binpb'
V1ALPHA = 'grpc.reflection.v1alpha.ServerReflection'
V1 = 'grpc.reflection.v1.ServerReflection'
SERVICE_NAMES = (V1ALPHA, V1)


def _join(scope: str, name: str) -> str:
    return f'{scope}.{name}' if scope else name


class Files:
    """FileDescriptorProtos by file name, and which file defines each symbol."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]):
        self.protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._bytes: dict[str, bytes] = {}
        self.symbols: dict[str, str] = {}
        self.messages: set[str] = set()
        self.extensions: dict[str, dict[int, str]] = {}      # extendee -> number -> file
        for f in files:
            self.add(f)

    def add(self, f: descriptor_pb2.FileDescriptorProto):
        if f.name in self.protos:
            return
        self.protos[f.name] = f
        self._bytes[f.name] = f.SerializeToString()
        for m in f.message_type:
            self._message(f.name, f.package, m)
        for e in f.enum_type:
            self._enum(f.name, f.package, e)
        for x in f.extension:
            self._extension(f.name, f.package, x)
        for s in f.service:
            name = self._symbol(f.name, f.package, s.name)
            for m in s.method:
                self._symbol(f.name, name, m.name)

    def _symbol(self, file: str, scope: str, name: str) -> str:
        full = _join(scope, name)
        self.symbols.setdefault(full, file)
        return full

    def _message(self, file, scope, m: descriptor_pb2.DescriptorProto):
        name = self._symbol(file, scope, m.name)
        self.messages.add(name)
        for part in (*m.field, *m.oneof_decl):
            self._symbol(file, name, part.name)
        for nested in m.nested_type:
            self._message(file, name, nested)
        for e in m.enum_type:
            self._enum(file, name, e)
        for x in m.extension:
            self._extension(file, name, x)

    def _enum(self, file, scope, e: descriptor_pb2.EnumDescriptorProto):
        name = self._symbol(file, scope, e.name)
        for v in e.value:
            # A value is a sibling of its enum (C++ scoping), but take Enum.VALUE too.
            self._symbol(file, scope, v.name)
            self._symbol(file, name, v.name)

    def _extension(self, file, scope, x: descriptor_pb2.FieldDescriptorProto):
        self._symbol(file, scope, x.name)
        self.extensions.setdefault(x.extendee.lstrip('.'), {})[x.number] = file

    def with_dependencies(self, name: str) -> list[bytes]:
        """The serialized file, first, then each of its transitive dependencies once."""
        order: list[str] = []

        def visit(n):
            if n in order or n not in self.protos:
                return
            order.append(n)
            for dep in self.protos[n].dependency:
                visit(dep)
        visit(name)
        return [self._bytes[n] for n in order]


def _python_files(service_names: Iterable[str]) -> list[descriptor_pb2.FileDescriptorProto]:
    """The files (dependencies first) of services found only in the Python pool."""
    pool = descriptor_pool.Default()
    out: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(fd):
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        out.append(proto)
    for name in service_names:
        try:
            visit(pool.FindServiceByName(name).file)
        except KeyError:
            pass
    return out


def _v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file in the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    alpha, v1 = '.grpc.reflection.v1alpha.', '.grpc.reflection.v1.'
    for m in proto.message_type:
        for f in m.field:
            f.type_name = f.type_name.replace(alpha, v1)
    for s in proto.service:
        for m in s.method:
            m.input_type, m.output_type = m.input_type.replace(alpha, v1), m.output_type.replace(alpha, v1)
    proto.name = 'grpc/reflection/v1/reflection.proto'
    proto.package = 'grpc.reflection.v1'
    proto.ClearField('options')
    return proto


def load(service_names: Iterable[str], path: pathlib.Path = DESCRIPTORS) -> Files:
    service_names = list(service_names)
    files = Files(descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file)
    for f in _python_files(n for n in service_names if n not in files.symbols):
        files.add(f)
    files.add(_v1_reflection_file())
    return files


def _error(request, code: grpc.StatusCode, message: str):
    return reflection_pb2.ServerReflectionResponse(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=code.value[0], error_message=message))


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):
    def __init__(self, service_names: Iterable[str], files: Files):
        self._services = sorted(set(service_names))
        self._files = files

    def _file(self, request, name: str | None, what: str):
        if name is None:
            return _error(request, grpc.StatusCode.NOT_FOUND, f'{what} not found')
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=self._files.with_dependencies(name)))

    def answer(self, request: reflection_pb2.ServerReflectionRequest):
        files = self._files
        kind = request.WhichOneof('message_request')
        if kind == 'file_by_filename':
            name = request.file_by_filename
            return self._file(request, name if name in files.protos else None, f'file {name}')
        if kind == 'file_containing_symbol':
            symbol = request.file_containing_symbol.lstrip('.')
            return self._file(request, files.symbols.get(symbol), f'symbol {symbol}')
        if kind == 'file_containing_extension':
            x = request.file_containing_extension
            return self._file(request, files.extensions.get(x.containing_type, {}).get(x.extension_number),
                              f'extension {x.extension_number} of {x.containing_type}')
        if kind == 'all_extension_numbers_of_type':
            base = request.all_extension_numbers_of_type.lstrip('.')
            if base not in files.messages:
                return _error(request, grpc.StatusCode.NOT_FOUND, f'type {base} not found')
            return reflection_pb2.ServerReflectionResponse(
                original_request=request,
                all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                    base_type_name=base, extension_number=sorted(files.extensions.get(base, {}))))
        if kind == 'list_services':
            return reflection_pb2.ServerReflectionResponse(
                original_request=request,
                list_services_response=reflection_pb2.ListServiceResponse(
                    service=[reflection_pb2.ServiceResponse(name=n) for n in self._services]))
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, 'no request')

    async def ServerReflectionInfo(self, request_iterator, context):
        async for request in request_iterator:
            yield self.answer(request)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> ReflectionServicer:
    """Serves reflection for service_names (and itself, v1alpha and v1) on server."""
    names = [*service_names, *SERVICE_NAMES]
    servicer = ReflectionServicer(names, load(names))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {'ServerReflectionInfo': grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, handlers),))
    server.add_registered_method_handlers(V1, handlers)
    return servicer
