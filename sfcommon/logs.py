"""Structured logs: one JSON object per line, the same keys in every part.

    {"time": "2025-01-02T03:04:05.678Z", "level": "info", "process": "sfcontrol",
     "logger": "sfcontrol.server", "message": "...", <extra fields>, "exception": "..."}

`time` is UTC, to the millisecond; `process` is the part (sfcontrol, sfnode-node0,
sf-gateway, sf-up); any `extra={...}` given to the log call follows as keys of its own
(a request_id, a node name, a port); `exception` is the traceback when there is one.
"""

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord('', 0, '', 0, '', (), None))) | {'message', 'asctime'}
KEYS = ('time', 'level', 'process', 'logger', 'message')


def _time(created: float) -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(created)) + f'.{int(created * 1000) % 1000:03d}Z'


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str = ''):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out = {'time': _time(record.created), 'level': record.levelname.lower(),
               'process': self.process_name, 'logger': record.name, 'message': record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in out})
        if record.exc_info:
            out['exception'] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(process_name: str, level: str = 'info'):
    """Every record of this process to stderr, in the one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
