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
    "cast_float",
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
        out[start : start + _BLOCK_ROWS] = cast_float(cast_float(v, np.float16), out.dtype)
    return out


# numpy's own float dtypes that torch converts between (vectorised).
_TORCH_FLOATS = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
# Below this many values numpy's conversion costs less than handing the array to torch.
_TORCH_MIN_VALUES = 4096


def cast_float(values: np.ndarray, dtype: type | np.dtype) -> np.ndarray:
    """`values.astype(dtype)`, the same values to the bit, converted by torch where both
    types are float16/32/64: numpy converts to and from float16 one element at a time (a
    million values: 8.5 ms to float16 and 4.3 back, against 0.9 and 0.7 in torch), which
    was most of decoding a service call's neighbour tokens."""
    values = np.asarray(values)
    target = np.dtype(dtype)
    if values.dtype == target:
        return values
    if values.dtype not in _TORCH_FLOATS or target not in _TORCH_FLOATS or values.size < _TORCH_MIN_VALUES:
        return values.astype(target)
    import torch  # here: `mvpp-bank` commands that never decode start without it

    source = torch.from_numpy(np.ascontiguousarray(values))
    return source.to(getattr(torch, _TORCH_FLOATS[target])).numpy()


def stored_tokens(rows: np.ndarray, storage: str) -> np.ndarray:
    """Unit token rows as a bank with `storage` gives them back (float32)."""
    if check_token_storage(storage) == "int8":
        return decode_rows(encode_rows(rows))
    return np.asarray(rows, np.float32).astype(np.float16).astype(np.float32)
