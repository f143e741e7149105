"""Packed sequences: the bank's frames, tokens and sound without padding, and the batches
made from them are the padded batches the model always read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvpp.memory_bank.schema import BankPoint, Manifest
from mvpp.memory_bank.token_storage import decode_rows, encode_rows
from mvpp.predictor.config import ModelConfig
from mvpp.predictor.dataset import FeatureTable, TargetNorm, make_batch
from mvpp.predictor.model import PopularityModel
from mvpp.retriever.bulk import Neighbours
from mvpp.retriever.packed import PackedSequences
from mvpp.retriever.snapshot import snapshot_from_points

TOKEN_DIM, FRAME_DIM = 12, 6


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def ragged(n: int, dim: int, seed: int = 0) -> list[np.ndarray | None]:
    rng = np.random.default_rng(seed)
    return [None if i % 5 == 3 else unit(rng.standard_normal((1 + (i * 7) % 9, dim))) for i in range(n)]


def padded_by_hand(arrays: list[np.ndarray | None], width: int, dim: int) -> np.ndarray:
    out = np.zeros((len(arrays), width, dim), np.float32)
    for i, a in enumerate(arrays):
        if a is not None:
            out[i, : len(a)] = a.astype(np.float16)
    return out


def test_padded_batches_are_the_padded_table() -> None:
    arrays = ragged(30, TOKEN_DIM)
    packed = PackedSequences.from_arrays(arrays, TOKEN_DIM)
    width = max(len(a) for a in arrays if a is not None)
    assert packed.shape == (30, width, TOKEN_DIM)
    assert packed.rows.shape == (sum(0 if a is None else len(a) for a in arrays), TOKEN_DIM)
    table = padded_by_hand(arrays, width, TOKEN_DIM)
    items = np.array([4, 0, 3, 29, 4, 17])
    assert np.array_equal(packed.padded(items), table[items])
    # a wider table pads with more zeros
    wider = PackedSequences(packed.rows, packed.lengths, width + 3)
    assert np.array_equal(wider.padded(items)[:, :width], table[items]) and not wider.padded(items)[:, width:].any()
    assert packed.padded(np.array([], np.int64)).shape == (0, width, TOKEN_DIM)


def test_codes_stay_codes_until_a_batch_reads_them() -> None:
    arrays = ragged(25, TOKEN_DIM, seed=1)
    coded = PackedSequences.from_arrays(arrays, TOKEN_DIM, coded=True)
    assert coded.rows.dtype == np.uint8 and coded.coded
    plain = PackedSequences.from_arrays([None if a is None else decode_rows(encode_rows(a)) for a in arrays], TOKEN_DIM)
    every = np.arange(25)
    # the float16 values the codes stand for, bit for bit
    assert np.array_equal(coded.padded(every), plain.padded(every))
    assert coded.nbytes < 0.6 * plain.nbytes
    # codes given as codes are taken as they are
    again = PackedSequences.from_arrays([None if a is None else encode_rows(a) for a in arrays], TOKEN_DIM, coded=True)
    assert np.array_equal(again.rows, coded.rows)


def test_inconsistent_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="rows in all"):
        PackedSequences(np.zeros((5, 3), np.float16), np.array([2, 2]), 2)
    with pytest.raises(ValueError, match="longer than the width"):
        PackedSequences(np.zeros((5, 3), np.float16), np.array([2, 3]), 2)
    empty = PackedSequences.empty(4, dim=7)
    assert empty.shape == (4, 0, 7) and empty.padded(np.arange(4)).shape == (4, 0, 7)


def _snapshot(n: int, storage: str):
    manifest = Manifest(profile="test", text_model="t", captioner_model=None, frame_model="f", retrieval_dim=8,
                        token_dim=TOKEN_DIM, frame_dim=FRAME_DIM, n_frames=3, max_tokens=8,
                        label_names=["views"], token_storage=storage)
    rng = np.random.default_rng(2)
    tokens, frames = ragged(n, TOKEN_DIM, seed=3), ragged(n, FRAME_DIM, seed=4)
    points = [
        BankPoint(
            item_id=f"item-{i:03d}",
            retrieval=unit(rng.standard_normal(8)),
            tokens=tokens[i],
            frames=None if frames[i] is None else frames[i][:3],
            title=f"title {i}",
            labels={"views": float(i)},
            targets={"views": float(np.log2(2 + i))},
        )
        for i in range(n)
    ]
    return snapshot_from_points(points, manifest), tokens


@pytest.mark.parametrize("storage", ["int8", "float16"])
def test_neighbour_batches_match_the_padded_projection(storage: str) -> None:
    """The neighbours' projected sequences in a batch are the projection of the padded
    table, gathered; projecting only the rows a batch needs changes none of them."""
    snap, tokens = _snapshot(40, storage)
    assert snap.tokens.coded == (storage == "int8")
    assert snap.token_len.max() == 8  # tokens past the bank's max_tokens are dropped
    cfg = ModelConfig(d_model=16)
    cfg.inputs.d_token, cfg.inputs.d_frame, cfg.inputs.n_targets = TOKEN_DIM, FRAME_DIM, 1
    torch.manual_seed(0)
    model = PopularityModel(ModelConfig.from_dict(cfg.to_dict())).eval()
    table = FeatureTable(snap, TargetNorm.fit(snap.targets))
    rng = np.random.default_rng(5)
    nb = Neighbours(rng.integers(-1, 40, (6, 4)), rng.random((6, 4)).astype(np.float32))
    query = table.items(torch.arange(6))

    table.project(model)
    everything = make_batch(table, query, nb)
    table.project(model, nb.indices[nb.indices >= 0])
    needed = make_batch(table, query, nb)
    for name in ("nb_tokens", "nb_token_mask", "nb_frames", "nb_frame_mask"):
        assert torch.equal(getattr(everything, name), getattr(needed, name)), name

    # by hand: every item's padded tokens projected, then gathered by neighbour
    every = np.arange(len(snap))
    with torch.no_grad():
        padded = torch.from_numpy(snap.tokens.padded(every))
        mask = torch.arange(snap.tokens.width) < torch.from_numpy(snap.token_len).long().unsqueeze(-1)
        assert model.token_proj is not None
        projected = model.token_proj(padded, mask)  # (N, n, d)
    for b in range(6):
        for j in range(4):
            row = nb.indices[b, j]
            n_rows = 0 if row < 0 else int(snap.token_len[row])
            assert int(needed.nb_token_mask[b, j].sum()) == n_rows
            if n_rows:
                torch.testing.assert_close(needed.nb_tokens[b, j, :n_rows], projected[row, :n_rows], rtol=0, atol=1e-6)
            assert not needed.nb_tokens[b, j, n_rows:].any()
    # and the items' own tokens are their rows, as the bank gives them back
    for i in range(6):
        if tokens[i] is not None:
            kept = tokens[i][:8]
            expected = decode_rows(encode_rows(kept)) if storage == "int8" else kept.astype(np.float16)
            assert np.array_equal(query.tokens[i, : len(kept)].numpy(), expected.astype(np.float32))
