"""Command line: `sf-gateway` serves REST; `python -m gateway envoy|openapi` writes files.

    sf-gateway [--listen HOST:PORT] [--grpc-target HOST:PORT] [--max-body BYTES]
               [--header-timeout S] [--body-timeout S] [--idle-timeout S] [--max-connections N]
    python -m gateway envoy --out DIR [--grpc-upstream HOST:PORT] [--listen-port 13000]
    python -m gateway openapi [--out FILE]
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from gateway import app as gateway_app
from gateway import envoy, http_server, openapi

DEFAULT_GRPC_TARGET = '127.0.0.1:13001'

start_gateway = gateway_app.start_gateway  # for the sf-up launcher and tests

log = logging.getLogger('gateway')


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record):
        entry = {'time': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))
                 + f'.{int(record.msecs):03d}Z',
                 'level': record.levelname.lower(), 'logger': record.name,
                 'message': record.getMessage()}
        request_id = getattr(record, 'request_id', None)
        if request_id:
            entry['request_id'] = request_id
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level=logging.INFO):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _host_port(text):
    host, _, port = text.rpartition(':')
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f'expected HOST:PORT, got {text!r}')
    return host.strip('[]') or '0.0.0.0', int(port)


async def serve(grpc_target, host, port, **options):
    runner, actual = await start_gateway(grpc_target, host, port, **options)
    log.info('REST gateway on %s:%d, forwarding to %s', host, actual, grpc_target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info('REST gateway stopped')


def serve_arguments(argv):
    """sf-gateway's arguments: (the argparse namespace, start_gateway's options)."""
    parser = argparse.ArgumentParser(prog='sf-gateway', description='Shaken Fist REST gateway')
    parser.add_argument('--listen', type=_host_port, default=os.environ.get('SF_GATEWAY_LISTEN'),
                        help='HOST:PORT to listen on (env SF_GATEWAY_LISTEN); default 0.0.0.0:13000 '
                             'with --tls-cert, else 127.0.0.1:13000 (plaintext is refused off loopback)')
    parser.add_argument('--tls-cert', default=os.environ.get('SF_GATEWAY_TLS_CERT'),
                        help='serve HTTPS with this certificate, PEM (env SF_GATEWAY_TLS_CERT)')
    parser.add_argument('--tls-key', default=os.environ.get('SF_GATEWAY_TLS_KEY'),
                        help='... and this key, PEM (env SF_GATEWAY_TLS_KEY)')
    parser.add_argument('--grpc-ca', default=os.environ.get('SF_GRPC_CA'),
                        help="reach the controller over TLS, trusting this CA's PEM (env SF_GRPC_CA)")
    parser.add_argument('--grpc-server-name', default=os.environ.get('SF_GRPC_SERVER_NAME'),
                        help="the name in the controller's certificate, if not the target's host")
    parser.add_argument('--grpc-target', default=os.environ.get('SF_GRPC_TARGET', DEFAULT_GRPC_TARGET),
                        help='the controller, HOST:PORT (env SF_GRPC_TARGET, default %(default)s)')
    parser.add_argument('--max-body', type=int, default=gateway_app.DEFAULT_MAX_BODY,
                        help='largest request body in bytes, uploads excepted (default %(default)s)')
    parser.add_argument('--timeout', type=float, default=gateway_app.DEFAULT_TIMEOUT,
                        help='deadline of unary calls in seconds (default %(default)s)')
    parser.add_argument('--stream-timeout', type=float, default=gateway_app.DEFAULT_STREAM_TIMEOUT,
                        help='deadline of streaming calls in seconds (default %(default)s)')
    # Limits for slow or abusive clients.
    parser.add_argument('--header-timeout', type=float,
                        default=os.environ.get('SF_GATEWAY_HEADER_TIMEOUT', http_server.DEFAULT_HEADER_TIMEOUT),
                        help='seconds a request head may take from its first byte; then 408 '
                             '(env SF_GATEWAY_HEADER_TIMEOUT, default %(default)s)')
    parser.add_argument('--body-timeout', type=float,
                        default=os.environ.get('SF_GATEWAY_BODY_TIMEOUT', gateway_app.DEFAULT_BODY_TIMEOUT),
                        help='seconds a request body may pause; then 408 '
                             '(env SF_GATEWAY_BODY_TIMEOUT, default %(default)s)')
    parser.add_argument('--idle-timeout', type=float,
                        default=os.environ.get('SF_GATEWAY_IDLE_TIMEOUT', http_server.DEFAULT_IDLE_TIMEOUT),
                        help='seconds an idle keep-alive connection is kept '
                             '(env SF_GATEWAY_IDLE_TIMEOUT, default %(default)s)')
    parser.add_argument('--max-connections', type=int,
                        default=os.environ.get('SF_GATEWAY_MAX_CONNECTIONS', http_server.DEFAULT_MAX_CONNECTIONS),
                        help='open connections at most; more are refused with 503 '
                             '(env SF_GATEWAY_MAX_CONNECTIONS, default %(default)s)')
    parser.add_argument('--log-level', default=os.environ.get('SF_LOG_LEVEL', 'INFO'))
    args = parser.parse_args(argv)
    if args.listen is None:
        args.listen = _host_port('0.0.0.0:13000' if args.tls_cert else '127.0.0.1:13000')
    options = dict(max_body=args.max_body, timeout=args.timeout, stream_timeout=args.stream_timeout,
                   tls_cert=args.tls_cert, tls_key=args.tls_key, grpc_ca=args.grpc_ca,
                   grpc_server_name=args.grpc_server_name,
                   header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                   idle_timeout=args.idle_timeout, max_connections=args.max_connections)
    return args, options


def _serve_main(argv):
    args, options = serve_arguments(argv)
    setup_logging(args.log_level.upper())
    host, port = args.listen
    asyncio.run(serve(args.grpc_target, host, port, **options))


def _envoy_main(argv):
    parser = argparse.ArgumentParser(prog='python -m gateway envoy',
                                     description='write an Envoy transcoder config')
    parser.add_argument('--out', required=True, help='directory to write into')
    parser.add_argument('--grpc-upstream', default=os.environ.get('SF_GRPC_TARGET', DEFAULT_GRPC_TARGET),
                        help='the controller, HOST:PORT (default %(default)s)')
    parser.add_argument('--listen-port', type=int, default=13000)
    args = parser.parse_args(argv)
    for path in envoy.write(args.out, args.grpc_upstream, args.listen_port):
        print(path)


def _openapi_main(argv):
    parser = argparse.ArgumentParser(prog='python -m gateway openapi',
                                     description='print the OpenAPI document')
    parser.add_argument('--out', help='file to write (default: stdout)')
    args = parser.parse_args(argv)
    text = json.dumps(openapi.document(), indent=2) + '\n'
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {'envoy': _envoy_main, 'openapi': _openapi_main, 'serve': _serve_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return _serve_main(argv)


if __name__ == '__main__':
    main()
