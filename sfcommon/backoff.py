"""Retry delays: exponential, capped, with jitter so that many retriers spread out."""

import asyncio
import random


class Backoff:
    """Delays of first, 2*first, 4*first... up to cap, each scaled by a random factor
    in [0.5, 1) ("equal jitter"); reset() after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, rng=random.random):
        self.first, self.cap, self.rng = first, cap, rng
        self._next = first

    def next(self) -> float:
        delay = self._next * (0.5 + self.rng() / 2)
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self):
        self._next = self.first

    async def sleep(self):
        await asyncio.sleep(self.next())
