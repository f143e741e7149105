"""Audio encoders: a clip's sound track -> one L2-normalised vector per segment.

- `LogMelAudioEncoder` ("logmel-v1", the `lite` profile): no weights. Per segment of
  SEGMENT_S seconds, the mean and the spread of 40 log-mel bands, loudness, the share of
  silence, the rate of onsets and a tempo estimate; centred and scaled by fixed
  constants. Deterministic and fast (numpy).
- `TransformersAudioEncoder` (the `full` profile): a pretrained audio transformer from
  transformers (an Audio Spectrogram Transformer by default), its pooled output per
  segment; loaded like the other encoders from a hub id or a local folder.

Both take (samples, rate) pairs: mono float32 samples at `media.AUDIO_RATE`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    EncoderUnavailableError,
    l2_normalize,
    load_local_or_hub,
    resolve_device,
)

logger = logging.getLogger(__name__)

LOGMEL_ID = "logmel-v1"
DEFAULT_AST = "MIT/ast-finetuned-audioset-10-10-0.4593"

# Segments of the sound track, each one vector (a clip shorter than one is one segment).
SEGMENT_S = 2.0
# The shortest sound handed to a transformer's feature extractor (seconds).
MIN_TRANSFORMER_S = 0.5
# Short-time analysis: 25 ms windows every 10 ms, 40 mel bands up to 8 kHz.
N_FFT = 400
HOP = 160
N_MELS = 40
FMIN, FMAX = 30.0, 8000.0
# Levels in dB relative to full scale: a frame quieter than SILENCE_DB is silent; dB
# values are centred at DB_CENTRE and divided by DB_SCALE (speech and music sit around
# -30 dBFS, silence at -100).
SILENCE_DB = -50.0
DB_CENTRE, DB_SCALE = -60.0, 30.0
DB_FLOOR = -100.0
# Onsets: frames whose spectral flux exceeds the segment's median by this factor.
ONSET_FACTOR = 2.0
ONSET_RATE_SCALE = 10.0  # onsets per second
TEMPO_MIN, TEMPO_MAX, TEMPO_SCALE = 60.0, 200.0, 200.0  # beats per minute

FEATURE_NAMES: tuple[str, ...] = (
    *(f"mel{i}_mean" for i in range(N_MELS)),
    *(f"mel{i}_std" for i in range(N_MELS)),
    "loudness",
    "silence",
    "onset_rate",
    "tempo",
)


def mel_filterbank(rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the mel scale (HTK formula)."""

    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(np.array(FMIN)), mel(np.array(min(FMAX, rate / 2))), n_mels + 2))
    freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, freqs.size), np.float32)
    for i in range(n_mels):
        lo, mid, hi = edges[i : i + 3]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[i] = np.clip(np.minimum(up, down), 0.0, None)
    return fb


def segment_features(samples: np.ndarray, rate: int, fb: np.ndarray) -> np.ndarray:
    """The raw descriptor of one segment (FEATURE_NAMES order)."""
    if samples.size < N_FFT:
        samples = np.pad(samples, (0, N_FFT - samples.size))
    n = 1 + (samples.size - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        samples, shape=(n, N_FFT), strides=(samples.strides[0] * HOP, samples.strides[0])
    ) * np.hanning(N_FFT).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 / N_FFT  # (n, F)
    mel_db = 10 * np.log10(np.maximum(power @ fb.T, 1e-10))  # (n, n_mels)
    mel_db = np.maximum(mel_db, DB_FLOOR)
    rms_db = 10 * np.log10(np.maximum(np.mean(frames**2, axis=1), 1e-10))
    rms_db = np.maximum(rms_db, DB_FLOOR)
    flux = np.maximum(np.diff(mel_db, axis=0), 0.0).sum(axis=1) if n > 1 else np.zeros(1)
    threshold = ONSET_FACTOR * np.median(flux) + 1e-6
    peaks = (flux[1:-1] > threshold) & (flux[1:-1] >= flux[:-2]) & (flux[1:-1] >= flux[2:]) if flux.size > 2 else np.zeros(0, bool)
    seconds = samples.size / rate
    tempo = _tempo(flux, rate)
    return np.concatenate([
        (mel_db.mean(axis=0) - DB_CENTRE) / DB_SCALE,
        mel_db.std(axis=0) / DB_SCALE,
        [(rms_db.mean() - DB_CENTRE) / DB_SCALE],
        [float(np.mean(rms_db < SILENCE_DB))],
        [peaks.sum() / seconds / ONSET_RATE_SCALE],
        [tempo / TEMPO_SCALE],
    ]).astype(np.float32)


def _tempo(flux: np.ndarray, rate: int) -> float:
    """Beats per minute of the strongest periodicity of the onset envelope in
    [TEMPO_MIN, TEMPO_MAX], 0 when the segment has none."""
    env = flux - flux.mean()
    if env.size < 4 or not np.any(env):
        return 0.0
    frames_per_s = rate / HOP
    lags = np.arange(int(frames_per_s * 60 / TEMPO_MAX), int(frames_per_s * 60 / TEMPO_MIN) + 1)
    lags = lags[(lags > 0) & (lags < env.size)]
    if not lags.size:
        return 0.0
    ac = np.array([np.dot(env[:-lag], env[lag:]) for lag in lags])
    if ac.max() <= 0:
        return 0.0
    return float(60 * frames_per_s / lags[int(np.argmax(ac))])


class LogMelAudioEncoder:
    """Model-free sound descriptor per segment (the `lite` profile's audio encoder)."""

    model_id: str = LOGMEL_ID
    dim: int = len(FEATURE_NAMES)

    def __init__(self) -> None:
        self._banks: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"LogMelAudioEncoder(model_id={self.model_id!r}, dim={self.dim})"

    def encode(self, clips: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """(samples, rate) pairs -> (S_i, dim) float32, L2-normalised rows."""
        out = []
        for samples, rate in clips:
            samples = np.asarray(samples, np.float32).reshape(-1)
            if samples.size == 0:
                out.append(np.zeros((0, self.dim), np.float32))
                continue
            fb = self._banks.setdefault(rate, mel_filterbank(rate))
            parts = split_segments(samples, max(1, int(SEGMENT_S * rate)))
            out.append(l2_normalize(np.stack([segment_features(p, rate, fb) for p in parts])))
        return out


def split_segments(samples: np.ndarray, seg: int) -> list[np.ndarray]:
    """Consecutive pieces of `seg` samples; a tail shorter than half a piece joins the
    piece before it, so no segment describes a fraction of a second of sound."""
    parts = [samples[lo : lo + seg] for lo in range(0, samples.size, seg)]
    if len(parts) > 1 and parts[-1].size < seg // 2:
        parts[-2] = np.concatenate(parts[-2:])
        parts.pop()
    return parts


class TransformersAudioEncoder:
    """A pretrained audio transformer (transformers' AutoModel and feature extractor):
    the mean of its last hidden states per segment of `segment_s` seconds.

    Args:
        model_id_or_path: hub id (default an Audio Spectrogram Transformer) or a local
            folder saved by `save_pretrained` (model and feature extractor).
        device: torch device; default CUDA when available.
        model_id: the id recorded in the bank manifest; defaults to `model_id_or_path`.
    """

    def __init__(
        self,
        model_id_or_path: str | Path = DEFAULT_AST,
        device: str | None = None,
        *,
        model_id: str | None = None,
        segment_s: float = 10.0,
    ) -> None:
        source = str(model_id_or_path)
        self.model_id = model_id or source
        self.device = resolve_device(device)
        self.segment_s = segment_s
        self._extractor, self._model = _load_audio_model(source, self.device)
        self.rate = int(getattr(self._extractor, "sampling_rate", 16_000))
        try:
            probe = self.encode([(np.zeros(self.rate // 2, np.float32), self.rate)])
        except Exception as exc:
            raise EncoderUnavailableError(source, f"model loaded but a test encode failed: {exc}") from exc
        self.dim = int(probe[0].shape[1])

    def __repr__(self) -> str:
        return f"TransformersAudioEncoder(model_id={self.model_id!r}, device={self.device!r})"

    def encode(self, clips: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        import torch

        out = []
        for samples, rate in clips:
            samples = np.asarray(samples, np.float32).reshape(-1)
            if samples.size == 0:
                out.append(np.zeros((0, getattr(self, "dim", 0)), np.float32))
                continue
            if rate != self.rate:
                samples = _resample(samples, rate, self.rate)
            parts = split_segments(samples, max(1, int(self.segment_s * self.rate)))
            # A filterbank needs whole analysis windows: a sound shorter than
            # MIN_TRANSFORMER_S is padded with silence instead of failing the item.
            shortest = int(MIN_TRANSFORMER_S * self.rate)
            parts = [np.pad(p, (0, max(0, shortest - p.size))) for p in parts]
            inputs = self._extractor(parts, sampling_rate=self.rate, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.no_grad():
                hidden = self._model(**inputs).last_hidden_state  # (S, T, h)
            out.append(l2_normalize(hidden.mean(dim=1).float().cpu().numpy()))
        return out


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear interpolation to another rate (the decoder already gives AUDIO_RATE)."""
    n = max(1, round(samples.size * target / rate))
    return np.interp(np.linspace(0, samples.size - 1, n), np.arange(samples.size), samples).astype(np.float32)


def _load_audio_model(source: str, device: str) -> tuple[Any, Any]:
    try:
        from transformers import AutoFeatureExtractor, AutoModel
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EncoderUnavailableError(source, f"transformers is not installed ({exc})") from exc

    def load(name: str, local_only: bool) -> tuple[Any, Any]:
        extractor = AutoFeatureExtractor.from_pretrained(name, local_files_only=local_only)
        model = AutoModel.from_pretrained(name, local_files_only=local_only).to(device).eval()
        return extractor, model

    return load_local_or_hub(source, load)
