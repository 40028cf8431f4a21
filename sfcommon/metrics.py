"""Prometheus metrics shared by the controller, the node and the gateway.

One registry per process (prometheus_client's default). Metrics are created once,
at import, so any number of controllers, nodes and gateways in one process (as in
the tests) share them without registering anything twice; what is computed at
scrape time comes from collectors over objects that register themselves (Live).

The gRPC metrics use grpc-ecosystem/go-grpc-prometheus's names and labels, so its
dashboards work: grpc_server_handled_total{grpc_service, grpc_method, grpc_type,
grpc_code} and grpc_server_handling_seconds, and the same for clients. Per call the
cost is a dict lookup, a counter and a histogram: each method's label children are
bound once.

    server = await start_metrics_server('127.0.0.1:9101')   # GET /metrics
    ...
    await server.close()
"""

import asyncio
import time
import weakref

import grpc
import prometheus_client
from aiohttp import web
from prometheus_client import Counter, Histogram, exposition

# Seconds. Fine below 10 ms (a cached read takes about 1 ms), coarse up to a minute.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)

# Each counter would otherwise carry a second series, *_created, of little use here.
prometheus_client.disable_created_metrics()

_GRPC_LABELS = ('grpc_service', 'grpc_method', 'grpc_type')
GRPC_SERVER_HANDLED = Counter('grpc_server_handled_total',
                              'RPCs completed on the server, by method and status code',
                              (*_GRPC_LABELS, 'grpc_code'))
GRPC_SERVER_SECONDS = Histogram('grpc_server_handling_seconds',
                                'Time to complete an RPC on the server (a stream: its whole life)',
                                _GRPC_LABELS, buckets=LATENCY_BUCKETS)
GRPC_CLIENT_HANDLED = Counter('grpc_client_handled_total',
                              'Unary RPCs completed by this client, by method and status code',
                              (*_GRPC_LABELS, 'grpc_code'))
GRPC_CLIENT_SECONDS = Histogram('grpc_client_handling_seconds',
                                'Time for a unary RPC of this client to complete',
                                _GRPC_LABELS, buckets=LATENCY_BUCKETS)

_OK, _UNKNOWN, _CANCELLED = grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED


class _Method:
    """One method's label children: the histogram's, and the counter's per status code."""

    __slots__ = ('_counter', '_handled', '_labels', 'seconds')

    def __init__(self, counter: Counter, histogram: Histogram, method, grpc_type: str):
        if isinstance(method, bytes):
            method = method.decode()
        service, _, name = method.lstrip('/').rpartition('/')
        self._labels = (service, name, grpc_type)
        self._counter = counter
        self._handled = {}
        self.seconds = histogram.labels(*self._labels)

    def done(self, code: grpc.StatusCode, seconds: float):
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._counter.labels(*self._labels, code.name)
        child.inc()
        self.seconds.observe(seconds)


_server_methods: dict[str, _Method] = {}
_client_methods: dict[object, _Method] = {}


def _server_method(method: str, handler) -> _Method:
    m = _server_methods.get(method)
    if m is None:
        kind = ('bidi_stream' if handler.response_streaming else 'client_stream') \
            if handler.request_streaming else \
            ('server_stream' if handler.response_streaming else 'unary')
        m = _server_methods[method] = _Method(GRPC_SERVER_HANDLED, GRPC_SERVER_SECONDS, method, kind)
    return m


def _failed_code(e: BaseException, context) -> grpc.StatusCode:
    if isinstance(e, (GeneratorExit, asyncio.CancelledError)):
        return _CANCELLED
    # context.abort() (an AbortError) has set the code; anything else is UNKNOWN, as gRPC answers.
    return context.code() or _UNKNOWN


class ServerMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every RPC by method and status code. Put it first in the
    server's interceptors, so that it sees the code the others answer with."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        m = _server_method(details.method, handler)
        kw = {'request_deserializer': handler.request_deserializer,
              'response_serializer': handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_timed(handler.unary_unary, m), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_timed_stream(handler.unary_stream, m), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_timed(handler.stream_unary, m), **kw)
        return grpc.stream_stream_rpc_method_handler(_timed_stream(handler.stream_stream, m), **kw)


def _timed(behaviour, m: _Method):
    async def wrapped(request, context):
        started = time.perf_counter()
        try:
            response = await behaviour(request, context)
        except BaseException as e:
            m.done(_failed_code(e, context), time.perf_counter() - started)
            raise
        m.done(context.code() or _OK, time.perf_counter() - started)
        return response
    return wrapped


def _timed_stream(behaviour, m: _Method):
    async def wrapped(request, context):
        started = time.perf_counter()
        try:
            result = behaviour(request, context)
            if hasattr(result, '__aiter__'):
                async for item in result:
                    yield item
            else:   # a handler that writes with context.write() and returns
                await result
        except BaseException as e:
            m.done(_failed_code(e, context), time.perf_counter() - started)
            raise
        m.done(context.code() or _OK, time.perf_counter() - started)
    return wrapped


class ClientMetrics(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts and times a channel's unary calls by method and status code."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        m = _client_methods.get(method)
        if m is None:
            m = _client_methods[method] = _Method(GRPC_CLIENT_HANDLED, GRPC_CLIENT_SECONDS, method, 'unary')
        started = time.perf_counter()
        try:
            call = await continuation(client_call_details, request)
            code = await call.code()
        except asyncio.CancelledError:
            m.done(_CANCELLED, time.perf_counter() - started)
            raise
        m.done(code, time.perf_counter() - started)
        return call


class Live:
    """The objects a scrape-time collector reads: each adds itself when it starts and
    is discarded when it stops (or is collected), so a collector registered once per
    process serves every controller or node in it."""

    def __init__(self):
        self._objects = weakref.WeakSet()

    def add(self, obj):
        self._objects.add(obj)

    def discard(self, obj):
        self._objects.discard(obj)

    def __iter__(self):
        return iter(list(self._objects))


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The process's metrics in the exposition format the Accept header asks for:
    (body, Content-Type)."""
    encode, content_type = exposition.choose_encoder(accept or '')
    return encode(prometheus_client.REGISTRY), content_type


async def _serve(request: web.BaseRequest) -> web.StreamResponse:
    if request.path != '/metrics':
        return web.Response(status=404, text='only /metrics is served here\n')
    if request.method not in ('GET', 'HEAD'):
        return web.Response(status=405, headers={'Allow': 'GET, HEAD'})
    body, content_type = render(request.headers.get('Accept'))
    return web.Response(body=body, headers={'Content-Type': content_type})


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(':')
    if not sep or not port.isdigit():
        raise ValueError(f'metrics listen address: expected HOST:PORT, not {listen!r}')
    return host.strip('[]') or '0.0.0.0', int(port)


class MetricsServer:
    """An HTTP server of GET /metrics; port is the one it listens on (listen may say 0)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int):
        self._runner, self.host, self.port = runner, host, port

    @property
    def url(self) -> str:
        host = f'[{self.host}]' if ':' in self.host else self.host
        return f'http://{host}:{self.port}/metrics'

    async def close(self):
        await self._runner.cleanup()


async def start_metrics_server(listen: str) -> MetricsServer:
    """Serve this process's metrics on listen (host:port) until close(). Plain HTTP and
    no authentication, as Prometheus scrapes: listen on loopback or a management network."""
    host, port = _host_port(listen)
    runner = web.ServerRunner(web.Server(_serve), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return MetricsServer(runner, host, runner.addresses[0][1])
