"""sf-up's children kept up: a child that exits when nobody asked it to is started
again, as at first, after a backoff (1 s doubling to 30 s with jitter, back to 1 s
once it has stayed up a minute), with one log line saying which child, how it
ended and when it comes back. Each child is watched by awaiting its exit, not by
polling.

A node is restarted for as long as sf-up runs (its guests keep running meanwhile:
a node reattaches to them). What the plane cannot live without (etcd) gives up
after `give_up_after` failed starts in a row: `failed` is then called with why,
and sf-up stops everything and exits non-zero.
"""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from sfcommon.backoff import Backoff

log = logging.getLogger('sf-up')
STABLE = 60.0       # seconds up after which a child's backoff starts again from the first delay


def how_it_ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f'killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'killed by signal {-code}'
    return f'exited with {code}'


class Supervised:
    """One child. start() -> an object with wait() (an awaitable of its exit code)
    and the pid; started again by run() until stop()."""

    def __init__(self, name: str, start: Callable[[], Awaitable], *, give_up_after: int | None = None,
                 failed: Callable[[str], None] | None = None, backoff: Backoff | None = None,
                 stable: float = STABLE):
        self.name = name
        self._start = start
        self.give_up_after = give_up_after
        self.failed = failed
        self.backoff = backoff or Backoff(1.0, 30.0)
        self.stable = stable
        self.child = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def start(self):
        """The first start (its failure is the caller's), then the watch."""
        self.child = await self._start()
        self._task = asyncio.create_task(self._watch(), name=f'supervise-{self.name}')
        return self.child

    async def _watch(self):
        loop = asyncio.get_running_loop()
        failures = 0        # ends and failed starts since the child last stayed up
        while True:
            began = loop.time()
            code = await self.child.wait()
            if self._stopping:
                return
            if loop.time() - began >= self.stable:
                self.backoff.reset()
                failures = 0
            failures += 1
            what = how_it_ended(code)
            while True:
                if self.give_up_after is not None and failures > self.give_up_after:
                    why = f'{self.name} could not be kept up: it failed {failures} times in a row, last: {what}'
                    log.error(why, extra={'child': self.name})
                    if self.failed:
                        self.failed(why)
                    return
                delay = self.backoff.next()
                log.warning(f'{self.name} {what}; restarting it in {delay:.1f} s',
                            extra={'child': self.name, 'exit_code': code, 'restart_in': round(delay, 2),
                                   'restarts': self.restarts})
                await asyncio.sleep(delay)
                try:
                    self.child = await self._start()
                    self.restarts += 1
                    break
                except Exception as e:  # noqa: BLE001 -- any failed start is counted and tried again
                    failures += 1
                    what = f'did not start ({e})'

    async def stop(self):
        """No more restarts (the child itself is the caller's to stop)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
