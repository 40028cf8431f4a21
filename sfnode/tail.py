"""Following a file as it grows (a console log), woken by inotify rather than polling.

QEMU appends the serial port's output to console.log; ClearConsoleData truncates
it. follow() yields (offset, data) from an offset: what is there, then each new
piece as the kernel says the file changed. A truncation restarts it at 0 (the
offsets say so): seen as a size below the follower's position, or, since the log
may have grown past it again before the follower woke, as a change of the
clears() count the truncating side keeps. It ends when the file is deleted (the
instance is gone).
"""

import asyncio
import ctypes
import os
import struct

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_MOVE_SELF = 0x800
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
_EVENT = struct.Struct('iIII')     # wd, mask, cookie, len (then len bytes of name)
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)


class _Watch:
    """An inotify descriptor on one file, readable in the event loop."""

    def __init__(self, path: str):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), 'inotify_init1')
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path),
                                     IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, os.strerror(err), path)
        self.changed = asyncio.Event()
        self.gone = False
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self):
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        pos = 0
        while pos + _EVENT.size <= len(buf):
            _, mask, _, length = _EVENT.unpack_from(buf, pos)
            pos += _EVENT.size + length
            if mask & _GONE:
                self.gone = True
        self.changed.set()

    async def wait(self):
        await self.changed.wait()
        self.changed.clear()

    def close(self):
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


async def follow(path: str, offset: int | None = None, clears=lambda: 0, chunk: int = CHUNK):
    """Yields (offset, data) as path grows; offset None starts at its end, one beyond
    it (the log was cleared since) at 0. The first item is (start, b''): where the
    stream starts."""
    watch = _Watch(path)         # before the first read: no change between is missed
    try:
        with open(path, 'rb') as f:
            seen_clears = clears()
            size = f.seek(0, os.SEEK_END)
            position = size if offset is None else offset if offset <= size else 0
            yield position, b''
            while True:
                size = os.fstat(f.fileno()).st_size
                if size < position or clears() != seen_clears:
                    position, seen_clears = 0, clears()     # cleared: start again
                f.seek(position)
                if data := f.read(chunk):
                    yield position, data
                    position += len(data)
                    continue        # checked again before each read: a clear may come between
                if watch.gone or os.fstat(f.fileno()).st_nlink == 0:
                    return
                await watch.wait()
    finally:
        watch.close()
