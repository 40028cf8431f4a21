"""Domain events and states: libvirt's lifecycle events, the power states they
leave a domain in, and libvirt's event loop thread."""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import libvirt

from sfnode import domain as domainxml

from shakenfist.v1 import instance_pb2



LOG = logging.getLogger(__name__)

# Power states are the node API's enum, ready to report.
POWER_ON = instance_pb2.POWER_STATE_ON
POWER_OFF = instance_pb2.POWER_STATE_OFF
POWER_PAUSED = instance_pb2.POWER_STATE_PAUSED
POWER_CRASHED = instance_pb2.POWER_STATE_CRASHED

# -- events ------------------------------------------------------------------------------

def _constant_names(prefix: str) -> dict[int, str]:
    return {getattr(libvirt, n): n[len(prefix):].lower() for n in dir(libvirt)
            if n.startswith(prefix) and not n.endswith('_LAST')}


EVENT_NAMES = {getattr(libvirt, 'VIR_DOMAIN_EVENT_' + n): n.lower() for n in (
    'DEFINED', 'UNDEFINED', 'STARTED', 'SUSPENDED', 'RESUMED', 'STOPPED', 'SHUTDOWN',
    'PMSUSPENDED', 'CRASHED')}
EVENT_DETAILS = {event: _constant_names(f'VIR_DOMAIN_EVENT_{name.upper()}_')
            for event, name in EVENT_NAMES.items()}


def power_state_of_event(event: str, detail: str) -> int | None:
    """The power state a lifecycle event leaves the domain in; None if it does not say."""
    if event in ('started', 'resumed'):
        return POWER_ON
    if event in ('suspended', 'pmsuspended'):
        return POWER_PAUSED
    if event == 'stopped':
        return POWER_CRASHED if detail == 'crashed' else POWER_OFF
    if event == 'crashed':
        return POWER_CRASHED
    # defined/undefined change no power state; 'shutdown' means the guest has
    # shut down and the domain is about to stop, which a 'stopped' event says.
    return None


def power_state_of(state: int) -> int:
    """The power state of a virDomainState."""
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return POWER_OFF
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return POWER_CRASHED
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return POWER_PAUSED
    return POWER_ON


@dataclasses.dataclass(frozen=True)
class DomainEvent:
    """Something libvirt reported about a domain."""
    name: str
    uuid: str
    # 'lifecycle', 'reboot' (the guest rebooted or was reset), 'device-removed'
    # or 'job-completed' (a block job such as a backup ended).
    kind: str
    # For lifecycle events: defined, undefined, started, suspended, resumed,
    # stopped, shutdown, pmsuspended or crashed; and libvirt's detail, for
    # example booted, destroyed, shutdown, crashed, paused.
    event: str = ''
    detail: str = ''
    # The power state (instance_pb2.PowerState) the event leaves the domain
    # in, when it says.
    power_state: int | None = None
    # For device-removed: the device's alias (net1, ua-...).
    device: str | None = None
    # For job-completed: libvirt's job statistics ('success', 'errmsg', ...).
    job: dict | None = None
    timestamp: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    power_state: int            # instance_pb2.PowerState
    active: bool
    persistent: bool

    @property
    def instance_uuid(self) -> str | None:
        """The instance UUID, for domains named sf-<uuid>."""
        if self.name.startswith(domainxml.DOMAIN_PREFIX):
            return self.name[len(domainxml.DOMAIN_PREFIX):]
        return None


Listener = Callable[[DomainEvent], object]

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def ensure_event_loop():
    """Register libvirt's default event loop and run it in a daemon thread.

    Once per process, and before the first connection is opened: the embedded
    QEMU driver runs its QEMU monitor I/O and timers on this loop (without it,
    opening qemu:///embed fails), and events and keepalives need it for every
    driver."""
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        # Errors are raised as exceptions; don't also print each one on stderr.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop_thread = threading.Thread(target=run, name='libvirt-events', daemon=True)
        _event_loop_thread.start()

