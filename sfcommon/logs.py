"""Structured logs: one JSON object per line, with any `extra` fields."""

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord('', 0, '', 0, '', (), None))) | {'message', 'asctime'}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out = {'ts': round(record.created, 3), 'level': record.levelname.lower(),
               'process': self.process_name, 'logger': record.name, 'msg': record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out['exception'] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(process_name: str, level: str = 'info'):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
