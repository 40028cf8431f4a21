"""Who is calling: set by the interceptor for the duration of one RPC."""

import contextvars
import dataclasses

SYSTEM = 'system'


@dataclasses.dataclass(frozen=True)
class Caller:
    namespace: str
    key_name: str = ''
    request_id: str = ''   # the transport-level x-request-id, for logs

    @property
    def is_system(self) -> bool:
        return self.namespace == SYSTEM

    def can_see(self, namespace: str) -> bool:
        return self.is_system or namespace == self.namespace


_current: contextvars.ContextVar[Caller] = contextvars.ContextVar('caller')


def current() -> Caller:
    return _current.get()


def set_current(caller: Caller):
    return _current.set(caller)


# The full name of the RPC being served ('/package.Service/Method'), which keys
# idempotency records.
current_method: contextvars.ContextVar[str] = contextvars.ContextVar('method', default='')
