"""Micro-batching: requests of concurrent clients that arrive close together run as one batched model call.

The first request of a batch waits at most ``max_wait_ms`` for others (none when ``max_batch`` is 1: one at a time,
as openpi's and most peers' servers serve), and only while ``more_may_come()``: the server says no once every
connected client has a request in flight (openpi's clients wait for each answer), so a lone robot never waits.
Requests that queued while the previous batch ran join the next one at once, so under load batches fill without
waiting. The model runs in one worker thread, off the event loop, which
keeps receiving, decoding and answering meanwhile. A client that disconnects does not disturb a batch: its row
is computed and its answer dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

FLUSH_CHECK_S = 0.05


class MicroBatcher[Item, Result]:
    """``await submit(item)`` -> ``(result, batch_size)``; ``run_batch(items)`` returns one result or exception per
    item. ``start()`` and ``close()`` run in the event loop that calls ``submit``."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result | Exception]],
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        more_may_come: Callable[[], bool] = lambda: True,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.more_may_come = more_may_come
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict_action")
        self._task: asyncio.Task | None = None
        self._flushing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, item: Item) -> tuple[Result, int]:
        if self._task is None or self._task.done():
            raise RuntimeError("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    def flush(self) -> None:
        """From now on, run what is queued without waiting for batches to fill (a shutdown)."""
        self._flushing = True

    async def close(self) -> None:
        """Answer what is queued, then stop the worker."""
        self.flush()
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def _next_batch(self) -> list[tuple[Item, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if self._queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or self._flushing or not self.more_may_come():
                    break
                try:  # in slices, so that a shutdown (flush) stops the wait
                    batch.append(await asyncio.wait_for(self._queue.get(), min(remaining, FLUSH_CHECK_S)))
                except TimeoutError:
                    continue
            else:
                batch.append(self._queue.get_nowait())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [(item, future) for item, future in batch if not future.done()]  # a cancelled waiter: gone
            try:
                if live:
                    results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _ in live])
                    for (_, future), result in zip(live, results, strict=True):
                        if future.done():
                            continue
                        if isinstance(result, Exception):
                            future.set_exception(result)
                        else:
                            future.set_result((result, len(live)))
            except Exception as e:  # run_batch itself failed: every request of the batch hears why
                for _, future in live:
                    if not future.done():
                        future.set_exception(e)
            finally:
                for _ in batch:
                    self._queue.task_done()
