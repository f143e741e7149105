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
from mvpp.memory_bank.schema import FRAMES, RETRIEVAL, BankPoint, Hit, SearchFilter
from mvpp.memory_bank.store.base import BankStore
from mvpp.retriever.bulk import Neighbours, bulk_topk

logger = logging.getLogger(__name__)


@dataclass
class Query:
    """A clip and/or a title to find neighbours for."""

    clip: Path | None = None
    title: str = ""
    item_id: str | None = None  # excluded from its own results when set


@dataclass
class EncodedQuery:
    point: BankPoint
    exclude_id: str | None = None  # the bank item this query is, never its own neighbour

    @property
    def using(self) -> str:
        return RETRIEVAL if self.point.retrieval is not None else FRAMES

    @property
    def vector(self) -> np.ndarray:
        if self.point.retrieval is not None:
            return self.point.retrieval
        if self.point.frames is None or len(self.point.frames) == 0:
            raise ValueError(f"query {self.point.item_id!r} has neither text nor frames")
        return self.point.frames


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
        return [EncodedQuery(p, q.item_id) for p, q in zip(points, queries, strict=True)]

    def search(
        self, encoded: list[EncodedQuery], k: int = 10, flt: SearchFilter | None = None
    ) -> list[list[Hit]]:
        """Batched search; each query uses its own vector kind."""
        results: list[list[Hit] | None] = [None] * len(encoded)
        for using in (RETRIEVAL, FRAMES):
            idx = [i for i, e in enumerate(encoded) if e.using == using]
            if not idx:
                continue
            flts = [_with_exclusion(flt, encoded[i].exclude_id) for i in idx]
            hits = self.store.search_batch([encoded[i].vector for i in idx], k, using=using, flts=flts)
            for i, h in zip(idx, hits, strict=True):
                results[i] = h
        return [r or [] for r in results]

    def query(self, query: Query, k: int = 10, flt: SearchFilter | None = None) -> list[Hit]:
        """Top-k neighbours of one clip and/or title."""
        return self.search(self.encode([query]), k, flt)[0]

    def query_batch(
        self, queries: list[Query], k: int = 10, flt: SearchFilter | None = None
    ) -> list[list[Hit]]:
        return self.search(self.encode(queries), k, flt)


def _with_exclusion(flt: SearchFilter | None, item_id: str | None) -> SearchFilter | None:
    if item_id is None:
        return flt
    base = flt or SearchFilter()
    return replace(base, exclude_ids=[*base.exclude_ids, item_id])


__all__ = ["EncodedQuery", "Neighbours", "Query", "Retriever", "bulk_topk"]
