"""Command line: `sf-gateway` serves REST; `python -m gateway envoy|openapi` writes files.

    sf-gateway [serve] [--listen HOST:PORT] [--grpc-target HOST:PORT] [--max-body BYTES]
               [--header-timeout S] [--body-timeout S] [--idle-timeout S] [--max-connections N]
    python -m gateway envoy --out DIR [--grpc-upstream HOST:PORT] [--listen-port 13000]
    python -m gateway openapi [--out FILE]

Every flag and its SF_* variable is in gateway/settings.py (`--help` lists them).
"""

import asyncio
import json
import logging
import sys

from gateway import app as gateway_app
from gateway import envoy, openapi
from gateway.settings import (
    DEFAULT_GRPC_TARGET,
    EnvoySettings,
    GatewaySettings,
    OpenApiSettings,
)
from sfcommon import serve
from sfcommon.settings import parse

__all__ = ['DEFAULT_GRPC_TARGET', 'main', 'serve_arguments', 'start_gateway']

start_gateway = gateway_app.start_gateway  # for the sf-up launcher and tests

log = logging.getLogger('gateway')


def serve_arguments(argv) -> tuple[GatewaySettings, dict]:
    """sf-gateway's settings and start_gateway's options from them."""
    settings = parse(GatewaySettings, argv, prog='sf-gateway', description='Shaken Fist REST gateway')
    return settings, settings.gateway_options()


async def start(settings: GatewaySettings, stops: serve.Stops):
    host, port = settings.address
    runner, actual = await start_gateway(settings.grpc_target, host, port, **settings.gateway_options())
    stops.add('REST gateway', runner.cleanup)
    log.info('REST gateway on %s:%d, forwarding to %s', host, actual, settings.grpc_target,
             extra={'port': actual})


def use_uvloop() -> bool:
    """sf-gateway's own process runs on uvloop where it can (bench P2: about 4% off a
    REST call); asyncio's loop otherwise. Only here: sf-up hosts the gateway in its own
    loop, and the controller gained nothing from uvloop (bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        log.debug('uvloop is not installed; on asyncio\'s loop')
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _serve_main(argv):
    settings, _ = serve_arguments(argv)
    use_uvloop()
    serve.run('sf-gateway', settings, start)


def _envoy_main(argv):
    settings = parse(EnvoySettings, argv, prog='python -m gateway envoy',
                     description='write an Envoy transcoder config')
    for path in envoy.write(str(settings.out), settings.grpc_upstream, settings.listen_port):
        print(path)


def _openapi_main(argv):
    settings = parse(OpenApiSettings, argv, prog='python -m gateway openapi',
                     description='print the OpenAPI document')
    text = json.dumps(openapi.document(), indent=2) + '\n'
    if settings.out:
        settings.out.write_text(text)
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
