"""sfcontrol: run the controller. Settings come from flags or SF_* environment variables."""

import argparse
import asyncio
import logging
import os
import pathlib
import signal

from sfcommon import logs
from sfcontrol import server

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog='sfcontrol', description=__doc__)
    p.add_argument('--etcd', default=env('SF_ETCD_ENDPOINTS', '127.0.0.1:2379'),
                   help='comma-separated etcd endpoints (SF_ETCD_ENDPOINTS)')
    p.add_argument('--listen', default=env('SF_GRPC_LISTEN', '0.0.0.0:13001'),
                   help='host:port for gRPC (SF_GRPC_LISTEN)')
    p.add_argument('--state-dir', type=pathlib.Path, default=env('SF_STATE_DIR', '/var/lib/shakenfist'),
                   help='the system key (written on first start) and blob bytes (SF_STATE_DIR)')
    p.add_argument('--prefix', default=env('SF_ETCD_PREFIX', '/sf'),
                   help='etcd key prefix (SF_ETCD_PREFIX)')
    p.add_argument('--token-ttl', type=int, default=int(env('SF_TOKEN_TTL', '900')),
                   help='token lifetime in seconds (SF_TOKEN_TTL)')
    p.add_argument('--floating-netblock', default=env('SF_FLOATING_NETBLOCK', '198.51.100.0/24'),
                   help='the pool floating addresses come from (SF_FLOATING_NETBLOCK)')
    p.add_argument('--log-level', default=env('SF_LOG_LEVEL', 'info'))
    return p


def config_from(args) -> server.Config:
    return server.Config(etcd_endpoints=[e.strip() for e in args.etcd.split(',') if e.strip()],
                         listen=args.listen, state_dir=args.state_dir, store_prefix=args.prefix,
                         token_ttl=args.token_ttl, floating_netblock=args.floating_netblock)


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
    logs.setup('sfcontrol', args.log_level)
    asyncio.run(serve(config_from(args)))


if __name__ == '__main__':
    main()
