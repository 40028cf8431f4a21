"""google.api.http path templates, compiled into one segment trie.

Template syntax (google/api/http.proto):
    Template = "/" [ Segments ] [ ":" Verb ]
    Segment  = "*" | "**" | LITERAL | "{" FieldPath [ "=" Segments ] "}"
"**" may only be the last segment. Matching splits the request path on "/"
and drops empty segments, so "//instances" and "/instances/" both match
"/instances" (sf-client joins base URL and path naively). Literal segments
are tried before "*", and "*" before "**", so literal routes win.
"""

import re
import urllib.parse

__all__ = ['BadPath', 'MethodNotAllowed', 'NotFound', 'Router', 'parse', 'variables']

_ONE, _REST = object(), object()  # the "*" and "**" tokens
_CONTROL = re.compile('[\x00-\x1f\x7f]')


class NotFound(LookupError):
    pass


class BadPath(ValueError):
    """A path no route could name: str() is user-facing."""


class MethodNotAllowed(LookupError):
    def __init__(self, allowed):
        super().__init__(', '.join(sorted(allowed)))
        self.allowed = sorted(allowed)


def _split(text):
    """Splits on "/" outside braces."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == '{':
            depth += 1
        elif c == '}':
            depth -= 1
        elif c == '/' and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def _token(text, template):
    if text == '*':
        return _ONE
    if text == '**':
        return _REST
    if not text or any(c in text for c in '{}*:'):
        raise ValueError(f'bad segment {text!r} in path template {template!r}')
    return text


def parse(template):
    """Returns (tokens, variables, verb): tokens are literal strings, _ONE or
    _REST; variables are (field path tuple, first token, end token or None)."""
    if not template.startswith('/'):
        raise ValueError(f'path template {template!r} does not start with "/"')
    # The verb follows the last ':' that is outside every variable.
    brace = template.rfind('}')
    colon = template.rfind(':', brace + 1)
    verb = ''
    if colon > 0 and '/' not in template[colon:]:
        template, verb = template[:colon], template[colon + 1:]
    tokens, variables = [], []
    body = template[1:].rstrip('/')
    for segment in (_split(body) if body else []):
        if segment.startswith('{') and segment.endswith('}'):
            name, _, pattern = segment[1:-1].partition('=')
            start = len(tokens)
            tokens += [_token(s, template) for s in (pattern or '*').split('/')]
            end = None if tokens[-1] is _REST else len(tokens)
            variables.append((tuple(name.split('.')), start, end))
        else:
            tokens.append(_token(segment, template))
    if _REST in tokens[:-1]:
        raise ValueError(f'"**" must be the last segment of {template!r}')
    return tokens, variables, verb


def variables(template):
    """The field paths bound by a template's variables."""
    return [path for path, _, _ in parse(template)[1]]


class _Node:
    __slots__ = ('literal', 'one', 'rest', 'ends')

    def __init__(self):
        self.literal = {}
        self.one = self.rest = None
        self.ends = {}  # custom verb ('' for none) -> {http method: (target, variables)}


class Router:
    def __init__(self):
        self._root = _Node()

    def add(self, http_method, template, target):
        tokens, variables_, verb = parse(template)
        node = self._root
        for token in tokens:
            if token is _ONE:
                node.one = node = node.one or _Node()
            elif token is _REST:
                node.rest = node = node.rest or _Node()
            else:
                node = node.literal.setdefault(token, _Node())
        methods = node.ends.setdefault(verb, {})
        if http_method in methods:
            raise ValueError(f'{http_method} {template} is bound twice')
        methods[http_method] = (target, variables_)

    def match(self, http_method, raw_path):
        """Returns (target, {field: value or nested dict}); raises NotFound or
        MethodNotAllowed. raw_path is the percent-encoded path, no query."""
        segments = [_decode(s) for s in raw_path.split('/') if s]
        tries = [(segments, '')]
        if segments and ':' in segments[-1]:
            head, _, verb = segments[-1].rpartition(':')
            if head:
                tries.insert(0, (segments[:-1] + [head], verb))
        allowed = set()
        for segs, verb in tries:
            for node in _walk(self._root, segs, 0):
                methods = node.ends.get(verb)
                if not methods:
                    continue
                found = methods.get(http_method)
                if found is None:
                    allowed.update(methods)
                    continue
                target, variables_ = found
                return target, _bind(variables_, segs)
        if allowed:
            raise MethodNotAllowed(allowed)
        raise NotFound(raw_path)


def _decode(segment):
    # Bytes that are not UTF-8 stay as surrogates, which codec refuses with
    # the field's name; control characters have no place in any name or ID.
    text = urllib.parse.unquote(segment, errors='surrogateescape') if '%' in segment else segment
    if _CONTROL.search(text):
        raise BadPath(f'the path segment {text!r} has a control character')
    return text


def _walk(node, segs, i):
    """Nodes reached by segs[i:], most literal first."""
    if i == len(segs):
        yield node
        if node.rest is not None:  # "**" matches zero segments too
            yield node.rest
        return
    child = node.literal.get(segs[i])
    if child is not None:
        yield from _walk(child, segs, i + 1)
    if node.one is not None:
        yield from _walk(node.one, segs, i + 1)
    if node.rest is not None:
        yield node.rest


def _bind(variables_, segs):
    params = {}
    for path, start, end in variables_:
        value = segs[start] if end == start + 1 else '/'.join(segs[start:end])
        target = params
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = value
    return params
