"""Base images: shorthands, fetching by URL into a content cache, and disk files.

The cache is content addressed: a fetched image is stored under the SHA-512 of
its bytes, and each URL points at the content it last fetched, so instances
that share a base share one copy.
"""

import asyncio
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import urllib.parse

import aiohttp
import yarl

from sfcommon import errors
from sfcommon.disks import UNSIZED_DISK_GIB
from sfcommon.urlpolicy import MAX_REDIRECTS, ImagePolicy

log = logging.getLogger(__name__)

# Real upstream cloud images. Offline plans add their own (sf-up adds "sftest").
SHORTHANDS = {
    'debian:11': 'https://cloud.debian.org/images/cloud/bullseye/latest/debian-11-genericcloud-amd64.qcow2',
    'debian:12': 'https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2',
    'ubuntu:22.04': 'https://cloud-images.ubuntu.com/jammy/current/jammy-server-cloudimg-amd64.img',
    'ubuntu:24.04': 'https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img',
}
CHUNK = 1024 * 1024


def load_table(path: str | None) -> dict[str, str]:
    """The shorthand table: the defaults, overridden by a JSON file {name: url}."""
    table = dict(SHORTHANDS)
    if path:
        table.update(json.loads(pathlib.Path(path).read_text()))
    return table


def resolve(base: str | None, table: dict[str, str]) -> tuple[str, bool] | None:
    """(URL, trusted) of a disk base, or None for a blank disk. A shorthand's URL is the
    operator's (trusted); any other is the tenant's, and fetched under the ImagePolicy."""
    if base is None or base.strip().lower() in ('', 'none'):
        return None
    if base in table:
        return table[base], True
    if urllib.parse.urlsplit(base).scheme:
        return base, False
    raise errors.InvalidArgument(f'unknown image {base!r}: not a URL or a known shorthand '
                         f'({", ".join(sorted(table))})')


class ImageCache:
    def __init__(self, root: pathlib.Path, policy: ImagePolicy | None = None):
        self.root = pathlib.Path(root)
        self.policy = policy or ImagePolicy()
        (self.root / 'content').mkdir(parents=True, exist_ok=True)
        (self.root / 'urls').mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}

    def _url_file(self, url: str) -> pathlib.Path:
        return self.root / 'urls' / hashlib.sha256(url.encode()).hexdigest()

    def cached(self, url: str) -> pathlib.Path | None:
        ref = self._url_file(url)
        if ref.exists():
            path = self.root / 'content' / ref.read_text().strip()
            if path.exists():
                return path
        return None

    async def fetch(self, url: str, progress=None, trusted: bool = False) -> pathlib.Path:
        """The cached copy of url, fetching it first if needed. progress(percent) is
        awaited as the download advances (every 10%). A URL that is not trusted (the
        operator's) must pass the ImagePolicy, here where the fetch happens."""
        policy = None if trusted else self.policy
        if policy is not None:
            policy.check(url)
        return await self._cache(url, lambda: _read(url, policy), progress)

    async def fetch_blob(self, blob_uuid: str, chunks, progress=None) -> pathlib.Path:
        """The cached copy of a blob (immutable, so cached by its UUID), read from
        chunks() (the controller's GetBlob) the first time."""
        async def read():
            done = 0
            async for chunk in chunks():
                done += len(chunk)
                yield chunk, done, 0
        return await self._cache(f'sf://blob/{blob_uuid}', read, progress)

    async def _cache(self, url: str, reader, progress) -> pathlib.Path:
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            if (path := self.cached(url)) is not None:
                return path
            tmp = self.root / 'content' / f'.partial-{os.getpid()}-{hashlib.sha256(url.encode()).hexdigest()[:12]}'
            digest = hashlib.sha512()
            tmp.unlink(missing_ok=True)
            try:
                async for chunk, done, total in reader():
                    with open(tmp, 'ab') as f:
                        f.write(chunk)
                    digest.update(chunk)
                    if progress and total:
                        await progress(done * 100 // total)
            except (aiohttp.ClientError, OSError) as e:
                tmp.unlink(missing_ok=True)
                raise errors.Unavailable(f'fetching {url} failed: {e}')
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            final = self.root / 'content' / digest.hexdigest()
            if tmp.exists():
                os.replace(tmp, final)
            else:
                final.touch()   # an empty image
            self._url_file(url).write_text(digest.hexdigest())
            return final


class _CheckedResolver(aiohttp.ThreadedResolver):
    """Resolves names for one fetch and refuses internal addresses, so that what is
    checked is what is connected to (no DNS rebinding between the two)."""

    def __init__(self, policy: ImagePolicy):
        super().__init__()
        self.policy = policy
        self.url = ''

    async def resolve(self, host, port=0, family=socket.AF_INET):
        found = await super().resolve(host, port, family)
        for result in found:
            self.policy.check_address(self.url, result['host'])
        return found


async def _read(url: str, policy: ImagePolicy | None):
    """Yield (chunk, bytes so far, total or 0) for an http(s) or file URL; with a policy,
    every redirect and every address the names resolve to must pass it."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == 'file':
        path = pathlib.Path(urllib.parse.unquote(parsed.path))
        if policy is not None:
            # An allow-listed directory must not lead elsewhere through a symlink.
            path = path.resolve()
            policy.check(path.as_uri())
        total, done = path.stat().st_size, 0
        with open(path, 'rb') as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                done += len(chunk)
                yield chunk, done, total
        return
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60, sock_connect=30)
    resolver = _CheckedResolver(policy) if policy else aiohttp.ThreadedResolver()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(resolver=resolver)) as session:
        for _ in range(MAX_REDIRECTS + 1):
            if policy is not None:
                policy.check(url)
                resolver.url = url
            async with session.get(url, allow_redirects=False) as r:
                if r.status in (301, 302, 303, 307, 308) and 'Location' in r.headers:
                    url = str(r.url.join(yarl.URL(r.headers['Location'])))
                    continue
                if r.status != 200:
                    raise aiohttp.ClientError(f'HTTP {r.status}')
                total, done = int(r.headers.get('Content-Length') or 0), 0
                async for chunk in r.content.iter_chunked(CHUNK):
                    done += len(chunk)
                    yield chunk, done, total
                return
        raise aiohttp.ClientError(f'more than {MAX_REDIRECTS} redirects')


class Progress:
    """Calls report(message) at each new 10% step of a fetch."""

    def __init__(self, what: str, report):
        self.what, self.report, self.last = what, report, -1

    async def __call__(self, percent: int):
        step = percent // 10 * 10
        if step > self.last:
            self.last = step
            await self.report(f'Fetching required blob {self.what}, {step}% complete')


async def qemu_img(*args) -> str:
    proc = await asyncio.create_subprocess_exec('qemu-img', *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise errors.Internal(f'qemu-img {args[0]} failed: {err.decode().strip()[-300:]}')
    return out.decode()


_INFO: dict[tuple[str, float], dict] = {}


async def image_info(path: pathlib.Path) -> dict:
    """qemu-img info of an image, remembered while the file is unchanged: base images
    are shared by many disks, and the call costs 7-9 ms (bench P4)."""
    key = (str(path), os.stat(path).st_mtime)
    if key not in _INFO:
        _INFO[key] = json.loads(await qemu_img('info', '--output', 'json', str(path)))
    return _INFO[key]


async def make_disk(path: pathlib.Path, base: pathlib.Path | None, size_gib: int | None):
    """A qcow2 disk: an overlay of base (grown to size_gib if larger) or blank."""
    if path.exists():
        return      # made before a restart: keep the guest's data
    tmp = path.with_suffix('.partial')
    size_gib = size_gib or UNSIZED_DISK_GIB
    if base is None:
        await qemu_img('create', '-q', '-f', 'qcow2', str(tmp), f'{size_gib}G')
    else:
        info = await image_info(base)
        size = max(info['virtual-size'], size_gib * 1024 ** 3)
        await qemu_img('create', '-q', '-f', 'qcow2', '-F', info['format'], '-b', str(base),
                       str(tmp), str(size))
    os.replace(tmp, path)


def remove_tree(path: pathlib.Path):
    shutil.rmtree(path, ignore_errors=True)
