"""Who is calling: set by the interceptor for the duration of one RPC."""

import contextvars
import dataclasses

SYSTEM = 'system'


@dataclasses.dataclass(frozen=True)
class Caller:
    namespace: str
    key_name: str = ''
    request_id: str = ''   # the transport-level x-request-id, for logs
    node: str = ''         # a node of the node API (its certificate's name); no namespace
    controller: str = ''   # a controller calling another (its certificate's name); no namespace
    address: str = ''      # where the call came from (the gateway forwards its client's)

    @property
    def is_system(self) -> bool:
        return self.namespace == SYSTEM

    def can_see(self, namespace: str) -> bool:
        return self.is_system or namespace == self.namespace


_current: contextvars.ContextVar[Caller] = contextvars.ContextVar('caller')


def delete_all_scope(request) -> str:
    """The namespace a delete-all request empties, with Shaken Fist's rules: it needs
    confirm, system must name the namespace, others may name only their own."""
    from sfcommon import errors
    me = current()
    if not request.confirm:
        raise errors.InvalidArgument('parameter confirm is not set true')
    if me.is_system and not request.HasField('namespace'):
        raise errors.InvalidArgument('system user must specify parameter namespace')
    ns = request.namespace if request.HasField('namespace') else me.namespace
    if not me.can_see(ns):
        raise errors.Unauthenticated('you cannot delete other namespaces')
    return ns


def current() -> Caller:
    return _current.get()


def set_current(caller: Caller):
    return _current.set(caller)


# The full name of the RPC being served ('/package.Service/Method'), which keys
# idempotency records.
current_method: contextvars.ContextVar[str] = contextvars.ContextVar('method', default='')
