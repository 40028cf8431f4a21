"""The web console's files, served by the gateway under /ui.

The page itself (gateway/ui/) is the project's; the libraries it uses come
from npm at pinned versions (`make deps` installs them into .tools/node_modules,
or --ui-vendor names another node_modules) and are served from /ui/vendor/.
Nothing is fetched from elsewhere at run time: the page's Content-Security-Policy
allows only this origin.
"""

import mimetypes
import pathlib

from aiohttp import web

PAGES = pathlib.Path(__file__).parent / 'ui'
DEFAULT_VENDOR = pathlib.Path(__file__).resolve().parent.parent / '.tools' / 'node_modules'
PREFIX = '/ui'
# /ui/vendor/<name>/... -> the npm package it comes from (and only these two).
PACKAGES = {'xterm': '@xterm/xterm', 'novnc': '@novnc/novnc'}
HEADERS = {
    'Content-Security-Policy': "default-src 'self'; img-src 'self' blob: data:; "
                               "style-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:; "
                               "frame-ancestors 'none'",
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    'Cache-Control': 'no-cache',
}
TYPES = {'.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css',
         '.html': 'text/html', '.svg': 'image/svg+xml', '.json': 'application/json'}


class Missing(Exception):
    """No such file of the web console (the gateway answers 404 with the message)."""


class WebUi:
    def __init__(self, vendor: pathlib.Path | None = None):
        self.vendor = pathlib.Path(vendor or DEFAULT_VENDOR).resolve()

    @staticmethod
    def claims(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + '/')

    def file_for(self, path: str) -> pathlib.Path | None:
        """The file a /ui path names, or None; never one outside its root."""
        rest = path[len(PREFIX):].lstrip('/')
        if rest in ('', 'index.html'):
            return PAGES / 'index.html'
        if rest.startswith('vendor/'):
            name, _, inside = rest[len('vendor/'):].partition('/')
            if name not in PACKAGES or not inside:
                return None
            root = (self.vendor / PACKAGES[name]).resolve()
        else:
            root, inside = PAGES.resolve(), rest
        found = (root / inside).resolve()
        if not found.is_relative_to(root) or not found.is_file():
            return None
        return found

    def serve(self, request: web.Request, rid: str) -> web.Response:
        """The file, or Missing saying why not."""
        if request.path == PREFIX:
            return web.Response(status=308, headers={'Location': PREFIX + '/', 'X-Request-ID': rid})
        found = self.file_for(request.path)
        if found is None:
            if request.path.startswith(PREFIX + '/vendor/'):
                raise Missing(f'{request.path} is not here: the web console\'s libraries are '
                                  'installed by `make deps` (or named with --ui-vendor)')
            raise Missing(f'no page {request.path}')
        content_type = TYPES.get(found.suffix) or mimetypes.guess_type(found.name)[0] or 'application/octet-stream'
        return web.Response(body=found.read_bytes(), headers={
            **HEADERS, 'Content-Type': content_type, 'X-Request-ID': rid})
