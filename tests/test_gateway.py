"""Tests of the REST gateway against a real grpc.aio server with small servicers."""

import asyncio
import io
import json
import uuid

import aiohttp
import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway import app as gateway_app
from gateway import envoy, routes
from gateway.main import start_gateway
from sfcommon import errors
from shakenfist.v1 import blob_service_pb2 as blob_svc
from shakenfist.v1 import blob_service_pb2_grpc as blob_grpc
from shakenfist.v1 import event_pb2, instance_pb2
from shakenfist.v1 import event_service_pb2 as event_svc
from shakenfist.v1 import event_service_pb2_grpc as event_grpc
from shakenfist.v1 import instance_service_pb2 as inst_svc
from shakenfist.v1 import instance_service_pb2_grpc as inst_grpc
from shakenfist.v1 import server_service_pb2 as server_svc
from shakenfist.v1 import server_service_pb2_grpc as server_grpc
from tests import schema_index

MiB = 1024 * 1024
MAX_BODY = MiB  # small, so that the 3 MiB upload shows uploads are exempt
BLOB_CHUNKS = [b'first chunk\n', b'\x00\x01\x02 binary \xff', b'last']


class Seen:
    """What the servicers were called with."""

    def __init__(self):
        self.requests = {}   # method name -> last request
        self.metadata = {}   # method name -> last invocation metadata as a dict
        self.upload_messages = []

    def record(self, name, request, context):
        self.requests[name] = request
        self.metadata[name] = dict(context.invocation_metadata())


def instance(uuid_='i-1'):
    return instance_pb2.Instance(
        uuid=uuid_, name='inst1', namespace='ns1', state=instance_pb2.INSTANCE_STATE_CREATED,
        version=3, cpus=1, memory=1024, power_state=instance_pb2.POWER_STATE_ON,
        node='node1')


class Instances(inst_grpc.InstanceServiceServicer):
    def __init__(self, seen):
        self.seen = seen

    async def GetInstance(self, request, context):
        self.seen.record('GetInstance', request, context)
        ref = request.instance_ref
        if ref == 'notready':
            err = errors.NotReady('instance i-2 is not ready (creating)')
            await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
        if ref == 'plain':
            await context.abort(grpc.StatusCode.NOT_FOUND, 'nothing called plain')
        if ref.startswith('code-'):     # a bare status of any code
            await context.abort(grpc.StatusCode[ref[len('code-'):]], f'failed with {ref}')
        if ref == 'strange':  # an ErrorInfo reason this schema does not define
            info = error_details_pb2.ErrorInfo(reason='MADE_UP', domain=errors.DOMAIN)
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                       message='strange state', details=[detail])
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, 'strange state',
                                trailing_metadata=(('grpc-status-details-bin',
                                                    status.SerializeToString()),))
        return inst_svc.GetInstanceResponse(instance=instance(ref))

    async def ListInstances(self, request, context):
        self.seen.record('ListInstances', request, context)
        response = inst_svc.ListInstancesResponse(instances=[instance('i-1'), instance('i-2')])
        if request.page_size == 1:
            del response.instances[1:]
            response.next_page_token = 'page-2'
        return response

    async def PowerOffInstance(self, request, context):
        self.seen.record('PowerOffInstance', request, context)
        return inst_svc.PowerOffInstanceResponse()

    async def GetConsoleData(self, request, context):
        self.seen.record('GetConsoleData', request, context)
        return inst_svc.GetConsoleDataResponse(console=httpbody_pb2.HttpBody(
            content_type='application/octet-stream', data=b'\x00console \xfe\xff'))


class Server(server_grpc.ServerServiceServicer):
    async def GetCapabilities(self, request, context):
        return server_svc.GetCapabilitiesResponse(
            capabilities=['instance-get', 'events-by-type'], version='1.0')


class Blobs(blob_grpc.BlobServiceServicer):
    def __init__(self, seen):
        self.seen = seen

    async def ReadBlobData(self, request, context):
        self.seen.record('ReadBlobData', request, context)
        if request.blob_uuid == 'missing':
            err = errors.NotFound('blob not found')
            await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
        for i, chunk in enumerate(BLOB_CHUNKS):
            if request.blob_uuid == 'broken' and i == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, 'node went away')
            yield blob_svc.ReadBlobDataResponse(
                data=httpbody_pb2.HttpBody(content_type='text/plain', data=chunk))


class Uploads(blob_grpc.UploadServiceServicer):
    def __init__(self, seen):
        self.seen = seen

    async def WriteUpload(self, request_iterator, context):
        self.seen.metadata['WriteUpload'] = dict(context.invocation_metadata())
        size = 0
        async for message in request_iterator:
            self.seen.upload_messages.append(message)
            size += len(message.data.data)
        return blob_svc.WriteUploadResponse(size=size)


class Events(event_grpc.EventServiceServicer):
    def __init__(self, seen):
        self.seen = seen

    async def WatchEvents(self, request, context):
        self.seen.record('WatchEvents', request, context)
        for i, kind in enumerate([event_pb2.EVENT_TYPE_AUDIT, event_pb2.EVENT_TYPE_STATUS]):
            if i == 1 and request.cursor == 'old':
                err = errors.CursorExpired('cursor c0 is too old')
                await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
            yield event_svc.WatchEventsResponse(
                cursor=f'c{i}', event=event_pb2.Event(
                    type=kind, timestamp=1700000000.5 + i, message=f'event {i}',
                    object_type=event_pb2.OBJECT_TYPE_INSTANCE, object_uuid='i-1'))


@pytest.fixture
async def backend():
    seen = Seen()
    server = grpc.aio.server()
    inst_grpc.add_InstanceServiceServicer_to_server(Instances(seen), server)
    server_grpc.add_ServerServiceServicer_to_server(Server(), server)
    blob_grpc.add_BlobServiceServicer_to_server(Blobs(seen), server)
    blob_grpc.add_UploadServiceServicer_to_server(Uploads(seen), server)
    event_grpc.add_EventServiceServicer_to_server(Events(seen), server)
    port = server.add_insecure_port('127.0.0.1:0')
    await server.start()
    yield seen, f'127.0.0.1:{port}'
    await server.stop(None)


@pytest.fixture
async def rest(backend):
    seen, target = backend
    runner, port = await start_gateway(target, '127.0.0.1', 0, max_body=MAX_BODY)
    async with aiohttp.ClientSession(f'http://127.0.0.1:{port}') as session:
        session.seen, session.port = seen, port
        yield session
    await runner.cleanup()


async def call(session, method, path, **kwargs):
    """(status, headers, parsed JSON body)."""
    async with session.request(method, path, **kwargs) as r:
        return r.status, r.headers, json.loads(await r.read())


def assert_error(status, headers, body, expected_status):
    assert status == expected_status
    assert headers['Content-Type'].startswith('application/json')
    assert body == {'error': body['error'], 'status': expected_status}
    assert isinstance(body['error'], str) and body['error']
    assert 'Traceback' not in body['error']


# ------------------------------------------------------------------ success

async def test_get_instance_renders_the_shaken_fist_wire(rest):
    status, headers, body = await call(rest, 'GET', '/instances/i-1')
    assert status == 200
    assert headers['Content-Type'].startswith('application/json')
    assert body['uuid'] == 'i-1' and body['state'] == 'created' and body['power_state'] == 'on'
    assert body['version'] == 3 and body['node'] == 'node1'
    # Unset optional and message fields are null, unset enums too.
    assert body['ssh_key'] is None and body['error_message'] is None
    assert body['agent_state'] is None and body['video'] is None
    assert body['interfaces'] == [] and body['uefi'] is False
    assert rest.seen.requests['GetInstance'].instance_ref == 'i-1'


async def test_get_with_json_body_reaches_the_servicer(rest):
    status, _, body = await call(rest, 'GET', '/instances', json={'all': True})
    assert status == 200
    assert [i['uuid'] for i in body] == ['i-1', 'i-2']  # response_body: a bare list
    assert rest.seen.requests['ListInstances'].all is True
    await call(rest, 'GET', '/instances', json={'all': False, 'namespace': 'ns2'})
    request = rest.seen.requests['ListInstances']
    assert request.all is False and request.namespace == 'ns2'


async def test_query_parameters_set_fields_and_page_token_moves_to_a_header(rest):
    status, headers, body = await call(rest, 'GET', '/instances?all=true&page_size=1')
    assert status == 200
    request = rest.seen.requests['ListInstances']
    assert request.all is True and request.page_size == 1
    assert [i['uuid'] for i in body] == ['i-1']
    assert headers['X-Next-Page-Token'] == 'page-2'
    _, headers, _ = await call(rest, 'GET', '/instances')
    assert 'X-Next-Page-Token' not in headers


async def test_repeated_query_parameters_become_a_list(rest):
    async with rest.get('/events:watch?event_types=audit&event_types=status&object_ref=i-1') as r:
        assert r.status == 200
        await r.read()
    request = rest.seen.requests['WatchEvents']
    assert list(request.event_types) == [event_pb2.EVENT_TYPE_AUDIT, event_pb2.EVENT_TYPE_STATUS]
    assert request.object_ref == 'i-1'


async def raw_request(port, target):
    """Sends the request target as is (clients would read '//x' as a host)."""
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    writer.write(f'GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
    head, _, body = (await reader.read()).partition(b'\r\n\r\n')
    writer.close()
    await writer.wait_closed()
    return int(head.split()[1]), json.loads(body)


async def test_double_and_trailing_slashes_are_tolerated(rest):
    status, body = await raw_request(rest.port, '//instances/')
    assert status == 200 and len(body) == 2
    status, body = await raw_request(rest.port, '/instances//i-1/')
    assert status == 200 and body['uuid'] == 'i-1'


async def test_void_call_answers_null(rest):
    async with rest.post('/instances/i-1/poweroff') as r:
        assert r.status == 200
        assert r.headers['Content-Type'].startswith('application/json')
        assert await r.read() == b'null'
    assert rest.seen.requests['PowerOffInstance'].instance_ref == 'i-1'


async def test_path_variable_wins_over_a_body_key(rest):
    await call(rest, 'POST', '/instances/i-1/poweroff', json={'instance_ref': 'other'})
    assert rest.seen.requests['PowerOffInstance'].instance_ref == 'i-1'


async def test_capabilities_are_public_at_the_root(rest):
    status, _, body = await call(rest, 'GET', '/')
    assert status == 200
    assert body == {'capabilities': ['instance-get', 'events-by-type'], 'version': '1.0'}


async def test_console_data_is_raw_bytes(rest):
    async with rest.get('/instances/i-1/consoledata', json={'length': 5}) as r:
        assert r.status == 200
        assert r.headers['Content-Type'] == 'application/octet-stream'
        assert await r.read() == b'\x00console \xfe\xff'
    assert rest.seen.requests['GetConsoleData'].length == 5


async def test_blob_data_is_streamed_raw(rest):
    async with rest.get('/blobs/b-1/data?offset=10&limit=20') as r:
        assert r.status == 200
        assert r.headers['Content-Type'] == 'text/plain'
        assert 'Content-Length' not in r.headers  # chunked: streamed, not buffered
        assert await r.read() == b''.join(BLOB_CHUNKS)
    request = rest.seen.requests['ReadBlobData']
    assert (request.blob_uuid, request.offset, request.limit) == ('b-1', 10, 20)


async def test_stream_that_fails_before_its_first_message_is_a_json_error(rest):
    assert_error(*await call(rest, 'GET', '/blobs/missing/data'), 404)


async def test_raw_stream_that_fails_midway_is_cut_off(rest):
    with pytest.raises(aiohttp.ClientPayloadError):
        async with rest.get('/blobs/broken/data') as r:
            assert r.status == 200
            await r.read()


async def test_upload_is_streamed_in_pieces_and_answers_a_json_integer(rest):
    data = bytes(range(256)) * (3 * MiB // 256)  # over MAX_BODY: uploads are exempt
    async with rest.post('/upload/u-1', data=io.BytesIO(data),
                         headers={'Content-Type': 'application/octet-stream'}) as r:
        assert r.status == 200
        assert await r.read() == str(len(data)).encode()
    messages = rest.seen.upload_messages
    assert len(messages) > 1
    assert all(len(m.data.data) <= MiB for m in messages)
    assert {m.upload_uuid for m in messages} == {'u-1'}
    assert {m.data.content_type for m in messages} == {'application/octet-stream'}
    assert b''.join(m.data.data for m in messages) == data


async def test_upload_of_a_chunked_body_is_streamed_too(rest):
    async def body():
        for _ in range(3):
            yield b'x' * 700_000
    status, _, size = await call(rest, 'POST', '/upload/u-2', data=body())
    assert status == 200 and size == 2_100_000
    assert len(rest.seen.upload_messages) > 1


async def test_empty_upload_still_names_the_upload(rest):
    status, _, size = await call(rest, 'POST', '/upload/u-3')
    assert status == 200 and size == 0
    assert [m.upload_uuid for m in rest.seen.upload_messages] == ['u-3']


async def test_watch_is_newline_delimited_json(rest):
    async with rest.get('/events:watch') as r:
        assert r.status == 200
        assert r.headers['Content-Type'] == 'application/x-ndjson'
        lines = (await r.read()).decode().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first['cursor'] == 'c0' and second['cursor'] == 'c1'
    assert first['event']['type'] == 'audit' and second['event']['type'] == 'status'
    assert first['event']['object_type'] == 'instance'
    assert first['event']['extra'] is None and first['event']['duration'] is None


async def test_json_stream_that_fails_midway_ends_with_an_error_line(rest):
    async with rest.get('/events:watch', json={'cursor': 'old'}) as r:
        assert r.status == 200
        lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert lines[0]['cursor'] == 'c0'
    assert lines[1:] == [{'error': 'cursor c0 is too old', 'status': 400}]


# --------------------------------------------------------------- headers

async def test_request_id_is_echoed_and_forwarded(rest):
    status, headers, _ = await call(rest, 'GET', '/instances/i-1',
                                    headers={'X-Request-ID': 'req-42'})
    assert status == 200 and headers['X-Request-ID'] == 'req-42'
    assert rest.seen.metadata['GetInstance']['x-request-id'] == 'req-42'


async def test_every_response_carries_a_request_id(rest):
    for method, path in [('GET', '/instances/i-1'), ('GET', '/instances/notready'),
                         ('GET', '/nowhere'), ('PATCH', '/instances'), ('GET', '/openapi.json'),
                         ('GET', '/docs'), ('GET', '/blobs/b-1/data'), ('GET', '/events:watch'),
                         ('POST', '/upload/u-1')]:
        async with rest.request(method, path) as r:
            uuid.UUID(r.headers['X-Request-ID'])  # generated: a UUID
            await r.read()
    # The generated one reaches the controller too.
    assert uuid.UUID(rest.seen.metadata['GetInstance']['x-request-id'])


async def test_authorization_header_is_forwarded_as_metadata(rest):
    await call(rest, 'GET', '/instances/i-1', headers={'Authorization': 'Bearer tok-1'})
    assert rest.seen.metadata['GetInstance']['authorization'] == 'Bearer tok-1'
    await call(rest, 'POST', '/upload/u-1', data=b'abc', headers={'Authorization': 'Bearer tok-2'})
    assert rest.seen.metadata['WriteUpload']['authorization'] == 'Bearer tok-2'
    await call(rest, 'GET', '/instances/i-1')
    assert 'authorization' not in rest.seen.metadata['GetInstance']


# ----------------------------------------------------------------- errors

async def test_error_info_decides_the_http_status(rest):
    status, headers, body = await call(rest, 'GET', '/instances/notready')
    assert_error(status, headers, body, 406)
    assert body['error'] == 'instance i-2 is not ready (creating)'


async def test_plain_grpc_not_found_is_404(rest):
    status, headers, body = await call(rest, 'GET', '/instances/plain')
    assert_error(status, headers, body, 404)
    assert body['error'] == 'nothing called plain'


@pytest.mark.parametrize('code,http', [('CANCELLED', 499), ('UNKNOWN', 500), ('DATA_LOSS', 500),
                                       ('INTERNAL', 500), ('OUT_OF_RANGE', 400), ('ABORTED', 409)])
async def test_every_grpc_code_has_an_http_status(rest, code, http):
    status, headers, body = await call(rest, 'GET', f'/instances/code-{code}')
    assert_error(status, headers, body, http)
    assert body['error'] == f'failed with code-{code}'


def test_the_code_table_covers_every_code():
    assert set(gateway_app.HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


async def test_unknown_error_reason_falls_back_to_the_grpc_code(rest):
    status, headers, body = await call(rest, 'GET', '/instances/strange')
    assert_error(status, headers, body, 409)
    assert body['error'] == 'strange state'


async def test_unimplemented_method_is_501(rest):
    assert_error(*await call(rest, 'POST', '/instances', json={'name': 'x'}), 501)


async def test_unknown_field_is_400(rest):
    status, headers, body = await call(rest, 'GET', '/instances', json={'all': True, 'bogus': 1})
    assert_error(status, headers, body, 400)
    assert 'bogus' in body['error']
    assert 'ListInstances' not in rest.seen.requests  # never forwarded


async def test_wrong_type_in_query_is_400(rest):
    status, headers, body = await call(rest, 'GET', '/instances?page_size=many')
    assert_error(status, headers, body, 400)
    assert 'page_size' in body['error']


async def test_body_that_is_not_an_object_is_400(rest):
    status, headers, body = await call(rest, 'GET', '/instances', json=[1, 2])
    assert_error(status, headers, body, 400)
    assert body['error'] == 'the request body must be a JSON object'


async def test_malformed_json_is_400(rest):
    status, headers, body = await call(rest, 'GET', '/instances', data=b'{"all": tru',
                                       headers={'Content-Type': 'application/json'})
    assert_error(status, headers, body, 400)
    assert body['error'].startswith('the request body is not valid JSON')


async def test_unmatched_path_is_404_and_wrong_verb_is_405(rest):
    assert_error(*await call(rest, 'GET', '/no/such/thing'), 404)
    status, headers, body = await call(rest, 'PATCH', '/instances')
    assert_error(status, headers, body, 405)
    assert headers['Allow'] == 'DELETE, GET, POST'


async def test_body_over_the_limit_is_413(rest):
    big = b'{"a": "' + b'x' * MAX_BODY + b'"}'
    assert_error(*await call(rest, 'POST', '/instances/i-1/poweroff', data=io.BytesIO(big)), 413)

    async def chunked():  # no Content-Length: the limit applies while reading
        yield big
    assert_error(*await call(rest, 'POST', '/instances/i-1/poweroff', data=chunked()), 413)
    assert 'PowerOffInstance' not in rest.seen.requests


async def test_unexpected_failure_is_a_plain_500(rest, monkeypatch):
    def explode(message):
        raise RuntimeError('secret internals')
    monkeypatch.setattr(gateway_app.codec, 'to_wire', explode)
    async with rest.get('/instances/i-1') as r:
        assert r.status == 500
        assert json.loads(await r.read()) == {'error': 'internal error', 'status': 500}


async def test_controller_down_is_503():
    runner, port = await start_gateway('127.0.0.1:1', '127.0.0.1', 0, timeout=5)
    try:
        async with aiohttp.ClientSession() as session:
            assert_error(*await call(session, 'GET', f'http://127.0.0.1:{port}/instances'), 503)
    finally:
        await runner.cleanup()


# ------------------------------------------------------------- docs, envoy

async def test_openapi_has_every_binding_and_the_proto_comments(rest):
    status, _, doc = await call(rest, 'GET', '/openapi.json')
    assert status == 200 and doc['openapi'].startswith('3.0')
    operations = [(verb.upper(), path) for path, item in doc['paths'].items() for verb in item]
    expected = {(verb, schema_index.normalise(path)) for verb, path, _ in schema_index.routes()}
    assert len(operations) == len(schema_index.routes())
    assert {(v, schema_index.normalise(p)) for v, p in operations} == expected
    get = doc['paths']['/instances/{instance_ref}']['get']
    assert get['operationId'] == 'InstanceService_GetInstance'
    assert 'Deleted instances stay readable by UUID' in get['description']
    schemas = doc['components']['schemas']
    assert 'delete-wait' in schemas['InstanceState']['enum']
    assert schemas['InstanceState']['nullable'] is True
    assert schemas['Instance']['properties']['uuid']['description'] == "The instance's UUID."
    assert schemas['SideChannelList']['type'] == 'array'
    assert schemas['AgentCommandResult']['properties']['return-code']['type'] == 'integer'
    console = doc['paths']['/instances/{instance_ref}/consoledata']['get']['responses']['200']
    assert console['content']['application/octet-stream']['schema']['format'] == 'binary'
    assert doc['paths']['/']['get']['security'] == []


async def test_docs_page_lists_operations(rest):
    async with rest.get('/docs') as r:
        assert r.status == 200
        assert r.headers['Content-Type'].startswith('text/html')
        page = await r.text()
    assert page.startswith('<!DOCTYPE html>')
    assert 'POST /instances/{instance_ref}/poweroff' in page
    assert 'Deleted instances stay readable by UUID' in page


def test_envoy_config_transcodes_every_service(tmp_path):
    descriptors, config_path = envoy.write(tmp_path / 'out', '10.0.0.9:7000', 13500)
    assert descriptors.read_bytes() == schema_index.DESCRIPTORS.read_bytes()
    text = config_path.read_text()
    assert 'proto3 JSON' in text  # the comment saying why sf-client needs our gateway
    try:
        import yaml
        config = yaml.safe_load(text)
    except ImportError:  # the file is JSON behind YAML comment lines
        config = json.loads('\n'.join(l for l in text.splitlines() if not l.startswith('#')))
    [listener] = config['static_resources']['listeners']
    assert listener['address']['socket_address']['port_value'] == 13500
    [manager] = listener['filter_chains'][0]['filters']
    assert manager['name'] == 'envoy.filters.network.http_connection_manager'
    filters = {f['name']: f['typed_config'] for f in manager['typed_config']['http_filters']}
    assert list(filters)[-1] == 'envoy.filters.http.router'
    transcoder = filters['envoy.filters.http.grpc_json_transcoder']
    assert transcoder['proto_descriptor'] == str(descriptors)
    services = {f'{f.package}.{s.name}' for f in schema_index.file_set().file
                if f.package == 'shakenfist.v1' for s in f.service}
    assert set(transcoder['services']) == services and len(services) >= 8
    assert transcoder['print_options']['preserve_proto_field_names'] is True
    assert transcoder['print_options']['always_print_primitive_fields'] is True
    assert transcoder['convert_grpc_status'] is True
    assert transcoder['match_incoming_request_route'] is False
    [cluster] = config['static_resources']['clusters']
    route = manager['typed_config']['route_config']['virtual_hosts'][0]['routes'][0]
    assert route['route']['cluster'] == cluster['name']
    options = cluster['typed_extension_protocol_options'][
        'envoy.extensions.upstreams.http.v3.HttpProtocolOptions']
    assert 'http2_protocol_options' in options['explicit_http_config']
    address = cluster['load_assignment']['endpoints'][0]['lb_endpoints'][0]['endpoint']
    assert address['address']['socket_address'] == {'address': '10.0.0.9', 'port_value': 7000}


def test_envoy_cli_writes_both_files(tmp_path):
    from gateway.main import main
    main(['envoy', '--out', str(tmp_path), '--grpc-upstream', 'ctl:5000'])
    assert (tmp_path / 'descriptors.binpb').exists()
    assert '"port_value": 5000' in (tmp_path / 'envoy.yaml').read_text()


# ------------------------------------------------------------------ router

def router(*entries):
    r = routes.Router()
    for method, template in entries:
        r.add(method, template, template)
    return r


def test_literal_route_wins_over_a_variable():
    r = router(('GET', '/a/{x}'), ('GET', '/a/b'), ('GET', '/a/{x}/c'))
    assert r.match('GET', '/a/b') == ('/a/b', {})
    assert r.match('GET', '/a/z') == ('/a/{x}', {'x': 'z'})
    assert r.match('GET', '/a/b/c') == ('/a/{x}/c', {'x': 'b'})  # backtracks past the literal


def test_template_forms():
    r = router(('GET', '/v/{name=shelves/*}/books'), ('GET', '/f/{path=**}'),
               ('POST', '/x/{a.b}:run'), ('GET', '/'))
    assert r.match('GET', '/v/shelves/s1/books') == ('/v/{name=shelves/*}/books',
                                                     {'name': 'shelves/s1'})
    assert r.match('GET', '/f/a/b/c') == ('/f/{path=**}', {'path': 'a/b/c'})
    assert r.match('POST', '/x/7:run') == ('/x/{a.b}:run', {'a': {'b': '7'}})
    assert r.match('GET', '/x%20y'.replace('x%20y', '')) == ('/', {})
    with pytest.raises(routes.NotFound):
        r.match('POST', '/x/7')


def test_path_variables_are_percent_decoded():
    r = router(('GET', '/i/{ref}'))
    assert r.match('GET', '/i/a%20b%2Fc') == ('/i/{ref}', {'ref': 'a b/c'})


def test_method_not_allowed_lists_the_allowed_methods():
    r = router(('GET', '/i/{ref}'), ('DELETE', '/i/{ref}'))
    with pytest.raises(routes.MethodNotAllowed) as e:
        r.match('PUT', '/i/x')
    assert e.value.allowed == ['DELETE', 'GET']


def test_bad_templates_are_refused():
    for template in ['no-slash', '/a/**/b', '/a/{x']:
        with pytest.raises(ValueError):
            routes.parse(template)
    with pytest.raises(ValueError):
        router(('GET', '/a/{x}'), ('GET', '/a/{y}'))
