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
               seed: int = 0) -> Path:
    """A small synthetic H.264 clip: a moving square over a coloured gradient."""
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
        for i in range(n_frames):
            img = base.copy()
            x = (i * 3) % max(1, w - 10)
            img[10:20, x : x + 10] = rng.integers(0, 255, 3)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def encoders():
    """The lite profile's encoders (the real MiniLM text model, frame statistics), loaded once."""
    from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders

    return load_encoders(EncoderSpec.from_profile("lite"))


@pytest.fixture
def real_videos() -> Path:
    return shared_path("videos")
