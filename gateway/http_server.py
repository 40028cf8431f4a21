"""The gateway's HTTP server: aiohttp's, answering its own errors in the
gateway's JSON error model.

aiohttp's RequestHandler.handle_error renders the HTTP parser's errors (a bad
request line, a header too long, ...) as plain text, and its HTTPExceptions
(such as 417 for an unknown Expect) are plain text too. This module is the
one place that reaches into aiohttp's server for that: a RequestHandler
subclass (aiohttp's protocol, one per connection) and a site that serves an
AppRunner with it, as TCPSite would with plain RequestHandlers.
"""

import asyncio
import http
import json
import logging
import uuid

import yarl
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

log = logging.getLogger('gateway')

# aiohttp raises the same LineTooLong for a long URL and a long header field;
# the limit it names tells them apart, so the two differ.
MAX_URL = 8192      # bytes; beyond, 414
MAX_FIELD = 8190    # bytes of one header field (aiohttp's default); beyond, 431
MAX_HEADERS = 100   # beyond, 431
_TOO_MANY_HEADERS = 'Too many headers received'  # aiohttp's message, both parsers


def error_json(status, message):
    """The error model's body. ASCII-escaped, so that any message encodes."""
    return json.dumps({'error': message, 'status': status}).encode()


def _json_response(status, message, headers=None):
    return web.Response(status=status, body=error_json(status, message),
                        content_type='application/json',
                        headers={'X-Request-ID': str(uuid.uuid4()), **(headers or {})})


class _Connection(web.RequestHandler):
    """One client connection: aiohttp's, with JSON errors."""

    def __init__(self, web_server, **kwargs):
        super().__init__(web_server, loop=asyncio.get_running_loop(), **kwargs)

    async def finish_response(self, request, resp, start_time):
        # aiohttp's own refusals are web.HTTPExceptions in plain text (such
        # as 417 for an Expect header other than 100-continue).
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            headers = {k: v for k, v in resp.headers.items()
                       if k not in ('Content-Type', 'Content-Length')}
            resp = _json_response(resp.status, resp.text or resp.reason, headers)
        return await super().finish_response(request, resp, start_time)

    def handle_error(self, request, status=500, exc=None, message=None):
        """aiohttp's answer to a request it could not parse (or to a handler
        that raised, which the gateway's never does), in the JSON model."""
        status, text = self._describe(status, exc)
        if status >= 500:
            self.log_exception('Error handling request from %s', request.remote, exc_info=exc)
        else:
            log.debug('refused a request from %s: %s', request.remote, text)
        if request.writer.output_size > 0:
            raise ConnectionError('the response has started; an error cannot follow it')
        response = _json_response(status, text)
        response.force_close()
        return response

    def _describe(self, status, exc):
        if isinstance(exc, LineTooLong):
            if exc.args[1] == self.max_line_size:
                return 414, f'the URL is longer than {self.max_line_size} bytes'
            return 431, f'a header field is longer than {self.max_field_size} bytes'
        if isinstance(exc, HttpProcessingError):
            if exc.message == _TOO_MANY_HEADERS:
                return 431, f'more than {self.max_headers} header fields'
            # The parser's reason, without the bytes and caret it appends.
            reason = exc.message.split('\n', 1)[0].rstrip(':')[:200]
            return 400, f'the request is not valid HTTP/1.1: {reason}'
        if status >= 500:
            return status, 'internal error'
        return status, http.HTTPStatus(status).phrase.lower()


class Site(web.BaseSite):
    """A TCP listener whose connections are _Connection protocols."""

    __slots__ = ('_host', '_port', '_web_server', '_options')

    def __init__(self, runner, host, port, *, backlog=128):
        super().__init__(runner, backlog=backlog)
        self._host, self._port = host, port
        self._web_server = runner.server  # aiohttp's Server: the app's handler, and the connections to shut down
        self._options = dict(access_log=None, max_line_size=MAX_URL, max_field_size=MAX_FIELD,
                             max_headers=MAX_HEADERS)

    @property
    def name(self):
        return str(yarl.URL.build(scheme='http', host=self._host or '0.0.0.0', port=self._port))

    async def start(self):
        await super().start()
        # BaseSite.stop() closes self._server, and runner.addresses reads it.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self._web_server, **self._options), self._host, self._port,
            backlog=self._backlog)
