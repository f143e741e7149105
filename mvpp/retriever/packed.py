"""Per-item sequences (a title's token rows, a video's frames, its sound segments) stored
back to back, without padding.

Sequences differ in length (a MicroLens title has about 15 token rows, the longest 32),
so a padded (N, P, d) table holds mostly zeros; packed, the bank's arrays take what their
rows take. Batches get padded copies of the items they need (`padded`). Rows of a bank
that stores its tokens as 8-bit codes (memory_bank.token_storage) stay codes here and are
decoded when a batch reads them: half of float16's bytes in RAM and in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mvpp.memory_bank.token_storage import cast_float, decode_rows, encode_rows

__all__ = ["PackedSequences"]


@dataclass
class PackedSequences:
    """The sequences of N items.

    rows: (R, d) float16 values, or uint8 codes of unit rows when `coded`; R = the sum of
    `lengths` (N,). width: the length a padded batch gets (at least the longest sequence).
    """

    rows: np.ndarray
    lengths: np.ndarray
    width: int
    coded: bool = False

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, np.int32)
        self.offsets = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        if self.rows.ndim != 2 or len(self.rows) != self.offsets[-1]:
            raise ValueError(f"{len(self.lengths)} sequences of {int(self.offsets[-1])} rows in all, "
                             f"but rows have shape {self.rows.shape}")
        if len(self.lengths) and int(self.lengths.max()) > self.width:
            raise ValueError(f"a sequence of {int(self.lengths.max())} rows is longer than the width {self.width}")

    # -- making ------------------------------------------------------------------------

    @classmethod
    def empty(cls, n: int, dim: int = 1) -> PackedSequences:
        """N items without any row: shape (N, 0, dim)."""
        return cls(np.zeros((0, dim), np.float16), np.zeros(n, np.int32), 0)

    @classmethod
    def from_arrays(
        cls, arrays: Sequence[np.ndarray | None], dim: int, width: int = 0, coded: bool = False
    ) -> PackedSequences:
        """Sequences from one (n_i, dim) array per item (None or empty: no rows); `width`
        at least the longest. Float rows of a `coded` table are encoded here; uint8
        arrays are taken as codes already."""
        lengths = np.array([0 if a is None else len(a) for a in arrays], np.int32)
        dtype = np.uint8 if coded else np.float16
        rows = np.empty((int(lengths.sum()), dim), dtype)
        at = 0
        for a, n in zip(arrays, lengths, strict=True):
            if n:
                rows[at : at + n] = a if not coded or a.dtype == np.uint8 else encode_rows(a)
                at += n
        return cls(rows, lengths, max(width, int(lengths.max()) if len(lengths) else 0), coded)

    # -- sizes -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, width, d): the shape of the padded table."""
        return (len(self), self.width, self.dim)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.lengths.nbytes + self.offsets.nbytes)

    # -- reading -----------------------------------------------------------------------

    def row_index(self, items: np.ndarray) -> np.ndarray:
        """The rows of `items` (any shape), concatenated in order: (sum of their lengths,)."""
        items = np.asarray(items, np.int64).reshape(-1)
        lengths = self.lengths[items].astype(np.int64)
        starts = self.offsets[items]
        # each item's start repeated over its rows, plus the row's place in the item
        first = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return first + np.arange(int(lengths.sum()), dtype=np.int64)

    def values(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` as float32 (codes decoded, float16 values widened)."""
        rows = self.rows[index]
        return decode_rows(rows, np.float32) if self.coded else cast_float(rows, np.float32)

    def padded(self, items: np.ndarray) -> np.ndarray:
        """(B, P, d) float32 sequences of `items` (B,), zeros past each one's length;
        P = the table's width."""
        items = np.asarray(items, np.int64)
        out = np.zeros((len(items), self.width, self.dim), np.float32)
        lengths = self.lengths[items]
        out[np.arange(self.width)[None, :] < lengths[:, None]] = self.values(self.row_index(items))
        return out
