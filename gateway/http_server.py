"""The gateway's HTTP server: aiohttp's, bounded against slow and abusive
clients, and answering its own errors in the gateway's JSON error model.

aiohttp 3.14 has options for the idle keep-alive time (keepalive_timeout) and
the size of a request head (max_line_size, max_field_size, max_headers), but
none for how long a head may take to arrive or how many connections may be
open; and it renders the HTTP parser's errors (RequestHandler.handle_error)
and its own HTTPExceptions (such as 417 for an unknown Expect) as plain text.
This module is the one place that reaches into aiohttp's server for those: a
RequestHandler subclass (aiohttp's protocol, one per connection) and a site
that serves an AppRunner with it, as TCPSite would with plain RequestHandlers.
A body that stops arriving needs no internals: gateway.app reads bodies with
a deadline.
"""

import asyncio
import http
import json
import logging
import uuid

import yarl
from aiohttp import web
from aiohttp.http_exceptions import (BadHttpMessage, ContentEncodingError, HttpProcessingError,
                                     LineTooLong)
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import _ErrInfo  # how aiohttp queues a refusal in place of a request

log = logging.getLogger('gateway')

DEFAULT_HEADER_TIMEOUT = 10.0   # seconds for a request head, from its first byte
DEFAULT_IDLE_TIMEOUT = 75.0     # seconds a keep-alive connection may wait for its next request
DEFAULT_MAX_CONNECTIONS = 1000
# aiohttp raises the same LineTooLong for a long URL and a long header field;
# the limit it names tells them apart, so the two differ.
MAX_URL = 8192      # bytes; beyond, 414
MAX_FIELD = 8190    # bytes of one header field (aiohttp's default); beyond, 431
MAX_HEADERS = 100   # beyond, 431
_TOO_MANY_HEADERS = 'Too many headers received'  # aiohttp's message, both parsers


def error_json(status, message):
    """The error model's body. ASCII-escaped, so that any message encodes."""
    return json.dumps({'error': message, 'status': status}).encode()


def _raw_response(status, message):
    """A whole response, for the moments when there is no request to answer."""
    body = error_json(status, message)
    return (f'HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n'
            f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n'
            f'X-Request-ID: {uuid.uuid4()}\r\nConnection: close\r\n\r\n').encode() + body


def _json_response(status, message, headers=None):
    return web.Response(status=status, body=error_json(status, message),
                        content_type='application/json',
                        headers={'X-Request-ID': str(uuid.uuid4()), **(headers or {})})


class _Connection(web.RequestHandler):
    """One client connection: aiohttp's, plus a deadline for each request head,
    a place in the site's connection count, and JSON errors."""

    __slots__ = ('_site', '_counted', '_head_timer', '_last_body')

    def __init__(self, site, web_server, **kwargs):
        self._site = site
        self._counted = False
        self._head_timer = None
        self._last_body = None  # the newest request's body: bytes after its end are a new head
        super().__init__(web_server, loop=asyncio.get_running_loop(), **kwargs)

    def connection_made(self, transport):
        if self._site.connections >= self._site.max_connections:
            # Refused before aiohttp sees it: no request task, no timers.
            transport.write(_raw_response(503, 'too many connections; try again later'))
            transport.close()
            return
        self._site.connections += 1
        self._counted = True
        super().connection_made(transport)
        self._start_head_timer()  # a new connection owes its first head at once

    def connection_lost(self, exc):
        if not self._counted:
            return  # refused in connection_made
        self._counted = False
        self._site.connections -= 1
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data):
        # The head deadline runs from a head's first byte until the parser has
        # the whole head. Between requests the idle timeout applies instead
        # (aiohttp's keepalive_timeout), and a body is the app's to time.
        # Not covered: the start of a head that comes in one packet with the
        # end of the previous request; the idle timeout still bounds it.
        # An upgraded connection (a WebSocket) carries frames, not heads.
        if data and self._head_timer is None and not self._upgraded and self._payload_parser is None and (
                self._last_body is None or self._last_body.is_eof()):
            self._start_head_timer()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # the parser finished a head, or refused one
            self._stop_head_timer()
            for i in range(count - self._request_count, 0):  # the new ones end the queue
                self._refuse_other_versions(i)
            self._last_body = self._messages[-1][1]

    def _refuse_other_versions(self, i):
        # llhttp also takes HTTP/2.0 and HTTP/0.9 request lines, and aiohttp
        # would answer them with that version in its status line. A 400,
        # not 505: bad input is never a server error here.
        message = self._messages[i][0]
        version = getattr(message, 'version', None)
        if version is not None and version.major != 1:
            exc = BadHttpMessage(f'HTTP/{version.major}.{version.minor} is not supported')
            self._messages[i] = (_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)

    def _start_head_timer(self):
        self._head_timer = self._loop.call_later(self._site.header_timeout, self._head_timed_out)

    def _stop_head_timer(self):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self):
        self._head_timer = None
        if self._waiter is not None:
            # aiohttp is idle, waiting for this head: nothing else is being
            # written, so the 408 can go out now.
            if self.transport is not None:
                self.transport.write(_raw_response(
                    408, f'the request head did not arrive within {self._site.header_timeout:g} seconds'))
            self.force_close()
        else:
            self.close()  # a pipelined head behind a response in progress: stop after it

    async def finish_response(self, request, resp, start_time):
        # aiohttp's own refusals are web.HTTPExceptions in plain text (such
        # as 417 for an Expect header other than 100-continue).
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            headers = {k: v for k, v in resp.headers.items()
                       if k not in ('Content-Type', 'Content-Length')}
            resp = _json_response(resp.status, resp.text or resp.reason, headers)
        result = await super().finish_response(request, resp, start_time)
        if request.content.exception() is not None:
            # The body failed (it stopped arriving, or could not be decoded):
            # close now, rather than let aiohttp linger reading the rest.
            self.force_close()
        return result

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
        if isinstance(exc, ContentEncodingError):  # its message may be just the coding's name
            reason = exc.message if ' ' in exc.message else f'Can not decode content-encoding: {exc.message}'
            return 400, f'the request body cannot be read: {reason}'
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

    __slots__ = ('_host', '_port', '_web_server', '_options', 'header_timeout',
                 'max_connections', 'connections')

    def __init__(self, runner, host, port, *, header_timeout=DEFAULT_HEADER_TIMEOUT,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT, max_connections=DEFAULT_MAX_CONNECTIONS,
                 backlog=128, ssl_context=None):
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._host, self._port = host, port
        self._web_server = runner.server  # aiohttp's Server: the app's handler, and the connections to shut down
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.connections = 0  # open and accepted
        self._options = dict(keepalive_timeout=idle_timeout, access_log=None,
                             max_line_size=MAX_URL, max_field_size=MAX_FIELD,
                             max_headers=MAX_HEADERS)

    @property
    def name(self):
        scheme = 'https' if self._ssl_context else 'http'
        return str(yarl.URL.build(scheme=scheme, host=self._host or '0.0.0.0', port=self._port))

    async def start(self):
        await super().start()
        # BaseSite.stop() closes self._server, and runner.addresses reads it.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self, self._web_server, **self._options), self._host, self._port,
            backlog=self._backlog, ssl=self._ssl_context)
