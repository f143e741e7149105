"""How a bank stores its token features: 8-bit codes (the default) or float16.

Token features are the bulk of a text bank (a MicroLens title keeps about 15 rows of
384 values) and are never searched, only read back for the predictor, so they can be
stored coarser than the retrieval vector. Every token row is a unit vector (the bank's
vectors are cosine vectors), which makes a row's scale redundant: a row is stored as
one unsigned byte per value, `round(127 * x / max|x|) + 128`, and read back as the
direction of `code - 128`. That halves float16's bytes and keeps each row within a
cosine of 0.9996 of the original (0.99997 on average over the MicroLens titles' tokens).

Read-back values are rounded to float16, the precision the predictor's token table
holds them in, so an item encoded for scoring (`stored_tokens`) gets bit for bit the
features its stored copy gives.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_TOKEN_STORAGE",
    "LEGACY_TOKEN_STORAGE",
    "TOKEN_STORAGES",
    "check_token_storage",
    "decode_rows",
    "encode_rows",
    "stored_tokens",
]

TOKEN_STORAGES: tuple[str, ...] = ("int8", "float16")
DEFAULT_TOKEN_STORAGE = "int8"
# What a bank recorded before the setting existed holds.
LEGACY_TOKEN_STORAGE = "float16"

# Codes 1..255 around 128: the row's largest magnitude maps to +-127.
_LEVELS = 127
_ZERO = 128
# Rows converted at a time: a bank's whole token table at float32 would not fit in RAM.
_BLOCK_ROWS = 65_536


def check_token_storage(value: str) -> str:
    """`value` as one of `TOKEN_STORAGES` (case and spaces ignored), else ValueError."""
    name = str(value).strip().lower()
    if name not in TOKEN_STORAGES:
        raise ValueError(f"token storage must be one of {', '.join(TOKEN_STORAGES)}, got {value!r}")
    return name


def encode_rows(rows: np.ndarray) -> np.ndarray:
    """(n, d) float rows -> (n, d) uint8 codes of their directions; an all-zero row
    encodes to all 128 (and decodes to zeros)."""
    rows = np.asarray(rows)
    out = np.empty(rows.shape, np.uint8)
    for start in range(0, len(rows), _BLOCK_ROWS):
        x = rows[start : start + _BLOCK_ROWS].astype(np.float32)
        peak = np.abs(x).max(axis=-1, keepdims=True) if x.shape[-1] else np.zeros((len(x), 1), np.float32)
        scaled = np.divide(x * _LEVELS, peak, out=np.zeros_like(x), where=peak > 0)
        out[start : start + _BLOCK_ROWS] = np.rint(scaled) + _ZERO
    return out


def decode_rows(codes: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """(n, d) codes (uint8, or the same integers as floats, as an engine returns them)
    -> (n, d) unit rows rounded to float16, as `dtype`."""
    codes = np.asarray(codes)
    out = np.empty(codes.shape, dtype)
    for start in range(0, len(codes), _BLOCK_ROWS):
        # in place where it can be: a service decodes its neighbours' rows on every call
        v = codes[start : start + _BLOCK_ROWS].astype(np.float32)
        v -= _ZERO
        norms = np.sqrt(np.add.reduce(v * v, axis=-1, keepdims=True))  # np.linalg.norm's sum
        np.divide(v, norms, out=v, where=norms > 0)  # an all-zero row stays zero
        out[start : start + _BLOCK_ROWS] = v.astype(np.float16)
    return out


def stored_tokens(rows: np.ndarray, storage: str) -> np.ndarray:
    """Unit token rows as a bank with `storage` gives them back (float32)."""
    if check_token_storage(storage) == "int8":
        return decode_rows(encode_rows(rows))
    return np.asarray(rows, np.float32).astype(np.float16).astype(np.float32)
