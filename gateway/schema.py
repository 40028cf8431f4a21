"""The shakenfist.v1 schema as the gateway sees it, read once from the descriptors.

The descriptor set (shakenfist/descriptors.binpb, written by tools/gen.py) says
which services exist, their google.api.http bindings and the proto comments.
The message classes are the generated ones, so that gateway.codec finds the
wire options registered in the default descriptor pool.
"""

import dataclasses
import functools
import importlib
import pathlib

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import shakenfist
from shakenfist.v1 import wire_pb2

PACKAGE = 'shakenfist.v1'
DESCRIPTORS = pathlib.Path(shakenfist.__file__).parent / 'descriptors.binpb'
HTTP_BODY = 'google.api.HttpBody'


@functools.cache
def file_set(path: pathlib.Path = DESCRIPTORS) -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(pathlib.Path(path).read_bytes())
    return fds


def our_files(fds=None):
    """The FileDescriptorProtos of package shakenfist.v1."""
    return [f for f in (fds or file_set()).file if f.package == PACKAGE]


def service_names(fds=None) -> list[str]:
    return [f'{PACKAGE}.{s.name}' for f in our_files(fds) for s in f.service]


@dataclasses.dataclass(frozen=True)
class Binding:
    """One google.api.http rule of one method (additional_bindings included)."""
    service: str            # full name, 'shakenfist.v1.InstanceService'
    method: str             # 'GetInstance'
    http_method: str        # 'GET', 'POST', ... (a custom rule's kind, upper case)
    template: str           # '/instances/{instance_ref}'
    body: str               # '', '*' or a request field name
    response_body: str      # '' or a response field name
    client_streaming: bool
    server_streaming: bool
    input: object           # generated message Descriptors
    output: object
    public: bool            # access = ACCESS_PUBLIC: no token needed
    index: int              # 0 for the main rule, then the additional bindings

    @property
    def grpc_path(self) -> str:
        return f'/{self.service}/{self.method}'

    @property
    def operation_id(self) -> str:
        suffix = f'_{self.index + 1}' if self.index else ''
        return f'{self.service.rsplit(".", 1)[1]}_{self.method}{suffix}'

    @property
    def request_class(self):
        return message_factory.GetMessageClass(self.input)

    @property
    def response_class(self):
        return message_factory.GetMessageClass(self.output)


def _import_generated(fds):
    # Registers every shakenfist.v1 type (and its wire options) in the default pool.
    for f in our_files(fds):
        importlib.import_module(f.name[:-len('.proto')].replace('/', '.') + '_pb2')


def _rules(rule):
    yield rule
    yield from rule.additional_bindings


@functools.cache
def bindings() -> tuple[Binding, ...]:
    fds = file_set()
    _import_generated(fds)
    pool = descriptor_pool.Default()
    out = []
    for f in our_files(fds):
        for svc in f.service:
            for m in svc.method:
                if not m.options.HasExtension(annotations_pb2.http):
                    continue
                desc = pool.FindMethodByName(f'{PACKAGE}.{svc.name}.{m.name}')
                public = m.options.Extensions[wire_pb2.access] == wire_pb2.ACCESS_PUBLIC
                for i, rule in enumerate(_rules(m.options.Extensions[annotations_pb2.http])):
                    kind = rule.WhichOneof('pattern')
                    if kind == 'custom':
                        verb, template = rule.custom.kind.upper(), rule.custom.path
                    else:
                        verb, template = kind.upper(), getattr(rule, kind)
                    out.append(Binding(
                        f'{PACKAGE}.{svc.name}', m.name, verb, template, rule.body,
                        rule.response_body, m.client_streaming, m.server_streaming,
                        desc.input_type, desc.output_type, public, i))
    return tuple(out)


# Field numbers on the path of a SourceCodeInfo.Location.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


def _clean(text: str) -> str:
    lines = [line[1:] if line.startswith(' ') else line for line in text.strip('\n').split('\n')]
    return '\n'.join(lines).strip()


@functools.cache
def comments() -> dict[str, str]:
    """Leading comment of every message, field, enum, value, service and method
    of shakenfist.v1, keyed by full name ('shakenfist.v1.Instance.uuid')."""
    out = {}
    for f in our_files():
        docs = {tuple(loc.path): loc.leading_comments or loc.trailing_comments
                for loc in f.source_code_info.location}

        def put(name, path):
            text = docs.get(tuple(path))
            if text:
                out[name] = _clean(text)

        def enum(e, prefix, path):
            put(f'{prefix}.{e.name}', path)
            for i, v in enumerate(e.value):
                put(f'{prefix}.{e.name}.{v.name}', path + [_ENUM_VALUE, i])

        def message(m, prefix, path):
            name = f'{prefix}.{m.name}'
            put(name, path)
            for i, field in enumerate(m.field):
                put(f'{name}.{field.name}', path + [_MESSAGE_FIELD, i])
            for i, nested in enumerate(m.nested_type):
                message(nested, name, path + [_MESSAGE_NESTED, i])
            for i, e in enumerate(m.enum_type):
                enum(e, name, path + [_MESSAGE_ENUM, i])

        for i, m in enumerate(f.message_type):
            message(m, PACKAGE, [_FILE_MESSAGE, i])
        for i, e in enumerate(f.enum_type):
            enum(e, PACKAGE, [_FILE_ENUM, i])
        for i, s in enumerate(f.service):
            put(f'{PACKAGE}.{s.name}', [_FILE_SERVICE, i])
            for j, m in enumerate(s.method):
                put(f'{PACKAGE}.{s.name}.{m.name}', [_FILE_SERVICE, i, _SERVICE_METHOD, j])
    return out
