"""Authentication, namespace scoping and the error model, for every RPC.

Access comes from the schema: each method's (shakenfist.v1.access) option.
shakenfist.v1 methods without it are ACCESS_NAMESPACE; health and reflection
are public. The node API (NodeControlService) takes no token: the caller is the
node its TLS client certificate names (CN "node:<name>", issued by the
cluster CA), and nothing else may call it. The controllers' BlobPeerService
takes only a controller's certificate (CN "controller:<name>"). Handlers raise ApiError; this turns it into a gRPC status with
ErrorInfo. Anything unexpected is logged and answered INTERNAL, with no
traceback for the caller.
"""

import functools
import logging
import uuid

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from sfcommon import errors
from sfcontrol import caller, limits
from sfcontrol.caller import Caller
from sfcontrol.store.etcd import StoreError
from shakenfist.v1 import wire_pb2

log = logging.getLogger(__name__)
PUBLIC, NAMESPACE, SYSTEM = wire_pb2.ACCESS_PUBLIC, wire_pb2.ACCESS_NAMESPACE, wire_pb2.ACCESS_SYSTEM
NODE = -1       # not a value of the public schema's Access: the node API's own
CONTROLLER = -2     # nor this: the controller-to-controller API's
_PUBLIC_SERVICES = ('grpc.health.v1.Health', 'grpc.reflection.v1alpha.ServerReflection',
                    'grpc.reflection.v1.ServerReflection')
_NODE_SERVICE = 'shakenfist.node.v1alpha1.NodeControlService'
_PEER_SERVICE = 'shakenfist.peer.v1alpha1.BlobPeerService'
NODE_CN_PREFIX = 'node:'
CONTROLLER_CN_PREFIX = 'controller:'


@functools.cache
def access_of(method: str) -> int:
    """The access policy of '/package.Service/Method'."""
    service, name = method.lstrip('/').rsplit('/', 1)
    if service in _PUBLIC_SERVICES:
        return PUBLIC
    if service == _NODE_SERVICE:
        return NODE
    if service == _PEER_SERVICE:
        return CONTROLLER
    try:
        desc = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return SYSTEM
    if not service.startswith('shakenfist.v1.'):
        return SYSTEM
    return desc.GetOptions().Extensions[wire_pb2.access] or NAMESPACE


class ApiInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth_provider):
        self._auth = auth_provider     # a callable returning the Auth (set once started)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        access = access_of(method)
        auth = self._auth

        def enter(context):
            md = dict(context.invocation_metadata() or ())
            request_id = md.get('x-request-id') or str(uuid.uuid4())
            if access == PUBLIC:
                who = Caller('', '', request_id, address=address_of(context, md))
            elif access == NODE:
                who = Caller('', '', request_id, node=node_of(context))
            elif access == CONTROLLER:
                who = Caller('', '', request_id, controller=controller_of(context))
            else:
                who = auth().authenticate(md.get('authorization'), request_id)
                if access == SYSTEM and not who.is_system:
                    raise errors.PermissionDenied('only the system namespace may do this')
            caller.set_current(who)
            caller.current_method.set(method)

        async def fail(context, e):
            if isinstance(e, errors.ApiError):
                err = e
            elif isinstance(e, StoreError):
                log.warning('%s: store failure: %s', method, e)
                err = errors.Unavailable('the state store is unavailable; retry')
            elif isinstance(e, TimeoutError):
                err = errors.Unavailable('timed out waiting for the state store; retry')
            elif isinstance(e, NotImplementedError):
                # An RPC of the schema whose implementation has not landed yet.
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f'{method} is not implemented yet')
            else:
                log.exception('%s failed', method)
                err = errors.Internal('internal error')
            await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())

        def unary(behaviour):
            async def wrapped(request, context):
                try:
                    enter(context)
                    return await behaviour(request, context)
                except Exception as e:   # noqa: BLE001 -- every failure becomes a status
                    if _is_abort(e):
                        raise
                    await fail(context, e)
            return wrapped

        def streaming(behaviour):
            async def wrapped(request, context):
                try:
                    enter(context)
                    async for item in behaviour(request, context):
                        yield item
                except Exception as e:   # noqa: BLE001
                    if _is_abort(e):
                        raise
                    await fail(context, e)
            return wrapped

        kw = dict(request_deserializer=_tolerant(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
        check = limits.for_method(method)   # the schema's limits; None outside shakenfist.v1
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(_checked(handler.unary_unary, check)), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(_checked(handler.unary_stream, check)), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                unary(_checked_stream(handler.stream_unary, check)), **kw)
        return grpc.stream_stream_rpc_method_handler(
            streaming(_checked_stream(handler.stream_stream, check)), **kw)


def address_of(context, md) -> str:
    """The client's address: the first X-Forwarded-For hop (the gateway sets it), else the
    peer's. A direct caller can claim any address this way; it only chooses which failure
    bucket it spends (auth.FailureLimiter), and scrypt runs one at a time regardless."""
    forwarded = md.get('x-forwarded-for', '').split(',')[0].strip()
    if forwarded:
        return forwarded[:64]
    peer = context.peer() or ''                 # 'ipv4:127.0.0.1:4321', 'ipv6:[::1]:4321'
    return peer.split(':', 1)[-1].rsplit(':', 1)[0]


def node_of(context) -> str:
    """The node a node-API caller's certificate names; UNAUTHENTICATED without one."""
    names = context.auth_context().get('x509_common_name') or [b'']
    cn = names[0].decode(errors='replace')
    if not cn.startswith(NODE_CN_PREFIX) or len(cn) == len(NODE_CN_PREFIX):
        raise errors.Unauthenticated('the node API needs a node certificate of this cluster, '
                                     'on the node port')
    return cn[len(NODE_CN_PREFIX):]


def controller_of(context) -> str:
    """The controller a peer caller's certificate names; a node's or none is refused."""
    names = context.auth_context().get('x509_common_name') or [b'']
    cn = names[0].decode(errors='replace')
    if not names[0]:
        raise errors.Unauthenticated('this API needs a controller certificate of this cluster, '
                                     'on the node port')
    if not cn.startswith(CONTROLLER_CN_PREFIX) or len(cn) == len(CONTROLLER_CN_PREFIX):
        raise errors.PermissionDenied('only a controller of this cluster may call this')
    return cn[len(CONTROLLER_CN_PREFIX):]


class _Undecodable:
    """A request message that did not parse. grpc.aio lets the deserializer's
    exception escape as UNKNOWN (with a logged traceback); the handler reports
    this instead as INVALID_ARGUMENT, after authentication."""

    def __init__(self, problem: str):
        self.problem = problem

    def error(self):
        return errors.InvalidArgument(f'the request message could not be parsed: {self.problem}')


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def deserialize(data):
        try:
            return deserializer(data)
        except DecodeError as e:
            return _Undecodable(str(e))
    return deserialize


def _checked(behaviour, check=None):
    """A unary-request behaviour that refuses an undecodable request, and (with check)
    one over the schema's limits, before the handler sees it."""
    def call(request, context):
        if isinstance(request, _Undecodable):
            raise request.error()
        if check is not None:
            check(request)
        return behaviour(request, context)
    return call


def _checked_stream(behaviour, check=None):
    """A streaming-request behaviour whose request stream fails at an undecodable
    message, or (with check) at one over the schema's limits."""
    async def requests(iterator):
        async for message in iterator:
            if isinstance(message, _Undecodable):
                raise message.error()
            if check is not None:
                check(message)
            yield message

    def call(request_iterator, context):
        return behaviour(requests(request_iterator), context)
    return call


def _is_abort(e: BaseException) -> bool:
    # context.abort() raises this to end the RPC; it must pass through.
    return isinstance(e, grpc.aio.AbortError) or type(e).__name__ == 'AbortError'
