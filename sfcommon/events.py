"""Building events (shakenfist.v1.Event), for the controller and the nodes alike."""

import time

from shakenfist.v1 import event_pb2


def make_event(fqdn: str, object_type: int, uuid: str, event_type: int, message: str,
               extra: dict | None = None, duration: float | None = None) -> event_pb2.Event:
    ev = event_pb2.Event(type=event_type, timestamp=time.time(), fqdn=fqdn, message=message,
                         object_type=object_type, object_uuid=uuid)
    if duration is not None:
        ev.duration = duration
    if extra is not None:
        ev.extra.update(extra)
    return ev
