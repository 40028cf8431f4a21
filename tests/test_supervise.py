"""sf-up keeps its children up (sfup/supervise.py), with cheap children: one that
exits is started again after a backoff and logged; a child that keeps failing is
given up on (and the part told why) only where asked; one that stays up long
enough starts its backoff again; stop() ends the restarts. sf-up healing a node
killed with SIGKILL is tests/test_sf_up.py."""

import asyncio
import logging
import sys

import pytest

from sfcommon.backoff import Backoff
from sfup.supervise import Supervised, how_it_ended
from tests.waiting import eventually

pytestmark = pytest.mark.asyncio


def child(code: str):
    async def start():
        return await asyncio.create_subprocess_exec(sys.executable, '-c', code)
    return start


def fast():
    return Backoff(0.01, 0.04, rng=lambda: 0.99)


async def test_a_child_that_exits_is_started_again_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger='sf-up')
    s = Supervised('kid', child('import sys; sys.exit(3)'), backoff=fast())
    first = await s.start()
    await eventually(lambda: s.restarts >= 3, 10, what='three restarts')
    await s.stop()
    assert s.child.pid != first.pid
    assert 'kid exited with 3; restarting it in' in caplog.text


async def test_a_child_that_keeps_failing_is_given_up_on_where_asked():
    why = []
    s = Supervised('etcd', child('import sys; sys.exit(1)'), give_up_after=3, failed=why.append, backoff=fast())
    await s.start()
    await eventually(lambda: why, 10, what='given up')
    assert s.restarts == 3
    assert why == ['etcd could not be kept up: it failed 4 times in a row, last: exited with 1']


async def test_a_start_that_fails_counts_as_a_failure():
    why, starts = [], []

    async def start():
        starts.append(1)
        if len(starts) > 1:
            raise RuntimeError('no etcd binary')
        return await asyncio.create_subprocess_exec(sys.executable, '-c', 'pass')
    s = Supervised('etcd', start, give_up_after=2, failed=why.append, backoff=fast())
    await s.start()
    await eventually(lambda: why, 10, what='given up')
    assert why == ['etcd could not be kept up: it failed 3 times in a row, last: did not start (no etcd binary)']


async def test_a_child_that_stayed_up_starts_its_count_and_backoff_again():
    why = []
    s = Supervised('node0', child('import sys; sys.exit(1)'), give_up_after=1, failed=why.append,
                   backoff=fast(), stable=0.0)
    await s.start()
    await eventually(lambda: s.restarts >= 4, 10, what='four restarts')
    await s.stop()
    assert not why


async def test_stop_ends_the_restarts_and_leaves_the_child_to_its_owner():
    s = Supervised('node0', child('import time; time.sleep(60)'), backoff=fast())
    proc = await s.start()
    await s.stop()
    proc.kill()
    await proc.wait()
    assert s._task.done()         # the watch is over: no restart can come
    assert s.restarts == 0 and s.child is proc


async def test_how_a_child_ended_is_said_plainly():
    assert how_it_ended(3) == 'exited with 3'
    assert how_it_ended(-9) == 'killed by SIGKILL'
