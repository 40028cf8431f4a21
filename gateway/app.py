"""The REST gateway: aiohttp in front, one grpc.aio channel behind.

Every route comes from the google.api.http bindings in the descriptors. All
per-method work (path templates, body handling, response rendering, the gRPC
multicallables) is done once at start-up into an Endpoint; a request is then
a trie lookup, a JSON parse, one gRPC call and a render.
"""

import asyncio
import contextlib
import json
import logging
import pathlib
import re
import ssl
import time
import urllib.parse
import uuid

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import Counter, Histogram

from gateway import codec, http_server, openapi, routes, schema, webui
from sfcommon import errors, metrics
from sfcommon.listen import refuse_plaintext
from shakenfist.v1 import wire_pb2

log = logging.getLogger('gateway')

MiB = 1024 * 1024
DEFAULT_MAX_BODY = 10 * MiB
DEFAULT_TIMEOUT = 60.0
DEFAULT_STREAM_TIMEOUT = 3600.0
DEFAULT_BODY_TIMEOUT = 30.0  # seconds a request body may pause before 408
UPLOAD_CHUNK = MiB  # bytes per message when streaming a request body
WS_MAX_FRAME = MiB + 1024   # a WebSocket frame: one message's bytes, at most 1 MiB
WS_HEARTBEAT = 30.0         # seconds between pings that keep a quiet WebSocket alive
CLIENT_CHECK_INTERVAL = 1.0  # seconds between checks that a streaming client is still there

JSON = 'application/json'
BODY_LENGTH = 'x-body-length'   # metadata: the bytes a streamed body must carry
OCTET_STREAM = 'application/octet-stream'
NDJSON = 'application/x-ndjson'
NULL = b'null'

# gRPC code -> HTTP status, for errors that carry no ErrorInfo: every code but OK.
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 507, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.DATA_LOSS: 500,
}
_METADATA_VALUE = re.compile(r'[\x20-\x7e]+')  # what gRPC accepts in ASCII metadata
# Well below gRPC's 8 KiB for all metadata (our tokens are a few hundred bytes).
MAX_AUTHORIZATION = 4096
_REQUEST_ID = re.compile(r'[\x21-\x7e]{1,128}')
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(',', ':')).encode
# The channel to the controller. No retries: the gateway's calls are made once, as
# its client asked (and the retry filter costs every call; bench P2). No proxy: the
# controller is reached directly, whatever http_proxy says.
CHANNEL_OPTIONS = (('grpc.max_receive_message_length', -1), ('grpc.enable_retries', 0),
                   ('grpc.enable_http_proxy', 0))


REQUESTS = Counter('sf_gateway_requests_total',
                   'REST requests answered, by route template, method and HTTP status '
                   '(499: the client left first)', ['route', 'method', 'status'])
REQUEST_SECONDS = Histogram('sf_gateway_request_duration_seconds',
                            'Time to answer a REST request (a stream: its whole life)',
                            ['route', 'method'], buckets=metrics.LATENCY_BUCKETS)
UNMATCHED = '(unmatched)'   # the route of requests no route took (404, 405, 400, 417)
CLIENT_LEFT = 499           # nginx's status for a request whose client went away
_METHODS = frozenset(('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'))


class RouteMetrics:
    """One route's label children, bound once: a request costs a dict lookup, a
    counter and a histogram."""

    __slots__ = ('_statuses', 'method', 'route', 'seconds')

    def __init__(self, route, method):
        self.route, self.method = route, method
        self._statuses = {}
        self.seconds = REQUEST_SECONDS.labels(route, method)

    def done(self, status, seconds):
        child = self._statuses.get(status)
        if child is None:
            child = self._statuses[status] = REQUESTS.labels(self.route, self.method, str(status))
        child.inc()
        self.seconds.observe(seconds)


_UNMATCHED = {m: RouteMetrics(UNMATCHED, m) for m in (*_METHODS, 'other')}


def _unmatched(method):
    return _UNMATCHED[method if method in _METHODS else 'other']


class _Page:
    """One of the gateway's own pages: serve(request, rid) answers it."""

    __slots__ = ('metrics', 'serve')

    def __init__(self, path, serve):
        self.serve, self.metrics = serve, RouteMetrics(path, 'GET')


class HttpError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class _RequestIds:
    """Request IDs for requests that bring none: UUID-shaped, a random prefix drawn
    once per process and a counter (uuid4 per request is a getrandom call and a UUID
    object each; these only need to be unique and to look like UUIDs)."""

    def __init__(self):
        self._prefix = str(uuid.uuid4())[:24]   # 8-4-4-4- and nothing of the last group
        self._next = 0

    def __call__(self):
        self._next += 1
        return f'{self._prefix}{self._next & 0xffffffffffff:012x}'


_new_request_id = _RequestIds()


def _json_body(value):
    return _dumps(value).encode()


def _wire_key(field):
    return field.GetOptions().Extensions[wire_pb2.wire_name] or field.name


def _is_http_body(field):
    return field is not None and field.message_type is not None \
        and field.message_type.full_name == schema.HTTP_BODY


class Endpoint:
    """Everything needed to serve one binding, computed once."""

    def __init__(self, binding: schema.Binding):
        self.binding = binding
        self.request_class = binding.request_class
        self.path_keys = frozenset(path[0] for path in routes.variables(binding.template))
        fields = binding.input.fields_by_name
        self.repeated_keys = frozenset(
            key for f in binding.input.fields if f.is_repeated for key in (f.name, _wire_key(f)))

        # Request side: where the HTTP body goes.
        body_field = fields.get(binding.body) if binding.body not in ('', '*') else None
        if binding.body not in ('', '*') and body_field is None:
            raise ValueError(f'{binding.operation_id}: no request field {binding.body!r}')
        self.raw_body_field = binding.body if _is_http_body(body_field) else None
        self.body_key = _wire_key(body_field) if body_field and not self.raw_body_field else None
        self.chunked = binding.client_streaming and self.raw_body_field is not None

        # Response side: what becomes the HTTP body.
        out = binding.output
        selected = out.fields_by_name.get(binding.response_body) if binding.response_body else None
        if binding.response_body and selected is None:
            raise ValueError(f'{binding.operation_id}: no response field {binding.response_body!r}')
        self.raw_response_field = binding.response_body if _is_http_body(selected) else None
        if selected is not None:
            key = _wire_key(selected)
            self.encode = lambda m: _json_body(codec.to_wire(m).get(key))
        elif out.fields:
            self.encode = lambda m: _json_body(codec.to_wire(m))
        else:
            self.encode = lambda m: NULL  # a void call: Shaken Fist answers null
        # The page token has no place in a bare-list body, so it moves to a header.
        self.page_token = selected is not None and 'next_page_token' in out.fields_by_name \
            and binding.response_body != 'next_page_token'

        self.streaming = binding.client_streaming or binding.server_streaming
        # Both ways: a WebSocket whose binary frames are the messages' one bytes field.
        self.websocket = binding.client_streaming and binding.server_streaming
        if self.websocket:
            self.ws_in = _bytes_field(binding.input)
            self.ws_out = _bytes_field(out)
        self.kind = ('stream' if binding.client_streaming else 'unary') + '_' + \
            ('stream' if binding.server_streaming else 'unary')  # a grpc.aio.Channel method
        self.call = None  # the multicallable, made when the channel exists
        self.metrics = RouteMetrics(binding.template, binding.http_method)

    def connect(self, channel):
        self.call = getattr(channel, self.kind)(
            self.binding.grpc_path,
            request_serializer=self.request_class.SerializeToString,
            response_deserializer=self.binding.response_class.FromString)


class Gateway:
    def __init__(self, grpc_target, *, max_body=DEFAULT_MAX_BODY, timeout=DEFAULT_TIMEOUT,
                 stream_timeout=DEFAULT_STREAM_TIMEOUT, channel_options=(),
                 header_timeout=http_server.DEFAULT_HEADER_TIMEOUT,
                 body_timeout=DEFAULT_BODY_TIMEOUT,
                 idle_timeout=http_server.DEFAULT_IDLE_TIMEOUT,
                 max_connections=http_server.DEFAULT_MAX_CONNECTIONS,
                 grpc_ca=None, grpc_server_name=None, ui_vendor=None):
        self.grpc_target = grpc_target
        # TLS to the controller: its CA (PEM file) and, if its certificate does not
        # name grpc_target's host, the name it carries.
        self.grpc_ca, self.grpc_server_name = grpc_ca, grpc_server_name
        self.max_body = max_body
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        # Client limits. The body's is applied here; the others by http_server.Site.
        for name, value in [('header_timeout', header_timeout), ('body_timeout', body_timeout),
                            ('idle_timeout', idle_timeout), ('max_connections', max_connections)]:
            if not value > 0:
                raise ValueError(f'{name} must be positive, not {value!r}')
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.channel_options = [*CHANNEL_OPTIONS, *channel_options]
        self.channel = None
        self.endpoints = [Endpoint(b) for b in schema.bindings()]
        self.router = routes.Router()
        for e in self.endpoints:
            self.router.add(e.binding.http_method, e.binding.template, e)
        # The gateway's own pages, built once.
        document = openapi.document()
        self._openapi = _json_body(document)
        self._docs = openapi.html(document).encode()
        # Prometheus metrics of this process, unauthenticated (as Prometheus scrapes).
        self.ui = webui.WebUi(ui_vendor)
        self.ui.metrics = RouteMetrics(webui.PREFIX + '/*', 'GET')
        for path, serve in [('/openapi.json', self._serve_openapi), ('/docs', self._serve_docs),
                            ('/metrics', self._serve_metrics)]:
            self.router.add('GET', path, _Page(path, serve))

    # ------------------------------------------------------------ lifecycle

    async def on_startup(self, app):
        # grpc.aio channels bind to the running loop, so this cannot happen earlier.
        if self.grpc_ca:
            credentials = grpc.ssl_channel_credentials(pathlib.Path(self.grpc_ca).read_bytes())
            override = [('grpc.ssl_target_name_override', self.grpc_server_name)] \
                if self.grpc_server_name else []
            self.channel = grpc.aio.secure_channel(self.grpc_target, credentials,
                                                   options=[*self.channel_options, *override])
        else:
            self.channel = grpc.aio.insecure_channel(self.grpc_target, options=self.channel_options)
        for e in self.endpoints:
            e.connect(self.channel)

    async def on_cleanup(self, app):
        if self.channel is not None:
            await self.channel.close()

    # ------------------------------------------------------------- handling

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = None    # the target's RouteMetrics, once matched
        rid = request.headers.get('X-Request-ID')
        if rid is None or not _REQUEST_ID.fullmatch(rid):
            rid = _new_request_id()
        try:
            await _expect(request)
            if self.ui.claims(request.path) and request.method in ('GET', 'HEAD'):
                route = self.ui.metrics
                response = self.ui.serve(request, rid)
                route.done(response.status, time.perf_counter() - started)
                return response
            target, params = self.router.match(request.method, request.rel_url.raw_path)
            route = target.metrics
            if isinstance(target, Endpoint):
                response = await self._forward(request, target, params, rid)
            else:
                response = target.serve(request, rid)
        except routes.NotFound:
            response = _error(404, f'no route for {request.method} {request.path}', rid)
        except webui.Missing as e:
            response = _error(404, str(e), rid)
        except routes.BadPath as e:
            response = _error(400, str(e), rid)
        except routes.MethodNotAllowed as e:
            response = _error(405, f'{request.method} is not allowed here; allowed: {e}', rid,
                              {'Allow': ', '.join(e.allowed)})
        except HttpError as e:
            response = _error(e.status, e.message, rid, e.headers)
        except codec.WireError as e:
            response = _error(400, str(e), rid)
        except grpc.aio.AioRpcError as e:
            response = _rpc_error(e, rid)
        except web.HTTPRequestEntityTooLarge:
            response = _error(413, 'request body too large', rid)
        except (asyncio.CancelledError, ConnectionResetError):
            (route or _unmatched(request.method)).done(CLIENT_LEFT, time.perf_counter() - started)
            raise
        except Exception:
            log.exception('request failed', extra={'request_id': rid})
            response = _error(500, 'internal error', rid)
        (route or _unmatched(request.method)).done(response.status, time.perf_counter() - started)
        return response

    def _serve_openapi(self, request, rid):
        return web.Response(body=self._openapi, content_type=JSON, headers={'X-Request-ID': rid})

    def _serve_docs(self, request, rid):
        return web.Response(body=self._docs, content_type='text/html', charset='utf-8',
                            headers={'X-Request-ID': rid})

    def _serve_metrics(self, request, rid):
        body, content_type = metrics.render(request.headers.get('Accept'))
        return web.Response(body=body, headers={'Content-Type': content_type, 'X-Request-ID': rid})

    def _metadata(self, request, rid):
        # The client's address as the gateway sees it (never a header the client sent):
        # the controller limits failed logins per client by it.
        metadata = [('x-request-id', rid), ('x-forwarded-for', request.remote or '')]
        auth = request.headers.get('Authorization')
        if auth is not None:
            # 400 rather than 401: the gateway cannot forward this header at all, so
            # no one has judged the credentials (and 401 promises WWW-Authenticate).
            if len(auth) > MAX_AUTHORIZATION:
                raise HttpError(400, f'the Authorization header is longer than {MAX_AUTHORIZATION} bytes')
            if not _METADATA_VALUE.fullmatch(auth):
                raise HttpError(400, 'the Authorization header is not printable ASCII')
            metadata.append(('authorization', auth))
        return metadata

    async def _forward(self, request, e: Endpoint, params, rid):
        metadata = self._metadata(request, rid)
        content_type = _content_type(request) if e.raw_body_field else None
        body = _Body(request, self.body_timeout)
        # Path variables, then the body, then query parameters.
        message = e.request_class()
        if params:
            codec.from_wire(message, params)
        if not e.chunked:
            await self._read_body(request, body, e, message, content_type)
        raw_query = request.rel_url.raw_query_string
        if raw_query:
            codec.from_wire(message, _query(raw_query, e.repeated_keys), ignore=e.path_keys)
        if e.websocket:
            return await self._websocket(request, e, message, metadata)

        if e.chunked:
            messages = _chunks(body, message, e.raw_body_field, content_type)
            if request.content_length is not None:
                # A stream cut short (the client stalled or left, and the call is
                # cancelled) ends like a whole one on the server: this tells them apart.
                metadata.append((BODY_LENGTH, str(request.content_length)))
        elif e.binding.client_streaming:
            messages = _one(message)
        else:
            messages = message
        timeout = self.stream_timeout if e.streaming else self.timeout
        call = e.call(messages, timeout=timeout, metadata=metadata)
        if e.binding.server_streaming:
            return await self._stream(request, e, call, rid)
        try:
            response = await call
        except asyncio.CancelledError:
            # A body that fails inside the request iterator only cancels the call.
            if body.error is not None and not asyncio.current_task().cancelling():
                raise body.error from None
            raise
        return self._respond(e, response, rid)

    async def _websocket(self, request, e: Endpoint, first, metadata):
        """A two-way stream as a WebSocket. The handshake's request (path, query, body) is
        the first message, as for any other call. Then binary frames (and text frames, as UTF-8) carry
        the bytes of the request's bytes field; responses come back as binary frames. Without
        an Authorization header (browsers cannot send one) the first frame must be text:
        {"authorization": "Bearer <token>"}. A failure is a last text frame in the error
        model, then a close with code 4000 + the HTTP status."""
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_FRAME, heartbeat=WS_HEARTBEAT)
        if not ws.can_prepare(request).ok:
            raise HttpError(426, f'{e.binding.template} is a WebSocket: send Upgrade: websocket',
                            {'Upgrade': 'websocket'})
        await ws.prepare(request)
        try:
            if not any(key == 'authorization' for key, _ in metadata):
                metadata.append(('authorization', await _ws_authorization(ws, self.header_timeout)))
            call = e.call(_ws_requests(ws, e, first), timeout=self.stream_timeout, metadata=metadata)
            try:
                async for message in call:
                    data = getattr(message, e.ws_out)
                    if data:
                        await ws.send_bytes(data)
            finally:
                call.cancel()
            await ws.close()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                await _ws_fail(ws, *_rpc_status(err))
        except HttpError as err:
            await _ws_fail(ws, err.status, err.message)
        except ConnectionResetError:
            pass
        return ws

    async def _read_body(self, request, body, e, message, content_type):
        if not request.can_read_body:
            return
        if request.content_length is not None and request.content_length > self.max_body:
            raise HttpError(413, 'request body too large')
        raw = await body.read_all(self.max_body)
        if e.raw_body_field is not None:
            field = getattr(message, e.raw_body_field)
            field.data = raw
            field.content_type = content_type
            return
        if not raw.strip():
            return  # an empty body is {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as err:  # also UnicodeDecodeError
            raise HttpError(400, f'the request body is not valid JSON: {err}') from None
        if e.body_key is not None:
            codec.from_wire(message, {e.body_key: data})
            return
        if not isinstance(data, dict):
            raise HttpError(400, 'the request body must be a JSON object')
        codec.from_wire(message, data, ignore=e.path_keys)

    def _respond(self, e: Endpoint, response, rid):
        headers = {'X-Request-ID': rid}
        if e.page_token and response.next_page_token:
            headers['X-Next-Page-Token'] = response.next_page_token
        if e.raw_response_field is not None:
            body = getattr(response, e.raw_response_field)
            headers['Content-Type'] = body.content_type or OCTET_STREAM
            return web.Response(body=body.data, headers=headers)
        return web.Response(body=e.encode(response), content_type=JSON, headers=headers)

    async def _stream(self, request, e: Endpoint, call, rid):
        raw = e.raw_response_field
        reading = asyncio.ensure_future(call.read())
        try:
            # Wait for the first message so that an immediate failure is a
            # proper error response rather than a broken 200.
            first = await reading
            if raw is not None:
                content_type = OCTET_STREAM
                if first is not grpc.aio.EOF:
                    content_type = getattr(first, raw).content_type or OCTET_STREAM
            else:
                content_type = NDJSON
            response = web.StreamResponse(headers={'Content-Type': content_type,
                                                   'X-Request-ID': rid})
            try:
                await response.prepare(request)
                message = first
                while message is not grpc.aio.EOF:
                    if raw is not None:
                        await response.write(getattr(message, raw).data)
                    else:
                        await response.write(e.encode(message) + b'\n')
                    reading = asyncio.ensure_future(call.read())
                    message = await _next(request, reading)
            except ConnectionResetError:
                return response  # the client went away
            except grpc.aio.AioRpcError as err:
                # Too late for a status code. NDJSON readers get an error line;
                # for raw bytes, cutting the connection is the only signal.
                log.warning('stream %s failed: %s', e.binding.grpc_path, err.code(),
                            extra={'request_id': rid})
                if raw is not None:
                    if request.transport is not None:
                        request.transport.close()
                    return response
                status, text = _rpc_status(err)
                await response.write(http_server.error_json(status, text) + b'\n')
            await response.write_eof()
            return response
        finally:
            call.cancel()  # a no-op when finished; stops the RPC if the client left
            if not reading.done():
                reading.cancel()
            elif not reading.cancelled():
                reading.exception()  # seen, so asyncio does not report it as lost


def _bytes_field(descriptor) -> str:
    names = [f.name for f in descriptor.fields if f.type == f.TYPE_BYTES]
    if len(names) != 1:
        raise ValueError(f'{descriptor.full_name}: a WebSocket message needs one bytes field')
    return names[0]


async def _ws_authorization(ws, timeout) -> str:
    """The first frame's {"authorization": "Bearer <token>"}, checked as the header is."""
    try:
        frame = await ws.receive(timeout=timeout)
    except TimeoutError:
        raise HttpError(401, 'no authorization frame') from None
    try:
        auth = json.loads(frame.data)['authorization'] if frame.type == aiohttp.WSMsgType.TEXT else None
    except (ValueError, TypeError, KeyError):
        auth = None
    if not isinstance(auth, str) or not auth:
        raise HttpError(401, 'this WebSocket needs a token: send {"authorization": "Bearer <token>"} as its first frame')
    if len(auth) > MAX_AUTHORIZATION or not _METADATA_VALUE.fullmatch(auth):
        raise HttpError(400, f'the authorization is not printable ASCII of at most {MAX_AUTHORIZATION} bytes')
    return auth


async def _ws_requests(ws, e: Endpoint, first):
    """The request stream: first (the path's fields), then one message per frame."""
    yield first
    async for frame in ws:
        if frame.type == aiohttp.WSMsgType.BINARY:
            data = frame.data
        elif frame.type == aiohttp.WSMsgType.TEXT:
            data = frame.data.encode()
        else:
            break
        message = e.request_class()
        setattr(message, e.ws_in, data)
        yield message


async def _ws_fail(ws, status, text):
    if not ws.closed:
        with contextlib.suppress(ConnectionResetError):
            await ws.send_str(http_server.error_json(status, text).decode())
            await ws.close(code=4000 + status, message=text[:120].encode())


async def _expect(request):
    """The Expect header, as aiohttp's router would answer it (the gateway has its own)."""
    expect = request.headers.get('Expect')
    if expect is None or request.version != aiohttp.HttpVersion11:
        return
    if expect.lower() != '100-continue':
        raise HttpError(417, f'unknown Expect: {expect}')
    await request.writer.write(b'HTTP/1.1 100 Continue\r\n\r\n')
    request.writer.output_size = 0     # the response proper has not started


async def _next(request, reading):
    """The message reading gives; ConnectionResetError if the client leaves first
    (aiohttp does not cancel the handler then, and a quiet stream, such as a watch,
    would otherwise hold its gRPC call open until it next had something to write)."""
    while True:
        await asyncio.wait({reading}, timeout=CLIENT_CHECK_INTERVAL)
        if reading.done():
            return reading.result()
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError('the client went away')


def _content_type(request):
    value = request.headers.get('Content-Type', OCTET_STREAM)
    if value and not _METADATA_VALUE.fullmatch(value):
        raise HttpError(400, 'the Content-Type header is not printable ASCII')
    return value


def _query(raw_query, repeated_keys):
    """Query parameters as a JSON-like dict: a.b=x nests, repeated fields list.
    Bytes that are not UTF-8 stay as surrogates, for codec to refuse."""
    data = {}
    for key, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True,
                                             errors='surrogateescape'):
        *parents, leaf = key.split('.')
        target = data
        for name in parents:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise HttpError(400, f'query parameter {key!r} conflicts with another')
        if not parents and leaf in repeated_keys:
            target.setdefault(leaf, []).append(value)
        else:
            target[leaf] = value
    return data


async def _one(message):
    yield message


async def _chunks(reader, base, field, content_type):
    """Streams the request body as messages, each a copy of base with one
    piece of at most UPLOAD_CHUNK bytes; at least one message is sent."""
    sent = False
    while True:
        data = await reader.read(UPLOAD_CHUNK)
        if not data and sent:
            return
        message = type(base)()
        message.CopyFrom(base)
        body = getattr(message, field)
        body.data = data
        body.content_type = content_type
        yield message
        sent = True
        if len(data) < UPLOAD_CHUNK:
            return


class BodyTimeout(Exception):
    """Set on a request's stream when its body stops arriving: a failed body
    ends its connection after the response (see http_server)."""


class _Body:
    """A request body, read with a deadline on each wait for more: a client
    that sends nothing for `timeout` seconds gets 408, one that keeps sending
    takes as long as it needs (time spent waiting for gRPC is not counted: the
    body is not being read then). `error` keeps the HttpError raised, because
    inside the request iterator of a gRPC call it only shows as a cancelled call."""

    def __init__(self, request, timeout):
        self._stream, self._timeout = request.content, timeout
        self.error = None

    async def _wait(self, read):
        try:
            async with asyncio.timeout(self._timeout):
                return await read
        except TimeoutError:
            self._stream.set_exception(BodyTimeout())
            self.error = HttpError(408, 'the request body stopped arriving '
                                        f'(nothing for {self._timeout:g} seconds)')
        except web.RequestPayloadError as e:
            # Bad chunked framing or compression, found while reading.
            reason = str(e).strip().splitlines()[-1].strip()
            self.error = HttpError(400, f'the request body cannot be read: {reason}')
        raise self.error from None

    async def read_all(self, limit):
        data = bytearray()
        while chunk := await self._wait(self._stream.readany()):
            data += chunk
            if len(data) > limit:
                raise HttpError(413, 'request body too large')
        return bytes(data)

    async def read(self, size):
        """Up to size bytes, fewer only at the end of the body."""
        data = bytearray()
        while len(data) < size:
            more = await self._wait(self._stream.read(size - len(data)))
            if not more:
                break
            data += more
        return bytes(data)


def _error(status, message, rid, headers=None):
    all_headers = {'X-Request-ID': rid, **(headers or {})}
    return web.Response(status=status, body=http_server.error_json(status, message),
                        content_type=JSON, headers=all_headers)


def _rpc_status(err):
    """(HTTP status, message) for a failed call."""
    api_error = errors.from_rpc_error(err)
    if api_error is not None and api_error.http_status:
        return api_error.http_status, api_error.message
    return HTTP_STATUS[err.code()], err.details() or err.code().name.lower()


def _rpc_error(err, rid):
    status, message = _rpc_status(err)
    if status >= 500:
        log.warning('gRPC call failed: %s %s', err.code().name, err.details(),
                    extra={'request_id': rid})
    return _error(status, message, rid)




class _Runner(web.ServerRunner):
    """aiohttp's low-level server, straight to Gateway.handle: the gateway has its own
    router (aiohttp's would first fail to match every request, then answer plain-text
    404s for paths its patterns cannot hold, such as a decoded newline)."""

    def __init__(self, gateway: Gateway):
        super().__init__(web.Server(gateway.handle, client_max_size=gateway.max_body),
                         handle_signals=False)
        self.gateway = gateway

    async def _make_server(self):
        await self.gateway.on_startup(None)
        return await super()._make_server()

    async def _cleanup_server(self):
        await super()._cleanup_server()
        await self.gateway.on_cleanup(None)


async def start_gateway(grpc_target, host='127.0.0.1', port=0, *, tls_cert=None, tls_key=None,
                        **options):
    """Starts the gateway; returns (runner, the port it listens on). Stop it
    with `await runner.cleanup()`. HTTPS with tls_cert and tls_key (PEM files);
    plaintext only on loopback. options: see Gateway."""
    context = None
    if tls_cert and tls_key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
    else:
        refuse_plaintext('the REST gateway', host)
    gateway = Gateway(grpc_target, **options)
    runner = _Runner(gateway)
    await runner.setup()
    site = http_server.Site(runner, host, port, header_timeout=gateway.header_timeout,
                            idle_timeout=gateway.idle_timeout,
                            max_connections=gateway.max_connections, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1]
