"""Token features stored as 8-bit codes: what comes back, on both backends, in the
training cache, and what a bank records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mvpp.memory_bank.builder import stored_form
from mvpp.memory_bank.schema import RETRIEVAL, TEXT, BankPoint, Manifest
from mvpp.memory_bank.store import BankStore, EdgeBankStore, ServerBankStore
from mvpp.memory_bank.token_storage import (
    DEFAULT_TOKEN_STORAGE,
    cast_float,
    check_token_storage,
    decode_rows,
    encode_rows,
    stored_tokens,
)
from mvpp.retriever.snapshot import BankSnapshot, read_snapshot

DIM, TOKEN_DIM = 8, 48


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def manifest(storage: str) -> Manifest:
    return Manifest(profile="test", text_model="t", captioner_model=None, frame_model="f", retrieval_dim=DIM,
                    token_dim=TOKEN_DIM, frame_dim=4, n_frames=2, max_tokens=6, label_names=["views"],
                    token_storage=storage)


def points(n: int = 40, seed: int = 0) -> list[BankPoint]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        # raw encoder outputs: not unit rows, a few large values as real models have
        tokens = rng.standard_normal((1 + i % 6, TOKEN_DIM)).astype(np.float32) * 3
        tokens[:, 0] *= 20
        out.append(BankPoint(
            item_id=f"item-{i}",
            retrieval=unit_rows(rng.standard_normal(DIM)),
            tokens=tokens if i % 7 else None,
            title=f"title {i}",
            labels={"views": float(i)},
            targets={"views": float(np.log2(1 + i))},
            published_ts=1_600_000_000.0 + i,
        ))
    return out


def open_backend(backend: str, folder: Path) -> BankStore:
    return EdgeBankStore(folder) if backend == "edge" else ServerBankStore(path=str(folder), collection="bank")


def test_codes_keep_each_rows_direction() -> None:
    rows = unit_rows(np.random.default_rng(1).standard_normal((2_000, 384)))
    codes = encode_rows(rows)
    assert codes.dtype == np.uint8 and codes.min() >= 1 and codes.max() <= 255
    # the row's largest magnitude takes the extreme code
    assert (np.abs(codes.astype(int) - 128).max(axis=1) == 127).all()
    back = decode_rows(codes)
    cosine = (back * rows).sum(axis=1)
    assert cosine.min() > 0.9996
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-3)
    # read back as float16 values, which encode to the same codes: storing again is lossless
    assert np.array_equal(back, back.astype(np.float16).astype(np.float32))
    assert np.array_equal(encode_rows(back), codes)
    assert np.array_equal(stored_tokens(back, "int8"), back)
    # the engine hands the codes back as floats
    assert np.array_equal(decode_rows(codes.astype(np.float64)), back)


def test_conversions_are_numpys_to_the_bit() -> None:
    """Decoding converts through torch for speed; the values are numpy's own, every
    float16 value and rounding case included, in every output type."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (5_000, 384)).astype(np.uint8)
    codes[:3] = 128  # all-zero rows
    v = codes.astype(np.float32) - 128
    norms = np.sqrt(np.add.reduce(v * v, axis=-1, keepdims=True))
    reference = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0).astype(np.float16)
    for dtype in (np.float32, np.float16, np.float64):
        out = decode_rows(codes, dtype)
        assert out.dtype == dtype and np.array_equal(out, reference.astype(dtype))
    # every float16 bit pattern widened, and float32 values at and between float16's steps narrowed
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]
    assert np.array_equal(cast_float(halves, np.float32).view(np.uint32), halves.astype(np.float32).view(np.uint32))
    wide = halves.astype(np.float32)
    between = np.concatenate([wide, (wide[:-1] + wide[1:]) / 2, wide * np.float32(1 + 2**-12),
                              rng.standard_normal(100_000).astype(np.float32)])
    between = between[np.isfinite(between)]
    assert np.array_equal(cast_float(between, np.float16).view(np.uint16), between.astype(np.float16).view(np.uint16))
    assert cast_float(between[:10], np.float16).dtype == np.float16  # small arrays: numpy itself
    same = np.ones(3, np.float32)
    assert cast_float(same, np.float32) is same


def test_zero_rows_and_empty_tables() -> None:
    codes = encode_rows(np.zeros((2, 5), np.float32))
    assert (codes == 128).all()
    assert not decode_rows(codes).any()
    assert encode_rows(np.zeros((0, 5), np.float32)).shape == (0, 5)
    assert decode_rows(np.zeros((0, 5), np.uint8)).shape == (0, 5)


def test_storage_names() -> None:
    assert DEFAULT_TOKEN_STORAGE == "int8"
    assert check_token_storage(" INT8 ") == "int8"
    with pytest.raises(ValueError, match="int8, float16"):
        check_token_storage("int4")


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_a_bank_gives_back_what_stored_form_made(tmp_path: Path, backend: str) -> None:
    """An item encoded for scoring (`stored_form`) has bit for bit the tokens its stored
    copy gives back, and storing them again changes nothing."""
    made = [stored_form(p, "int8") for p in points()]
    with open_backend(backend, tmp_path / "bank") as store:
        store.init(manifest("int8"))
        store.upsert(made)
        got = store.get([p.item_id for p in made], vectors=(RETRIEVAL, TEXT))
        for p, g in zip(made, got, strict=True):
            assert g is not None
            if p.tokens is None:
                assert g.tokens is None
            else:
                assert g.tokens is not None and g.tokens.dtype == np.float32
                assert np.array_equal(g.tokens, p.tokens)
        store.upsert([g for g in got if g is not None])
        again = {p.item_id: p for p in store.scroll(vectors=(TEXT,))}
        for p in made:
            if p.tokens is not None:
                assert np.array_equal(again[p.item_id].tokens, p.tokens)


def test_an_int8_bank_is_smaller_and_old_banks_read_as_float16(tmp_path: Path) -> None:
    sizes = {}
    for storage in ("int8", "float16"):
        pts = [stored_form(p, storage) for p in points(400)]
        with EdgeBankStore(tmp_path / storage) as store:
            store.init(manifest(storage))
            store.upsert(pts)
            store.flush()
        text = next((tmp_path / storage / "shard" / "segments").glob("*/vector_storage-text"))
        sizes[storage] = sum(f.stat().st_blocks * 512 for f in text.rglob("*") if f.is_file())
        # reopened: the manifest says how to read them
        with EdgeBankStore(tmp_path / storage) as store:
            assert store.manifest is not None and store.manifest.token_storage == storage
            (got,) = store.get([pts[1].item_id], vectors=(TEXT,))
            assert got is not None and np.array_equal(got.tokens, pts[1].tokens)
    assert sizes["int8"] < 0.7 * sizes["float16"]

    # a manifest written before the setting existed describes a float16 bank
    recorded = json.loads((tmp_path / "float16" / "manifest.json").read_text())
    del recorded["token_storage"]
    assert Manifest.from_dict(recorded).token_storage == "float16"


def test_the_cache_keeps_codes_and_gives_the_banks_tokens(tmp_path: Path) -> None:
    pts = [stored_form(p, "int8") for p in points(60)]
    with EdgeBankStore(tmp_path / "bank") as store:
        store.init(manifest("int8"))
        store.upsert(pts)
        fresh = read_snapshot(store, tmp_path / "cache")
        cached = read_snapshot(store, tmp_path / "cache")
    assert fresh.token_storage == cached.token_storage == "int8"
    # codes in RAM as on disk: one byte per value
    assert fresh.tokens.coded and cached.tokens.coded and cached.tokens.rows.dtype == np.uint8
    assert np.array_equal(cached.tokens.rows, fresh.tokens.rows)
    assert np.array_equal(cached.token_len, fresh.token_len)
    everything = np.arange(len(fresh))
    assert np.array_equal(cached.tokens.padded(everything), fresh.tokens.padded(everything))
    by_id = {p.item_id: p for p in pts}
    for i, item_id in enumerate(fresh.item_ids):
        p = by_id[item_id]
        n = 0 if p.tokens is None else min(len(p.tokens), 6)
        assert fresh.token_len[i] == n
        if n:
            assert np.array_equal(fresh.tokens.padded([i])[0, :n], p.tokens[:n])
    (folder,) = [f for f in (tmp_path / "cache").iterdir() if f.is_dir()]
    with np.load(folder / "arrays.npz") as data:
        assert data["tokens"].dtype == np.uint8
    assert BankSnapshot.load(folder) is not None


def test_an_older_banks_fingerprint_is_unchanged(tmp_path: Path) -> None:
    """The setting is not part of a float16 bank's fingerprint, so the runs and caches of
    banks built before it still match them."""
    from mvpp.retriever.snapshot import bank_fingerprint

    with EdgeBankStore(tmp_path / "bank") as store:
        store.init(manifest("float16"))
        store.upsert([stored_form(p, "float16") for p in points(5)])
        before = bank_fingerprint(store)
    recorded = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    del recorded["token_storage"]
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps(recorded))
    with EdgeBankStore(tmp_path / "bank") as store:
        assert bank_fingerprint(store) == before
