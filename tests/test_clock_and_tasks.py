"""sfcommon/clock.py and sfcommon/tasks.py on their own: a ManualClock fires what is due, in
order, only when advanced; Tasks keeps, reports and cancels what it owns."""

import asyncio
import logging

import pytest

from sfcommon.clock import SYSTEM, ManualClock
from sfcommon.tasks import Tasks


def test_a_manual_clock_fires_due_timers_in_order_each_at_its_own_time():
    clock = ManualClock(start=1000.0)
    fired = []
    clock.call_at(1010.0, lambda: fired.append(('b', clock.now())))
    clock.call_later(5.0, lambda: fired.append(('a', clock.now())))
    cancelled = clock.call_later(7.0, lambda: fired.append(('never', clock.now())))
    cancelled.cancel()
    clock.advance(4.5)
    assert fired == [] and clock.now() == 1004.5
    clock.advance(10.0)
    assert fired == [('a', 1005.0), ('b', 1010.0)] and clock.now() == 1014.5
    assert clock.pending == []
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_sleep_on_a_manual_clock_ends_when_the_clock_passes_it():
    clock = ManualClock(start=0.0)
    sleeper = asyncio.create_task(clock.sleep(30))
    await asyncio.sleep(0)      # let it arm its timer
    clock.advance(29.5)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(0.5)
    await asyncio.wait_for(sleeper, 5)


async def blocked_until(clock, when):
    """A task blocked forever inside clock.timeout_at(when), its timer armed."""
    async def wait_forever():
        async with clock.timeout_at(when):
            await asyncio.Event().wait()
    waiting = asyncio.create_task(wait_forever())
    await asyncio.sleep(0)
    return waiting


async def test_timeout_at_cancels_the_block_and_raises_timeout_error():
    clock = ManualClock(start=0.0)
    waiting = await blocked_until(clock, 60)
    clock.advance(60)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiting, 5)


async def test_timeout_at_passes_on_a_cancellation_of_its_own():
    clock = ManualClock(start=0.0)
    waiting = await blocked_until(clock, 60)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert clock.pending == []      # its timer went with it


async def test_the_system_clock_fires_its_timers_by_itself():
    fired = asyncio.Event()
    SYSTEM.call_at(SYSTEM.now() + 0.05, fired.set)
    await asyncio.wait_for(fired.wait(), 5)


async def test_tasks_keep_their_work_log_its_failures_and_cancel_it_on_close(caplog):
    tasks = Tasks('test owner')
    gate = asyncio.Event()

    async def fails():
        raise RuntimeError('it broke')
    with caplog.at_level(logging.ERROR, logger='sfcommon.tasks'):
        failing = tasks.spawn(fails(), name='failing')
        waiting = tasks.spawn(gate.wait(), name='waiting')
        await asyncio.wait([failing])
        assert len(tasks) == 1      # the failed one is let go, and reported
    assert 'test owner: task failing failed' in caplog.text and 'it broke' in caplog.text
    await tasks.close()
    assert waiting.cancelled() and len(tasks) == 0
    with pytest.raises(RuntimeError, match='stopping'):
        tasks.spawn(gate.wait())


async def test_wait_idle_waits_for_work_started_meanwhile():
    tasks = Tasks('test owner')
    done = []

    async def second():
        done.append('second')

    async def first():
        await asyncio.sleep(0)
        tasks.spawn(second())
        done.append('first')
    tasks.spawn(first())
    await asyncio.wait_for(tasks.wait_idle(), 5)
    assert done == ['first', 'second']
