"""sfnode.tail: following a console log by inotify, on a real file."""

import asyncio
import os

import pytest

from sfnode import tail

pytestmark = pytest.mark.asyncio


async def take(stream, until: bytes, timeout=10):
    """(offset, data) items from stream until their data holds until."""
    items = []
    async with asyncio.timeout(timeout):
        while until not in b''.join(d for _, d in items):
            items.append(await anext(stream))
    return items


async def test_it_starts_at_the_end_then_yields_each_append_with_its_offset(tmp_path):
    log = tmp_path / 'console.log'
    log.write_bytes(b'before\n')
    stream = tail.follow(str(log))
    assert await anext(stream) == (7, b'')
    with open(log, 'ab', buffering=0) as f:
        f.write(b'one\n')
        assert await take(stream, b'one') == [(7, b'one\n')]
        f.write(b'two\n')
        assert await take(stream, b'two') == [(11, b'two\n')]
    await stream.aclose()


async def test_from_an_offset_it_replays_and_a_truncation_restarts_at_zero(tmp_path):
    log = tmp_path / 'console.log'
    log.write_bytes(b'0123456789')
    cleared = [0]
    stream = tail.follow(str(log), offset=4, clears=lambda: cleared[0])
    assert await anext(stream) == (4, b'')
    assert await anext(stream) == (4, b'456789')
    # Cleared and grown past the follower's position before it looks: the count tells.
    os.truncate(log, 0)
    cleared[0] += 1
    with open(log, 'ab', buffering=0) as f:
        f.write(b'after clear\n')
    items = await take(stream, b'after clear')
    assert items[-1][0] == 0 and b''.join(d for _, d in items) == b'after clear\n'
    await stream.aclose()


async def test_a_shrunken_log_restarts_at_zero(tmp_path):
    log = tmp_path / 'console.log'
    log.write_bytes(b'0123456789')
    stream = tail.follow(str(log))
    assert await anext(stream) == (10, b'')
    os.truncate(log, 0)
    with open(log, 'ab', buffering=0) as f:
        f.write(b'new\n')
    assert await take(stream, b'new') == [(0, b'new\n')]
    await stream.aclose()


async def test_an_offset_beyond_the_end_starts_at_zero_and_deletion_ends_it(tmp_path):
    log = tmp_path / 'console.log'
    log.write_bytes(b'abc')
    stream = tail.follow(str(log), offset=99)
    assert await anext(stream) == (0, b'')
    assert await anext(stream) == (0, b'abc')
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    log.unlink()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 10)
