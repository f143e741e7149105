"""Video files -> evenly spaced RGB frames, with PyAV.

Everything that can go wrong with a file (missing, empty, not a video, corrupt,
truncated to nothing decodable) becomes a `MediaError` carrying the reason, so a
batch can report it per item and go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# A clip whose decodable frames end before this fraction of its declared duration is
# reported as truncated rather than silently indexed from a fragment.
TRUNCATION_TOLERANCE = 0.9

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")


class MediaError(Exception):
    """A video could not be read. `reason` is short and meant for a failures file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        # Rebuilt from (path, reason): decoder worker processes send errors back pickled.
        return (MediaError, (self.path, self.reason))


# The sound track is decoded to mono at this rate, at most this many seconds of it.
AUDIO_RATE = 16_000
MAX_AUDIO_S = 60.0
# Peak amplitude below which a sound track counts as silent (-60 dBFS): a muted
# track says nothing about the clip, so it is matched and modelled as no sound.
SILENT_PEAK = 1e-3


@dataclass
class Clip:
    """Decoded frames of one video, and its sound.

    frames: (L, H, W, 3) uint8, L <= the number requested (short clips give what they
    have); mask: (n_requested,) bool, True where a frame exists. audio: (n,) float32
    mono samples at `audio_rate` in [-1, 1], None when the file has no sound track or
    it could not be decoded (`audio_error` then says why).
    """

    path: str
    frames: np.ndarray
    mask: np.ndarray
    duration_s: float | None
    fps: float | None
    width: int
    height: int
    audio: np.ndarray | None = None
    audio_rate: int = AUDIO_RATE
    audio_error: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def has_sound(self) -> bool:
        """A decoded sound track that is not silent."""
        return self.audio is not None and self.audio.size > 0 and float(np.abs(self.audio).max()) >= SILENT_PEAK


@dataclass
class Probe:
    duration_s: float | None
    fps: float | None
    n_frames: int | None
    width: int
    height: int
    codec: str


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def list_videos(folder: Path) -> list[Path]:
    """Video files directly or recursively under `folder`, sorted for determinism."""
    return sorted(p for p in folder.rglob("*") if is_video_file(p))


def _open(path: Path):
    import av

    if not path.exists():
        raise MediaError(path, "file not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except Exception as exc:  # PyAV raises several error types for bad containers
        raise MediaError(path, f"not a readable video ({type(exc).__name__}: {exc})") from exc
    if not container.streams.video:
        container.close()
        raise MediaError(path, "no video stream")
    return container


def probe(path: Path | str) -> Probe:
    """Duration, frame rate and size from the container header (no decoding)."""
    path = Path(path)
    container = _open(path)
    try:
        return _probe_open(container)
    finally:
        container.close()


def _probe_open(container) -> Probe:
    stream = container.streams.video[0]
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    fps = float(stream.average_rate) if stream.average_rate else None
    n = stream.frames or None
    ctx = stream.codec_context
    return Probe(duration, fps, n, int(ctx.width or 0), int(ctx.height or 0), ctx.name or "")


def _resize(frame: np.ndarray, max_side: int) -> np.ndarray:
    h, w = frame.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return frame
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


def _same_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Frames resized to the first one's size: a stream may change resolution midway."""
    h, w = frames[0].shape[:2]
    if all(f.shape[:2] == (h, w) for f in frames):
        return frames
    from PIL import Image

    return [
        f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR))
        for f in frames
    ]


def decode_frames(path: Path | str, n_frames: int = 10, max_side: int = 384) -> Clip:
    """Decode `n_frames` frames evenly spaced over the clip.

    Frames are picked at the centres of `n_frames` equal time slices. Decoding is one
    sequential pass (seeking is unreliable on truncated files); each decoded frame is
    kept if it is the first at or after its slice centre. Frames are downscaled so the
    longer side is at most `max_side` (encoders resize to 224 anyway).
    """
    path = Path(path)
    if n_frames <= 0:
        raise ValueError("n_frames must be positive")
    container = _open(path)
    try:
        info = _probe_open(container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = _decode_even(container, stream, info, n_frames, max_side)
        audio, audio_error = _decode_audio(container)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(path, f"decoding failed ({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()
    if not frames:
        raise MediaError(path, "no decodable frames")
    arr = np.stack(_same_size(frames))
    mask = np.zeros(n_frames, dtype=bool)
    mask[: len(frames)] = True
    return Clip(str(path), arr, mask, info.duration_s, info.fps, info.width, info.height,
                audio=audio, audio_error=audio_error)


def _decode_audio(container, rate: int = AUDIO_RATE, max_s: float = MAX_AUDIO_S) -> tuple[np.ndarray | None, str | None]:
    """The first sound track as mono float32 samples at `rate` (at most `max_s` seconds),
    and why there are none: (None, None) for a clip without sound, (None, reason) for a
    sound track that cannot be decoded (the frames are still usable)."""
    import av

    if not container.streams.audio:
        return None, None
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks: list[np.ndarray] = []
    total, limit = 0, int(rate * max_s)
    try:
        container.seek(0)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                total += chunks[-1].size
            if total >= limit:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except Exception as exc:  # a damaged sound track: the clip keeps its frames
        return None, f"sound track not decodable ({type(exc).__name__}: {exc})"
    samples = np.concatenate(chunks)[:limit].astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        return None, "sound track without decodable samples"
    return np.clip(samples, -1.0, 1.0), None


def _decode_even(container, stream, info: Probe, n_frames: int, max_side: int) -> list[np.ndarray]:
    import av

    duration = info.duration_s
    if duration is None or duration <= 0:
        # Unknown length: keep every frame (downscaled), then subsample.
        all_frames = []
        for frame in container.decode(stream):
            all_frames.append(_resize(frame.to_ndarray(format="rgb24"), max_side))
        return _subsample(all_frames, n_frames)

    targets = [(i + 0.5) * duration / n_frames for i in range(n_frames)]
    start = 0.0
    if stream.start_time is not None and stream.time_base is not None:
        start = float(stream.start_time * stream.time_base)
    picked: list[np.ndarray] = []
    t_idx = 0
    last_t = 0.0
    damaged = False
    try:
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            t = frame.time - start
            last_t = max(last_t, t)
            if t >= targets[t_idx]:
                # One frame serves one slice: short clips give fewer frames, never repeats.
                picked.append(_resize(frame.to_ndarray(format="rgb24"), max_side))
                while t_idx < n_frames and t >= targets[t_idx]:
                    t_idx += 1
            if t_idx >= n_frames:
                break
    except av.error.FFmpegError:
        damaged = True
    # A frame covers [t, t + 1/fps): compare where the last one ends, not where it starts.
    last_end = last_t + (1.0 / info.fps if info.fps else 0.0)
    if t_idx < n_frames and last_end < TRUNCATION_TOLERANCE * duration:
        # The header promises more than the file holds: a cut-off or damaged file.
        raise MediaError(
            container.name,
            f"truncated or corrupt: frames end at {last_end:.2f} s of {duration:.2f} s"
            + (" (decoder error)" if damaged else ""),
        )
    return picked


def _subsample(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    if len(frames) <= n:
        return frames
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]
