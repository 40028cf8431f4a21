"""sfcontrol: run the controller. Settings come from flags or SF_* environment variables."""

import argparse
import asyncio
import logging
import os
import pathlib
import signal

from sfcommon import logs, pki
from sfcontrol import server

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog='sfcontrol', description=__doc__)
    p.add_argument('--etcd', default=env('SF_ETCD_ENDPOINTS', '127.0.0.1:2379'),
                   help='comma-separated etcd endpoints (SF_ETCD_ENDPOINTS)')
    p.add_argument('--listen', default=env('SF_GRPC_LISTEN'),
                   help='host:port of the public gRPC API (SF_GRPC_LISTEN); default 0.0.0.0:13001 '
                        'with --tls-cert, else 127.0.0.1:13001 (plaintext is refused off loopback)')
    p.add_argument('--tls-cert', type=pathlib.Path, default=env('SF_TLS_CERT'),
                   help="the public API's TLS certificate, PEM (SF_TLS_CERT)")
    p.add_argument('--tls-key', type=pathlib.Path, default=env('SF_TLS_KEY'),
                   help="the public API's TLS key, PEM (SF_TLS_KEY)")
    p.add_argument('--node-listen', default=env('SF_NODE_API_LISTEN', '0.0.0.0:13002'),
                   help='host:port of the node API, mutual TLS (SF_NODE_API_LISTEN)')
    p.add_argument('--pki-dir', type=pathlib.Path, default=env('SF_PKI_DIR', '/etc/shakenfist/controller'),
                   help="this controller's bundle from sf-pki: ca.pem, controller.pem/.key, "
                        'etcd-ca.pem, etcd-client.pem/.key (SF_PKI_DIR)')
    p.add_argument('--state-dir', type=pathlib.Path, default=env('SF_STATE_DIR', '/var/lib/shakenfist'),
                   help='the system key (written on first start) and blob bytes (SF_STATE_DIR)')
    p.add_argument('--prefix', default=env('SF_ETCD_PREFIX', '/sf'),
                   help='etcd key prefix (SF_ETCD_PREFIX)')
    p.add_argument('--token-ttl', type=int, default=int(env('SF_TOKEN_TTL', '900')),
                   help='token lifetime in seconds (SF_TOKEN_TTL)')
    p.add_argument('--floating-netblock', default=env('SF_FLOATING_NETBLOCK', '198.51.100.0/24'),
                   help='the pool floating addresses come from (SF_FLOATING_NETBLOCK)')
    p.add_argument('--image-allow', action='append',
                   default=[v.strip() for v in env('SF_IMAGE_ALLOW', '').split(',') if v.strip()],
                   help='a URL prefix that tenants may use as an image although it is a local file or '
                        'an internal address; repeatable (SF_IMAGE_ALLOW, comma-separated); give '
                        'the nodes the same list')
    p.add_argument('--max-blob-size', type=int, default=int(env('SF_MAX_BLOB_SIZE', str(20 * 2**30))),
                   help='largest blob or upload in bytes (SF_MAX_BLOB_SIZE)')
    p.add_argument('--namespace-quota', type=int, default=int(env('SF_NAMESPACE_QUOTA', str(200 * 2**30))),
                   help='bytes of blobs and uploads a namespace may hold (SF_NAMESPACE_QUOTA)')
    p.add_argument('--log-level', default=env('SF_LOG_LEVEL', 'info'))
    return p


def config_from(args) -> server.Config:
    tls = bool(args.tls_cert and args.tls_key)
    d = args.pki_dir
    return server.Config(
        etcd_endpoints=[e.strip() for e in args.etcd.split(',') if e.strip()],
        listen=args.listen or ('0.0.0.0:13001' if tls else '127.0.0.1:13001'),
        tls_cert=args.tls_cert, tls_key=args.tls_key, node_listen=args.node_listen,
        pki=pki.Bundle(d, 'controller'),
        etcd_tls=pki.EtcdTls(d / 'etcd-ca.pem', d / 'etcd-client.pem', d / 'etcd-client.key'),
        state_dir=args.state_dir, store_prefix=args.prefix,
        token_ttl=args.token_ttl, floating_netblock=args.floating_netblock,
        image_allow=tuple(args.image_allow), max_blob_size=args.max_blob_size,
        namespace_quota=args.namespace_quota)


async def serve(config: server.Config):
    controller = await server.start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info('stopping')
    await controller.stop()


def main():
    args = parser().parse_args()
    os.umask(0o077)     # keys, disks, blobs and logs are the plane's alone
    logs.setup('sfcontrol', args.log_level)
    asyncio.run(serve(config_from(args)))


if __name__ == '__main__':
    main()
