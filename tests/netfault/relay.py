"""A delaying TCP relay for the latency scenario.

This machine's kernel has no ``netem`` qdisc, so the delay is added by a
relay on this host that every connection of a replica to Redis goes through
(an nftables ``dnat`` rule inside the replica's namespace sends it there).
Each chunk from Redis is held ``delay ± jitter`` before it is passed on, in
order (TCP never reorders a stream): every Redis round trip takes that much
longer. With the delay set to zero the relay only copies bytes.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time


class DelayRelay:
    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int):
        self.listen = (listen_host, listen_port)
        self.target = (target_host, target_port)
        self.delay = 0.0
        self.jitter = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="delay-relay")
        self.server = None
        self.rng = random.Random(7)

    def start(self) -> "DelayRelay":
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        fut.result(timeout=5)
        return self

    def set(self, delay: float, jitter: float = 0.0) -> None:
        self.delay, self.jitter = delay, jitter

    def stop(self) -> None:
        async def close():
            if self.server is not None:
                self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    async def _serve(self):
        self.server = await asyncio.start_server(self._conn, *self.listen)

    def _hold(self) -> float:
        if self.delay <= 0:
            return 0.0
        return max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))

    async def _pump(self, reader, writer, delayed: bool):
        queue: asyncio.Queue = asyncio.Queue()

        async def send():
            while True:
                at, data = await queue.get()
                if data is None:
                    break
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(send())
        last = 0.0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                at = time.monotonic() + (self._hold() if delayed else 0.0)
                last = max(last, at)  # in order, whatever the jitter
                queue.put_nowait((last, data))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            queue.put_nowait((0.0, None))
            try:
                await sender
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _conn(self, client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pump(client_reader, up_writer, delayed=False),
            self._pump(up_reader, client_writer, delayed=True),
            return_exceptions=True,
        )
