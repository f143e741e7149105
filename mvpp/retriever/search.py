"""The predictor's neighbour search: one policy for training, evaluation and scoring.

A search looks for the k best keys of each query among a *memory*: rows of a bank
snapshot whose labels may inform a prediction (a run's training items, or every labelled
item of the bank). The policy, saved with a run as its training config:

1. dense cosine of the retrieval vectors (`bulk.bulk_topk`), with every filter of the
   protocol: never the query itself, and with time safety only keys published strictly
   before the query; for a large memory, the same ranking of the candidates an HNSW
   index proposes (`ann.AnnIndex`, `ApproximateSearch`);
2. a bonus for keys in the query's group (`GroupBoost`, e.g. the same creator), which also
   lets items without a retrieval vector (metadata-only posts) find and be found;
3. a lexical re-rank of the dense candidates (`LexicalRerank`, see `rerank`).

Queries are described by a `QueryBatch`, made the same way from bank rows (evaluation,
training) and from freshly encoded items (scoring), so both retrieve alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvpp.config import usable_cores
from mvpp.memory_bank.metadata import category_key
from mvpp.retriever.ann import AnnConfig, AnnIndex, MemoryKeys
from mvpp.retriever.bulk import KeyRows, Neighbours, PackedKeys, bulk_topk, candidate_topk
from mvpp.retriever.rerank import rerank_lexical
from mvpp.retriever.snapshot import BankSnapshot


@dataclass
class LexicalRerank:
    """Hybrid neighbours: the dense search returns `candidates` per query, re-scored as
    cosine + `weight` * TF-IDF cosine of the title bags.

    key_ids / key_weights: (N, W) bags of every item of the snapshot.
    """

    key_ids: np.ndarray
    key_weights: np.ndarray
    vocab_size: int
    weight: float
    candidates: int


@dataclass
class GroupBoost:
    """Keys in the query's own group score `weight` more.

    A group is the value of one metadata column, such as the creator: a creator's earlier
    posts say more about a new post's reception than any stranger's similar caption.
    key_group: (N,) codes of the snapshot's items, -1 where the column has no value.
    """

    column: str
    weight: float
    codes: dict[str, int]
    key_group: np.ndarray

    @classmethod
    def fit(cls, metadata: list[dict[str, Any]], column: str, weight: float) -> GroupBoost:
        """Codes for every value of `column` among the items' metadata (a snapshot's)."""
        if not metadata or not any(m and column in m for m in metadata):
            known = sorted({name for m in metadata for name in (m or {})})
            if not known:
                raise ValueError(f"neighbour group column {column!r}: the bank has no metadata")
            raise ValueError(f"neighbour group column {column!r} is not in the bank's metadata; it has {known}")
        codes: dict[str, int] = {}
        for m in metadata:
            key = category_key((m or {}).get(column))
            if key is not None:
                codes.setdefault(key, len(codes))
        boost = cls(column, weight, codes, np.zeros(0, np.int64))
        boost.key_group = boost.encode(metadata)
        return boost

    def encode(self, metadata: list[dict[str, Any] | None]) -> np.ndarray:
        """(B,) codes of items' metadata; -1 for a missing value or one the bank lacks
        (no key can share it)."""
        out = np.full(len(metadata), -1, np.int64)
        for j, m in enumerate(metadata):
            key = category_key(m.get(self.column)) if m else None
            if key is not None:
                out[j] = self.codes.get(key, -1)
        return out


@dataclass
class QueryBatch:
    """What a search needs to know about B queries.

    vectors: (B, D) retrieval vectors (rows of zeros where has_vector is False).
    own_row: (B,) the query's own row in the snapshot searched, or -1: never a neighbour.
    time: (B,) publish times in unix seconds, NaN when unknown.
    bags: (ids (B, W), weights (B, W)) title bags for the lexical re-rank, or None.
    groups: (B,) group codes (`GroupBoost.encode`), or None.
    """

    vectors: np.ndarray
    has_vector: np.ndarray
    own_row: np.ndarray
    time: np.ndarray
    bags: tuple[np.ndarray, np.ndarray] | None = None
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    @classmethod
    def from_snapshot(
        cls,
        snapshot: BankSnapshot,
        rows: np.ndarray,
        rerank: LexicalRerank | None = None,
        groups: GroupBoost | None = None,
        own_rows: np.ndarray | None = None,
    ) -> QueryBatch:
        """Queries for rows of a snapshot: the bank's own items (own_rows = rows, the
        default) or freshly encoded items gathered in a snapshot of their own (own_rows:
        their rows in the searched bank, -1 where absent). `rerank` and `groups` must
        describe `snapshot`."""
        rows = np.asarray(rows, np.int64)
        return cls(
            vectors=snapshot.retrieval[rows],
            has_vector=snapshot.has_retrieval[rows],
            own_row=rows.copy() if own_rows is None else np.asarray(own_rows, np.int64),
            time=snapshot.published_ts[rows],
            bags=(rerank.key_ids[rows], rerank.key_weights[rows]) if rerank is not None else None,
            groups=groups.key_group[rows] if groups is not None else None,
        )

    def subset(self, sl: slice) -> QueryBatch:
        return QueryBatch(
            self.vectors[sl],
            self.has_vector[sl],
            self.own_row[sl],
            self.time[sl],
            (self.bags[0][sl], self.bags[1][sl]) if self.bags is not None else None,
            self.groups[sl] if self.groups is not None else None,
        )


# Candidates an index proposes beyond the limit: keys whose scores tie with the last one
# at the ranking's resolution (`bulk.ranking_scores`) go to the lowest index, which the
# engine, ranking by the unrounded score, may leave just outside its top.
TIE_MARGIN = 8


@dataclass
class ApproximateSearch:
    """Dense candidates from an HNSW index (`ann.AnnIndex`) instead of an exact scan.

    root: the folder that keeps indexes, one per memory (named by its digest): a run's
    folder, so that evaluation and scoring search the graph training searched.
    """

    root: Path
    config: AnnConfig = field(default_factory=AnnConfig)
    # processes that share a long search (each opens the index); None: one per core
    workers: int | None = None

    @property
    def processes(self) -> int:
        if self.workers:
            return self.workers
        return usable_cores()


class NeighbourSearch:
    """Top-k neighbours among a memory of snapshot rows, by the run's policy.

    memory: rows of `snapshot` that may be neighbours (labelled items).
    time_safe: keys must be published strictly before their query (an undated query
    gets no time filter; undated keys never qualify for a dated query).
    rerank / groups: describe the whole snapshot (key bags, key group codes).
    wide: also return the best `wide` keys by the dense ranking (cosine and group bonus,
    every filter applied), before the re-rank: the wider neighbourhood whose label
    statistics the predictor reads (0: none).
    approximate: take the dense stage's candidates from an HNSW index over the memory
    (None: exact search of every key).
    """

    def __init__(
        self,
        snapshot: BankSnapshot,
        memory: np.ndarray,
        k: int,
        time_safe: bool,
        rerank: LexicalRerank | None = None,
        groups: GroupBoost | None = None,
        wide: int = 0,
        approximate: ApproximateSearch | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.memory = np.asarray(memory, np.int64)
        self.k = k
        self.wide = wide
        self.time_safe = time_safe
        self.rerank = rerank if rerank is not None and rerank.weight != 0.0 else None
        self.groups = groups if groups is not None and groups.weight != 0.0 else None
        # the query's own row as a position in the memory, for self-exclusion
        self._pos_in_memory = np.full(len(snapshot), -1, np.int64)
        self._pos_in_memory[self.memory] = np.arange(len(self.memory))
        # the memory's side of every search, prepared once (a service searches per
        # request): for the exact search packed for oneDNN's float32 screen, the survivors
        # scored from the snapshot's rows (else a float32 copy, which the screen reads);
        # read from the snapshot when an index proposes candidates, whose few vectors per
        # query are converted when scored (no copy of most of a large bank)
        keys = self.memory
        rows = KeyRows(snapshot.retrieval, keys)
        self._vectors: np.ndarray | KeyRows | PackedKeys = rows
        if approximate is None:
            packed = PackedKeys.of(rows)
            self._vectors = packed if packed is not None else np.ascontiguousarray(snapshot.retrieval[keys], np.float32)
        self._has_vector = snapshot.has_retrieval[keys]
        self._time = snapshot.published_ts[keys]
        self._group = self.groups.key_group[keys] if self.groups is not None else None
        self.approximate = approximate
        self.index: AnnIndex | None = None
        self._members: dict[int, np.ndarray] = {}
        if approximate is not None:
            keys = MemoryKeys(rows, self._has_vector, self._time if time_safe else None, self._group)
            self.index = AnnIndex.open_or_build(approximate.root, keys, approximate.config)
            if self._group is not None:
                order = np.argsort(self._group, kind="stable")
                codes, starts = np.unique(self._group[order], return_index=True)
                for code, part in zip(codes, np.split(order, starts[1:]), strict=True):
                    if code >= 0:
                        self._members[int(code)] = part  # positions, ascending

    def __len__(self) -> int:
        """Items in the memory."""
        return len(self.memory)

    def with_k(self, k: int) -> NeighbourSearch:
        """The same search for k neighbours and no wider neighbourhood, sharing this one's
        gathered memory and index (nothing is gathered, hashed or opened again)."""
        other = copy.copy(self)
        other.k, other.wide = k, 0
        return other

    def search(self, queries: QueryBatch) -> Neighbours:
        """(B, k) snapshot rows of the neighbours (-1: none) and their scores: cosine, plus
        the group bonus and the weighted lexical cosine when those are on."""
        keys = self.memory
        own = np.where(queries.own_row >= 0, self._pos_in_memory[np.maximum(queries.own_row, 0)], -1)
        hybrid = self.rerank is not None and queries.bags is not None
        candidates = self.rerank.candidates if hybrid and self.rerank is not None else 0
        nb = self.dense(queries, own, max(self.k, candidates, self.wide), exact=self.index is None)
        # copies: views would keep the whole (B, limit) search result alive with them; the
        # scores in float32, the precision the wide statistics read them in
        wide = nb.indices[:, : self.wide].copy(), nb.scores[:, : self.wide].astype(np.float32)
        # ranked best first, ties to the lower index: the first n of a deeper search are
        # the n a search for n returns
        top = max(self.k, candidates)
        nb = Neighbours(nb.indices[:, :top], nb.scores[:, :top])
        if hybrid:
            assert self.rerank is not None and queries.bags is not None
            # the candidates' bags are read where they are: gathering the memory's bags
            # first would copy all of them on every call
            nb = rerank_lexical(
                nb, queries.bags[0], queries.bags[1], self.rerank.key_ids, self.rerank.key_weights,
                self.rerank.vocab_size, self.k, self.rerank.weight, key_rows=keys,
            )

        def rows(idx: np.ndarray) -> np.ndarray:  # memory positions -> snapshot rows
            return np.where(idx >= 0, keys[np.maximum(idx, 0)], -1)

        scores = np.ascontiguousarray(nb.scores)  # not a view of the deeper search
        if not self.wide:
            return Neighbours(rows(nb.indices), scores)
        # a training run keeps every item's wider neighbourhood (ten times its k): its
        # rows in 32 bits where they fit, 0.8 GB instead of 1.6 at 10^6 items and 100 wide
        wide_rows = rows(wide[0])
        if len(self.snapshot) <= np.iinfo(np.int32).max:
            wide_rows = wide_rows.astype(np.int32)
        return Neighbours(rows(nb.indices), scores, wide_rows, wide[1])

    def dense(self, queries: QueryBatch, own: np.ndarray, limit: int, exact: bool) -> Neighbours:
        """(B, limit) memory positions of the best keys by the dense ranking (cosine plus
        the group bonus, every filter applied): of all keys, or (exact=False) of the
        candidates the index proposes. own: the queries' positions in the memory or -1."""
        groups = self.groups if queries.groups is not None else None
        common = dict(
            query_has_vector=queries.has_vector,
            key_has_vector=self._has_vector,
            query_key_index=own,
            query_time=queries.time if self.time_safe else None,
            key_time=self._time if self.time_safe else None,
            query_group=queries.groups if groups is not None else None,
            key_group=self._group if groups is not None else None,
            group_weight=groups.weight if groups is not None else 0.0,
        )
        if exact or self.index is None:
            return bulk_topk(queries.vectors, self._vectors, limit, **common)
        with_vector = queries.has_vector
        cand = np.full((len(queries), 0), -1, np.int64)
        if with_vector.any():
            # all queries, or those with a vector (a copy: only when some lack one)
            rows = slice(None) if with_vector.all() else np.flatnonzero(with_vector)
            found = self.index.candidates(
                queries.vectors[rows], limit + TIE_MARGIN, own[rows],
                queries.time[rows] if self.time_safe else None,
                queries.groups[rows] if groups is not None and queries.groups is not None else None,
                workers=self.approximate.processes if self.approximate is not None else 1,
            )
            cand = np.full((len(queries), found.shape[1]), -1, np.int64)
            cand[rows] = found
        if groups is not None and queries.groups is not None:
            cand = np.concatenate([cand, self._group_candidates(queries, own, limit)], axis=1)
        return candidate_topk(queries.vectors, self._vectors, cand, limit, **common)

    def _group_candidates(self, queries: QueryBatch, own: np.ndarray, limit: int) -> np.ndarray:
        """(B, limit) keys of each query's group the index cannot propose, lowest position
        first (they tie on the group bonus alone): those without a vector, or all of them
        for a query without one. Positions in the memory, -1 for none."""
        assert queries.groups is not None
        out = np.full((len(queries), limit), -1, np.int64)
        for i, code in enumerate(queries.groups):
            members = self._members.get(int(code))
            if members is None:
                continue
            if queries.has_vector[i]:
                members = members[~self._has_vector[members]]
            members = members[members != own[i]]
            if self.time_safe and np.isfinite(queries.time[i]):
                members = members[self._time[members] < queries.time[i]]
            out[i, : min(limit, len(members))] = members[:limit]
        return out

    def recall(self, queries: QueryBatch, n: int) -> float:
        """Share of the exact dense top n the index's search also returns, over `queries`
        (1.0 without an index): the price of the approximation, measured."""
        own = np.where(queries.own_row >= 0, self._pos_in_memory[np.maximum(queries.own_row, 0)], -1)
        exact = self.dense(queries, own, n, exact=True).indices
        approx = self.dense(queries, own, n, exact=False).indices
        found = sum(len(set(e[e >= 0]) & set(a[a >= 0])) for e, a in zip(exact, approx, strict=True))
        return found / max(1, int((exact >= 0).sum()))
