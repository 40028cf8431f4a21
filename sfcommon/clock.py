"""Time as a seam: the wall clock and its timers, real (SystemClock) or moved by a test (ManualClock).

Deadlines (agent operations, node heartbeats) are wall-clock seconds, as stored
in etcd, and are armed with call_at() on the clock that made them, so a test
advances a ManualClock past a deadline instead of sleeping until it passes
(trio's MockClock, for a wall clock and asyncio).
"""

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds (time.time() for the real clock)."""

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Call callback (in the event loop) once now() reaches when."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...

    async def sleep(self, seconds: float) -> None: ...

    def timeout_at(self, when: float) -> contextlib.AbstractAsyncContextManager: ...


class _Timers:
    """What every clock derives from now() and call_at()."""

    def now(self) -> float:
        raise NotImplementedError

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        raise NotImplementedError

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now() + delay, callback)

    async def sleep(self, seconds: float) -> None:
        woken = asyncio.get_running_loop().create_future()
        timer = self.call_later(seconds, lambda: woken.done() or woken.set_result(None))
        try:
            await woken
        finally:
            timer.cancel()

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager:
        return self.timeout_at(self.now() + seconds)

    @contextlib.asynccontextmanager
    async def timeout_at(self, when: float):
        """asyncio.timeout_at on this clock: the block is cancelled at when, and
        TimeoutError raised in its place."""
        task = asyncio.current_task()
        fired = False

        def expire():
            nonlocal fired
            fired = True
            task.cancel()
        timer = self.call_at(when, expire)
        try:
            yield
        except asyncio.CancelledError:
            if fired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()


class SystemClock(_Timers):
    """The real wall clock (skew: seconds added to it, for a controller whose clock is off)."""

    def __init__(self, skew: float = 0.0):
        self.skew = skew

    def now(self) -> float:
        return time.time() + self.skew

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, when - self.now()), callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM = SystemClock()


class _ManualTimer:
    __slots__ = ('callback', 'cancelled', 'when')

    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


class ManualClock(_Timers):
    """A wall clock that moves only when advance() is called. Due timers fire during
    advance(), in deadline order, each seeing now() at its own deadline."""

    def __init__(self, start: float | None = None):
        self._now = time.time() if start is None else start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    @property
    def pending(self) -> list[float]:
        """The deadlines of the timers not yet fired or cancelled, soonest first."""
        return sorted(t.when for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float):
        if seconds < 0:
            raise ValueError('a clock does not go back')
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
        self._now = target
