"""The gateway's settings (`sf-gateway --help`, `python -m gateway envoy|openapi --help`):
flags, SF_* variables and defaults, each declared once (the mechanism:
sfcommon/settings.py). Limits default to the constants beside the code they bound."""

import pathlib

import pydantic

from gateway import app, http_server
from sfcommon.settings import HostPort, Settings, setting, split_host_port

DEFAULT_GRPC_TARGET = '127.0.0.1:13001'
DEFAULT_LISTEN_PORT = 13000


class GatewaySettings(Settings):
    """sf-gateway [serve]: the REST gateway."""

    listen: HostPort | None = setting(
        None, env='SF_GATEWAY_LISTEN', metavar='HOST:PORT',
        help=f'where to listen; default 0.0.0.0:{DEFAULT_LISTEN_PORT} with --tls-cert, '
             f'else 127.0.0.1:{DEFAULT_LISTEN_PORT} (plaintext is refused off loopback)')
    tls_cert: pathlib.Path | None = setting(None, env='SF_GATEWAY_TLS_CERT',
                                            help='serve HTTPS with this certificate, PEM')
    tls_key: pathlib.Path | None = setting(None, env='SF_GATEWAY_TLS_KEY', help='... and this key, PEM')
    grpc_ca: pathlib.Path | None = setting(None, env='SF_GRPC_CA',
                                           help="reach the controller over TLS, trusting this CA's PEM")
    grpc_server_name: str | None = setting(None, env='SF_GRPC_SERVER_NAME',
                                           help="the name in the controller's certificate, if not the target's host")
    grpc_target: HostPort = setting(DEFAULT_GRPC_TARGET, env='SF_GRPC_TARGET', metavar='HOST:PORT',
                                    help='the controller')
    max_body: int = setting(app.DEFAULT_MAX_BODY, env='SF_GATEWAY_MAX_BODY', gt=0,
                            help='largest request body in bytes, uploads excepted')
    timeout: float = setting(app.DEFAULT_TIMEOUT, env='SF_GATEWAY_TIMEOUT', gt=0,
                             help='deadline of unary calls in seconds')
    stream_timeout: float = setting(app.DEFAULT_STREAM_TIMEOUT, env='SF_GATEWAY_STREAM_TIMEOUT', gt=0,
                                    help='deadline of streaming calls in seconds')
    # Limits for slow or abusive clients.
    header_timeout: float = setting(http_server.DEFAULT_HEADER_TIMEOUT, env='SF_GATEWAY_HEADER_TIMEOUT', gt=0,
                                    help='seconds a request head may take from its first byte; then 408')
    body_timeout: float = setting(app.DEFAULT_BODY_TIMEOUT, env='SF_GATEWAY_BODY_TIMEOUT', gt=0,
                                  help='seconds a request body may pause; then 408')
    idle_timeout: float = setting(http_server.DEFAULT_IDLE_TIMEOUT, env='SF_GATEWAY_IDLE_TIMEOUT', gt=0,
                                  help='seconds an idle keep-alive connection is kept')
    max_connections: int = setting(http_server.DEFAULT_MAX_CONNECTIONS, env='SF_GATEWAY_MAX_CONNECTIONS', gt=0,
                                   help='open connections at most; more are refused with 503')
    ui_vendor: pathlib.Path | None = setting(None, env='SF_GATEWAY_UI_VENDOR', metavar='DIR',
                                             help="a node_modules with the web console's libraries "
                                                  '(default: the checkout\'s .tools/node_modules)')

    @pydantic.model_validator(mode='after')
    def _tls_pair(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError('--tls-cert and --tls-key (SF_GATEWAY_TLS_CERT, SF_GATEWAY_TLS_KEY) go together')
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to listen on."""
        default = f'{"0.0.0.0" if self.tls_cert else "127.0.0.1"}:{DEFAULT_LISTEN_PORT}'
        return split_host_port(self.listen or default)

    def gateway_options(self) -> dict:
        """start_gateway's keyword arguments."""
        def text(path):
            return str(path) if path else None
        return {'max_body': self.max_body, 'timeout': self.timeout, 'stream_timeout': self.stream_timeout,
                'tls_cert': text(self.tls_cert), 'tls_key': text(self.tls_key), 'grpc_ca': text(self.grpc_ca),
                'grpc_server_name': self.grpc_server_name, 'header_timeout': self.header_timeout,
                'body_timeout': self.body_timeout, 'idle_timeout': self.idle_timeout,
                'max_connections': self.max_connections, 'ui_vendor': text(self.ui_vendor)}


class EnvoySettings(Settings):
    """python -m gateway envoy: write an Envoy transcoder config."""

    out: pathlib.Path = setting(help='directory to write into')
    grpc_upstream: HostPort = setting(DEFAULT_GRPC_TARGET, env='SF_GRPC_TARGET', metavar='HOST:PORT',
                                      help='the controller')
    listen_port: int = setting(DEFAULT_LISTEN_PORT, ge=0, le=65535, help="Envoy's REST port")


class OpenApiSettings(Settings):
    """python -m gateway openapi: print the OpenAPI document."""

    out: pathlib.Path | None = setting(None, help='file to write (default: stdout)')
