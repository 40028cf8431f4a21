"""Read the generated descriptor set: routes, enums and comments, for tests."""

import functools
import pathlib
import re

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
DESCRIPTORS = ROOT / 'shakenfist' / 'descriptors.binpb'


@functools.cache
def file_set() -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(DESCRIPTORS.read_bytes())
    return fds


def our_files():
    return [f for f in file_set().file if f.name.startswith('shakenfist/')]


def http_rules(rule):
    yield rule
    yield from rule.additional_bindings


def routes():
    """(verb, path template, 'package.Service.Method') for every HTTP binding."""
    out = []
    for f in our_files():
        for svc in f.service:
            for m in svc.method:
                if not m.options.HasExtension(annotations_pb2.http):
                    continue
                for rule in http_rules(m.options.Extensions[annotations_pb2.http]):
                    verb = rule.WhichOneof('pattern')
                    out.append((verb.upper(), getattr(rule, verb), f'{f.package}.{svc.name}.{m.name}'))
    return out


def normalise(path):
    """Compare templates by shape: variable names and trailing slashes do not matter."""
    return re.sub(r'\{[^}]*\}', '{}', path.rstrip('/') or '/')
