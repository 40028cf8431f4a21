"""Background tasks with an owner: kept referenced, failures logged, cancelled and awaited on close.

asyncio keeps only a weak reference to a task, so a fire-and-forget
ensure_future() can vanish mid-run and its exception goes unseen. Every task a
component starts and does not await itself goes in its Tasks, and the
component's stop awaits close() (trio's nursery, without cancelling the
siblings when one fails: one failed report must not stop the others).
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)


class Tasks:
    def __init__(self, owner: str):
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Awaitable, name: str | None = None) -> asyncio.Future:
        """Run work (a coroutine, usually) as a task of this owner."""
        if self._closed:
            if asyncio.iscoroutine(work):
                work.close()
            raise RuntimeError(f'{self.owner} is stopping: no new tasks')
        if asyncio.iscoroutine(work):
            task = asyncio.get_running_loop().create_task(work, name=name)
        else:
            task = asyncio.ensure_future(work)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task):
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error('%s: task %s failed', self.owner, getattr(task, 'get_name', lambda: task)(), exc_info=e)

    async def wait_idle(self):
        """Until no task of this owner runs (including those started meanwhile)."""
        while self._tasks:
            await self._idle.wait()

    def cancel(self):
        """Cancel every task (for a synchronous stop; close() also waits for them)."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self):
        """Cancel every task and wait for them to end; no new ones after this."""
        self._closed = True
        tasks = list(self._tasks)
        self.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def alongside(work: Awaitable):
    """Run work as a task while the block runs (one direction of a relay while the
    block does the other); cancelled and awaited when the block ends."""
    task = asyncio.ensure_future(work)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
