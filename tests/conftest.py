"""Shared fixtures: the real data beside the project, and synthetic clips written with PyAV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a clear message."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
    return path


def write_clip(path: Path, n_frames: int = 24, size: tuple[int, int] = (64, 48), fps: int = 12,
               seed: int = 0, sound: str | None = None, sound_seconds: float | None = None,
               rate: int = 44100, layout: str = "stereo", corrupt_sound: bool = False) -> Path:
    """A small synthetic H.264 clip: a moving square over a coloured gradient.

    sound: None (no sound track), "tone" (a chord whose pitches follow `seed`), "noise"
    or "silence", encoded as AAC at `rate` in `layout`, lasting `sound_seconds` (default:
    the video's length); `corrupt_sound` replaces its packets by random bytes.
    """
    import av

    rng = np.random.default_rng(seed)
    w, h = size
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    base[..., 1] = rng.integers(0, 255)
    base[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        audio = None
        if sound is not None:
            audio = container.add_stream("aac", rate=rate)
            audio.layout = layout
        for i in range(n_frames):
            img = base.copy()
            x = (i * 3) % max(1, w - 10)
            img[10:20, x : x + 10] = rng.integers(0, 255, 3)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            seconds = n_frames / fps if sound_seconds is None else sound_seconds
            _write_sound(container, audio, sound, seconds, rate, layout, seed, corrupt_sound)
    return path


def _write_sound(container, stream, kind: str, seconds: float, rate: int, layout: str, seed: int,
                 corrupt: bool) -> None:
    import av

    rng = np.random.default_rng(seed + 1000)
    t = np.arange(int(seconds * rate)) / rate
    if kind == "tone":
        pitches = 220.0 * 2 ** (rng.integers(0, 24, 3) / 12)
        wave = sum(0.2 * np.sin(2 * np.pi * f * t) for f in pitches) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    elif kind == "noise":
        wave = 0.3 * rng.standard_normal(t.size)
    else:
        wave = np.zeros(t.size)
    channels = 2 if layout == "stereo" else 1
    data = np.tile(wave.astype(np.float32), (channels, 1))

    def mux(packet) -> None:
        if corrupt:  # the same timing, random contents: the decoder cannot read it
            garbled = av.Packet(bytes(rng.integers(0, 255, packet.size, dtype=np.uint8)))
            garbled.pts, garbled.dts, garbled.time_base = packet.pts, packet.dts, packet.time_base
            garbled.duration, garbled.stream = packet.duration, stream
            packet = garbled
        container.mux(packet)

    for lo in range(0, data.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, lo : lo + 1024]), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, lo
        for packet in stream.encode(frame):
            mux(packet)
    for packet in stream.encode(None):
        mux(packet)


@pytest.fixture(scope="session")
def encoders():
    """The lite profile's encoders (the real MiniLM text model, frame statistics), loaded once."""
    from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders

    return load_encoders(EncoderSpec.from_profile("lite"))


@pytest.fixture(scope="session")
def tiny_sentence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT sentence model saved locally (`tiny_models.make_tiny_sentence_model`)."""
    from tiny_models import make_tiny_sentence_model

    return make_tiny_sentence_model(tmp_path_factory.mktemp("tiny-sentence") / "sentence")


@pytest.fixture
def real_videos() -> Path:
    return shared_path("videos")
