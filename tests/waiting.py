"""Waiting on conditions, with deadlines (never a bare sleep)."""

import asyncio
import time


async def eventually(check, timeout=10.0, interval=0.02, what='condition'):
    """Await check() (sync or async) until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f'{what} not met within {timeout}s (last: {last!r})')
        await asyncio.sleep(interval)
