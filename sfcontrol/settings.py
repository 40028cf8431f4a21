"""The controller's settings (`sfcontrol --help`): flags, SF_* variables and defaults,
each declared once (the mechanism: sfcommon/settings.py). Defaults that the in-process
server.Config also has are taken from it, so they are written once too."""

import pathlib

import pydantic

from sfcommon.settings import CommaList, HostPort, Settings, setting
from sfcontrol.server import Config

DEFAULT_LISTEN_PORT = 13001


class ControllerSettings(Settings):
    etcd: str = setting('127.0.0.1:2379', env='SF_ETCD_ENDPOINTS', help='comma-separated etcd endpoints')
    listen: HostPort | None = setting(
        None, env='SF_GRPC_LISTEN',
        help=f'host:port of the public gRPC API; default 0.0.0.0:{DEFAULT_LISTEN_PORT} with --tls-cert, '
             f'else 127.0.0.1:{DEFAULT_LISTEN_PORT} (plaintext is refused off loopback)')
    tls_cert: pathlib.Path | None = setting(None, env='SF_TLS_CERT', help="the public API's TLS certificate, PEM")
    tls_key: pathlib.Path | None = setting(None, env='SF_TLS_KEY', help="the public API's TLS key, PEM")
    node_listen: HostPort = setting('0.0.0.0:13002', env='SF_NODE_API_LISTEN',
                                    help='host:port of the node API, mutual TLS')
    pki_dir: pathlib.Path = setting(
        pathlib.Path('/etc/shakenfist/controller'), env='SF_PKI_DIR',
        help="this controller's bundle from sf-pki: ca.pem, controller.pem/.key, etcd-ca.pem, "
             'etcd-client.pem/.key')
    state_dir: pathlib.Path = setting(Config.state_dir, env='SF_STATE_DIR',
                                      help='the system key (written on first start) and blob bytes')
    prefix: str = setting(Config.store_prefix, env='SF_ETCD_PREFIX', help='etcd key prefix')
    token_ttl: int = setting(Config.token_ttl, env='SF_TOKEN_TTL', gt=0, help='token lifetime in seconds')
    floating_netblock: str = setting(Config.floating_netblock, env='SF_FLOATING_NETBLOCK',
                                     help='the pool floating addresses come from')
    image_allow: CommaList = setting(
        (), env='SF_IMAGE_ALLOW', metavar='PREFIX',
        help='a URL prefix that tenants may use as an image although it is a local file or an internal '
             'address; repeatable, or comma-separated in the variable; give the nodes the same list')
    max_blob_size: int = setting(Config.max_blob_size, env='SF_MAX_BLOB_SIZE', gt=0,
                                 help='largest blob or upload in bytes')
    namespace_quota: int = setting(Config.namespace_quota, env='SF_NAMESPACE_QUOTA', ge=0,
                                   help='bytes of blobs and uploads a namespace may hold')
    peer_address: str = setting(
        Config.peer_address, env='SF_PEER_ADDRESS',
        help="host:port where other controllers reach this one's node API port (blob copies); "
             "default: --node-listen's host, or this host's FQDN when that is every address")
    blob_copies: int = setting(Config.blob_copies, env='SF_BLOB_COPIES', gt=0,
                               help='controllers that hold each blob before it is acknowledged (at most '
                                    'the live ones)')
    blob_holder_ttl: int = setting(Config.blob_holder_ttl, env='SF_BLOB_HOLDER_TTL', gt=0,
                                   help="seconds until a dead controller's blob copies stop counting")
    metrics_listen: HostPort | None = setting(
        None, env='SF_METRICS_LISTEN',
        help='host:port of GET /metrics (Prometheus, plain HTTP, no token: bind it where only your '
             'monitoring reaches); default off')

    @pydantic.model_validator(mode='after')
    def _tls_pair(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError('--tls-cert and --tls-key (SF_TLS_CERT, SF_TLS_KEY) go together')
        return self

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def listen_address(self) -> str:
        return self.listen or f'{"0.0.0.0" if self.tls else "127.0.0.1"}:{DEFAULT_LISTEN_PORT}'

    @property
    def etcd_endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(',') if e.strip()]
