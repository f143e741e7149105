"""The whole bank as arrays, read once by scrolling and cached on disk.

Training and bulk retrieval need every item's vectors and labels at once; one scroll
of the store gives them, and a cache keyed on the bank's content (the sorted content
hashes of all points) makes the next run start in seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvpp.memory_bank.schema import AUDIO, FRAMES, RETRIEVAL, TEXT, BankPoint, Manifest
from mvpp.memory_bank.store.base import BankStore
from mvpp.memory_bank.token_storage import LEGACY_TOKEN_STORAGE, encode_rows
from mvpp.retriever.packed import PackedSequences

logger = logging.getLogger(__name__)

CACHE_VERSION = 4
# The sequences and the names of their rows' lengths in the cache.
_SEQUENCES = (("frames", "frame_len"), ("tokens", "token_len"), ("audio", "audio_len"))


@dataclass
class BankSnapshot:
    """Arrays over the N items of a bank, in a fixed order (sorted by item id).

    retrieval: (N, D) float32, zero rows where has_retrieval is False.
    targets: (N, T) float32, NaN where a target is missing; label_names: the T names.
    frames (N, L, d_v), tokens (N, n, d_t), audio (N, S, d_a): each item's sequence of
    rows, packed (see packed.PackedSequences; the shapes are the padded ones); frame_len,
    token_len, audio_len (N,) their lengths. A bank without sound features has S = 0 and
    d_a = 1.
    published_ts: (N,) float64, NaN when unknown; observed_ts: (N,) float64, when the labels
    were observed (NaN when unknown); duration_s: (N,) float64, the video file's duration.
    """

    item_ids: list[str]
    retrieval: np.ndarray
    has_retrieval: np.ndarray
    targets: np.ndarray
    label_names: list[str]
    published_ts: np.ndarray
    frames: PackedSequences
    tokens: PackedSequences
    titles: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    raw_labels: list[dict] = field(default_factory=list)
    duration_s: np.ndarray | None = None
    fingerprint: str = ""
    observed_ts: np.ndarray | None = None
    audio: PackedSequences | None = None
    # The bank's token storage: an int8 bank's tokens stay 8-bit codes here and in the
    # cache (they decode to the same float16 values), half of float16's bytes.
    token_storage: str = LEGACY_TOKEN_STORAGE

    def __post_init__(self) -> None:
        # Optional per-item times and durations are NaN arrays rather than None.
        for name in ("duration_s", "observed_ts"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self.item_ids), np.nan, np.float64))
        if self.audio is None:
            self.audio = PackedSequences.empty(len(self.item_ids))

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def frame_len(self) -> np.ndarray:
        return self.frames.lengths

    @property
    def token_len(self) -> np.ndarray:
        return self.tokens.lengths

    @property
    def audio_len(self) -> np.ndarray:
        assert self.audio is not None
        return self.audio.lengths

    def index_of(self) -> dict[str, int]:
        return {item_id: i for i, item_id in enumerate(self.item_ids)}

    def with_targets(self, names: list[str]) -> BankSnapshot:
        """The same items with only the targets `names`, in that order (a shallow copy:
        the arrays are shared). A name the bank lacks is a column of NaN."""
        cols = [self.targets[:, self.label_names.index(n)] if n in self.label_names else None for n in names]
        targets = np.full((len(self), len(names)), np.nan, np.float32)
        for j, col in enumerate(cols):
            if col is not None:
                targets[:, j] = col
        view = copy.copy(self)
        view.targets, view.label_names = targets, list(names)
        return view

    @property
    def labelled(self) -> np.ndarray:
        return ~np.isnan(self.targets).all(axis=1) if self.targets.size else np.zeros(len(self), bool)

    # -- persistence ------------------------------------------------------------------

    _ARRAYS = ("retrieval", "has_retrieval", "targets", "published_ts", "duration_s", "observed_ts")

    def save(self, folder: Path) -> None:
        """Write the arrays to `folder`; sequences as their packed rows and lengths."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp_arrays = folder / "arrays.tmp.npz"
        arrays = {n: getattr(self, n) for n in self._ARRAYS}
        shapes = {}
        for seq, length in _SEQUENCES:
            packed = getattr(self, seq)
            arrays[seq], arrays[length] = packed.rows, packed.lengths
            shapes[seq] = list(packed.shape)
        np.savez(tmp_arrays, **arrays)
        tmp_arrays.replace(folder / "arrays.npz")
        meta = {
            "version": CACHE_VERSION,
            "shapes": shapes,
            "token_storage": self.token_storage,
            "fingerprint": self.fingerprint,
            "item_ids": self.item_ids,
            "label_names": self.label_names,
            "titles": self.titles,
            "metadata": self.metadata,
            "raw_labels": self.raw_labels,
        }
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps(meta, ensure_ascii=False))
        tmp.replace(folder / "index.json")

    @classmethod
    def load(cls, folder: Path) -> BankSnapshot | None:
        """The cached snapshot in `folder`; None when there is none, or it is of another
        version, or damaged (then the caller reads the bank again and rewrites it)."""
        if not (folder / "index.json").exists():
            return None
        try:
            meta = json.loads((folder / "index.json").read_text())
            if meta.get("version") != CACHE_VERSION:
                return None
            storage = meta.get("token_storage", LEGACY_TOKEN_STORAGE)
            with np.load(folder / "arrays.npz", allow_pickle=False) as data:
                arrays = {n: data[n] for n in cls._ARRAYS}
                for seq, length in _SEQUENCES:
                    rows = data[seq]
                    coded = seq == "tokens" and storage == "int8"
                    if rows.dtype != (np.uint8 if coded else np.float16):
                        raise ValueError(f"{seq} rows are {rows.dtype}")
                    arrays[seq] = PackedSequences(rows, data[length], int(meta["shapes"][seq][1]), coded)
        except Exception as exc:  # a truncated zip, a torn JSON, a missing array, ...
            logger.warning("the bank cache %s is damaged (%s): reading the bank again", folder, exc)
            return None
        return cls(
            item_ids=meta["item_ids"],
            label_names=meta["label_names"],
            titles=meta["titles"],
            metadata=meta["metadata"],
            raw_labels=meta["raw_labels"],
            fingerprint=meta["fingerprint"],
            token_storage=storage,
            **arrays,
        )


def bank_fingerprint(store: BankStore) -> str:
    """Hash of every point's content hash: changes whenever any item changes."""
    digest = hashlib.sha256()
    hashes = sorted(f"{item_id}:{content}" for item_id, content in store.content_hashes())
    for h in hashes:
        digest.update(h.encode())
    manifest = store.manifest
    if manifest is not None:
        recorded = manifest.to_dict()
        if recorded["token_storage"] == LEGACY_TOKEN_STORAGE:
            # as before the setting existed: a bank's fingerprint (its runs', its cache's)
            # does not change with the version that reads it
            del recorded["token_storage"]
        digest.update(json.dumps(recorded, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def read_snapshot(
    store: BankStore,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> BankSnapshot:
    """All items of the bank as arrays; reuses `cache_dir` when the bank is unchanged."""
    fingerprint = bank_fingerprint(store)
    if cache_dir is not None:
        cached = BankSnapshot.load(cache_dir / fingerprint)
        if cached is not None and cached.fingerprint == fingerprint:
            logger.info("bank arrays from cache %s", cache_dir / fingerprint)
            return cached
    manifest = store.manifest
    assert manifest is not None
    points = []
    for p in store.scroll(vectors=(RETRIEVAL, FRAMES, TEXT, AUDIO)):
        points.append(_slim(p, manifest))
        if progress:
            progress(1)
    snap = snapshot_from_points(points, manifest)
    snap.fingerprint = fingerprint
    if cache_dir is not None:
        snap.save(cache_dir / fingerprint)
        _drop_stale_caches(cache_dir, keep=fingerprint)
    return snap


def _f16(rows: np.ndarray | None) -> np.ndarray | None:
    return None if rows is None else rows.astype(np.float16)


def _slim(point: BankPoint, manifest: Manifest) -> BankPoint:
    """What a snapshot needs of a scrolled point, and no more: the whole bank is held until
    it is packed into arrays. Multivectors go to float16 at once (the bank stores them at
    float16 or coarser, so nothing is lost: the arrays are float16 too), tokens past the
    bank's `max_tokens` are dropped and an int8 bank's tokens go back to their codes, and
    so are the fields the arrays do not use (hashes, captions, paths)."""
    tokens = None if point.tokens is None else point.tokens[: manifest.max_tokens]
    return BankPoint(
        item_id=point.item_id,
        retrieval=point.retrieval,
        frames=_f16(point.frames),
        tokens=encode_rows(tokens) if tokens is not None and manifest.token_storage == "int8" else _f16(tokens),
        audio=_f16(point.audio),
        title=point.title,
        labels=point.labels,
        targets=point.targets,
        published_ts=point.published_ts,
        metadata=point.metadata,
        duration_s=point.duration_s,
        observed_ts=point.observed_ts,
    )


def _drop_stale_caches(cache_dir: Path, keep: str) -> None:
    """Remove the caches of the bank's earlier contents: each is as large as the bank's
    arrays, and a bank that grows every day would otherwise keep one per day."""
    for folder in cache_dir.iterdir():
        if folder.is_dir() and folder.name != keep and (folder / "index.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed the stale bank cache %s", folder)


def snapshot_from_points(points: list[BankPoint], manifest: Manifest, fresh: bool = False) -> BankSnapshot:
    """Arrays of `points` as the bank holds them: sorted by item id, sequences as wide as
    the longest. `fresh` (items being scored): in the order given, sequences as wide as
    the bank's full lengths, so a chunk of items without frames still has their shape."""
    if not fresh:
        points = sorted(points, key=lambda p: p.item_id)
    n = len(points)
    label_names = list(manifest.label_names) or sorted({k for p in points for k in p.targets})
    retrieval = np.zeros((n, manifest.retrieval_dim), np.float32)
    has_retrieval = np.zeros(n, bool)
    targets = np.full((n, len(label_names)), np.nan, np.float32)
    published = np.full(n, np.nan, np.float64)
    duration = np.full(n, np.nan, np.float64)
    observed = np.full(n, np.nan, np.float64)
    for i, p in enumerate(points):
        if p.retrieval is not None and len(p.retrieval):
            retrieval[i] = p.retrieval
            has_retrieval[i] = True
        for j, name in enumerate(label_names):
            if name in p.targets and p.targets[name] is not None:
                targets[i, j] = p.targets[name]
        if p.published_ts is not None:
            published[i] = p.published_ts
        if p.duration_s is not None:
            duration[i] = p.duration_s
        if p.observed_ts is not None:
            observed[i] = p.observed_ts
    tokens = [None if p.tokens is None else p.tokens[: manifest.max_tokens] for p in points]
    return BankSnapshot(
        item_ids=[p.item_id for p in points],
        retrieval=retrieval,
        has_retrieval=has_retrieval,
        targets=targets,
        label_names=label_names,
        published_ts=published,
        frames=PackedSequences.from_arrays(
            [p.frames for p in points], manifest.frame_dim, manifest.n_frames if fresh else 0
        ),
        tokens=PackedSequences.from_arrays(
            tokens, manifest.token_dim, manifest.max_tokens if fresh else 0, coded=manifest.token_storage == "int8"
        ),
        audio=PackedSequences.from_arrays([p.audio for p in points], max(1, manifest.audio_dim), 1 if fresh else 0),
        titles=[p.title for p in points],
        metadata=[p.metadata for p in points],
        raw_labels=[p.labels for p in points],
        duration_s=duration,
        observed_ts=observed,
        token_storage=manifest.token_storage,
    )
