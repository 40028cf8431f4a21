"""sfnode.console.SerialConsole on a real unix socket standing in for QEMU's serial
chardev: viewers share it, and one that does not read never slows the guest."""

import asyncio

from sfnode.console import VIEWER_BUFFER, SerialConsole


async def test_a_viewer_that_never_reads_does_not_slow_the_guest_or_the_other_viewer(tmp_path):
    path = str(tmp_path / 'console.sock')
    guest_writer = asyncio.get_running_loop().create_future()
    typed = asyncio.Queue()

    async def guest(reader, writer):        # QEMU's side of the serial port
        guest_writer.set_result(writer)
        while data := await reader.read(4096):
            typed.put_nowait(data)
    server = await asyncio.start_unix_server(guest, path)
    console = SerialConsole('i-1', path, authorize=None)
    try:
        async with console.viewing() as stalled, console.viewing() as reader:
            writer = await asyncio.wait_for(guest_writer, 10)
            piece, count = b'x' * 4000 + b'\n', VIEWER_BUFFER * 8
            total, received = len(piece) * count, 0

            async def read_all():
                nonlocal received
                while received < total:
                    received += len(await reader.queue.get())
            reading = asyncio.ensure_future(read_all())
            # Far more than the stalled viewer may hold: the guest's writes all complete.
            for _ in range(count):
                writer.write(piece)
                await writer.drain()
            await asyncio.wait_for(reading, 30)
            assert received == total
            assert stalled.queue.qsize() == VIEWER_BUFFER and stalled.dropped > 0
            # What a viewer types reaches the guest.
            await console.to_guest(b'typed\n')
            assert await asyncio.wait_for(typed.get(), 10) == b'typed\n'
    finally:
        await console.stop()
        server.close()
        await server.wait_closed()
