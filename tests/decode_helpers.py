"""Decode functions for worker-process tests: module-level, so that spawned workers can import them."""

from __future__ import annotations

import os
from pathlib import Path

from mvpp.media import MediaError
from mvpp.memory_bank.decoding import Decoded, decode_item

CRASH_MARKER = "crash"


def crash_on_marker(path: str, n_frames: int, max_side: int) -> Decoded:
    """Like `decode_item`, but the worker process dies at once on a file named *crash*."""
    if CRASH_MARKER in Path(path).stem:
        os._exit(3)  # what a segfault in FFmpeg looks like from the pool
    return decode_item(path, n_frames, max_side)


def raise_on_marker(path: str, n_frames: int, max_side: int) -> Decoded:
    """Like `decode_item`, but an unforeseen exception escapes for a file named *crash*."""
    if CRASH_MARKER in Path(path).stem:
        raise RuntimeError("decoder exploded")
    return decode_item(path, n_frames, max_side)


def report_niceness(path: str, n_frames: int, max_side: int) -> Decoded:
    """The worker's scheduling priority, sent back as the reason of a `MediaError`."""
    return MediaError(path, f"nice {os.nice(0)}")
