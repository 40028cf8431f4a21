"""The schema's limits (wire.proto: Limits, max_bytes).

- every string, bytes, repeated and map field reachable from a request of the
  public API has a limit that fits its kind, so nothing new can be added
  unbounded, and stored objects agree with the requests that fill them;
- the OpenAPI document shows every limit;
- over gRPC, every limit at its maximum passes the check and one over is
  refused (400, or 413 for bytes) with the limit in the message, before
  anything is stored;
- the findings of the hostile-tenant review (a 1 MB name, metadata value and
  metadata key, 40 NICs) over gRPC and REST: refused, etcd unchanged;
- per-object limits that repeated calls reach: 16 interfaces (hot-plugged ones
  too), 64 metadata keys and their bytes;
- an instance at every maximum at once: each of its transactions, measured,
  stays far below etcd's 1.5 MiB and 128 operations.
"""

import asyncio
import dataclasses
import importlib
import json

import aiohttp
import grpc
import pytest_asyncio
from aetcd import rpc
from google.api import httpbody_pb2
from google.protobuf import descriptor, descriptor_pool, message_factory, struct_pb2

from gateway import openapi
from sfcontrol import limits, server
from shakenfist.v1 import instance_pb2, instance_service_pb2 as api, network_pb2
from shakenfist.v1 import network_service_pb2 as net, specs_pb2, wire_pb2
from tests import schema_index
from tests.conftest import controller_config, system_key
from tests.helpers import create_created, disk, network, raises, wait_state
from tests.waiting import eventually

FD = descriptor.FieldDescriptor
C = grpc.StatusCode
SIZED = ('google.protobuf.Value', 'google.protobuf.Struct', 'google.protobuf.ListValue',
         'google.api.HttpBody')
MB = 1024 * 1024
ETCD_MAX_REQUEST = 1536 * 1024      # etcd's --max-request-bytes default
ETCD_MAX_OPS = 128                  # etcd's --max-txn-ops default


# --------------------------------------------------------------------- fixtures

@pytest_asyncio.fixture
async def controller(etcd, tmp_path):
    """As conftest's, but the scripted node, which does not heartbeat by itself, is
    never marked unreachable: that would change etcd while a test checks it did not."""
    ctl = await server.start(controller_config(etcd, tmp_path, heartbeat_timeout=3600))
    yield ctl
    await ctl.stop(None)


@pytest_asyncio.fixture
async def rest(gateway, controller, tmp_path):
    """(base URL, aiohttp session with the system token)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(gateway + '/auth', json={
                'namespace': 'system', 'key': system_key(tmp_path)}) as r:
            token = (await r.json())['access_token']
        session.headers['Authorization'] = f'Bearer {token}'
        yield gateway, session


async def stored(controller):
    """Every etcd key of the controller, with its value and revision."""
    return [tuple(kv) for kv in await controller.core.store.get_prefix('')]


async def unchanged(controller, before):
    after = await stored(controller)
    assert after == before, ([k for k, *_ in after if k not in {b[0] for b in before}],
                             [k for k, *_ in before if k not in {a[0] for a in after}])


async def call(session, base, verb, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    async with session.request(verb, base + path, data=data,
                               headers={'Content-Type': 'application/json'}) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if raw else None


# ----------------------------------------------------------------- the schema

def load_modules():
    for f in schema_index.our_files():
        if f.service or f.message_type:
            importlib.import_module(f.name[:-len('.proto')].replace('/', '.') + '_pb2')


def public_methods():
    """(gRPC path, method descriptor) of every RPC of the public API."""
    load_modules()
    pool = descriptor_pool.Default()
    return [(f'/{f.package}.{s.name}/{m.name}', pool.FindMethodByName(f'{f.package}.{s.name}.{m.name}'))
            for f in schema_index.our_files() if f.package == 'shakenfist.v1'
            for s in f.service for m in s.method]


def is_map(field):
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def ours(field):
    return (field.message_type is not None and not is_map(field)
            and field.message_type.full_name.startswith('shakenfist.v1.'))


def reachable(desc, trail=()):
    """(trail of fields, field) for every field reachable from desc."""
    for field in desc.fields:
        yield trail, field
        if ours(field) and field.message_type not in [f.message_type for f in trail]:
            yield from reachable(field.message_type, trail + (field,))


def unbounded(field, lim):
    """Why a field is unbounded, or None: what its kind needs and it lacks."""
    if is_map(field):
        key, value = field.message_type.fields
        missing = [] if lim.max_items else ['max_items']
        if key.type == FD.TYPE_STRING and not lim.max_key_length:
            missing.append('max_key_length')
        if value.type in (FD.TYPE_STRING, FD.TYPE_BYTES) and not lim.max_length:
            missing.append('max_length')
        return missing or None
    missing = []
    if field.is_repeated and not lim.max_items:
        missing.append('max_items')
    if field.type in (FD.TYPE_STRING, FD.TYPE_BYTES) and not lim.max_length:
        missing.append('max_length')
    if field.message_type is not None and field.message_type.full_name in SIZED and not lim.max_bytes:
        missing.append('max_bytes')
    return missing or None


def test_every_unbounded_field_reachable_from_a_request_has_a_limit():
    """Strings, bytes, repeated fields, maps and Value/Struct/HttpBody, at any depth
    of any request: a new one without a limit fails here."""
    missing, checked = [], 0
    for path, method in public_methods():
        for trail, field in reachable(method.input_type):
            needs = field.type in (FD.TYPE_STRING, FD.TYPE_BYTES) or field.is_repeated or (
                field.message_type is not None and field.message_type.full_name in SIZED)
            if not needs:
                continue
            checked += 1
            lim = limits.limits_of(field) or wire_pb2.Limits()
            if why := unbounded(field, lim):
                missing.append(f'{path} {".".join(f.name for f in trail + (field,))}: needs {why}')
    assert not missing, '\n'.join(sorted(set(missing)))
    assert checked > 150


def applicable(field):
    """The Limits fields that mean something for field's kind."""
    if is_map(field):
        return {'max_items', 'max_key_length', 'max_length'}
    out = {'max_items'} if field.is_repeated else set()
    if field.type in (FD.TYPE_STRING, FD.TYPE_BYTES):
        out.add('max_length')
    elif field.message_type is not None and field.message_type.full_name == 'google.protobuf.Struct':
        out |= {'max_items', 'max_key_length', 'max_bytes'}
    elif field.message_type is not None and field.message_type.full_name in SIZED:
        out.add('max_bytes')
    elif field.type not in (FD.TYPE_MESSAGE, FD.TYPE_ENUM, FD.TYPE_BOOL):
        out |= {'minimum', 'maximum'}
    return out


def test_every_limit_fits_its_field():
    """A limit the checker would ignore (max_length on a number, say) is a mistake."""
    load_modules()
    pool, wrong, count = descriptor_pool.Default(), [], 0
    for f in schema_index.our_files():
        for m in f.message_type:
            desc = pool.FindMessageTypeByName(f'{f.package}.{m.name}')
            for field in desc.fields:
                lim = limits.limits_of(field)
                if lim is None:
                    continue
                count += 1
                used = {d.name for d, _ in lim.ListFields()}
                if not used or used - applicable(field):
                    wrong.append(f'{field.full_name}: {sorted(used - applicable(field)) or "empty"}')
                if lim.HasField('minimum') and lim.HasField('maximum'):
                    assert lim.minimum <= lim.maximum, field.full_name
    assert not wrong, '\n'.join(wrong)
    assert count > 150


def lim(message, name):
    return limits.limits_of(message.DESCRIPTOR.fields_by_name[name])


def test_stored_objects_and_the_requests_that_fill_them_agree():
    assert lim(api.CreateInstanceRequest, 'metadata') == lim(instance_pb2.Instance, 'metadata')
    assert lim(api.CreateInstanceRequest, 'network').max_items == 16
    assert lim(instance_pb2.Instance, 'interfaces').max_items == 16
    assert lim(api.CreateInstanceRequest, 'disk').max_items == lim(instance_pb2.Instance, 'disk_spec').max_items
    for request, obj in [(api.SetInstanceMetadataRequest, instance_pb2.Instance),
                         (net.SetNetworkMetadataRequest, network_pb2.Network),
                         (net.SetInterfaceMetadataRequest, network_pb2.NetworkInterface)]:
        md = lim(obj, 'metadata')
        assert md.max_items == 64 and md.max_key_length == 256, obj
        assert lim(request, 'value').max_bytes == md.max_bytes, request
        assert lim(request, 'key').max_length == md.max_key_length, request
    for request in (api.DeleteInstanceMetadataRequest, net.DeleteNetworkMetadataRequest,
                    net.DeleteInterfaceMetadataRequest):
        assert lim(request, 'key').max_length == 256
    # The review's examples, and Shaken Fist's hostname rule for names.
    assert lim(api.CreateInstanceRequest, 'name').max_length == 63
    assert lim(instance_pb2.Instance, 'metadata').max_bytes == 64 * 1024
    assert api.CreateInstanceRequest.DESCRIPTOR.GetOptions().Extensions[wire_pb2.max_bytes] == 192 * 1024


# ----------------------------------------------------------------- OpenAPI

def expected_keywords(field, lim):
    """(where, keyword, value): where is '' for the field's schema, 'items' or
    'additionalProperties' for its values."""
    out = []
    value_where = ''
    if is_map(field):
        value_where = 'additionalProperties'
        if lim.max_items:
            out.append(('', 'maxProperties', lim.max_items))
        if lim.max_key_length:
            out.append(('', 'x-max-key-length', lim.max_key_length))
        field = field.message_type.fields[1]
    elif field.is_repeated:
        value_where = 'items'
        if lim.max_items:
            out.append(('', 'maxItems', lim.max_items))
    if field.type == FD.TYPE_STRING and lim.max_length:
        out.append((value_where, 'maxLength', lim.max_length))
    if lim.HasField('minimum'):
        out.append((value_where, 'minimum', lim.minimum))
    if lim.HasField('maximum'):
        out.append((value_where, 'maximum', lim.maximum))
    if lim.max_bytes:
        out.append((value_where, 'x-max-bytes', lim.max_bytes))
    if field.message_type is not None and field.message_type.full_name == 'google.protobuf.Struct':
        if lim.max_items:
            out.append(('', 'maxProperties', lim.max_items))
        if lim.max_key_length:
            out.append(('', 'x-max-key-length', lim.max_key_length))
    return out


def shows(schema, field, lim):
    problems = []
    for where, keyword, value in expected_keywords(field, lim):
        target = schema.get(where, {}) if where else schema
        if target.get(keyword) != value:
            problems.append(f'{field.full_name}: {where or "."} {keyword}={target.get(keyword)!r}, '
                            f'wanted {value!r}')
    return problems


def check_document(doc):
    """Every limited field of every message component and of every operation's
    parameters shows its limits (wire names as keys, as the codec writes them)."""
    load_modules()
    pool, problems, seen = descriptor_pool.Default(), [], 0
    for name, schema in doc['components']['schemas'].items():
        try:
            desc = pool.FindMessageTypeByName(f'shakenfist.v1.{name}')
        except KeyError:
            continue
        if desc.GetOptions().Extensions[wire_pb2.wire_list]:
            field = desc.fields[0]
            if (lim_ := limits.limits_of(field)) is not None:
                seen += 1
                problems += shows(schema, field, lim_)
            continue
        for field in desc.fields:
            if (lim_ := limits.limits_of(field)) is not None:
                seen += 1
                key = limits.wire_label(field)
                problems += shows(schema['properties'][key], field, lim_)
        if (most := desc.GetOptions().Extensions[wire_pb2.max_bytes]):
            if schema.get('x-max-bytes') != most:
                problems.append(f'{name}: x-max-bytes {schema.get("x-max-bytes")!r}')
    bindings = {(verb, openapi.openapi_path(path)): method for verb, path, method in schema_index.routes()}
    for path, item in doc['paths'].items():
        for verb, op in item.items():
            method = pool.FindMethodByName(bindings[(verb.upper(), path)])
            for p in op.get('parameters', []):
                desc, field = method.input_type, None
                for part in p['name'].split('.'):
                    field = desc.fields_by_name.get(part) or next(
                        f for f in desc.fields if limits.wire_label(f) == part)
                    desc = field.message_type
                if (lim_ := limits.limits_of(field)) is not None:
                    seen += 1
                    problems += shows(p['schema'], field, lim_)
    return problems, seen


def test_the_openapi_document_shows_every_limit():
    doc = openapi.document()
    problems, seen = check_document(doc)
    assert not problems, '\n'.join(problems)
    assert seen > 200
    schemas = doc['components']['schemas']
    create = schemas['CreateInstanceRequest']['properties']
    assert create['name']['maxLength'] == 63
    assert create['network']['maxItems'] == 16 and create['disk']['maxItems'] == 16
    assert create['metadata']['maxProperties'] == 64
    assert create['metadata']['x-max-key-length'] == 256 and create['metadata']['x-max-bytes'] == 65536
    assert create['cpus']['minimum'] == 1
    assert schemas['NetworkSpec']['properties']['network_uuid']['maxLength'] == 255
    assert schemas['SideChannelList']['maxItems'] == 8
    body = doc['paths']['/instances']['post']['requestBody']['content']['application/json']['schema']
    assert body['x-max-bytes'] == 196608 and body['properties']['name']['maxLength'] == 63
    put = doc['paths']['/instances/{instance_ref}/metadata/{key}']['put']
    params = {p['name']: p for p in put['parameters']}
    assert params['instance_ref']['schema']['maxLength'] == 63
    assert params['key']['schema']['maxLength'] == 256
    value = put['requestBody']['content']['application/json']['schema']['properties']['value']
    assert value['x-max-bytes'] == 65536
    events = {p['name']: p for p in doc['paths']['/instances/{instance_ref}/events']['get']['parameters']}
    assert events['page_token']['schema']['maxLength'] == 1024 and events['limit']['schema']['minimum'] == 0
    assert schemas['Instance']['properties']['interfaces']['maxItems'] == 16


async def test_the_served_openapi_document_shows_the_limits(rest):
    base, session = rest
    async with session.get(base + '/openapi.json') as r:
        doc = await r.json()
    problems, seen = check_document(doc)
    assert not problems and seen > 200
    assert doc == json.loads(json.dumps(openapi.document()))


# ------------------------------------------------- every limit, over gRPC

def sized(make, n):
    """make(length) whose protobuf encoding is exactly n bytes."""
    for length in range(n, -1, -1):
        value = make(length)
        if value.ByteSize() == n:
            return value
    raise AssertionError(f'no value of exactly {n} bytes')


def value_of(n):
    return sized(lambda k: struct_pb2.Value(string_value='v' * k), n)


def struct_of(n):
    return sized(lambda k: struct_pb2.Struct(fields={'k': struct_pb2.Value(string_value='v' * k)}), n)


def body_of(n):
    return sized(lambda k: httpbody_pb2.HttpBody(data=b'x' * k), n)


def filling(key, n):
    """The string Value that makes the Struct {key: value} exactly n bytes."""
    return sized(lambda k: struct_pb2.Struct(fields={key: struct_pb2.Value(string_value='v' * k)}),
                 n).fields[key]


@dataclasses.dataclass
class Variant:
    """One limit of one field: how to set it at its maximum and one over, and what
    the refusal must say."""
    method: object
    path: str
    trail: tuple
    field: object
    where: str          # the field as the message names it: "disk[0].base"
    kind: str           # characters, items, keys, key length, bytes, range
    at: object          # setter(message) at the limit
    over: object        # setter one over it
    says: str           # the refusal's message starts with this
    code: grpc.StatusCode


def label(trail, field):
    parts = []
    for f in trail:
        parts.append(limits.wire_label(f) + ('[0]' if f.is_repeated else ''))
    return '.'.join(parts + [limits.wire_label(field)])


def _item(field):
    if field.type == FD.TYPE_ENUM:
        return field.enum_type.values[1].number
    if field.type == FD.TYPE_STRING:
        return 'x'
    return None


def variants():
    out = []
    for path, method in public_methods():
        for trail, field in reachable(method.input_type):
            lim_ = limits.limits_of(field)
            if lim_ is None:
                continue
            name, where = field.name, label(trail, field)
            kw = dict(method=method, path=path, trail=trail, field=field, where=where)

            def add(kind, at, over, says, code=C.INVALID_ARGUMENT):
                out.append(Variant(kind=kind, at=at, over=over, says=says, code=code, **kw))
            n = lim_.max_length
            if field.is_repeated and lim_.max_items:
                k, item = lim_.max_items, _item(field)

                def items(count, name=name, item=item):
                    def set_(m):
                        if item is None:
                            for _ in range(count):
                                getattr(m, name).add()
                        else:
                            getattr(m, name).extend([item] * count)
                    return set_
                add('items', items(k), items(k + 1), f'{where}: at most {k} items (got {k + 1})')
            if n and field.type == FD.TYPE_STRING:
                if field.is_repeated:
                    def text(count, name=name):
                        return lambda m: getattr(m, name).append('x' * count)
                    add('characters', text(n), text(n + 1), f'{where}[0]: at most {n} characters (got {n + 1})')
                else:
                    def text(count, name=name):
                        return lambda m: setattr(m, name, 'x' * count)
                    add('characters', text(n), text(n + 1), f'{where}: at most {n} characters (got {n + 1})')
            if n and field.type == FD.TYPE_BYTES:
                def data(count, name=name):
                    return lambda m: setattr(m, name, b'x' * count)
                add('bytes', data(n), data(n + 1), f'{where}: at most {n} bytes (got {n + 1})')
            message = field.message_type.full_name if field.message_type else ''
            if message == 'google.protobuf.Struct':
                if lim_.max_items:
                    k = lim_.max_items

                    def keys(count, name=name):
                        return lambda m: getattr(m, name).update({f'k{i}': i + 1 for i in range(count)})
                    add('keys', keys(k), keys(k + 1), f'{where}: at most {k} keys (got {k + 1})')
                if lim_.max_key_length:
                    k = lim_.max_key_length

                    def key(count, name=name):
                        return lambda m: getattr(m, name).update({'k' * count: 1})
                    add('key length', key(k), key(k + 1),
                        f'{where}: keys are at most {k} characters (got {k + 1}: ')
            if lim_.max_bytes:
                k = lim_.max_bytes
                make = {'google.protobuf.Struct': struct_of, 'google.protobuf.Value': value_of,
                        'google.api.HttpBody': body_of}[message]

                def sized_(count, name=name, make=make):
                    return lambda m: getattr(m, name).CopyFrom(make(count))
                add('bytes', sized_(k), sized_(k + 1), f'{where}: at most {k} bytes (got {k + 1})',
                    code=C.RESOURCE_EXHAUSTED)
            lo = lim_.minimum if lim_.HasField('minimum') else None
            hi = lim_.maximum if lim_.HasField('maximum') else None
            text = (f'must be from {lo} to {hi}' if lo is not None and hi is not None
                    else 'must not be negative' if lo == 0
                    else f'at least {lo}' if lo is not None else f'at most {hi}')
            for v, step in ((lo, -1), (hi, 1)):
                if v is not None:
                    def number(value, name=name):
                        return lambda m: setattr(m, name, value)
                    add('range', number(v), number(v + step), f'{where}: {text} (got {v + step}')
    return out


def build(variant, setter):
    """A request of the variant's RPC with only its field set (by setter)."""
    m = message_factory.GetMessageClass(variant.method.input_type)()
    current = baseline(m)
    for f in variant.trail:
        current = baseline(getattr(current, f.name).add() if f.is_repeated else getattr(current, f.name))
    setter(current)
    return m


def baseline(m):
    """m with every field whose default is below its minimum (cpus, memory) at its
    minimum, so that only the field under test breaks a limit."""
    for field in m.DESCRIPTOR.fields:
        lim_ = limits.limits_of(field)
        if lim_ is not None and lim_.HasField('minimum') and lim_.minimum > 0 and not field.has_presence:
            setattr(m, field.name, lim_.minimum)
    return m


async def invoke(channel, token, variant, request):
    """(code, details) of one call with request, whatever the RPC's shape."""
    method, md = variant.method, (('authorization', f'Bearer {token}'),)
    kw = dict(request_serializer=type(request).SerializeToString, response_deserializer=lambda b: b)
    async def once():
        yield request
    if method.client_streaming and method.server_streaming:
        call_ = channel.stream_stream(variant.path, **kw)(once(), metadata=md, timeout=30)
    elif method.client_streaming:
        call_ = channel.stream_unary(variant.path, **kw)(once(), metadata=md, timeout=30)
    elif method.server_streaming:
        call_ = channel.unary_stream(variant.path, **kw)(request, metadata=md, timeout=30)
    else:
        call_ = channel.unary_unary(variant.path, **kw)(request, metadata=md, timeout=30)
    try:
        if method.server_streaming:
            try:
                await asyncio.wait_for(call_.read(), 5)
            finally:
                call_.cancel()
        else:
            await call_
        return C.OK, ''
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ''


def test_variants_cover_every_limit():
    """The generator: one variant per limit of every field reachable from a request."""
    found = variants()
    assert len(found) > 160
    assert {v.kind for v in found} == {'characters', 'items', 'keys', 'key length', 'bytes', 'range'}
    limited = {(v.path, v.where) for v in found}
    for path, method in public_methods():
        for trail, field in reachable(method.input_type):
            if limits.limits_of(field) is not None:
                assert (path, label(trail, field)) in limited, (path, field.full_name)
    both = [v for v in found if v.where == 'deadline_seconds' and v.path.endswith('/ExecuteCommand')]
    assert [v.says for v in both] == ['deadline_seconds: must be from 0 to 604800 (got -1',
                                      'deadline_seconds: must be from 0 to 604800 (got 604801']


async def test_each_limit_at_its_maximum_passes_and_one_over_is_refused_before_anything_is_stored(
        controller, system, node):
    await network(system)
    await create_created(system, networks=['net1'])
    cases = variants()
    before = await stored(controller)
    wrong = []
    async with grpc.aio.insecure_channel(f'127.0.0.1:{controller.port}',
                                         options=[('grpc.max_receive_message_length', -1)]) as channel:
        for v in cases:
            code, details = await invoke(channel, system.token, v, build(v, v.over))
            if code != v.code or not details.startswith(v.says):
                wrong.append(f'{v.path} {v.where} over: {code.name} {details[:200]!r}, wanted '
                             f'{v.code.name} {v.says!r}')
        await unchanged(controller, before)     # refused before anything was stored
        for v in cases:
            code, details = await invoke(channel, system.token, v, build(v, v.at))
            # At its limit the field passes the check; the call may still fail for
            # other reasons (a name that does not exist, a missing field).
            if code == C.RESOURCE_EXHAUSTED or details.startswith(v.says.split(' (got')[0]):
                wrong.append(f'{v.path} {v.where} at the limit: {code.name} {details[:200]!r}')
    assert not wrong, '\n'.join(wrong)


async def test_a_create_over_its_whole_size_is_413_even_with_every_field_within_limits(
        controller, system, node):
    before = await stored(controller)
    # 65,536 characters is user_data's limit, but 4-byte characters make 256 KiB.
    request = api.CreateInstanceRequest(name='big', cpus=1, memory=256, disk=[disk()],
                                        user_data='\U0001F600' * 65536)
    assert len(request.user_data) == lim(api.CreateInstanceRequest, 'user_data').max_length
    async with raises(C.RESOURCE_EXHAUSTED, 'PAYLOAD_TOO_LARGE',
                      'a CreateInstanceRequest is at most 196608 bytes in protobuf encoding (got '):
        await system.instances.CreateInstance(request)
    await unchanged(controller, before)


# ------------------------------------------------------- the review's findings

async def test_the_findings_over_grpc_are_refused_with_the_limit_and_store_nothing(controller, system, node):
    await network(system)
    inst = await create_created(system, networks=['net1'])
    before = await stored(controller)
    huge = 'x' * MB
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', f'name: at most 63 characters (got {MB})'):
        await system.instances.CreateInstance(api.CreateInstanceRequest(
            name=huge, cpus=1, memory=256, disk=[disk()]))
    async with raises(C.RESOURCE_EXHAUSTED, 'PAYLOAD_TOO_LARGE', 'value: at most 65536 bytes (got 1048580)'):
        await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref=inst.uuid, key='k', value=struct_pb2.Value(string_value=huge)))
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', f'key: at most 256 characters (got {MB})'):
        await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref=inst.uuid, key=huge, value=struct_pb2.Value(string_value='v')))
    metadata = struct_pb2.Struct()
    metadata.update({huge: 'v'})
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT',
                      f'metadata: keys are at most 256 characters (got {MB}: '):
        await system.instances.CreateInstance(api.CreateInstanceRequest(
            name='a', cpus=1, memory=256, disk=[disk()], metadata=metadata))
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'network: at most 16 items (got 40)'):
        await system.instances.CreateInstance(api.CreateInstanceRequest(
            name='a', cpus=1, memory=256, disk=[disk()],
            network=[specs_pb2.NetworkSpec(network_uuid='net1')] * 40))
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', f'name: at most 255 characters (got {MB})'):
        await system.networks.CreateNetwork(net.CreateNetworkRequest(name=huge, netblock='10.1.0.0/24'))
    await unchanged(controller, before)


async def test_the_findings_over_rest_are_400_or_413_with_the_limit_and_store_nothing(
        controller, system, node, rest):
    base, session = rest
    await network(system)
    inst = await create_created(system, networks=['net1'])
    before = await stored(controller)
    huge = 'x' * MB
    create = {'name': 'a', 'cpus': 1, 'memory': 256, 'disk': [{'size': 1, 'base': 'sftest'}]}
    found = []
    for verb, path, body, status, says in [
        ('POST', '/instances', {**create, 'name': huge}, 400, f'name: at most 63 characters (got {MB})'),
        ('PUT', f'/instances/{inst.uuid}/metadata/k', {'value': huge}, 413,
         'value: at most 65536 bytes (got 1048580)'),
        ('POST', f'/instances/{inst.uuid}/metadata', {'key': huge, 'value': 'v'}, 400,
         f'key: at most 256 characters (got {MB})'),
        ('POST', '/instances', {**create, 'metadata': {huge: 1}}, 400,
         f'metadata: keys are at most 256 characters (got {MB}: '),
        ('POST', '/instances', {**create, 'network': [{'network_uuid': 'net1'}] * 40}, 400,
         'network: at most 16 items (got 40)'),
        ('POST', '/networks', {'name': huge, 'netblock': '10.1.0.0/24'}, 400,
         f'name: at most 255 characters (got {MB})'),
        ('POST', f'/instances/{inst.uuid}/agent/execute', {'command_line': huge}, 400,
         f'command_line: at most 65536 characters (got {MB})'),
    ]:
        got, answer = await call(session, base, verb, path, body)
        if got != status or not (isinstance(answer, dict) and answer.get('status') == status
                                 and answer['error'].startswith(says)):
            found.append(f'{verb} {path}: {got} {str(answer)[:200]}, wanted {status} {says!r}')
    assert not found, '\n'.join(found)
    await unchanged(controller, before)


async def test_rest_accepts_each_finding_at_its_limit(controller, system, node, rest):
    base, session = rest
    await network(system)
    create = {'name': 'n' * 63, 'cpus': 1, 'memory': 256, 'disk': [{'size': 1, 'base': 'sftest'}],
              'network': [{'network_uuid': 'net1'}] * 16, 'metadata': {'k' * 256: 1}}
    status, body = await call(session, base, 'POST', '/instances', create)
    assert status == 200, body
    assert body['name'] == 'n' * 63 and len(body['interfaces']) == 16
    # A metadata value of exactly 64 KiB in protobuf encoding: a string of 65,532
    # characters (one tag byte, three length bytes).
    assert value_of(65536).string_value == 'v' * 65532
    uuid = body['uuid']
    await wait_state(system, uuid, instance_pb2.INSTANCE_STATE_CREATED)
    status, body = await call(session, base, 'PUT', f'/instances/{uuid}/metadata/big', {'value': 'v' * 65532})
    assert status == 413 and 'metadata: at most 65536 bytes' in body['error'], body  # with the other key
    status, body = await call(session, base, 'DELETE', f'/instances/{uuid}/metadata/{"k" * 256}')
    assert status == 200, body
    before = await stored(controller)
    status, body = await call(session, base, 'PUT', f'/instances/{uuid}/metadata/k', {'value': 'v' * 65533})
    assert status == 413 and body['error'] == 'value: at most 65536 bytes (got 65537)', body
    await unchanged(controller, before)
    # The whole metadata's encoding (the key, the map entry) takes a few bytes of
    # the instance's 64 KiB: one character more than fits is refused.
    fits = len(filling('k', 65536).string_value)
    assert fits == 65521
    status, body = await call(session, base, 'PUT', f'/instances/{uuid}/metadata/k', {'value': 'v' * (fits + 1)})
    assert status == 413 and body['error'] == 'metadata: at most 65536 bytes (got 65537)', body
    await unchanged(controller, before)
    status, body = await call(session, base, 'PUT', f'/instances/{uuid}/metadata/k', {'value': 'v' * fits})
    assert status == 200, body
    status, body = await call(session, base, 'GET', f'/instances/{uuid}/metadata')
    assert body == {'k': 'v' * fits}


# ----------------------------------------------- what repeated calls accumulate

async def test_sixteen_interfaces_hot_plugged_ones_included_and_no_more(controller, system, node, rest):
    await network(system)
    sixteen = [specs_pb2.NetworkSpec(network_uuid='net1')] * 16
    inst = await create_created(system, network=sixteen)
    assert len(inst.interfaces) == 16
    before = await stored(controller)
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'network: at most 16 items (got 17)'):
        await system.instances.CreateInstance(api.CreateInstanceRequest(
            name='b', cpus=1, memory=256, disk=[disk()], network=sixteen + sixteen[:1]))
    async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT',
                      'network: an instance has at most 16 interfaces (it has 16)'):
        await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
            instance_ref=inst.uuid, network=specs_pb2.NetworkSpec(network_uuid='net1')))
    base, session = rest
    status, body = await call(session, base, 'POST', f'/instances/{inst.uuid}/interfaces',
                              {'network': {'network_uuid': 'net1'}})
    assert status == 400 and body['error'] == 'network: an instance has at most 16 interfaces (it has 16)'
    await unchanged(controller, before)
    # Unplug one, and the 16th can be plugged again; a smaller instance can grow to 16.
    await system.instances.RemoveInstanceInterface(api.RemoveInstanceInterfaceRequest(
        instance_ref=inst.uuid, interface_uuid=inst.interfaces[3].uuid))
    await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
        instance_ref=inst.uuid, network=specs_pb2.NetworkSpec(network_uuid='net1')))
    small = await create_created(system, 'small', network=sixteen[:15])
    status, body = await call(session, base, 'POST', f'/instances/{small.uuid}/interfaces',
                              {'network': {'network_uuid': 'net1'}})
    assert status == 200, body
    async with raises(C.INVALID_ARGUMENT, match='at most 16 interfaces (it has 16)'):
        await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
            instance_ref=small.uuid, network=specs_pb2.NetworkSpec(network_uuid='net1')))


async def set_keys(setter, count, value=1):
    for i in range(count):
        await setter(f'k{i}', struct_pb2.Value(number_value=value))


async def test_metadata_per_object_is_at_most_64_keys_and_its_bytes(controller, system, node):
    n = await network(system)
    inst = await create_created(system, networks=['net1'])
    iface = inst.interfaces[0].uuid
    objects = [
        ('instance', lambda k, v: system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
            instance_ref=inst.uuid, key=k, value=v)), 65536),
        ('network', lambda k, v: system.networks.SetNetworkMetadata(net.SetNetworkMetadataRequest(
            network_ref=n.uuid, key=k, value=v)), 65536),
        ('interface', lambda k, v: system.interfaces.SetInterfaceMetadata(net.SetInterfaceMetadataRequest(
            interface_uuid=iface, key=k, value=v)), 8192),
    ]
    for what, setter, most in objects:
        await set_keys(setter, 64)
        await setter('k0', struct_pb2.Value(number_value=2))      # replacing a key is fine
        before = await stored(controller)
        async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'metadata: at most 64 keys (got 65)'):
            await setter('k64', struct_pb2.Value(number_value=1))
        await unchanged(controller, before)
        # Bytes: one key holding nearly all of them; then no room for another.
        for i in range(64):
            await delete_key(system, what, inst.uuid, n.uuid, iface, f'k{i}')
        await setter('a', filling('a', most))
        before = await stored(controller)
        async with raises(C.RESOURCE_EXHAUSTED, 'PAYLOAD_TOO_LARGE', f'metadata: at most {most} bytes (got '):
            await setter('b', struct_pb2.Value(number_value=1))
        await unchanged(controller, before)


async def delete_key(system, what, inst, network_uuid, iface, key):
    if what == 'instance':
        await system.instances.DeleteInstanceMetadata(api.DeleteInstanceMetadataRequest(
            instance_ref=inst, key=key))
    elif what == 'network':
        await system.networks.DeleteNetworkMetadata(net.DeleteNetworkMetadataRequest(
            network_ref=network_uuid, key=key))
    else:
        await system.interfaces.DeleteInterfaceMetadata(net.DeleteInterfaceMetadataRequest(
            interface_uuid=iface, key=key))


# ------------------------------------------------ the worst case, measured

def ascii_maxima(networks):
    """A create with every field at its limit, in ASCII."""
    return api.CreateInstanceRequest(
        name='m' * 63, cpus=1, memory=256,
        network=[specs_pb2.NetworkSpec(network_uuid=n, macaddress=f'02:00:00:00:01:{i:02x}',
                                       float=True) for i, n in enumerate(networks)],
        disk=[disk(base='https://images.example.com/' + 'd' * (2048 - 27)) for _ in range(16)],
        ssh_key='s' * 16384, user_data='QUJD' * (65536 // 4),
        metadata=struct_pb2.Struct(fields={'k' * 256: filling('k' * 256, 65536)}),
        request_id='r' * 255)       # no nvram_template: it must name an existing blob


async def test_every_limit_at_once_keeps_each_transaction_far_below_etcds_limits(controller, system, node):
    """The instance every maximum makes: each of its transactions measured as etcd
    receives it. Its create writes the record three times (the instance, the
    placement, the request_id record); later, metadata can grow it by 64 KiB and
    each of its 16 interfaces can hold 8 KiB, which its delete's response (kept in
    the request_id record) carries."""
    nets = []
    for i in range(16):
        n = await network(system, name=f'{i:02d}' + 'n' * 253, netblock=f'10.{i}.0.0/24', provide_nat=True)
        await system.networks.SetNetworkMetadata(net.SetNetworkMetadataRequest(
            network_ref=n.uuid, key='k', value=filling('k', 65536)))
        nets.append(n.name)       # a reference at its limit: the 255-character name
    store, seen = controller.core.store, []
    real_txn = store.txn

    async def measured(compares, success, failure=()):
        compares, success = list(compares), list(success)
        seen.append((rpc.TxnRequest(compare=compares, success=success).ByteSize(),
                     len(compares), len(success), caller_of()))
        return await real_txn(compares, success, failure)
    store.txn = measured

    # Every field at its limit in ASCII fits in the request's 192 KiB.
    maxima = ascii_maxima(nets)
    assert 180 * 1024 < maxima.ByteSize() <= 196608, maxima.ByteSize()
    inst = (await system.instances.CreateInstance(maxima)).instance
    assert len(inst.interfaces) == 16 and all(i.floating for i in inst.interfaces)
    await wait_state(system, inst.uuid, instance_pb2.INSTANCE_STATE_CREATED)
    create_size = max(s for s, *_ in seen)

    # The biggest record: 192 KiB of multi-byte characters outside metadata (which
    # the request's size allows), then the 64 KiB of metadata added later.
    heavy = api.CreateInstanceRequest()
    heavy.CopyFrom(maxima)
    heavy.name, heavy.request_id = 'heavy', 'h' * 255
    heavy.ClearField('metadata')
    for i, spec in enumerate(heavy.network):
        spec.macaddress = f'02:00:00:00:02:{i:02x}'
    heavy.ssh_key = '\U0001F600' * 16384
    grow = 0
    while True:
        trial = api.CreateInstanceRequest()
        trial.CopyFrom(heavy)
        for d in trial.disk:
            d.base = '\u20ac' * (grow + 64) + d.base[grow + 64:]
        if trial.ByteSize() > 196608:
            break
        heavy, grow = trial, grow + 64
    assert heavy.ByteSize() > 190 * 1024
    second = (await system.instances.CreateInstance(heavy)).instance
    await wait_state(system, second.uuid, instance_pb2.INSTANCE_STATE_CREATED)
    await system.instances.SetInstanceMetadata(api.SetInstanceMetadataRequest(
        instance_ref=second.uuid, key='k' * 256, value=filling('k' * 256, 65536), request_id='m' * 255))
    for iface in second.interfaces:
        await system.interfaces.SetInterfaceMetadata(net.SetInterfaceMetadataRequest(
            interface_uuid=iface.uuid, key='k' * 256, value=filling('k' * 256, 8192)))
    record = instance_pb2.Instance.FromString((await store.get(
        f'instances/system/{second.uuid}'))[0])
    assert record.ByteSize() > 240 * 1024, record.ByteSize()     # about 250 KiB

    # Power (the placement, with the instance), unplug and plug (placement and
    # interfaces), then delete with a request_id (the record and its view), and the
    # node's report that it is gone (every interface and address freed).
    await system.instances.PowerOffInstance(api.PowerOffInstanceRequest(
        instance_ref=second.uuid, request_id='p' * 255))
    await system.instances.RemoveInstanceInterface(api.RemoveInstanceInterfaceRequest(
        instance_ref=second.uuid, interface_uuid=second.interfaces[0].uuid, request_id='u' * 255))
    await system.instances.AddInstanceInterface(api.AddInstanceInterfaceRequest(
        instance_ref=second.uuid, request_id='a' * 255,
        network=specs_pb2.NetworkSpec(network_uuid=nets[0], float=True)))
    for target in (second.uuid, inst.uuid):
        await system.instances.DeleteInstance(api.DeleteInstanceRequest(
            instance_ref=target, request_id='d' * 254 + target[0]))
    for target in (second.uuid, inst.uuid):
        await wait_state(system, target, instance_pb2.INSTANCE_STATE_DELETED)
    await eventually(lambda: not node.desired, what='the node removed both')

    biggest = max(seen)
    most_ops = max(seen, key=lambda s: s[2])
    most_compares = max(seen, key=lambda s: s[1])
    print(f'\nworst transactions: {biggest[0]} bytes ({biggest[0] / ETCD_MAX_REQUEST:.0%} of etcd\'s '
          f'limit, {biggest[3]}); {most_ops[2]} operations ({most_ops[3]}); {most_compares[1]} '
          f'compares; the first create: {create_size} bytes')
    assert biggest[0] < ETCD_MAX_REQUEST // 2, biggest
    assert most_ops[2] <= 96 and most_compares[1] <= 96, (most_ops, most_compares)


def caller_of():
    """The RPC whose transaction this is (for the report)."""
    from sfcontrol import caller
    return caller.current_method.get() or 'not an RPC of the public API'
