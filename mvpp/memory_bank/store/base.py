"""The storage interface of a bank, shared by the embedded and the server backend.

Conventions every backend follows:

- One point per item, keyed by `point_id(item_id)`; re-upserting an item replaces it.
- Named vectors: `retrieval` (dense, cosine), `frames` and `text` (multivectors, cosine,
  MaxSim comparator, stored as float16). A point without a retrieval vector, frames or
  tokens (None, or zero rows) has no such named vector, and searches on it never return
  the point. Reads give None for a vector that is absent or was not requested.
- Cosine vectors are stored unit-normalised, row by row for multivectors: what comes back
  from `get` / `scroll` is the L2-normalised (and, for multivectors, float16-rounded) input.
- Scores: `retrieval` searches return the cosine similarity. Multivector searches
  (`frames`, `text`) return the MaxSim score divided by the number of (non-zero) query rows,
  i.e. the mean over query rows of the best cosine against the point's rows, so a perfect
  match scores 1.0 whatever the number of rows.
- Multivectors are not HNSW-indexed (a graph over every frame / token row would cost far
  more to build than it saves): multivector searches are exact scans. `retrieval` searches
  use HNSW once the engine has built it, or an exact scan with `exact=True`.
- Filters: `published_before` keeps only points with a known `published_ts` < t, so items of
  unknown time never leak into a "no peeking at the future" search.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from ..schema import (
    AUDIO,
    FRAMES,
    RETRIEVAL,
    TEXT,
    BankMismatchError,
    BankPoint,
    Hit,
    Manifest,
    SearchFilter,
)
from ..token_storage import LEGACY_TOKEN_STORAGE, decode_rows, encode_rows

log = logging.getLogger(__name__)

VECTOR_NAMES = (RETRIEVAL, FRAMES, TEXT, AUDIO)
MULTIVECTOR_NAMES = (FRAMES, TEXT, AUDIO)

# Points per engine call: large enough to amortise the per-call cost (WAL append, locking),
# small enough that the Python lists built for one call stay a few tens of MB.
UPSERT_BATCH = 256
# Points per engine call when scrolling payloads (larger calls read no faster).
SCROLL_BATCH = 512

# Candidates the HNSW search keeps while it walks the graph (`hnsw_ef`). Searches with
# the protocol's filters (labelled, published before the query) discard many of them:
# on a 20,000-item synthetic bank (benchmarks/bench_scale.py), filtered k = 10 queries
# found 0.955 of the exact top 10 with the engine's default, 0.965 at 128 and 0.986 at
# 256, at 0.52 / 0.62 / 0.91 ms p50.
SEARCH_EF = 256


# The retrieval vectors also get an 8-bit copy in RAM (scalar quantisation between these
# quantiles of their components), which the HNSW graph is built and walked with; each
# search's best are rescored with the float32 originals and exact searches ignore the
# copy. The graph builds about 3x faster and searches 2x faster at the same recall@10
# (100,000 synthetic items: 18 s against 54 s, 1.1 ms against 2.6 ms; benchmarks/README.md).
RETRIEVAL_INT8_QUANTILE = 0.99
# The retrieval graph's links per node and build-time candidates: the engine's defaults.
# The graph is about half of an import's time at 10^6 items. Cheaper graphs build faster
# with the same recall on synthetic vectors (64 candidates: a fifth to a third faster,
# recall@10 0.9997 both) but lose recall on real ones (filtered k = 10 queries on the
# MicroLens titles: 0.983 at 16 / 100, 0.978 at 16 / 64, 0.977 at 24 / 48; TikTok-VN
# captions: 0.935, 0.931, 0.928; benchmarks/README.md). The engine's extra links among
# points of nearby publish times (its per-payload links, `payload_m` left at its default)
# are half of that half, and stay: without them a 10^6-item graph walk found nothing for
# time filters keeping 1-8% of the bank (recall@10 0.00 against 0.998-1.000).
RETRIEVAL_GRAPH_M = 16
RETRIEVAL_EF_CONSTRUCT = 100
# Segments and filtered subsets below this size (KB of vectors) are searched by a scan
# rather than a graph walk (both engines' default).
FULL_SCAN_THRESHOLD_KB = 10_000
# A search through the 8-bit copy rescores at least this many of its best with the
# originals: filtered k = 10 queries on 100,000 synthetic items found 0.983 of the exact
# top 10 rescoring 10, 0.9994 rescoring 20 or 40, at almost the same cost.
RESCORE_AT_LEAST = 32


def rescore_oversampling(k: int) -> float:
    """The engine's `oversampling` for a search of the best k through the 8-bit copy."""
    return max(1.0, RESCORE_AT_LEAST / max(1, int(k)))


def search_ef(k: int) -> int:
    """Graph candidates for a search of the best k: never fewer than k."""
    return max(SEARCH_EF, int(k))


class BankBusyError(RuntimeError):
    """The bank's folder is held by another process (one writer per embedded bank)."""


class NotABankError(ValueError):
    """A folder or collection that exists and holds something other than an mvpp bank."""


class BankDamagedError(RuntimeError):
    """The engine cannot read a bank's files (truncated, deleted, overwritten)."""

    def __init__(self, location: str, detail: str) -> None:
        super().__init__(
            f"the bank at {location} cannot be read ({detail}); its files may be damaged: "
            "restore it from a copy or a snapshot, or build it again into a new folder with "
            "`mvpp-bank build` (the same table and flags)"
        )


class BankNotInitialisedError(RuntimeError):
    """A write on a bank that has no manifest yet: call `init(manifest)` first."""


def merge_manifest(stored: Manifest, requested: Manifest) -> tuple[Manifest, bool]:
    """The manifest to keep when an existing bank is opened with `requested`.

    Raises BankMismatchError when the encoders or dimensions disagree. Otherwise the stored
    manifest wins, with label names extended by the new ones (order kept). Returns the
    manifest and whether it changed.
    """
    stored.check_compatible(requested)
    if stored.label_names and requested.label_names and stored.label_transform != requested.label_transform:
        raise BankMismatchError(
            f"the bank's labels were transformed with {stored.label_transform!r}, this build asks for "
            f"{requested.label_transform!r}; build with --label-transform {stored.label_transform}, "
            "or into a new bank"
        )
    new_labels = [n for n in requested.label_names if n not in stored.label_names]
    columns = merge_columns(stored.columns, requested.columns)
    if not new_labels and columns == stored.columns:
        return stored, False
    merged = Manifest.from_dict(stored.to_dict())
    merged.label_names = list(stored.label_names) + new_labels
    merged.columns = columns
    return merged, True


def merge_columns(stored: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """The table columns of a bank built in several runs: the latest build's names where
    it has them (an earlier build's time or video column stays when a later table had
    none), with the label and metadata columns of every build."""
    if not requested:
        return dict(stored)
    merged = {**stored, **{k: v for k, v in requested.items() if v}}
    for key in ("label_cols", "meta_cols"):
        merged[key] = list(dict.fromkeys([*stored.get(key, []), *requested.get(key, [])]))
    return merged


def vector_dims(manifest: Manifest) -> dict[str, int]:
    return {
        RETRIEVAL: manifest.retrieval_dim,
        FRAMES: manifest.frame_dim,
        TEXT: manifest.token_dim,
        AUDIO: manifest.audio_dim,
    }


def multivector_storage(name: str, manifest: Manifest) -> tuple[str, str]:
    """(distance, datatype) of a multivector in this bank: float16 cosine rows, or, for
    tokens kept as 8-bit codes (`token_storage`), uint8 under the dot product, which
    stores them as they are where cosine would normalise them (they are never searched)."""
    if name == TEXT and manifest.token_storage == "int8":
        return "dot", "uint8"
    return "cosine", "float16"


def bank_vectors(names: tuple[str, ...], manifest: Manifest | None) -> tuple[str, ...]:
    """The requested vector names the bank has: a bank without sound features has no
    `audio` vector to ask for."""
    if manifest is None or manifest.audio_dim:
        return names
    return tuple(n for n in names if n != AUDIO)


def point_vectors(
    point: BankPoint, dims: dict[str, int], token_storage: str = LEGACY_TOKEN_STORAGE
) -> dict[str, list[Any]]:
    """The named vectors a point has, as the nested lists the engines take.

    Lists rather than numpy arrays: both engines walk their input element by element, and
    walking a numpy array creates one numpy scalar per element, which made building a
    point with a 32 x 384 multivector about twice as slow as `tolist()` first. Tokens go
    in as 8-bit codes when the bank stores them so (`token_storage`).
    """
    vectors: dict[str, list[Any]] = {}
    if point.retrieval is not None:
        retrieval = np.asarray(point.retrieval, dtype=np.float32)
        if retrieval.shape != (dims[RETRIEVAL],):
            raise ValueError(
                f"item {point.item_id!r}: retrieval vector has shape {retrieval.shape}, "
                f"the bank expects ({dims[RETRIEVAL]},)"
            )
        vectors[RETRIEVAL] = retrieval.tolist()
    for name, value in ((FRAMES, point.frames), (TEXT, point.tokens), (AUDIO, point.audio)):
        if value is None:
            continue
        arr = np.asarray(value)
        if arr.ndim != 2 or arr.shape[1] != dims[name]:
            raise ValueError(
                f"item {point.item_id!r}: {name} has shape {arr.shape}, "
                f"the bank expects (rows, {dims[name]})"
            )
        if arr.shape[0] == 0:
            continue  # an empty multivector is stored as no vector at all
        if name == TEXT and token_storage == "int8":
            arr = encode_rows(arr)
        vectors[name] = arr.tolist()
    return vectors


def prepare_query(query: np.ndarray, using: str, dims: dict[str, int]) -> tuple[list[Any], int]:
    """Validate a query and return (list form, number of rows the score is divided by)."""
    if using not in VECTOR_NAMES:
        raise ValueError(f"unknown vector {using!r}; expected one of {VECTOR_NAMES}")
    q = np.asarray(query, dtype=np.float32)
    if using == RETRIEVAL:
        if q.shape != (dims[RETRIEVAL],):
            raise ValueError(
                f"a {RETRIEVAL} query must have shape ({dims[RETRIEVAL]},), got {q.shape}"
            )
        return q.tolist(), 1
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dims[using]:
        raise ValueError(f"a {using} query must have shape (rows, {dims[using]}), got {q.shape}")
    # all-zero rows are padding: they match nothing and would only dilute the mean
    q = q[np.any(q != 0, axis=1)]
    return q.tolist(), int(q.shape[0])


def as_array(value: Any, multivector: bool) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32)
    if multivector and arr.ndim == 1:
        arr = arr.reshape(0 if arr.size == 0 else 1, -1)
    return arr


# The payload fields `hashes` and `content_hashes` read.
HASH_FIELDS = ["item_id", "content_hash"]


def hash_pairs(records: Iterable[Any]) -> Iterator[tuple[str, str]]:
    """(item id, content hash) of each engine record's payload, as `BankPoint.from_payload`
    reads them; records without an item id are skipped."""
    for rec in records:
        payload = rec.payload or {}
        if "item_id" in payload:
            yield str(payload["item_id"]), str(payload.get("content_hash") or "")


def record_to_point(
    payload: dict[str, Any] | None, vectors: Any, token_storage: str = LEGACY_TOKEN_STORAGE
) -> BankPoint:
    vecs = vectors if isinstance(vectors, dict) else {}
    tokens = as_array(vecs.get(TEXT), multivector=True)
    if tokens is not None and token_storage == "int8":
        tokens = decode_rows(tokens)
    return BankPoint.from_payload(
        payload or {},
        retrieval=as_array(vecs.get(RETRIEVAL), multivector=False),
        frames=as_array(vecs.get(FRAMES), multivector=True),
        tokens=tokens,
        audio=as_array(vecs.get(AUDIO), multivector=True),
    )


def check_vector_names(vectors: Iterable[str]) -> tuple[str, ...]:
    names = tuple(vectors)
    for name in names:
        if name not in VECTOR_NAMES:
            raise ValueError(f"unknown vector {name!r}; expected some of {VECTOR_NAMES}")
    return names


def chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class BankStore(ABC):
    """One bank (collection or shard): points, their vectors and payloads, and the manifest.

    Use as a context manager, or call `close()`; writes are durable once `upsert` returns.
    """

    backend: str  # "embedded" | "server"
    location: str  # folder or URL, for display

    # -- manifest -----------------------------------------------------------------------

    @property
    @abstractmethod
    def manifest(self) -> Manifest | None:
        """The stored manifest, or None for a new empty bank."""

    def _token_storage(self) -> str:
        """How this bank's token features are stored (what reads decode)."""
        manifest = self.manifest
        return manifest.token_storage if manifest is not None else LEGACY_TOKEN_STORAGE

    @abstractmethod
    def init(self, manifest: Manifest) -> None:
        """Create the bank with `manifest`, or check an existing bank against it.

        An existing bank keeps its manifest, extended with new label names; encoders or
        dimensions that differ raise BankMismatchError naming both values.
        """

    # -- writes -------------------------------------------------------------------------

    @abstractmethod
    def upsert(self, points: list[BankPoint]) -> None:
        """Insert or replace points (durable once this returns)."""

    def optimize(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Build the search indexes now (HNSW, segment merges) rather than lazily.

        Call once after a large build: the embedded engine has no background optimiser, so
        until then `retrieval` searches scan every vector. A no-op for a server, which
        optimises in the background.
        """

    # -- reads --------------------------------------------------------------------------

    @abstractmethod
    def hashes(self, item_ids: list[str]) -> dict[str, str]:
        """Stored content hashes of those items that exist."""

    @abstractmethod
    def content_hashes(self) -> Iterator[tuple[str, str]]:
        """(item id, content hash) of every point, in point id order: the two payload
        fields a bank's fingerprint reads, without building whole points."""

    @abstractmethod
    def count(self, flt: SearchFilter | None = None) -> int:
        """Number of points (matching `flt`)."""

    @abstractmethod
    def scroll(
        self,
        vectors: tuple[str, ...] = (RETRIEVAL,),
        flt: SearchFilter | None = None,
        batch_size: int = 512,
    ) -> Iterator[BankPoint]:
        """Every point (matching `flt`) with the requested vectors as float32 arrays,
        in point id order."""

    @abstractmethod
    def get(
        self, item_ids: list[str], vectors: tuple[str, ...] = (RETRIEVAL,)
    ) -> list[BankPoint | None]:
        """The points of `item_ids`, in order; None for an item not in the bank."""

    @abstractmethod
    def search(
        self,
        query: np.ndarray,
        k: int,
        using: str = RETRIEVAL,
        flt: SearchFilter | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """Top-k points by `using`: query (D,) for `retrieval`, (m, d) for `frames` / `text`."""

    @abstractmethod
    def search_batch(
        self,
        queries: list[np.ndarray],
        k: int,
        using: str = RETRIEVAL,
        flts: list[SearchFilter | None] | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        """`search` for many queries in one engine call; one list of hits per query."""

    # -- housekeeping -------------------------------------------------------------------

    @abstractmethod
    def size_bytes(self) -> int | None:
        """Disk usage of an embedded bank; None when the bank lives on a server."""

    @abstractmethod
    def flush(self) -> None:
        """Persist segments now (shortens the write-ahead log replayed on open)."""

    @abstractmethod
    def close(self) -> None:
        """Release the bank; the store object is unusable afterwards."""

    def __enter__(self) -> BankStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend}: {self.location})"

    # -- shared helpers -----------------------------------------------------------------

    @staticmethod
    def _check_flts(
        queries: Sequence[np.ndarray], flts: list[SearchFilter | None] | None
    ) -> list[SearchFilter | None]:
        if flts is None:
            return [None] * len(queries)
        if len(flts) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(flts)} filters")
        return list(flts)
