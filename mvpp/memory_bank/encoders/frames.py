"""Frame encoders: open_clip image embeddings (`full`) and a model-free descriptor (`lite`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import EncoderUnavailableError, l2_normalize, looks_like_local_path, resolve_device

logger = logging.getLogger(__name__)

__all__ = [
    "FRAME_STATS_ID",
    "FrameStatsEncoder",
    "OpenClipFrameEncoder",
    "open_clip_model_id",
]

FRAME_STATS_ID = "frame-stats-v1"

_HF_HUB = "hf-hub:"
_LOCAL_DIR = "local-dir:"


def _check_clips(clips: Sequence[np.ndarray]) -> list[np.ndarray]:
    checked: list[np.ndarray] = []
    for i, clip in enumerate(clips):
        clip = np.asarray(clip)
        if clip.ndim >= 1 and clip.shape[0] == 0:
            checked.append(clip)  # a clip without frames is normal (e.g. undecodable video)
            continue
        if clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"clip {i} has shape {clip.shape}, expected (L, H, W, 3)")
        if clip.dtype != np.uint8:
            raise ValueError(f"clip {i} has dtype {clip.dtype}, expected uint8 RGB")
        checked.append(clip)
    return checked


def _empty_or_clip(clip: np.ndarray) -> bool:
    return clip.shape[0] == 0


# --------------------------------------------------------------------------- open_clip


def open_clip_model_id(model_name: str, pretrained: str | None = None) -> str:
    """The manifest id of an open_clip model, e.g. "open_clip:ViT-B-32/laion2b_s34b_b79k".

    Local paths contribute only their final name so the id stays the same on
    every machine that holds the same files.
    """
    name = str(model_name)
    if name.startswith(_HF_HUB):
        return f"open_clip:{name}"
    if name.startswith(_LOCAL_DIR):
        return f"open_clip:{_LOCAL_DIR}{Path(name[len(_LOCAL_DIR) :]).name}"
    if Path(name).expanduser().is_dir():
        return f"open_clip:{_LOCAL_DIR}{Path(name).name}"
    if name.endswith(".json"):
        name = Path(name).stem
    if not pretrained:
        return f"open_clip:{name}"
    tag = Path(pretrained).name if looks_like_local_path(pretrained) else pretrained
    return f"open_clip:{name}/{tag}"


class OpenClipFrameEncoder:
    """open_clip image tower as a `FrameEncoder`.

    `model_name` may be
    - a built-in architecture ("ViT-B-32") with `pretrained` a tag
      ("laion2b_s34b_b79k") or a checkpoint file (.safetensors / .pt / .bin);
    - a local folder holding `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...})
      and the weights (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`, ...),
      given as a plain path or as "local-dir:<path>";
    - a model config json file (the bare model config, as in open_clip's
      `model_configs/`), registered under its file stem, with `pretrained` a checkpoint file;
    - "hf-hub:org/repo".
    Weights are required: a model that would start from random weights is an error.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "laion2b_s34b_b79k",
        device: str | None = None,
        *,
        batch_size: int = 64,
        model_id: str | None = None,
    ) -> None:
        self.device: str = resolve_device(device)
        self.batch_size = max(1, batch_size)
        model_name = str(model_name)
        pretrained = str(pretrained) if pretrained else None
        self.model_id: str = model_id or open_clip_model_id(model_name, pretrained)
        model, self._preprocess = _create_open_clip(model_name, pretrained, self.device)

        import torch

        # Only the image tower is used; dropping the rest frees the text tower's memory.
        self._visual = model.visual.eval()
        # open_clip's "fp16" precision halves the matrix weights but keeps embeddings and
        # norms in fp32, so the first parameter's dtype is not the input dtype.
        self._dtype = input_dtype(self.device)
        output_dim = getattr(self._visual, "output_dim", None)
        if output_dim is None:
            size = getattr(self._visual, "image_size", (224, 224))
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            probe = torch.zeros((1, 3, *size), dtype=self._dtype, device=self.device)
            with torch.inference_mode():
                output_dim = self._visual(probe).shape[-1]
        self.dim: int = int(output_dim)
        logger.info("frame encoder %s on %s: dim=%d", self.model_id, self.device, self.dim)

    def __repr__(self) -> str:
        return f"OpenClipFrameEncoder(model_id={self.model_id!r}, dim={self.dim}, device={self.device!r})"

    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(L_i, H, W, 3) uint8 clips -> (L_i, dim) float32 L2-normalised embeddings.

        Frames of all clips go through the model together, `batch_size` at a time.
        """
        import torch
        from PIL import Image

        clips = _check_clips(clips)
        lengths = [0 if _empty_or_clip(clip) else clip.shape[0] for clip in clips]
        frames = [frame for clip, n in zip(clips, lengths, strict=True) if n for frame in clip]
        rows: list[np.ndarray] = []
        for start in range(0, len(frames), self.batch_size):
            chunk = frames[start : start + self.batch_size]
            pixels = torch.stack([self._preprocess(Image.fromarray(frame)) for frame in chunk])
            pixels = pixels.to(device=self.device, dtype=self._dtype)
            with torch.inference_mode():
                features = self._visual(pixels)
            rows.append(features.float().cpu().numpy())
        flat = l2_normalize(np.concatenate(rows)) if rows else np.zeros((0, self.dim), np.float32)
        out: list[np.ndarray] = []
        offset = 0
        for n in lengths:
            out.append(np.ascontiguousarray(flat[offset : offset + n]))
            offset += n
        return out


def input_dtype(device: str) -> Any:
    """Pixel dtype of the image tower: fp16 on CUDA (its weights are made fp16), else fp32."""
    import torch

    return torch.float16 if device.startswith("cuda") else torch.float32


def _create_open_clip(model_name: str, pretrained: str | None, device: str) -> tuple[Any, Any]:
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EncoderUnavailableError(model_name, f"open_clip is not installed ({exc})") from exc

    shown = f"{model_name} ({pretrained})" if pretrained else model_name
    name = model_name
    path = Path(model_name).expanduser()
    if model_name.startswith((_HF_HUB, _LOCAL_DIR)):
        pretrained = None  # open_clip ignores it for these schemas
    elif path.is_dir():
        name = f"{_LOCAL_DIR}{path}"
        pretrained = None
    elif model_name.endswith(".json"):
        if not path.is_file():
            raise EncoderUnavailableError(shown, f"model config file {path} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    elif looks_like_local_path(model_name):
        raise EncoderUnavailableError(shown, f"local path {path} does not exist")
    if pretrained and looks_like_local_path(pretrained):
        ckpt = Path(pretrained).expanduser()
        if not ckpt.is_file():
            raise EncoderUnavailableError(shown, f"checkpoint file {ckpt} does not exist")
        pretrained = str(ckpt)

    precision = "fp16" if device.startswith("cuda") else "fp32"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            device=device,
            precision=precision,
            # Never fetch separate base tower weights: the full CLIP checkpoint is required.
            pretrained_text=False,
            require_pretrained=True,
        )
    except Exception as exc:
        raise EncoderUnavailableError(shown, str(exc)) from exc
    return model, preprocess


# --------------------------------------------------------------------------- frame statistics

# Working resolution of the descriptor: every frame is reduced to GRID x GRID.
GRID = 64
_LAYOUT = 4  # the luma layout is a LAYOUT x LAYOUT grid of block means
_HUE_BINS = 8  # 45 degrees each, starting at red
_SAT_BINS = 4
_VAL_BINS = 4
_EDGE_THRESHOLD = 0.04  # |central-difference gradient| of luma in [0, 1] units

# (feature group, names, expected values, typical spread, weight).
# Raw statistics are all positive and similar across videos, so their cosine is
# ~0.9 for any pair. Each value is therefore centred on an expected value and
# divided by a typical spread (fixed constants, estimated on natural video
# frames sampled ~1 s apart, rounded) so that an average frame maps near the
# origin and cosine similarity measures whether two frames deviate from the
# average in the same direction. The weight balances groups of different sizes
# (the histograms and the layout have many entries, motion only two).
# Changing any constant changes the descriptor: bump FRAME_STATS_ID with it.
_GROUPS: tuple[tuple[str, tuple[str, ...], tuple[float, ...], float, float], ...] = (
    ("mean_rgb", ("mean_r", "mean_g", "mean_b"), (0.45, 0.45, 0.42), 0.12, 1.0),
    ("std_rgb", ("std_r", "std_g", "std_b"), (0.23, 0.23, 0.23), 0.06, 1.0),
    ("brightness", ("brightness",), (0.45,), 0.12, 1.0),
    ("contrast", ("contrast",), (0.23,), 0.06, 1.0),
    ("colourfulness", ("colourfulness",), (0.13,), 0.08, 1.0),
    # log10 of the variance of the 4-neighbour luma Laplacian
    ("sharpness", ("log_sharpness",), (-1.5,), 0.35, 1.0),
    ("edge_density", ("edge_density",), (0.4,), 0.15, 1.0),
    # Histograms hold square-rooted (Hellinger) fractions of the frame. Natural
    # video is mostly unsaturated, with orange/skin and blue hues the most common.
    (
        "hue_hist",
        tuple(f"hue_{i}" for i in range(_HUE_BINS)),
        (0.14, 0.14, 0.08, 0.06, 0.12, 0.05, 0.03, 0.05),
        0.07,
        0.6,
    ),
    ("sat_hist", tuple(f"sat_{i}" for i in range(_SAT_BINS)), (0.75, 0.45, 0.3, 0.1), 0.2, 0.6),
    ("val_hist", tuple(f"val_{i}" for i in range(_VAL_BINS)), (0.4, 0.6, 0.45, 0.4), 0.15, 0.6),
    # block mean luma minus the frame's mean luma
    ("layout", tuple(f"layout_{i}" for i in range(_LAYOUT * _LAYOUT)), (0.0,) * 16, 0.15, 0.5),
    # square root of the mean absolute luma difference to the previous / next frame
    ("motion", ("motion_prev", "motion_next"), (0.22, 0.22), 0.15, 1.0),
)

FEATURE_NAMES: tuple[str, ...] = tuple(name for group in _GROUPS for name in group[1])
_CENTRE = np.array([c for g in _GROUPS for c in g[2]], dtype=np.float32)
_SCALE = np.array([g[4] / g[3] for g in _GROUPS for _ in g[1]], dtype=np.float32)
assert _CENTRE.shape == _SCALE.shape == (len(FEATURE_NAMES),)


class FrameStatsEncoder:
    """Deterministic, model-free frame descriptor (the `lite` profile's frame encoder).

    Per frame, on a GRID x GRID area-averaged copy: mean and std of R, G, B;
    brightness and contrast (mean and std of luma); colourfulness (Hasler and
    Suesstrunk); sharpness (log variance of the luma Laplacian); edge density;
    a hue histogram weighted by chroma, saturation and value histograms; a 4x4
    luma layout; and motion, the mean absolute luma difference to the previous
    and to the next frame (0 at the clip's ends). Features are centred and
    scaled with the fixed constants in `_GROUPS`, then L2-normalised. Numpy only,
    a few ms per frame.
    """

    model_id: str = FRAME_STATS_ID
    dim: int = len(FEATURE_NAMES)
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def __repr__(self) -> str:
        return f"FrameStatsEncoder(model_id={self.model_id!r}, dim={self.dim})"

    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(L_i, H, W, 3) uint8 clips -> (L_i, dim) float32 L2-normalised descriptors."""
        out: list[np.ndarray] = []
        for clip in _check_clips(clips):
            if _empty_or_clip(clip):
                out.append(np.zeros((0, self.dim), dtype=np.float32))
                continue
            raw = frame_statistics(clip)
            out.append(l2_normalize((raw - _CENTRE) * _SCALE))
        return out


def _downscale(clip: np.ndarray) -> np.ndarray:
    """(L, H, W, 3) uint8 -> (L, GRID, GRID, 3) float32 in [0, 1], by area averaging."""
    h, w = clip.shape[1:3]
    # Subsample very large frames first so the averaging touches few pixels.
    step = max(1, min(h, w) // (3 * GRID))
    if step > 1:
        clip = clip[:, ::step, ::step]
        h, w = clip.shape[1:3]
    f = max(1, min(h, w) // GRID)
    if f > 1:
        hc, wc = (h // f) * f, (w // f) * f
        # f*f strided slice additions in uint16 are several times faster than a
        # float mean over a reshaped view (f <= 5 here, so the sum cannot overflow).
        acc = np.zeros((clip.shape[0], hc // f, wc // f, 3), dtype=np.uint16)
        for i in range(f):
            for j in range(f):
                acc += clip[:, i:hc:f, j:wc:f]
        x = acc.astype(np.float32) * np.float32(1.0 / (f * f))
    else:
        x = clip.astype(np.float32)
    rows = np.linspace(0, x.shape[1] - 1, GRID).round().astype(np.intp)
    cols = np.linspace(0, x.shape[2] - 1, GRID).round().astype(np.intp)
    return x[:, rows][:, :, cols] * np.float32(1.0 / 255.0)


def _histogram(bins: np.ndarray, n_bins: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-frame histogram of (L, P) bin indices -> (L, n_bins) fractions of the P pixels."""
    n, p = bins.shape
    flat = (bins + (np.arange(n)[:, None] * n_bins)).ravel()
    w = None if weights is None else weights.ravel()
    counts = np.bincount(flat, weights=w, minlength=n * n_bins).reshape(n, n_bins)
    return counts.astype(np.float32) / np.float32(p)


def frame_statistics(clip: np.ndarray) -> np.ndarray:
    """Raw (uncentred) descriptor of every frame of an (L, H, W, 3) uint8 clip: (L, dim) float32."""
    x = _downscale(clip)
    n = x.shape[0]
    # Channel-first and contiguous: per-frame reductions over a flat pixel axis are fast.
    r, g, b = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).reshape(3, n, GRID * GRID)
    luma = 0.299 * r + 0.587 * g + 0.114 * b

    mean_rgb = np.stack([r.mean(1), g.mean(1), b.mean(1)], axis=1)
    std_rgb = np.stack([r.std(1), g.std(1), b.std(1)], axis=1)
    brightness = luma.mean(1)
    contrast = luma.std(1)

    rg = r - g
    yb = 0.5 * (r + g) - b
    colourfulness = np.sqrt(rg.var(1) + yb.var(1)) + 0.3 * np.sqrt(
        rg.mean(1) ** 2 + yb.mean(1) ** 2
    )

    img = luma.reshape(n, GRID, GRID)
    up, down = img[:, :-2, 1:-1], img[:, 2:, 1:-1]
    left, right = img[:, 1:-1, :-2], img[:, 1:-1, 2:]
    laplacian = 4.0 * img[:, 1:-1, 1:-1] - up - down - left - right
    sharpness = np.log10(laplacian.reshape(n, -1).var(1) + 1e-5)
    gx = 0.5 * (right - left)
    gy = 0.5 * (down - up)
    edges = (gx * gx + gy * gy) > _EDGE_THRESHOLD**2
    edge_density = edges.reshape(n, -1).mean(1)

    # HSV from the RGB extremes; hue is only meaningful where there is chroma,
    # so each pixel votes for its hue bin with its chroma (max - min).
    maxc = np.maximum(np.maximum(r, g), b)
    chroma = maxc - np.minimum(np.minimum(r, g), b)
    safe = np.where(chroma > 1e-6, chroma, np.float32(1.0))
    hue = np.where(
        maxc == r,
        ((g - b) / safe) % 6.0,
        np.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    ) * np.float32(1.0 / 6.0)
    sat = chroma / np.where(maxc > 1e-6, maxc, np.float32(1.0))

    def to_bins(values: np.ndarray, k: int) -> np.ndarray:
        return np.clip((values * k).astype(np.intp), 0, k - 1)

    hue_hist = _histogram(to_bins(hue, _HUE_BINS), _HUE_BINS, chroma)
    sat_hist = _histogram(to_bins(sat, _SAT_BINS), _SAT_BINS)
    val_hist = _histogram(to_bins(maxc, _VAL_BINS), _VAL_BINS)

    block = GRID // _LAYOUT
    layout = img.reshape(n, _LAYOUT, block, _LAYOUT, block).mean(axis=(2, 4)).reshape(n, -1)
    layout = layout - brightness[:, None]

    diffs = np.abs(np.diff(luma, axis=0)).mean(1) if n > 1 else np.zeros(0, np.float32)
    motion_prev = np.concatenate([[0.0], diffs])
    motion_next = np.concatenate([diffs, [0.0]])

    features = np.concatenate(
        [
            mean_rgb,
            std_rgb,
            brightness[:, None],
            contrast[:, None],
            colourfulness[:, None],
            sharpness[:, None],
            edge_density[:, None],
            np.sqrt(hue_hist),
            np.sqrt(sat_hist),
            np.sqrt(val_hist),
            layout,
            np.sqrt(motion_prev)[:, None],
            np.sqrt(motion_next)[:, None],
        ],
        axis=1,
    )
    return features.astype(np.float32, copy=False)
