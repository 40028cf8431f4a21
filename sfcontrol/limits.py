"""The schema's limits, checked: every request of the public API, before its handler.

The limits are declared once, as (shakenfist.v1.limits) field options and the
(shakenfist.v1.max_bytes) message option (protos/shakenfist/v1/wire.proto). For
each request type a plan is made once from its descriptor: the fields that
have a limit or lead to one, with their labels. Checking a request then only
reads those fields (a GetInstanceRequest: two string lengths), so the hot
path pays almost nothing.

Too long, too many or out of range is INVALID_ARGUMENT (400); too many bytes
(a field's max_bytes, a message's max_bytes) is PAYLOAD_TOO_LARGE (413). The
message names the field by its path and says the limit:
"disk[2].base: at most 2048 characters (got 70000)".

The same limits on stored objects (Instance.metadata, Instance.interfaces...)
bound what repeated calls accumulate; handlers check those with check_stored()
and max_items().
"""

import functools

from google.protobuf import descriptor, descriptor_pool

from sfcommon import errors
from shakenfist.v1 import wire_pb2

FD = descriptor.FieldDescriptor
PACKAGE = 'shakenfist.v1'
# Messages bounded as a whole by max_bytes (their insides carry no options).
SIZED = ('google.protobuf.Value', 'google.protobuf.Struct', 'google.protobuf.ListValue',
         'google.api.HttpBody')
STRUCT = 'google.protobuf.Struct'
_KEY_SHOWN = 24     # characters of an over-long key quoted in the message



def limits_of(field) -> wire_pb2.Limits | None:
    """The field's (limits) option, or None."""
    options = field.GetOptions()
    return options.Extensions[wire_pb2.limits] if options.HasExtension(wire_pb2.limits) else None


def wire_label(field) -> str:
    """The field's name as the caller wrote it: its REST key (wire_name) when it has one."""
    return field.GetOptions().Extensions[wire_pb2.wire_name] or field.name


def is_map(field) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def max_items(field) -> int:
    """A field's max_items (for handlers that add to a stored list: interfaces)."""
    lim = limits_of(field)
    return lim.max_items if lim is not None else 0


# ----------------------------------------------------------------- messages

def _range(lim) -> str:
    lo = lim.minimum if lim.HasField('minimum') else None
    hi = lim.maximum if lim.HasField('maximum') else None
    if lo is not None and hi is not None:
        return f'must be from {lo} to {hi}'
    if lo == 0:
        return 'must not be negative'
    return f'at least {lo}' if lo is not None else f'at most {hi}'


def _scalar(field, lim):
    """A check of one value of a scalar field, (value, path) -> None; None if unlimited."""
    if lim is None:
        return None
    if field.type in (FD.TYPE_STRING, FD.TYPE_BYTES) and lim.max_length:
        most, unit = lim.max_length, 'characters' if field.type == FD.TYPE_STRING else 'bytes'

        def length(value, path):
            if len(value) > most:
                raise errors.InvalidArgument(f'{path}: at most {most} {unit} (got {len(value)})')
        return length
    if lim.HasField('minimum') or lim.HasField('maximum'):
        lo = lim.minimum if lim.HasField('minimum') else float('-inf')
        hi = lim.maximum if lim.HasField('maximum') else float('inf')
        text = _range(lim)

        def bounded(value, path):
            if not lo <= value <= hi:       # NaN is outside every range
                raise errors.InvalidArgument(f'{path}: {text} (got {value})')
        return bounded
    return None


def _struct(lim):
    """A check of a google.protobuf.Struct: keys, key lengths, bytes."""
    keys, key_length, size = lim.max_items, lim.max_key_length, lim.max_bytes

    def check(value, path):
        fields = value.fields
        if keys and len(fields) > keys:
            raise errors.InvalidArgument(f'{path}: at most {keys} keys (got {len(fields)})')
        if key_length:
            for key in fields:
                if len(key) > key_length:
                    shown = key if len(key) <= _KEY_SHOWN else key[:_KEY_SHOWN] + '...'
                    raise errors.InvalidArgument(f'{path}: keys are at most {key_length} characters '
                                         f'(got {len(key)}: {shown!r})')
        if size and (n := value.ByteSize()) > size:
            raise errors.PayloadTooLarge(f'{path}: at most {size} bytes (got {n})')
    return check


def _sized(lim):
    size = lim.max_bytes

    def check(value, path):
        if (n := value.ByteSize()) > size:
            raise errors.PayloadTooLarge(f'{path}: at most {size} bytes (got {n})')
    return check


def _message_value(field, lim):
    """A check of one value of a message field; None if nothing in it is limited."""
    name = field.message_type.full_name
    if name == STRUCT and lim is not None:
        return _struct(lim)
    if name in SIZED:
        return _sized(lim) if lim is not None and lim.max_bytes else None
    plan = _plan(field.message_type)
    if plan is None:
        return None
    return lambda value, path: plan.check(value, path + '.')


def _field(field):
    """A check of a field of a message, (message, prefix) -> None; None if unlimited."""
    lim = limits_of(field)
    attr, label = field.name, wire_label(field)
    if is_map(field):
        key_field, value_field = field.message_type.fields
        most = lim.max_items if lim is not None else 0
        key_check = _scalar(key_field, _key_limits(lim))
        value_check = (_message_value(value_field, None) if value_field.type == FD.TYPE_MESSAGE
                       else _scalar(value_field, lim))
        if not (most or key_check or value_check):
            return None

        def check_map(m, prefix):
            entries = getattr(m, attr)
            path = prefix + label
            if most and len(entries) > most:
                raise errors.InvalidArgument(f'{path}: at most {most} keys (got {len(entries)})')
            for key, value in entries.items():
                if key_check:
                    key_check(key, f'{path} key')
                if value_check:
                    value_check(value, f'{path}[{key!r}]')
        return check_map
    item = (_message_value(field, None if field.is_repeated else lim)
            if field.type == FD.TYPE_MESSAGE else _scalar(field, lim))
    if field.is_repeated:
        most = lim.max_items if lim is not None else 0
        if not (most or item):
            return None

        def check_list(m, prefix):
            items = getattr(m, attr)
            path = prefix + label
            if most and len(items) > most:
                raise errors.InvalidArgument(f'{path}: at most {most} items (got {len(items)})')
            if item:
                for i, value in enumerate(items):
                    item(value, f'{path}[{i}]')
        return check_list
    if item is None:
        return None
    if field.has_presence:
        def check_present(m, prefix):
            if m.HasField(attr):
                item(getattr(m, attr), prefix + label)
        return check_present
    return lambda m, prefix: item(getattr(m, attr), prefix + label)


def _key_limits(lim):
    if lim is None or not lim.max_key_length:
        return None
    return wire_pb2.Limits(max_length=lim.max_key_length)


class _Plan:
    """The checks of one message type: plain string lengths first (the common case,
    in one loop), then everything else, then the whole message's size."""

    __slots__ = ('strings', 'others', 'max_bytes', 'type_name')

    def __init__(self, strings, others, max_bytes, type_name):
        self.strings, self.others, self.max_bytes, self.type_name = strings, others, max_bytes, type_name

    def check(self, m, prefix=''):
        for attr, most, label in self.strings:
            if len(getattr(m, attr)) > most:
                raise errors.InvalidArgument(f'{prefix}{label}: at most {most} characters '
                                     f'(got {len(getattr(m, attr))})')
        for check in self.others:
            check(m, prefix)
        if self.max_bytes and (n := m.ByteSize()) > self.max_bytes:
            what = f'{prefix[:-1]}: a' if prefix else 'the request is too large: a'
            raise errors.PayloadTooLarge(f'{what} {self.type_name} is at most {self.max_bytes} bytes in '
                            f'protobuf encoding (got {n})')


_planning: set[str] = set()


@functools.cache
def _plan(desc) -> _Plan | None:
    """The plan of a message type of our package; None when it has nothing to check."""
    if not desc.full_name.startswith(PACKAGE + '.') or desc.full_name in _planning:
        return None     # requests do not recurse; a recursive type would be checked once
    _planning.add(desc.full_name)
    try:
        strings, others = [], []
        for field in desc.fields:
            lim = limits_of(field)
            if (field.type == FD.TYPE_STRING and not field.is_repeated and lim is not None
                    and lim.max_length):
                strings.append((field.name, lim.max_length, wire_label(field)))
            elif (check := _field(field)) is not None:
                others.append(check)
        max_bytes = desc.GetOptions().Extensions[wire_pb2.max_bytes]
        if not (strings or others or max_bytes):
            return None
        return _Plan(tuple(strings), tuple(others), max_bytes, desc.name)
    finally:
        _planning.discard(desc.full_name)


def check(message) -> None:
    """Raise the ApiError for the first limit message breaks, if any."""
    plan = _plan(message.DESCRIPTOR)
    if plan is not None:
        plan.check(message)


@functools.cache
def for_method(method: str):
    """The check for the requests of '/package.Service/Method': a callable, or None
    for the RPCs outside the public API and requests with nothing to check."""
    service, _, name = method.lstrip('/').rpartition('/')
    if not service.startswith(PACKAGE + '.'):
        return None
    try:
        desc = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return None
    plan = _plan(desc.input_type)
    return plan.check if plan is not None else None


# ----------------------------------------------------------- stored objects

@functools.cache
def _stored(field):
    return _field(field)


def check_stored(obj, field_name: str) -> None:
    """Check a stored object's field against its limits after a change, for example
    an instance's metadata after a key was set."""
    field = obj.DESCRIPTOR.fields_by_name[field_name]
    check = _stored(field)
    if check is not None:
        check(obj, '')
