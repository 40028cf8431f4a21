"""The web console's files as the gateway serves them (the page itself is tested in a
real browser: tests/test_e2e_browser.py)."""

import aiohttp

from gateway import webui
from gateway.app import start_gateway



def test_only_files_under_the_page_and_the_three_packages_are_served(tmp_path):
    vendor = tmp_path / 'node_modules'
    (vendor / '@xterm' / 'xterm' / 'lib').mkdir(parents=True)
    (vendor / '@xterm' / 'xterm' / 'lib' / 'xterm.mjs').write_text('export {}')
    (vendor / 'secret.txt').write_text('no')
    ui = webui.WebUi(vendor)
    assert ui.file_for('/ui/') == webui.PAGES / 'index.html'
    assert ui.file_for('/ui/app.js') == (webui.PAGES / 'app.js').resolve()
    assert ui.file_for('/ui/vendor/xterm/lib/xterm.mjs').read_text() == 'export {}'
    for path in ('/ui/vendor/xterm/../../secret.txt', '/ui/vendor/other/x.js', '/ui/../webui.py',
                 '/ui/vendor/xterm/', '/ui/vendor/novnc/core/rfb.js', '/ui/nothing.js'):
        assert ui.file_for(path) is None, path


async def test_the_gateway_serves_the_page_with_a_strict_policy_and_says_what_is_missing(tmp_path):
    runner, port = await start_gateway('127.0.0.1:1', '127.0.0.1', 0, ui_vendor=str(tmp_path))
    base = f'http://127.0.0.1:{port}'
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f'{base}/ui', allow_redirects=False) as r:
                assert r.status == 308 and r.headers['Location'] == '/ui/'
            async with http.get(f'{base}/ui/') as r:
                assert r.status == 200 and r.content_type == 'text/html'
                assert "default-src 'self'" in r.headers['Content-Security-Policy']
                assert '/ui/app.js' in await r.text()
            async with http.get(f'{base}/ui/app.js') as r:
                assert r.status == 200 and r.content_type == 'text/javascript'
            # No libraries in the vendor directory: 404 in the error model, saying how to get them.
            async with http.get(f'{base}/ui/vendor/novnc/core/rfb.js') as r:
                body = await r.json()
                assert r.status == 404 and body['status'] == 404 and 'make deps' in body['error']
            async with http.post(f'{base}/ui/') as r:
                assert r.status in (404, 405)
    finally:
        await runner.cleanup()


def test_the_default_vendor_directory_has_the_pinned_libraries():
    """make deps installed them (the Makefile pins the versions)."""
    ui = webui.WebUi()
    for path in ('/ui/vendor/xterm/lib/xterm.mjs', '/ui/vendor/xterm/css/xterm.css',
                 '/ui/vendor/novnc/core/rfb.js'):
        assert ui.file_for(path) is not None, path
