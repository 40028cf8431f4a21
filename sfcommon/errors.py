"""One error model for gRPC and REST.

Business logic raises an ApiError subclass, one per ErrorReason in the schema
(protos/shakenfist/v1/errors.proto): `raise errors.NotFound('no such instance')`,
`except errors.StateConflict:`. The gRPC code and the HTTP status both come from
the reason's options in the schema, and the status sent to the client carries a
google.rpc.ErrorInfo with that reason (packed and read with grpc_status), so the
gateway needs no table of its own beyond the schema.
"""

import functools
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shakenfist.v1 import errors_pb2, wire_pb2

DOMAIN = 'shakenfist.v1'
_PREFIX = 'ERROR_REASON_'
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@functools.cache
def _reason_options(reason: int):
    value = errors_pb2.ErrorReason.DESCRIPTOR.values_by_number[reason]
    opts = value.GetOptions()
    return (value.name[len(_PREFIX):], _CODES[opts.Extensions[wire_pb2.grpc_code]],
            opts.Extensions[wire_pb2.http_status])


class ApiError(Exception):
    """A failure to report to the caller. The message is for users: no internals."""
    reason: int = errors_pb2.ERROR_REASON_INTERNAL

    def __init__(self, message: str, **metadata: str):
        super().__init__(message)
        self.message = message
        self.metadata = metadata

    @property
    def reason_name(self) -> str:
        return _reason_options(self.reason)[0]

    @property
    def code(self) -> grpc.StatusCode:
        return _reason_options(self.reason)[1]

    @property
    def http_status(self) -> int:
        return _reason_options(self.reason)[2]

    def to_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason_name, domain=DOMAIN,
                                           metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])

    def trailing_metadata(self):
        return rpc_status.to_status(self.to_status()).trailing_metadata

    def __repr__(self):
        return f'{type(self).__name__}({self.message!r})'


class InvalidArgument(ApiError):
    reason = errors_pb2.ERROR_REASON_INVALID_ARGUMENT


class Unauthenticated(ApiError):
    reason = errors_pb2.ERROR_REASON_UNAUTHENTICATED


class PermissionDenied(ApiError):
    reason = errors_pb2.ERROR_REASON_PERMISSION_DENIED


class NotFound(ApiError):
    reason = errors_pb2.ERROR_REASON_NOT_FOUND


class NotReady(ApiError):
    reason = errors_pb2.ERROR_REASON_NOT_READY


class StateConflict(ApiError):
    reason = errors_pb2.ERROR_REASON_STATE_CONFLICT


class AlreadyExists(ApiError):
    reason = errors_pb2.ERROR_REASON_ALREADY_EXISTS


class PayloadTooLarge(ApiError):
    reason = errors_pb2.ERROR_REASON_PAYLOAD_TOO_LARGE


class InsufficientResources(ApiError):
    reason = errors_pb2.ERROR_REASON_INSUFFICIENT_RESOURCES


class CursorExpired(ApiError):
    reason = errors_pb2.ERROR_REASON_CURSOR_EXPIRED


class AgentNotReady(ApiError):
    reason = errors_pb2.ERROR_REASON_AGENT_NOT_READY


class Unavailable(ApiError):
    reason = errors_pb2.ERROR_REASON_UNAVAILABLE


class Internal(ApiError):
    reason = errors_pb2.ERROR_REASON_INTERNAL


class TooManyRequests(ApiError):
    reason = errors_pb2.ERROR_REASON_TOO_MANY_REQUESTS


BY_REASON: dict[int, type[ApiError]] = {
    cls.reason: cls for cls in (
        InvalidArgument, Unauthenticated, PermissionDenied, NotFound, NotReady, StateConflict,
        AlreadyExists, PayloadTooLarge, InsufficientResources, CursorExpired, AgentNotReady,
        Unavailable, Internal, TooManyRequests)}

def from_rpc_error(err: grpc.RpcError) -> ApiError | None:
    """The ApiError a failed call carries in its ErrorInfo, if it carries one
    this schema knows (and its rich status agrees with the call's own)."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return None
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            value = errors_pb2.ErrorReason.DESCRIPTOR.values_by_name.get(_PREFIX + info.reason)
            cls = BY_REASON.get(value.number) if value else None
            return cls(status.message, **dict(info.metadata)) if cls else None
    return None


def reported(method):
    """Decorate a unary gRPC servicer method: an ApiError becomes its status with
    ErrorInfo; anything unexpected is logged and answered INTERNAL, no traceback."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ApiError as e:
            err = e
        except Exception:
            logging.getLogger(method.__module__).exception('%s failed', method.__name__)
            err = Internal('internal error')
        await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
    return wrapper


def reported_stream(method):
    """reported, for a servicer method that is an async generator (a response stream)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
            return
        except ApiError as e:
            err = e
        except Exception:
            logging.getLogger(method.__module__).exception('%s failed', method.__name__)
            err = Internal('internal error')
        await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
    return wrapper
