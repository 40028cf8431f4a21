"""Protobuf messages <-> the Shaken Fist REST JSON wire.

Driven only by descriptors and the options in shakenfist/v1/wire.proto:
`wire_value` (enum value strings), `wire_name` (JSON keys) and `wire_list`
(messages written as a bare list) and `wire_omit_unset`. It differs from proto3
JSON on purpose: every field is rendered, unset optional/message fields are null
(absent under wire_omit_unset), enums use
their wire strings, and 64-bit integers are JSON numbers rather than strings.

Per-descriptor work (options, key maps, renderers) is done once and cached,
so rendering a response is a walk over precomputed closures.
"""

import base64
import binascii
import functools
import math
import operator
import re

from google.protobuf import descriptor_pb2, json_format

from shakenfist.v1 import wire_pb2

__all__ = ['WireError', 'from_wire', 'to_wire']

FD = descriptor_pb2.FieldDescriptorProto
_INT_RANGES = {
    FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1),
    FD.TYPE_SFIXED32: (-2**31, 2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1), FD.TYPE_INT64: (-2**63, 2**63 - 1),
    FD.TYPE_SINT64: (-2**63, 2**63 - 1), FD.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FD.TYPE_DOUBLE, FD.TYPE_FLOAT)
_WKT = ('google.protobuf.Struct', 'google.protobuf.Value', 'google.protobuf.ListValue')
_INT_STRING = re.compile(r'-?[0-9]{1,20}')  # bounded: int() refuses huge strings
_OMIT = object()  # an unset member of a real oneof: no key at all


class WireError(ValueError):
    """A request body that does not fit the schema; str() is user-facing."""

    def __init__(self, path, detail):
        self.path, self.detail = path, detail
        super().__init__(f'{path}: {detail}' if path else detail)


# ---------------------------------------------------------------- descriptors

@functools.cache
def _enum(desc):
    """(number -> wire string, accepted string -> number, wire strings)."""
    to_wire, from_wire, accepted = {}, {}, []
    for v in desc.values:
        from_wire[v.name] = v.number
        wire = v.GetOptions().Extensions[wire_pb2.wire_value]
        if wire:
            to_wire[v.number] = wire
            from_wire[wire] = v.number
            accepted.append(wire)
    return to_wire, from_wire, ', '.join(accepted)


@functools.cache
def _message(desc):
    """(fields as (field, key, real oneof or None), key -> field, wire_list, omit_unset)."""
    # proto3 `optional` makes a synthetic oneof that the Python descriptor does
    # not flag; only the DescriptorProto says which oneofs are real.
    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    synthetic = {f.name for f in proto.field if f.proto3_optional}
    fields, by_key = [], {}
    for f in desc.fields:
        key = f.GetOptions().Extensions[wire_pb2.wire_name] or f.name
        oneof = f.containing_oneof if f.name not in synthetic else None
        fields.append((f, key, oneof))
        by_key[key] = by_key[f.name] = f
    options = desc.GetOptions().Extensions
    return fields, by_key, options[wire_pb2.wire_list], options[wire_pb2.wire_omit_unset]


def _is_map(f):
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


# ------------------------------------------------------------------ rendering

def to_wire(message):
    """Renders a message as JSON-able Python values (dict, list, scalars)."""
    return _renderer(message.DESCRIPTOR)(message)


def _value_to_py(v):
    kind = v.WhichOneof('kind')
    if kind == 'struct_value':
        return {k: _value_to_py(x) for k, x in v.struct_value.fields.items()}
    if kind == 'list_value':
        return [_value_to_py(x) for x in v.list_value.values]
    if kind == 'number_value':
        # Struct keeps numbers as doubles; give back ints as the JSON had them.
        return _number(v.number_value, integral=True)
    if kind in (None, 'null_value'):
        return None
    return getattr(v, kind)


def _number(n, integral=False):
    if not math.isfinite(n):
        return None
    return int(n) if integral and n.is_integer() and abs(n) < 2**53 else n


@functools.cache
def _renderer(desc):
    if desc.full_name == 'google.protobuf.Struct':
        return lambda m: {k: _value_to_py(v) for k, v in m.fields.items()}
    if desc.full_name == 'google.protobuf.ListValue':
        return lambda m: [_value_to_py(v) for v in m.values]
    if desc.full_name == 'google.protobuf.Value':
        return _value_to_py
    fields, _, wire_list, omit_unset = _message(desc)
    if wire_list:
        return _field_renderer(fields[0][0], None)
    plan = [(key, _field_renderer(f, oneof, omit_unset)) for f, key, oneof in fields]

    def render(m):
        out = {}
        for key, fn in plan:
            value = fn(m)
            if value is not _OMIT:
                out[key] = value
        return out
    return render


def _scalar_renderer(f):
    """A function turning one stored value of f into JSON; None if as is."""
    if f.type == FD.TYPE_MESSAGE:
        return lambda v: _renderer(v.DESCRIPTOR)(v)  # lazy: types may recurse
    if f.type == FD.TYPE_ENUM:
        return _enum(f.enum_type)[0].get  # unknown numbers and zero: None
    if f.type in _FLOATS:
        return _number
    if f.type == FD.TYPE_BYTES:
        return lambda v: base64.b64encode(v).decode('ascii')
    return None  # str, bool and integers are JSON already


def _field_renderer(f, oneof, omit_unset=False):
    name = f.name
    if _is_map(f):
        key_f, value_f = f.message_type.fields
        key = {FD.TYPE_BOOL: lambda k: 'true' if k else 'false'}.get(key_f.type, str)
        value = _scalar_renderer(value_f) or (lambda v: v)
        return lambda m: {key(k): value(v) for k, v in getattr(m, name).items()}
    convert = _scalar_renderer(f)
    get = operator.attrgetter(name)
    if f.is_repeated:
        if convert is None:
            return lambda m: list(get(m))
        return lambda m: [convert(v) for v in get(m)]
    if convert is not None:
        get = lambda m: convert(getattr(m, name))  # noqa: E731
    if oneof is not None:
        return lambda m: get(m) if m.HasField(name) else _OMIT
    if f.has_presence:  # message fields and proto3 `optional` scalars
        unset = _OMIT if omit_unset else None
        return lambda m: get(m) if m.HasField(name) else unset
    return get


# -------------------------------------------------------------------- parsing

def from_wire(message_class_or_instance, data, *, ignore=()):
    """Parses a JSON body into a message (a new one, or merged into the one
    given). `ignore` lists top-level keys to skip, such as path parameters."""
    message = message_class_or_instance
    if isinstance(message, type):
        message = message()
    if data is None:  # no body at all
        return message
    _parse_into(message, data, '', frozenset(ignore))
    return message


def _describe(v):
    """A JSON value as an error message shows it."""
    if v is None or isinstance(v, (bool, list, dict)):
        return {None: 'null', True: 'true', False: 'false', list: 'a list',
                dict: 'an object'}.get(v if v is None or isinstance(v, bool) else type(v))
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + '...'


def _expect(v, kind, path):
    if not isinstance(v, kind):
        noun = 'an object' if kind is dict else 'a list'
        raise WireError(path, f'expected {noun}, got {_describe(v)}')


def _parse_into(message, data, path, ignore=frozenset()):
    desc = message.DESCRIPTOR
    if desc.full_name in _WKT:
        if desc.full_name != 'google.protobuf.Value':
            _expect(data, dict if desc.full_name.endswith('Struct') else list, path)
        try:
            json_format.ParseDict(data, message)
        except json_format.ParseError as e:
            raise WireError(path, str(e)) from None
        return
    fields, by_key, wire_list, _ = _message(desc)
    if wire_list:
        _expect(data, list, path)
        message.SetInParent()  # an empty list is still a list, not null
        _parse_field(message, fields[0][0], data, path)
        return
    _expect(data, dict, path)
    seen = {}
    for key, value in data.items():
        if key in ignore:
            continue
        f = by_key.get(key)
        if f is None:
            raise WireError(path, f'unknown field {key!r}')
        if f.name in seen:
            raise WireError(path, f'{key!r} and {seen[f.name]!r} are the same field')
        seen[f.name] = key
        _parse_field(message, f, value, f'{path}.{key}' if path else key)
    # Naming two members of a real oneof is ambiguous, not "last one wins".
    for f, key, oneof in fields:
        if oneof is not None and f.name in seen and message.WhichOneof(oneof.name) != f.name:
            names = ', '.join(x.name for x in oneof.fields)
            raise WireError(path, f'only one of {names} may be given')


def _parse_field(message, f, value, path):
    try:
        _set_field(message, f, value, path)
    except UnicodeEncodeError as e:
        # protobuf strings must be UTF-8. A lone surrogate ("\ud800" in JSON, or
        # bytes that were not UTF-8 in a path or query) fails wherever a string
        # is set, Struct keys and values included; the innermost field says where.
        raise WireError(path, f'{_describe(e.object)} is not valid Unicode '
                              '(a lone surrogate, or bytes that are not UTF-8)') from None


def _set_field(message, f, value, path):
    if value is None and not (f.type == FD.TYPE_MESSAGE
                              and f.message_type.full_name == 'google.protobuf.Value'):
        return  # null: leave unset
    name = f.name
    if _is_map(f):
        _expect(value, dict, path)
        key_f, value_f = f.message_type.fields
        target = getattr(message, name)
        for k, v in value.items():
            item_path = f'{path}[{k!r}]'
            k = k if key_f.type == FD.TYPE_STRING else _parse_scalar(key_f, k, item_path)
            if value_f.type == FD.TYPE_MESSAGE:
                _parse_into(target[k], v, item_path)
            else:
                target[k] = _parse_scalar(value_f, v, item_path)
    elif f.is_repeated:
        _expect(value, list, path)
        target = getattr(message, name)
        for i, v in enumerate(value):
            if f.type == FD.TYPE_MESSAGE:
                _parse_into(target.add(), v, f'{path}[{i}]')
            else:
                target.append(_parse_scalar(f, v, f'{path}[{i}]'))
    elif f.type == FD.TYPE_MESSAGE:
        sub = getattr(message, name)
        sub.SetInParent()  # {} is present, unlike null
        _parse_into(sub, value, path)
    else:
        setattr(message, name, _parse_scalar(f, value, path))


def _parse_scalar(f, v, path):
    t = f.type
    if t in _INT_RANGES:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        elif isinstance(v, str) and _INT_STRING.fullmatch(v):
            v = int(v)  # sf-client sends some integers as strings
        if not isinstance(v, int) or isinstance(v, bool):
            raise WireError(path, f'expected an integer, got {_describe(v)}')
        low, high = _INT_RANGES[t]
        if not low <= v <= high:
            raise WireError(path, f'{v} is out of range ({low} to {high})')
        return v
    if t in _FLOATS:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise WireError(path, f'expected a number, got {_describe(v)}')
        return float(v)
    if t == FD.TYPE_BOOL:
        if isinstance(v, str) and v.lower() in ('true', 'false'):
            return v.lower() == 'true'
        if not isinstance(v, bool):
            raise WireError(path, f'expected true or false, got {_describe(v)}')
        return v
    if t == FD.TYPE_ENUM:
        _, accepted, listing = _enum(f.enum_type)
        if isinstance(v, str) and v in accepted:
            return accepted[v]
        if (isinstance(v, int) and not isinstance(v, bool)
                and f.enum_type.values_by_number.get(v) is not None):
            return v
        raise WireError(path, f'{_describe(v)} is not one of {listing}')
    if t == FD.TYPE_BYTES:
        if isinstance(v, str):
            try:
                return base64.b64decode(v, validate=True)
            except binascii.Error:
                pass
        raise WireError(path, f'expected base64 data, got {_describe(v)}')
    if not isinstance(v, str):
        raise WireError(path, f'expected a string, got {_describe(v)}')
    return v
