"""One error model for gRPC and REST.

Business logic raises ApiError(reason, message). The gRPC code and the HTTP
status both come from the ErrorReason value's options in the schema
(protos/shakenfist/v1/errors.proto), and the status sent to the client carries
a google.rpc.ErrorInfo with that reason, so the gateway needs no table of its
own beyond the schema.
"""

import functools

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

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

    def __init__(self, reason: int, message: str, **metadata: str):
        super().__init__(message)
        self.reason = reason
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
        return (('grpc-status-details-bin', self.to_status().SerializeToString()),)

    def __repr__(self):
        return f'ApiError({self.reason_name}, {self.message!r})'


def _factory(reason):
    def make(message: str, **metadata: str) -> ApiError:
        return ApiError(reason, message, **metadata)
    return make


invalid = _factory(errors_pb2.ERROR_REASON_INVALID_ARGUMENT)
unauthenticated = _factory(errors_pb2.ERROR_REASON_UNAUTHENTICATED)
permission_denied = _factory(errors_pb2.ERROR_REASON_PERMISSION_DENIED)
not_found = _factory(errors_pb2.ERROR_REASON_NOT_FOUND)
not_ready = _factory(errors_pb2.ERROR_REASON_NOT_READY)
conflict = _factory(errors_pb2.ERROR_REASON_STATE_CONFLICT)
already_exists = _factory(errors_pb2.ERROR_REASON_ALREADY_EXISTS)
insufficient = _factory(errors_pb2.ERROR_REASON_INSUFFICIENT_RESOURCES)
too_large = _factory(errors_pb2.ERROR_REASON_PAYLOAD_TOO_LARGE)
too_many_requests = _factory(errors_pb2.ERROR_REASON_TOO_MANY_REQUESTS)
cursor_expired = _factory(errors_pb2.ERROR_REASON_CURSOR_EXPIRED)
agent_not_ready = _factory(errors_pb2.ERROR_REASON_AGENT_NOT_READY)
unavailable = _factory(errors_pb2.ERROR_REASON_UNAVAILABLE)
internal = _factory(errors_pb2.ERROR_REASON_INTERNAL)


def from_rpc_error(err: grpc.RpcError) -> ApiError | None:
    """The ApiError carried by a failed call, if it carries one (used by the gateway)."""
    for key, value in (err.trailing_metadata() or ()):
        if key == 'grpc-status-details-bin':
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == DOMAIN:
                    number = errors_pb2.ErrorReason.DESCRIPTOR.values_by_name.get(_PREFIX + info.reason)
                    if number is None:      # a reason newer than this schema
                        return None
                    return ApiError(number.number, status.message, **dict(info.metadata))
    return None


def reported(method):
    """Decorate a unary gRPC servicer method: an ApiError becomes its status with
    ErrorInfo; anything unexpected is logged and answered INTERNAL, no traceback."""
    import logging

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ApiError as e:
            err = e
        except Exception:   # noqa: BLE001 -- every failure becomes a status
            logging.getLogger(method.__module__).exception('%s failed', method.__name__)
            err = internal('internal error')
        await context.abort(err.code, err.message, trailing_metadata=err.trailing_metadata())
    return wrapper
