"""Decode a build's videos batch by batch, each item to a `Clip` or a `MediaError`.

Two ways, chosen by `BuildSettings.decode_ahead`:

- in threads (off): each batch is decoded by `decode_workers` threads just before it
  is encoded. Nothing runs beside the encoders, which on the CPU need every core.
- ahead, in processes (on): `decode_workers` worker processes decode the next batch
  while the current one is encoded. On a GPU this hides decoding behind captioning.
  Threads cannot: BLIP's token-by-token generation is Python-bound and loses the
  interpreter lock to decoder threads. The workers run at a lower priority
  (`decode_niceness`): at the same priority they took the cores from the thread that
  feeds the GPU, and on an H200 a 256-clip build took 51.5 s against 40.4 s without
  overlap; at nice 10 it took 29.8 s (benchmarks/README.md).

A video that crashes its decoder process fails alone: the batch is retried in a fresh
pool, then its unfinished items one at a time, so only the culprit is reported.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import cast

from mvpp.config import BuildSettings
from mvpp.media import Clip, MediaError, decode_frames

logger = logging.getLogger(__name__)

Decoded = Clip | MediaError
DecodeFn = Callable[[str, int, int], Decoded]

# Batches in flight beyond the one being encoded: one hides decoding behind encoding;
# more only holds more frames in memory.
BATCHES_AHEAD = 1

CRASH_REASON = "the decoder process crashed on this video"


def decode_item(path: str, n_frames: int, max_side: int) -> Decoded:
    """Decode one video; every error comes back as a `MediaError` value, never raised."""
    try:
        return decode_frames(path, n_frames, max_side)
    except MediaError as exc:
        return exc
    except Exception as exc:  # an unforeseen decoder problem fails this item, not the batch
        return _raised(path, exc)


class BatchDecoder:
    """Yields the decoded items of each batch of paths, in order, one list per batch.

    `decode` must be a module-level function (worker processes import it by name). Use
    it as a context manager: leaving on an exception (Ctrl-C) stops the workers at once
    instead of waiting for the videos in their hands.
    """

    def __init__(self, settings: BuildSettings, decode: DecodeFn = decode_item) -> None:
        self.settings = settings
        self.decode = decode
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> BatchDecoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(terminate=exc_type is not None)

    def close(self, terminate: bool = False) -> None:
        """Shut the worker pool down; `terminate` kills workers mid-video."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if terminate:
            stop = getattr(pool, "terminate_workers", None)  # Python 3.14+
            if stop is not None:
                stop()
            else:
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def batches(self, batches: Iterable[list[Path]]) -> Iterator[list[Decoded]]:
        if self.settings.decode_ahead:
            yield from self._ahead(batches)
        else:
            yield from self._in_threads(batches)

    # -- threads, one batch at a time ----------------------------------------------

    def _in_threads(self, batches: Iterable[list[Path]]) -> Iterator[list[Decoded]]:
        with ThreadPoolExecutor(max_workers=self.settings.decode_workers) as pool:
            for paths in batches:
                yield list(pool.map(self._call, [str(p) for p in paths]))

    def _call(self, path: str) -> Decoded:
        try:
            return self.decode(path, self.settings.n_frames, self.settings.frame_max_side)
        except Exception as exc:  # a decode function other than decode_item may raise
            return _raised(path, exc)

    # -- processes, the next batch ahead -------------------------------------------

    def _ahead(self, batches: Iterable[list[Path]]) -> Iterator[list[Decoded]]:
        pending: deque[tuple[list[str], list[Future]]] = deque()
        try:
            for paths in batches:
                names = [str(p) for p in paths]
                pending.append((names, [self._submit(p) for p in names]))
                if len(pending) > BATCHES_AHEAD:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            self.close(terminate=bool(pending))

    def _submit(self, path: str) -> Future:
        if self._pool is None:
            # spawn, not fork: the parent holds CUDA state and torch's thread pools,
            # which a forked child inherits broken.
            self._pool = ProcessPoolExecutor(
                max_workers=self.settings.decode_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.settings.decode_niceness,),
            )
        try:
            return self._pool.submit(self.decode, path, self.settings.n_frames, self.settings.frame_max_side)
        except BrokenProcessPool:
            self._restart()
            return self._submit(path)

    def _restart(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _collect(self, paths: list[str], futures: list[Future]) -> list[Decoded]:
        results: list[Decoded | None] = [None] * len(paths)
        broken = self._gather(futures, results, range(len(paths)), paths)
        if broken:
            # The crash may have come from any video then in the pool: retry together once.
            logger.warning("a decoder process crashed; retrying %d videos", len(broken))
            self._restart()
            broken = self._gather([self._submit(paths[i]) for i in broken], results, broken, paths)
        for i in broken:
            # Still crashing: one video at a time, so that only the culprit fails.
            if self._gather([self._submit(paths[i])], results, [i], paths):
                results[i] = MediaError(paths[i], CRASH_REASON)
                logger.warning("%s: %s", paths[i], CRASH_REASON)
                self._restart()
        return cast(list[Decoded], results)  # every position filled above

    @staticmethod
    def _gather(
        futures: list[Future], results: list[Decoded | None], where: Iterable[int], paths: list[str]
    ) -> list[int]:
        """Fill results[where] from futures; returns the positions whose worker died."""
        broken = []
        for i, future in zip(where, futures, strict=True):
            try:
                results[i] = future.result()
            except (BrokenProcessPool, CancelledError):
                # Cancelled: queued in a pool that was restarted after another crash.
                broken.append(i)
            except Exception as exc:  # raised in the worker and sent back
                results[i] = _raised(paths[i], exc)
        return broken


def _init_worker(niceness: int) -> None:
    # Ctrl-C reaches the whole process group: the build stops in the parent, which then
    # shuts the pool down, instead of every worker printing its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if niceness > 0 and hasattr(os, "nice"):
        os.nice(niceness)


def _raised(path: str, exc: Exception) -> MediaError:
    logger.debug("decoding %s", path, exc_info=exc)
    return MediaError(path, f"decoding failed ({type(exc).__name__}: {exc})")
