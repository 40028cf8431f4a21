"""The bare baselines: a grpc.aio server whose one method returns the request bytes (P1),
and an aiohttp server that answers GET with the body it was last POSTed (to split P2).

    python bench/echo.py GRPC_PORT HTTP_PORT

No schema, no interceptor: a generic handler with no (de)serializers, so the gRPC
server does only what any grpc.aio unary call costs; likewise the HTTP server does
only what any aiohttp request costs.
"""

import asyncio
import sys

import grpc
from aiohttp import web


async def echo(request: bytes, context) -> bytes:
    return request


async def main(grpc_port: int, http_port: int):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        'bench.Echo', {'Echo': grpc.unary_unary_rpc_method_handler(echo)})])
    server.add_insecure_port(f'127.0.0.1:{grpc_port}')
    await server.start()

    body = b'null'

    async def get(request):
        return web.Response(body=body, content_type='application/json')

    async def post(request):
        nonlocal body
        body = await request.read()
        return web.Response(body=b'null', content_type='application/json')

    app = web.Application()
    app.router.add_get('/', get)
    app.router.add_post('/', post)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', http_port).start()
    await server.wait_for_termination()


if __name__ == '__main__':
    try:
        asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
