"""The bank's records: one point per item, the manifest, ids and content hashes.

Every backend stores exactly these records; nothing outside `memory_bank/store`
knows how Qdrant represents them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .token_storage import LEGACY_TOKEN_STORAGE

SCHEMA_VERSION = 1

# Named vectors of a bank point.
RETRIEVAL = "retrieval"
FRAMES = "frames"
TEXT = "text"
AUDIO = "audio"

# Item ids whose point ids are remembered: a build looks a batch's items up by point id
# (resume) and then stores them, and the UUID is computed once for both.
POINT_ID_CACHE = 1 << 16

# UUID5 namespace of item ids: fixed so the same item id maps to the same point everywhere.
ITEM_NAMESPACE = uuid.UUID("6f1c1c9e-4a8e-5b8e-9a55-2f1b7d0c3e11")

# Payload keys that get a payload index: the retriever's filters, and nothing else (each
# index is kept up to date on every upsert and rebuilt by the optimiser; an item is found
# by its point id, never through an index on its item_id).
INDEXED_FIELDS: dict[str, str] = {
    "labelled": "bool",
    "has_video": "bool",
    "has_audio": "bool",
    "published_ts": "float",
}


@functools.lru_cache(maxsize=POINT_ID_CACHE)
def point_id(item_id: str) -> str:
    """Stable point id of an item: re-upserting the same item replaces it."""
    return str(uuid.uuid5(ITEM_NAMESPACE, str(item_id)))


class BankMismatchError(ValueError):
    """A bank was opened with encoders or dimensions other than those it was built with."""


@dataclass
class Manifest:
    """What a bank was built with; stored beside the points and checked on open."""

    profile: str
    text_model: str
    captioner_model: str | None
    frame_model: str
    retrieval_dim: int
    token_dim: int
    frame_dim: int
    n_frames: int
    max_tokens: int
    label_names: list[str] = field(default_factory=list)
    label_transform: str = "log2p1"
    schema_version: int = SCHEMA_VERSION
    # The metadata table's columns the bank was built from (`metadata.ColumnMap` as a
    # dict): scoring reads new items' tables with them by default. Empty for banks built
    # from videos alone, or before columns were recorded.
    columns: dict[str, Any] = field(default_factory=dict)
    # Sound features (None: none; banks built before they existed have none).
    audio_model: str | None = None
    audio_dim: int = 0
    # The encoder spec the bank was built with (model paths included), so that scoring
    # and querying load the same encoders; empty for banks built before it was recorded.
    encoder_spec: dict[str, Any] = field(default_factory=dict)
    # How the token features are stored (`token_storage.TOKEN_STORAGES`); banks recorded
    # before the setting hold float16. Fixed when the bank is created.
    token_storage: str = LEGACY_TOKEN_STORAGE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    # Fields that must agree between the bank and the encoders opening it.
    ENCODER_FIELDS = (
        "text_model",
        "captioner_model",
        "frame_model",
        "retrieval_dim",
        "token_dim",
        "frame_dim",
        "n_frames",
        "max_tokens",
        "audio_model",
        "audio_dim",
        "schema_version",
    )

    def check_compatible(
        self,
        other: Manifest,
        mine: str = "the bank has",
        theirs: str = "requested",
        advice: str = "Open it with the same --profile and model overrides, or build a new bank.",
    ) -> None:
        """Raise BankMismatchError naming both sides of every disagreement (`mine` says
        what this manifest describes, `theirs` the other)."""
        diffs = []
        for name in self.ENCODER_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                diffs.append(f"{name}: {mine} {a!r}, {theirs} {b!r}")
        if diffs:
            raise BankMismatchError(
                "encoders or dimensions differ (" + "; ".join(diffs) + "). " + advice
            )


@dataclass
class BankPoint:
    """One item of the bank.

    retrieval: (D,) float32, L2-normalised; None when the item has no retrieval text
    (a bare clip in a profile without a captioner: it is then found by its frames).
    frames: (L, d_v) or None when the item has no video. tokens: (n, d_t) or None when
    it has no text.
    """

    item_id: str
    retrieval: np.ndarray | None
    frames: np.ndarray | None = None
    tokens: np.ndarray | None = None
    # (S, d_a) one row per segment of the sound track; None without sound
    audio: np.ndarray | None = None
    title: str = ""
    captions: list[str] = field(default_factory=list)
    labels: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    published_at: str | None = None
    published_ts: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    # Hash of what the encoders read (title, video, encoders): equal keys, equal vectors.
    encoding_key: str = ""
    duration_s: float | None = None
    video: str | None = None
    # When the labels were observed (e.g. scrape time): the post's age at observation.
    observed_at: str | None = None
    observed_ts: float | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.targets)

    @property
    def has_video(self) -> bool:
        return self.frames is not None and len(self.frames) > 0

    @property
    def has_audio(self) -> bool:
        return self.audio is not None and len(self.audio) > 0

    def payload(self) -> dict[str, Any]:
        """The Qdrant payload of this point (JSON-safe: a non-finite number is None).

        A field without a value (None, no captions) is left out, as `from_payload` reads
        it: each field costs the engine time on every upsert and optimisation (a fifth
        of the time to build a text-only point's payload went to the six empty ones).
        """
        # only the fields that can hold a float go through json_safe: this runs once per
        # point of every build and import
        payload = {
            "item_id": self.item_id,
            "title": self.title,
            "captions": list(self.captions) or None,
            "labels": json_safe(self.labels),
            "targets": json_safe(self.targets),
            "labelled": self.labelled,
            "has_video": self.has_video,
            "has_audio": self.has_audio,
            "published_at": self.published_at,
            "published_ts": json_safe(self.published_ts),
            "metadata": json_safe(self.metadata),
            "content_hash": self.content_hash,
            "encoding_key": self.encoding_key,
            "duration_s": json_safe(self.duration_s),
            "video": self.video,
            "observed_at": self.observed_at,
            "observed_ts": json_safe(self.observed_ts),
        }
        return {k: v for k, v in payload.items() if v is not None}

    @classmethod
    def from_payload(
        cls,
        payload: dict[str, Any],
        retrieval: np.ndarray | None,
        frames: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
        audio: np.ndarray | None = None,
    ) -> BankPoint:
        return cls(
            item_id=str(payload["item_id"]),
            retrieval=retrieval,
            frames=frames,
            tokens=tokens,
            audio=audio,
            title=payload.get("title") or "",
            captions=list(payload.get("captions") or []),
            labels=dict(payload.get("labels") or {}),
            targets=dict(payload.get("targets") or {}),
            published_at=payload.get("published_at"),
            published_ts=payload.get("published_ts"),
            metadata=dict(payload.get("metadata") or {}),
            content_hash=payload.get("content_hash") or "",
            encoding_key=payload.get("encoding_key") or "",
            duration_s=payload.get("duration_s"),
            video=payload.get("video"),
            observed_at=payload.get("observed_at"),
            observed_ts=payload.get("observed_ts"),
        )


@dataclass
class SearchFilter:
    """Which points a search may return. All conditions must hold."""

    exclude_ids: list[str] = field(default_factory=list)
    labelled_only: bool = False
    published_before: float | None = None  # unix seconds; strict
    has_video: bool | None = None
    has_audio: bool | None = None

    def is_empty(self) -> bool:
        return (
            not self.exclude_ids
            and not self.labelled_only
            and self.published_before is None
            and self.has_video is None
            and self.has_audio is None
        )


@dataclass
class Hit:
    """One retrieved neighbour."""

    item_id: str
    score: float
    payload: dict[str, Any]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, in nested dicts
    and lists too: JSON and the Qdrant payload have no place for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def content_hash(parts: dict[str, Any]) -> str:
    """Hash of everything that determines an item's point (inputs + encoder ids).

    A rebuild skips an item whose stored hash equals this one.
    """
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]
