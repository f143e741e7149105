"""Encoder interfaces shared by the bank builder, the retriever and the predictor.

Three roles, each a structural protocol so that the heavy model wrappers
(`text.py`, `captioner.py`, `frames.py`) and test doubles are interchangeable:

- `TextEncoder`: retrieval vectors (pooled, L2-normalised) and per-token
  features of a text.
- `FrameEncoder`: one L2-normalised vector per video frame.
- `Captioner`: one caption per frame.

Loading problems (weights missing locally and the hub unreachable) surface as
`EncoderUnavailableError`, whose message tells the user how to get going
offline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "AudioEncoder",
    "Captioner",
    "EncoderUnavailableError",
    "FrameEncoder",
    "TextEncoder",
    "hub_offline",
    "l2_normalize",
    "load_cache_first",
    "looks_like_local_path",
    "require_cached_when_offline",
    "resolve_device",
]


class EncoderUnavailableError(RuntimeError):
    """An encoder's weights could not be loaded (missing local path, hub unreachable, ...)."""

    def __init__(self, model: str, reason: str | None = None) -> None:
        self.model = model
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"Could not load encoder weights for '{model}'{detail}. The weights are not "
            "available offline (no usable local copy, and the Hugging Face hub could not be "
            "reached). Point the profile at a local copy of the model, or use `--profile lite`, "
            "which needs no downloads."
        )


@runtime_checkable
class TextEncoder(Protocol):
    """Sentence embedder giving a pooled retrieval vector and per-token features."""

    model_id: str
    dim: int
    token_dim: int

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(B, dim) float32, rows L2-normalised."""
        ...

    def encode_tokens(self, texts: list[str], max_tokens: int = 32) -> list[np.ndarray]:
        """Per text an (n_i, token_dim) float32 array, special tokens dropped, n_i <= max_tokens."""
        ...

    def encode_both(
        self, texts: list[str], max_tokens: int = 32, batch_size: int | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """`encode` and `encode_tokens` from a single transformer pass."""
        ...


@runtime_checkable
class FrameEncoder(Protocol):
    """Per-frame visual descriptor."""

    model_id: str
    dim: int

    def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Clips of (L_i, H, W, 3) uint8 RGB frames -> (L_i, dim) float32, rows L2-normalised."""
        ...


@runtime_checkable
class AudioEncoder(Protocol):
    """Sound descriptor, one vector per segment of the sound track."""

    model_id: str
    dim: int

    def encode(self, clips: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """(samples, rate) mono float32 pairs -> (S_i, dim) float32, rows L2-normalised."""
        ...


@runtime_checkable
class Captioner(Protocol):
    """Image captioner."""

    model_id: str

    def caption(self, frames: list[np.ndarray]) -> list[str]:
        """(H, W, 3) uint8 RGB frames -> one caption each."""
        ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32; all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def resolve_device(device: str | None = None) -> str:
    """The torch device to run on: the given one, else CUDA when present, else CPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hub_offline() -> bool:
    """True when the environment forbids Hugging Face hub network access."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def looks_like_local_path(name: str) -> bool:
    """Whether `name` is meant as a filesystem path rather than a hub id like 'org/model'.

    A path that does not exist must fail fast with a clear error instead of being
    sent to the hub as a repository name (which, offline, only yields a confusing
    connection error after retries).
    """
    if not name:
        return False
    if Path(name).expanduser().exists():
        return True
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name:
        return True
    # Hub ids are "name" or "org/name"; anything deeper is a path.
    return name.count("/") > 1


def require_cached_when_offline(repo_id: str) -> None:
    """Offline, fail at once when the hub cache holds no copy of `repo_id`, before the
    model libraries (seconds to import) are loaded only to find that out.

    Ids without an organisation are left to the loader, which may map them to another
    repository.
    """
    if not hub_offline() or "/" not in repo_id:
        return
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:
        raise EncoderUnavailableError(repo_id, "not in the local Hugging Face cache") from exc


def load_local_or_hub(source: str, load: Callable[[str, bool], T]) -> T:
    """`load(name, local_files_only)` of a transformers model given as a local folder
    (loaded from it alone) or a hub id (the cache first, then the hub when allowed);
    every failure is an `EncoderUnavailableError` naming `source`."""
    path = Path(source).expanduser()
    if not path.is_dir() and not looks_like_local_path(source):
        require_cached_when_offline(source)
    if path.is_dir():
        try:
            return load(str(path), True)
        except Exception as exc:
            raise EncoderUnavailableError(source, f"cannot load the local model folder ({exc})") from exc
    if looks_like_local_path(source):
        what = "is not a model folder" if path.exists() else "does not exist"
        raise EncoderUnavailableError(source, f"local path {path} {what}")
    return load_cache_first(source, lambda local_only: load(source, local_only))


def load_cache_first(model: str, load: Callable[[bool], T]) -> T:
    """Call `load(local_files_only)` from the local cache first, then (if allowed) the hub.

    Trying the cache first avoids network round trips for models that are already
    downloaded; the second attempt only happens when the hub may be used.
    Any failure is re-raised as `EncoderUnavailableError` naming `model`.
    """
    try:
        return load(True)
    except Exception as cache_exc:  # any loader failure here means "not usable from the cache"
        if hub_offline():
            raise EncoderUnavailableError(
                model, f"not in the local cache ({cache_exc})"
            ) from cache_exc
        logger.info("%s not in the local cache (%s); trying the Hugging Face hub", model, cache_exc)
    try:
        return load(False)
    except Exception as exc:
        raise EncoderUnavailableError(model, str(exc)) from exc
