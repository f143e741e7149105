"""Requests that arrive together are scored together.

Scoring one item costs little more than scoring a few dozen at once (one encoder pass,
one neighbour search, one model call), so under load the service waits a few
milliseconds after the first pending request (not at all when others are already
queued), takes every request queued by then (up to `max_items` rows), and scores them
in one call, in a worker thread: the event loop keeps accepting requests meanwhile.
Up to `workers` calls run at once; a batch is gathered only when a worker is free to
take it, so the requests that come while every worker is busy make the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 0.005
# Rows a call takes at most: enough for full encoder calls on a CPU (64 texts), and few
# enough that requests queued together are shared among the workers (8 clients x 16
# titles: 184 / 200 titles/s in two calls of 64 against 147 / 139 in one of 128).
DEFAULT_MAX_ITEMS = 64


@dataclass
class _Pending:
    request: Any
    size: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Merges concurrent `submit(request)` calls into calls of `score(requests) ->
    results` (one result per request, in order), run in worker threads, at most
    `workers` at a time. `size` tells a request's number of rows."""

    def __init__(
        self,
        score: Callable[[list[Any]], list[Any]],
        size: Callable[[Any], int],
        window_s: float = DEFAULT_WINDOW_S,
        max_items: int = DEFAULT_MAX_ITEMS,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.score = score
        self.size = size
        self.window_s = window_s
        self.max_items = max_items
        self.workers = workers
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self.calls = 0  # scoring calls made (each serves one or more requests)

    async def submit(self, request: Any) -> Any:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, self.size(request), future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            first = await self._queue.get()
            batch = [first]
            size = first.size
            if self._queue.empty():
                # wait for company only when none is queued: under load the requests that
                # came in during the last call are the batch, and waiting adds nothing
                await asyncio.sleep(self.window_s)
            while size < self.max_items and not self._queue.empty():
                nxt = self._queue.get_nowait()
                batch.append(nxt)
                size += nxt.size
            self.calls += 1
            call = asyncio.create_task(self._call(batch, free))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[_Pending], free: asyncio.Semaphore) -> None:
        try:
            results = await asyncio.to_thread(self.score, [pending.request for pending in batch])
        except Exception as exc:  # the requests fail, the service goes on
            logger.exception("scoring failed")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            free.release()
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
