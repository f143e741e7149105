"""Top-k neighbours of clips and titles: single, batched and bulk.

Queries are encoded exactly as the builder encodes bank items. A query with text
(a title, or captions in the full profile) searches the `retrieval` vectors; a clip
with no text at all searches the `frames` multivectors instead (MaxSim), which is
what the lite profile can offer for a bare clip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mvpp.config import BuildSettings
from mvpp.media import Clip, MediaError
from mvpp.memory_bank.builder import BankBuilder, BuildItem
from mvpp.memory_bank.decoding import DecodeFn, decode_item
from mvpp.memory_bank.encoders.profiles import Encoders
from mvpp.memory_bank.metadata import MetaRow
from mvpp.memory_bank.schema import AUDIO, FRAMES, RETRIEVAL, BankPoint, Hit, SearchFilter
from mvpp.memory_bank.store.base import BankStore
from mvpp.retriever.bulk import Neighbours, bulk_topk

logger = logging.getLogger(__name__)


# What a query is matched by: "auto" takes the retrieval vector when the query has text
# (a title, or captions), else the clip's frames and sound together.
MATCHES = ("auto", "retrieval", "frames", "audio")
# Candidates fetched per modality when frames and sound are combined, per neighbour asked.
COMBINED_CANDIDATES = 4


@dataclass
class Query:
    """A clip and/or a title to find neighbours for."""

    clip: Path | None = None
    title: str = ""
    item_id: str | None = None  # excluded from its own results when set
    by: str = "auto"


@dataclass
class EncodedQuery:
    point: BankPoint
    exclude_id: str | None = None  # the bank item this query is, never its own neighbour
    by: str = "auto"

    @property
    def using(self) -> tuple[str, ...]:
        """The vectors this query is matched by (several: their scores are averaged)."""
        p = self.point
        if self.by == "auto":
            if p.retrieval is not None:
                return (RETRIEVAL,)
            found = tuple(name for name, v in ((FRAMES, p.frames), (AUDIO, p.audio)) if v is not None and len(v))
            if not found:
                raise ValueError(f"query {p.item_id!r} has neither text, frames nor sound")
            return found
        if self.vector_of(self.by) is None:
            raise ValueError(f"query {p.item_id!r} has no {self.by} to match by")
        return (self.by,)

    def vector_of(self, name: str) -> np.ndarray | None:
        value = {RETRIEVAL: self.point.retrieval, FRAMES: self.point.frames, AUDIO: self.point.audio}[name]
        return None if value is None or (name != RETRIEVAL and len(value) == 0) else value


class Retriever:
    """Neighbours from one bank, with the encoders the bank was built with."""

    def __init__(
        self,
        store: BankStore,
        encoders: Encoders,
        settings: BuildSettings | None = None,
        decode: DecodeFn = decode_item,
    ) -> None:
        manifest = store.manifest
        if manifest is None:
            raise ValueError(f"no bank at {store.location}: build one with `mvpp-bank build`")
        self.store = store
        self.encoders = encoders
        self.settings = settings or BuildSettings(
            n_frames=manifest.n_frames, max_tokens=manifest.max_tokens
        )
        self._builder = BankBuilder(store, encoders, self.settings)
        self.decode = decode
        manifest.check_compatible(self._builder.manifest())

    def encode(self, queries: list[Query]) -> list[EncodedQuery]:
        """Encode queries like bank items. Raises MediaError for an unreadable clip."""
        items: list[tuple[BuildItem, Clip | None]] = []
        for n, q in enumerate(queries):
            clip = None
            if q.clip is not None:
                decoded = self.decode(str(q.clip), self.settings.n_frames, self.settings.frame_max_side)
                if isinstance(decoded, MediaError):
                    raise decoded
                clip = decoded
            if clip is None and not q.title.strip():
                raise ValueError("a query needs a clip or a title")
            item_id = q.item_id or f"query-{n}"
            items.append((BuildItem(item_id, MetaRow(item_id, title=q.title.strip()), q.clip), clip))
        points = self._builder.encode(items)
        return [EncodedQuery(p, q.item_id, q.by) for p, q in zip(points, queries, strict=True)]

    def search(
        self, encoded: list[EncodedQuery], k: int = 10, flt: SearchFilter | None = None
    ) -> list[list[Hit]]:
        """Batched search; each query is matched by its own vectors (`EncodedQuery.using`).

        A query matched by frames and sound together scores each candidate by the mean of
        its two MaxSim scores (the mean over the query's rows of the best cosine among the
        candidate's rows), 0 for a modality the candidate lacks: the candidates are the
        best COMBINED_CANDIDATES x k of each modality.
        """
        results: list[list[Hit] | None] = [None] * len(encoded)
        uses = [e.using for e in encoded]
        for using in (RETRIEVAL, FRAMES, AUDIO):
            idx = [i for i, u in enumerate(uses) if u == (using,)]
            if idx:
                flts = [_with_exclusion(flt, encoded[i].exclude_id) for i in idx]
                vectors = [encoded[i].vector_of(using) for i in idx]
                for i, h in zip(idx, self.store.search_batch(vectors, k, using=using, flts=flts), strict=True):
                    results[i] = h
        for i, e in enumerate(encoded):
            if len(uses[i]) > 1:
                results[i] = self._combined(e, uses[i], k, _with_exclusion(flt, e.exclude_id))
        return [r or [] for r in results]

    def _combined(self, query: EncodedQuery, using: tuple[str, ...], k: int, flt: SearchFilter | None) -> list[Hit]:
        candidates: dict[str, Hit] = {}
        for name in using:
            for hit in self.store.search(query.vector_of(name), COMBINED_CANDIDATES * k, using=name, flt=flt):
                candidates.setdefault(hit.item_id, hit)
        ids = list(candidates)
        points = self.store.get(ids, vectors=using)
        scored = []
        for item_id, point in zip(ids, points, strict=True):
            if point is None:
                continue
            per = []
            for name in using:
                q = query.vector_of(name)
                keys = {FRAMES: point.frames, AUDIO: point.audio}[name]
                per.append(maxsim(q, keys) if q is not None and keys is not None and len(keys) else 0.0)
            scored.append((float(np.mean(per)), item_id))
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        return [Hit(item_id, score, candidates[item_id].payload) for score, item_id in scored[:k]]

    def query(self, query: Query, k: int = 10, flt: SearchFilter | None = None) -> list[Hit]:
        """Top-k neighbours of one clip and/or title."""
        return self.search(self.encode([query]), k, flt)[0]

    def query_batch(
        self, queries: list[Query], k: int = 10, flt: SearchFilter | None = None
    ) -> list[list[Hit]]:
        return self.search(self.encode(queries), k, flt)


def maxsim(query: np.ndarray, keys: np.ndarray) -> float:
    """Mean over the query's rows of their best cosine among the keys' rows (rows unit)."""
    return float((np.asarray(query, np.float32) @ np.asarray(keys, np.float32).T).max(axis=1).mean())


def _with_exclusion(flt: SearchFilter | None, item_id: str | None) -> SearchFilter | None:
    if item_id is None:
        return flt
    base = flt or SearchFilter()
    return replace(base, exclude_ids=[*base.exclude_ids, item_id])


__all__ = ["EncodedQuery", "Neighbours", "Query", "Retriever", "bulk_topk"]
