"""How every part runs in the foreground (sfcontrol, sfnode, sf-gateway, sf-up).

    def main(argv=None):
        settings = parse(ControllerSettings, argv, prog='sfcontrol')
        serve.run('sfcontrol', settings, start)

    async def start(settings, stops: serve.Stops):
        controller = await server.start(...)
        stops.add('controller', controller.stop)

`run` sets the umask (keys, disks, blobs and logs are the plane's alone), the JSON logs
(sfcommon/logs.py), and SIGTERM/SIGINT handlers, then runs the part's `start`. What
`start` registers with `stops.add` as it goes is stopped in reverse order when a signal
comes, also if it comes while `start` is still running (`start` is then cancelled, and
what it had started is stopped all the same), or if `start` fails, or when the part
calls `stops.fail(why)`. Exit code 0 after a signal, 1 if `start` failed or it failed.
"""

import asyncio
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from sfcommon import logs

log = logging.getLogger('sfcommon.serve')

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stops:
    """What a part has started, each with how to stop it; stopped last-started first."""

    def __init__(self):
        self._stops: list[tuple[str, Callable[[], Any]]] = []
        self.failure = asyncio.Event()
        self.why: str | None = None

    def fail(self, why: str):
        """Something the part cannot run without is gone: stop everything, exit 1."""
        self.why = why
        self.failure.set()

    def add(self, name: str, stop: Callable[[], Any]):
        """stop() may be a coroutine function or a plain one."""
        self._stops.append((name, stop))

    async def run(self):
        while self._stops:
            name, stop = self._stops.pop()
            log.info('stopping %s', name)
            try:
                result = stop()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception('stopping %s failed', name)


Start = Callable[[Any, Stops], Awaitable[None]]


async def serve(settings, start: Start) -> int:
    """Run start(settings, stops), wait for SIGTERM or SIGINT, stop; the exit code."""
    loop = asyncio.get_running_loop()
    stops = Stops()
    signalled = asyncio.Event()

    def on_signal(sig: signal.Signals):
        log.info('%s received', sig.name, extra={'signal': sig.name, 'stopping': signalled.is_set()})
        signalled.set()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.create_task(start(settings, stops))
    waiting = asyncio.create_task(signalled.wait())
    code = 0
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info('stopping while starting')
            starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            if not signalled.is_set():
                raise
        except Exception:
            log.exception('start failed')
            code = 1
        else:
            if not signalled.is_set():
                log.info('started')
            failing = asyncio.create_task(stops.failure.wait())
            await asyncio.wait({waiting, failing}, return_when=asyncio.FIRST_COMPLETED)
            failing.cancel()
            if stops.failure.is_set() and not signalled.is_set():
                log.error('giving up: %s', stops.why)
                code = 1
    finally:
        waiting.cancel()
        await stops.run()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
    log.info('stopped', extra={'exit_code': code})
    return code


def run(process: str, settings, start: Start):
    """The process: umask, logs, serve(settings, start), exit with its code."""
    os.umask(0o077)
    logs.setup(process, settings.log_level)
    sys.exit(asyncio.run(serve(settings, start)))
