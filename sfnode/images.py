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
import urllib.parse

import aiohttp

from sfcommon import errors

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


def resolve(base: str | None, table: dict[str, str]) -> str | None:
    """The URL of a disk base; None for a blank disk."""
    if base is None or base.strip().lower() in ('', 'none'):
        return None
    if urllib.parse.urlparse(base).scheme in ('http', 'https', 'file'):
        return base
    if base in table:
        return table[base]
    raise errors.invalid(f'unknown image {base!r}: not a URL or a known shorthand '
                         f'({", ".join(sorted(table))})')


class ImageCache:
    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
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

    async def fetch(self, url: str, progress=None) -> pathlib.Path:
        """The cached copy of url, fetching it first if needed. progress(percent) is
        awaited as the download advances (every 10%)."""
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            if (path := self.cached(url)) is not None:
                return path
            tmp = self.root / 'content' / f'.partial-{os.getpid()}-{hashlib.sha256(url.encode()).hexdigest()[:12]}'
            digest = hashlib.sha512()
            try:
                async for chunk, done, total in _read(url):
                    with open(tmp, 'ab') as f:
                        f.write(chunk)
                    digest.update(chunk)
                    if progress and total:
                        await progress(done * 100 // total)
            except (aiohttp.ClientError, OSError) as e:
                tmp.unlink(missing_ok=True)
                raise errors.unavailable(f'fetching {url} failed: {e}')
            final = self.root / 'content' / digest.hexdigest()
            if tmp.exists():
                os.replace(tmp, final)
            else:
                final.touch()   # an empty image
            self._url_file(url).write_text(digest.hexdigest())
            return final


async def _read(url: str):
    """Yield (chunk, bytes so far, total or 0) for an http(s) or file URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == 'file':
        path = pathlib.Path(urllib.parse.unquote(parsed.path))
        total, done = path.stat().st_size, 0
        with open(path, 'rb') as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                done += len(chunk)
                yield chunk, done, total
        return
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url) as r:
            if r.status != 200:
                raise aiohttp.ClientError(f'HTTP {r.status}')
            total, done = int(r.headers.get('Content-Length') or 0), 0
            async for chunk in r.content.iter_chunked(CHUNK):
                done += len(chunk)
                yield chunk, done, total


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
        raise errors.internal(f'qemu-img {args[0]} failed: {err.decode().strip()[-300:]}')
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
    if base is None:
        await qemu_img('create', '-q', '-f', 'qcow2', str(tmp), f'{size_gib or 1}G')
    else:
        info = await image_info(base)
        size = max(info['virtual-size'], (size_gib or 0) * 1024 ** 3)
        await qemu_img('create', '-q', '-f', 'qcow2', '-F', info['format'], '-b', str(base),
                       str(tmp), str(size))
    os.replace(tmp, path)


def remove_tree(path: pathlib.Path):
    shutil.rmtree(path, ignore_errors=True)
