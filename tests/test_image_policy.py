"""A tenant's image URL cannot read the node's files or reach internal services
(sfcommon/urlpolicy.py): refused by the controller at create, and by the node
where the fetch happens, for literal addresses, names that resolve inward, and
redirects; only the operator's shorthands and allow-list reach inward."""

import functools
import http.server
import os
import threading

import grpc
import pytest

from sfcommon import errors
from sfcommon.urlpolicy import ImagePolicy
from sfnode import images
from tests.helpers import create, disk, raises

C = grpc.StatusCode


@pytest.mark.parametrize('url', [
    'file:///etc/shadow', 'file:///var/lib/shakenfist/system.key', 'ftp://example.com/x.qcow2',
    'http://127.0.0.1:2379/v3/kv/range', 'http://127.1/', 'http://0x7f000001/', 'http://2130706433/', 'http://0.0.0.0/', 'http://[::1]/x',
    'http://[::ffff:127.0.0.1]/x', 'http://169.254.169.254/latest/meta-data/', 'http://10.0.0.1/x',
    'http://192.168.1.1/x', 'http://100.64.0.1/x', 'http://224.0.0.1/x', 'http://localhost:13000/',
    'http://LOCALHOST./x', 'http://a.localhost/x', 'http://user:pw@example.com/x', 'gopher://x/',
    'http:///nohost', 'http://example.com:99999/x'])
def test_internal_or_odd_urls_are_refused(url):
    with pytest.raises(errors.ApiError) as e:
        ImagePolicy().check(url)
    assert e.value.code == C.INVALID_ARGUMENT


@pytest.mark.parametrize('url', ['https://cloud.debian.org/images/x.qcow2', 'http://8.8.8.8/x',
                                 'http://[2001:4860:4860::8888]/x'])
def test_public_urls_pass(url):
    ImagePolicy().check(url)


def test_the_allow_list_matches_scheme_host_port_and_whole_path_segments():
    policy = ImagePolicy(['file:///srv/images/', 'http://127.0.0.1:8000/base/'])
    for ok in ('file:///srv/images/a.qcow2', 'file:///srv/images/sub/b.qcow2',
               'http://127.0.0.1:8000/base/x.qcow2'):
        policy.check(ok)
    for bad in ('file:///srv/images/../../etc/shadow', 'file:///srv/images%2f..%2f..%2fetc/shadow',
                'file:///srv/imagesX/a', 'http://127.0.0.1:8001/base/x', 'http://127.0.0.1:8000/other',
                'http://127.0.0.1:8000@evil.example/base/x', 'https://127.0.0.1:8000/base/x'):
        with pytest.raises(errors.ApiError):
            policy.check(bad)


# -- at the node, where the fetch happens -------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """Two HTTP servers on loopback: 'images' serves a file and redirects; 'secret' is an
    internal service."""
    (tmp_path / 'pub').mkdir()
    (tmp_path / 'pub' / 'img').write_bytes(b'an image')
    (tmp_path / 'sec').mkdir()
    (tmp_path / 'sec' / 'key').write_bytes(b'the secret')
    servers = {}

    def serve(name, directory, redirect_to=None):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if redirect_to and self.path == '/jump':
                    self.send_response(302)
                    self.send_header('Location', redirect_to())
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *a):
                pass
        server = http.server.ThreadingHTTPServer(
            ('127.0.0.1', 0), functools.partial(Handler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
        return f'http://127.0.0.1:{server.server_address[1]}'
    secret = serve('secret', tmp_path / 'sec')
    public = serve('images', tmp_path / 'pub', redirect_to=lambda: secret + '/key')
    yield public, secret
    for s in servers.values():
        s.shutdown()


async def test_the_node_refuses_internal_urls_and_takes_them_when_allow_listed(tmp_path, served):
    public, secret = served
    cache = images.ImageCache(tmp_path / 'cache', ImagePolicy())
    for url in (public + '/img', secret + '/key', 'file:///etc/hostname'):
        with pytest.raises(errors.ApiError, match='internal addresses|only http and https'):
            await cache.fetch(url)
    # The operator's own URLs (shorthands) are trusted.
    assert (await cache.fetch(public + '/img', trusted=True)).read_bytes() == b'an image'
    allowed = images.ImageCache(tmp_path / 'cache2', ImagePolicy([public + '/']))
    assert (await allowed.fetch(public + '/img')).read_bytes() == b'an image'


async def test_a_redirect_from_an_allowed_server_into_an_internal_one_is_refused(tmp_path, served):
    public, secret = served
    cache = images.ImageCache(tmp_path / 'cache', ImagePolicy([public + '/']))
    with pytest.raises(errors.ApiError, match='internal addresses'):
        await cache.fetch(public + '/jump')
    assert not any((tmp_path / 'cache' / 'content').iterdir())


async def test_a_name_that_resolves_inward_is_refused_where_it_is_connected(tmp_path, served):
    public, _ = served
    # This machine's own name resolves to a loopback (or otherwise internal) address.
    port = public.rsplit(':', 1)[1]
    url = f'http://{os.uname().nodename}:{port}/img'
    ImagePolicy().check(url)                    # the controller cannot know; the node does
    with pytest.raises(errors.ApiError, match='internal addresses'):
        await images.ImageCache(tmp_path / 'cache', ImagePolicy()).fetch(url)


async def test_an_allow_listed_directory_cannot_be_left_by_a_symlink(tmp_path):
    allowed = tmp_path / 'images'
    allowed.mkdir()
    (allowed / 'good.img').write_bytes(b'fine')
    (allowed / 'escape.img').symlink_to('/etc/hostname')
    cache = images.ImageCache(tmp_path / 'cache', ImagePolicy([allowed.as_uri() + '/']))
    assert (await cache.fetch((allowed / 'good.img').as_uri())).read_bytes() == b'fine'
    with pytest.raises(errors.ApiError):
        await cache.fetch((allowed / 'escape.img').as_uri())


# -- at the controller ---------------------------------------------------------------------------------

async def test_create_with_a_host_file_or_internal_url_is_refused_and_creates_nothing(system, node):
    from shakenfist.v1 import instance_service_pb2 as api
    for base in ('file:///etc/shadow', 'http://127.0.0.1:2379/', 'http://[::1]/x'):
        async with raises(C.INVALID_ARGUMENT, 'INVALID_ARGUMENT', 'disk[0].base'):
            await create(system, disk=[disk(base=base)])
    listed = await system.instances.ListInstances(api.ListInstancesRequest(all=True))
    assert list(listed.instances) == []
