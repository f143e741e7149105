"""Bulk top-k: neighbours of many queries among many bank items at once.

Exact search by blocked matrix products on normalised vectors (cosine = inner product),
screened in float32 and ranked in float64.
Every filter of the protocol is a mask: the query itself, unlabelled or non-training
keys, and keys published at or after the query's time (no peeking at the future).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Queries scored per block: bounds peak memory at block x n_keys floats, and the block
# shrinks so that it never holds more than MAX_BLOCK_SCORES scores: a block's scores and
# masks take about 40 bytes per score (670 MB here), whatever the number of keys.
DEFAULT_BLOCK = 2048
MAX_BLOCK_SCORES = 1 << 24
# Keys gathered or converted at a time when they come as `KeyRows` or in another
# precision than the products' (a whole copy of a large memory would cost more than the
# search: 2.5 GB of float64 for 800,000 x 384).
KEY_CHUNK = 65_536
# Neighbours are ranked by scores rounded to this (see `ranking_scores`).
SCORE_RESOLUTION = 1e-4
# Query-candidate pairs scored exactly at a time after float32 screening (each gathers
# its key: 100 MB of float32 for 384-d keys).
MAX_CANDIDATE_PAIRS = 1 << 16
# A float32 inner product of two unit vectors of dimension D is within D units of
# float32 rounding (2**-24) of the exact one, whatever order the sum takes; screening
# allows this many times that bound, for vectors a little off unit length.
SCREEN_SAFETY = 4.0


class KeyRows:
    """Some rows of an array, gathered when read: the keys of a memory without a copy of
    their vectors (a bank's training items are most of it: 1.2 GB of 800,000 x 384
    float32 not held twice). `keys[i]` is `source[rows[i]]` for any index i."""

    def __init__(self, source: np.ndarray, rows: np.ndarray) -> None:
        self.source = source
        self.rows = np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.source[self.rows[index]]


class PackedKeys:
    """Keys with a copy laid out once for oneDNN (`mvpp.onednn`): the float32 screen of
    `bulk_topk` multiplies the packed copy (2-3x faster than the BLAS for a few queries,
    10-25% for thousands), and the keys that survive it are scored from `rows`, the keys
    themselves (an array or `KeyRows`). Build with `PackedKeys.of`."""

    def __init__(self, rows: np.ndarray | KeyRows, packed: torch.Tensor) -> None:
        self.rows = rows
        self.packed = packed  # opaque oneDNN layout of the (M, D) float32 keys

    @classmethod
    def of(cls, rows: np.ndarray | KeyRows) -> PackedKeys | None:
        """The keys packed, or None where oneDNN cannot multiply them in float32."""
        import torch

        from mvpp.onednn import pack_checked

        if len(rows) == 0:
            return None
        dense = torch.from_numpy(np.ascontiguousarray(rows[np.arange(len(rows))], np.float32))  # (M, D)
        packed = pack_checked(dense)
        return None if packed is None else cls(rows, packed)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.rows[index]


@dataclass
class Neighbours:
    """indices: (N, k) into the key set, -1 where fewer than k keys qualify.
    scores: (N, k) cosine similarities, -inf where indices is -1.
    wide_indices / wide_scores: (N, W) the wider neighbourhood a search was asked for
    (the best W by the dense ranking, before any re-rank), or None; `NeighbourSearch`
    gives them as int32 and float32, as a run keeps them for every item."""

    indices: np.ndarray
    scores: np.ndarray
    wide_indices: np.ndarray | None = None
    wide_scores: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def take(self, rows: np.ndarray) -> Neighbours:
        """The neighbours of some queries (rows of this result)."""
        wide = self.wide_indices is not None and self.wide_scores is not None
        return Neighbours(
            self.indices[rows],
            self.scores[rows],
            self.wide_indices[rows] if wide else None,  # type: ignore[index]
            self.wide_scores[rows] if wide else None,  # type: ignore[index]
        )

    def valid(self) -> np.ndarray:
        return self.indices >= 0

    @staticmethod
    def collect(parts: Iterable[Neighbours], n: int) -> Neighbours:
        """The neighbours of n queries from those of consecutive groups of them, each part
        copied into the result as it comes (no part outlives its copy: a list of parts
        and their concatenation would hold a large split's neighbours twice)."""
        out: Neighbours | None = None
        lo = 0
        for part in parts:
            if out is None:
                wide = part.wide_indices is not None and part.wide_scores is not None

                def like(a: np.ndarray) -> np.ndarray:
                    return np.empty((n, *a.shape[1:]), a.dtype)

                out = Neighbours(
                    like(part.indices), like(part.scores),
                    like(part.wide_indices) if wide else None,  # type: ignore[arg-type]
                    like(part.wide_scores) if wide else None,  # type: ignore[arg-type]
                )
            hi = lo + len(part.indices)
            out.indices[lo:hi], out.scores[lo:hi] = part.indices, part.scores
            if out.wide_indices is not None and out.wide_scores is not None:
                if part.wide_indices is None or part.wide_scores is None:
                    raise ValueError("Neighbours.collect: parts with and without a wider neighbourhood")
                out.wide_indices[lo:hi], out.wide_scores[lo:hi] = part.wide_indices, part.wide_scores
            lo = hi
        if out is None or lo != n:
            raise ValueError(f"Neighbours.collect: parts hold {lo} queries, expected {n}")
        return out


def bulk_topk(
    queries: np.ndarray,
    keys: np.ndarray | KeyRows | PackedKeys,
    k: int,
    *,
    key_mask: np.ndarray | None = None,
    query_has_vector: np.ndarray | None = None,
    key_has_vector: np.ndarray | None = None,
    query_key_index: np.ndarray | None = None,
    query_time: np.ndarray | None = None,
    key_time: np.ndarray | None = None,
    query_group: np.ndarray | None = None,
    key_group: np.ndarray | None = None,
    group_weight: float = 0.0,
    block: int = DEFAULT_BLOCK,
) -> Neighbours:
    """Top-k keys for every query.

    queries: (N, D), keys: (M, D), both L2-normalised (keys float64, searched in
    float64; or float32, float16, `KeyRows` or `PackedKeys`, screened in float32 and the
    survivors scored in float64).
    key_mask: (M,) bool, keys allowed at all (labelled, training split...).
    query_has_vector / key_has_vector: (N,), (M,) bool, False for an item without a
    retrieval vector (a post with metadata only). Its cosines mean nothing: such a pair
    qualifies only through a shared group, scoring the group bonus alone.
    query_key_index: (N,) int, the query's own row among the keys or -1: excluded.
    query_time / key_time: (N,), (M,) unix seconds (NaN = unknown); when given, a key
    qualifies only if published strictly before its query. Unknown times never qualify
    as "before" a known query time, so an undated key cannot leak the future.
    query_group / key_group: (N,), (M,) int group codes (-1 = none); a key in its
    query's group scores `group_weight` more than its cosine (same creator, say). The
    bonus only reorders keys that pass the filters.
    """
    import torch  # here rather than at the top: `mvpp-bank` commands start without it

    n, m = len(queries), len(keys)
    block = max(1, min(block, MAX_BLOCK_SCORES // max(m, 1)))
    k_eff = max(0, min(k, m))
    indices = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or k_eff == 0:
        return Neighbours(indices, scores)
    # Scores in float64, returned as float32: a float32 product's last bit depends on the
    # shape of the batch it is computed in, a float64 one's rounding to float32 does not,
    # so an item's neighbours and their scores are the same whatever it is searched with.
    # float64 keys are multiplied in float64. Keys in a narrower type are screened in
    # float32 (half the bytes, twice the arithmetic per cycle): every key that float32
    # rounding could place in a query's top k is kept, and the kept ones are scored and
    # ranked in float64 by `candidate_topk`, so the result is the float64 search's.
    float64 = isinstance(keys, np.ndarray) and keys.dtype == np.float64
    screen = not float64
    if float64 or (isinstance(keys, np.ndarray) and keys.dtype == np.float32):
        key_t = torch.from_numpy(np.ascontiguousarray(keys))
    else:
        key_t = keys
    dtype = torch.float32 if screen else torch.float64
    margin = 2 * screening_error(queries.shape[1], group_weight) + SCORE_RESOLUTION
    allowed = torch.ones(m, dtype=torch.bool) if key_mask is None else torch.from_numpy(key_mask.astype(bool))
    kt = None
    grouped = group_weight != 0.0 and query_group is not None and key_group is not None
    kg = torch.from_numpy(np.asarray(key_group, dtype=np.int64)) if grouped else None
    k_vec = torch.ones(m, dtype=torch.bool) if key_has_vector is None else torch.from_numpy(key_has_vector.astype(bool))
    if query_time is not None and key_time is not None:
        kt = torch.from_numpy(np.asarray(key_time, dtype=np.float64))
    neg_inf = torch.tensor(float("-inf"), dtype=dtype)
    with torch.inference_mode():
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            q = torch.from_numpy(np.ascontiguousarray(queries[lo:hi], dtype=np.float32 if screen else np.float64))
            q_vec = (
                torch.ones(hi - lo, dtype=torch.bool)
                if query_has_vector is None
                else torch.from_numpy(query_has_vector[lo:hi].astype(bool))
            )
            comparable = q_vec.unsqueeze(1) & k_vec.unsqueeze(0)  # (b, M)
            sims = torch.where(comparable, _products(q, key_t), 0.0)  # (b, M)
            mask = allowed.expand(hi - lo, m) & comparable
            if kg is not None:
                assert query_group is not None
                qg = torch.from_numpy(np.asarray(query_group[lo:hi], dtype=np.int64)).unsqueeze(1)
                same = (qg == kg.unsqueeze(0)) & (qg >= 0)
                sims = sims + group_weight * same.to(dtype)
                mask = mask | (allowed.unsqueeze(0) & same)
            mask = mask.clone()
            if query_key_index is not None:
                own = torch.from_numpy(np.asarray(query_key_index[lo:hi], dtype=np.int64))
                rows = torch.nonzero(own >= 0).squeeze(1)
                mask[rows, own[rows]] = False
            if kt is not None:
                qt = torch.from_numpy(np.asarray(query_time[lo:hi], dtype=np.float64))
                # NaN comparisons are False: undated keys or queries get no time-filtered keys
                # unless the query is undated, in which case no time filter applies.
                before = kt.unsqueeze(0) < qt.unsqueeze(1)
                undated_q = torch.isnan(qt).unsqueeze(1)
                mask &= before | undated_q
            sims = torch.where(mask, sims, neg_inf)
            if screen:
                kth = torch.topk(sims, k_eff, dim=1).values[:, -1:]  # (b, 1)
                kept = (sims >= kth - margin) & torch.isfinite(sims)
                part = _exact_among_kept(
                    kept, queries[lo:hi], keys, k_eff,
                    query_has_vector=_rows(query_has_vector, lo, hi, True),
                    key_has_vector=np.ones(m, bool) if key_has_vector is None else key_has_vector,
                    query_key_index=_rows(query_key_index, lo, hi, -1),
                    query_time=_rows(query_time, lo, hi, None) if kt is not None else None,
                    key_time=key_time if kt is not None else None,
                    query_group=_rows(query_group, lo, hi, None) if kg is not None else None,
                    key_group=key_group if kg is not None else None,
                    group_weight=group_weight if kg is not None else 0.0,
                )
                indices[lo:hi, :k_eff], scores[lo:hi, :k_eff] = part.indices, part.scores
                continue
            top_i = _topk_ties_by_index(ranking_scores(sims), k_eff)
            top_s = torch.gather(sims, 1, top_i)
            top_i = torch.where(torch.isinf(top_s), torch.full_like(top_i, -1), top_i)
            s_np, i_np = top_s.numpy(), top_i.numpy()
            order = np.lexsort((np.where(i_np < 0, m, i_np), -ranking_scores(s_np)), axis=1)
            indices[lo:hi, :k_eff] = np.take_along_axis(i_np, order, 1)
            scores[lo:hi, :k_eff] = np.take_along_axis(s_np, order, 1)
    return Neighbours(indices, scores)


# Queries scored together by `candidate_topk`: bounds the gathered keys at
# CANDIDATE_BLOCK x candidates x D doubles.
CANDIDATE_BLOCK = 256


def candidate_topk(
    queries: np.ndarray,
    keys: np.ndarray,
    candidates: np.ndarray,
    k: int,
    *,
    query_has_vector: np.ndarray,
    key_has_vector: np.ndarray,
    query_key_index: np.ndarray,
    query_time: np.ndarray | None = None,
    key_time: np.ndarray | None = None,
    query_group: np.ndarray | None = None,
    key_group: np.ndarray | None = None,
    group_weight: float = 0.0,
) -> Neighbours:
    """The top k of each query among its own candidate keys, scored, filtered and ranked
    as `bulk_topk` scores, filters and ranks all keys (same arguments): when a query's
    candidates hold its true top k, both return the same neighbours and scores.

    candidates: (N, C) key indices, -1 for none; repeats count once.
    """
    n, m = len(queries), len(keys)
    indices = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or k == 0 or candidates.shape[1] == 0:
        return Neighbours(indices, scores)
    cand_all = np.sort(np.asarray(candidates, np.int64), axis=1)
    cand_all[:, 1:][cand_all[:, 1:] == cand_all[:, :-1]] = -1  # a key proposed twice
    grouped = group_weight != 0.0 and query_group is not None and key_group is not None
    timed = query_time is not None and key_time is not None
    width = min(k, cand_all.shape[1])
    for lo in range(0, n, CANDIDATE_BLOCK):
        hi = min(n, lo + CANDIDATE_BLOCK)
        cand = cand_all[lo:hi]
        c = np.maximum(cand, 0)
        q = np.asarray(queries[lo:hi], np.float64)
        comparable = query_has_vector[lo:hi, None] & key_has_vector[c]  # (b, C)
        # einsum widens narrower keys as it reads them: no float64 copy of the gathered rows
        sims = np.where(comparable, np.einsum("bd,bcd->bc", q, np.asarray(keys[c])), 0.0)
        valid = cand >= 0
        mask = valid & comparable
        if grouped:
            assert query_group is not None and key_group is not None
            qg = np.asarray(query_group[lo:hi], np.int64)[:, None]
            same = (qg == key_group[c]) & (qg >= 0)
            sims = sims + group_weight * same
            mask |= valid & same
        mask &= c != np.asarray(query_key_index[lo:hi], np.int64)[:, None]
        if timed:
            assert query_time is not None and key_time is not None
            qt = np.asarray(query_time[lo:hi], np.float64)[:, None]
            with np.errstate(invalid="ignore"):
                mask &= (key_time[c] < qt) | np.isnan(qt)
        sims = np.where(mask, sims, -np.inf)
        order = np.lexsort((np.where(mask, c, m), -ranking_scores(sims)), axis=1)[:, :width]
        top_s = np.take_along_axis(sims, order, 1)
        top_i = np.take_along_axis(c, order, 1)
        indices[lo:hi, :width] = np.where(np.isinf(top_s), -1, top_i)
        scores[lo:hi, :width] = top_s
    return Neighbours(indices, scores)


def _products(q: torch.Tensor, keys: torch.Tensor | np.ndarray | KeyRows | PackedKeys) -> torch.Tensor:
    """(b, M) inner products of queries (b, D) with keys (M, D), in the queries' type: a
    tensor (of that type) is multiplied as it is, `PackedKeys` through oneDNN (float32
    queries); other rows (an array or `KeyRows`) are converted a chunk at a time
    (exactly, when the type is wider)."""
    import torch

    if isinstance(keys, torch.Tensor):
        return q @ keys.T
    if isinstance(keys, PackedKeys) and q.dtype == torch.float32:
        from mvpp.onednn import products

        return products(q, keys.packed)
    if isinstance(keys, PackedKeys):
        keys = keys.rows
    out = torch.empty((len(q), len(keys)), dtype=q.dtype)
    as_numpy = np.float64 if q.dtype == torch.float64 else np.float32
    for lo in range(0, len(keys), KEY_CHUNK):
        chunk = torch.from_numpy(np.asarray(keys[lo : lo + KEY_CHUNK], as_numpy))
        out[:, lo : lo + KEY_CHUNK] = q @ chunk.T
    return out


def screening_error(dim: int, group_weight: float = 0.0) -> float:
    """A bound on how far a float32 score (cosine of unit vectors of `dim` values, plus a
    group bonus) is from the exact one."""
    return SCREEN_SAFETY * (dim + 2) * 2.0**-24 * (1.0 + abs(group_weight))


def _rows(values: np.ndarray | None, lo: int, hi: int, fill: Any) -> Any:
    """values[lo:hi], or an array of `fill` when values is None and fill is not."""
    if values is not None:
        return values[lo:hi]
    return None if fill is None else np.full(hi - lo, fill)


def _exact_among_kept(kept: torch.Tensor, queries: np.ndarray, keys: np.ndarray | KeyRows | PackedKeys, k: int,
                      **filters: Any) -> Neighbours:
    """`candidate_topk` of each query (row of `kept`, (b, M) bool) among its kept keys.
    Rows go in order of how many keys they keep, in groups of at most
    MAX_CANDIDATE_PAIRS pairs (a query tied with thousands of copies of one video keeps
    them all, and must not make every row of its block as wide)."""
    import torch

    counts = kept.sum(dim=1).numpy()
    cols = torch.nonzero(kept, as_tuple=True)[1].numpy()  # row by row, each ascending
    starts = np.concatenate([[0], np.cumsum(counts)])
    b = len(counts)
    indices = np.full((b, k), -1, np.int64)
    scores = np.full((b, k), -np.inf, np.float32)
    order = np.argsort(counts, kind="stable")
    lo = 0
    while lo < b:
        hi = lo + 1
        while hi < b and (hi + 1 - lo) * counts[order[hi]] <= MAX_CANDIDATE_PAIRS:
            hi += 1
        rows = order[lo:hi]
        width = int(counts[rows[-1]])
        cand = np.full((len(rows), width), -1, np.int64)
        for j, r in enumerate(rows):
            cand[j, : counts[r]] = cols[starts[r] : starts[r + 1]]
        part = candidate_topk(
            queries[rows], keys, cand, k,
            **{name: value[rows] if isinstance(value, np.ndarray) and name.startswith("query") else value
               for name, value in filters.items()},
        )
        indices[rows], scores[rows] = part.indices, part.scores
        lo = hi
    return Neighbours(indices, scores)


def ranking_scores(scores: Any) -> Any:
    """Scores as neighbours are ranked by: rounded to SCORE_RESOLUTION (numpy or torch).

    An encoder's output for a text moves in the last float bits with the batch it was
    encoded in, so copies of one video or title in a bank score within about 1e-7 of each
    other, in an order that is noise. Ranked at a resolution far above that noise and far
    below any meaningful difference, such near-equal keys tie, and ties go to the lowest
    index: the neighbours of an item are the same whichever batch encoded it (scoring an
    item anew gives the neighbours evaluation gave it).
    """
    return (scores / SCORE_RESOLUTION).round()


def _topk_ties_by_index(sims, k: int):
    """Indices of each row's k largest values, lowest index first among keys tied at the
    k-th value (`torch.topk` keeps an arbitrary subset of ties, which may differ with the
    shape of the batch)."""
    import torch

    kth = torch.topk(sims, k, dim=1).values[:, -1:]  # (b, 1)
    above = sims > kth
    tied = sims == kth
    room = k - above.sum(dim=1, keepdim=True)  # ties that still fit
    take = above | (tied & (torch.cumsum(tied, dim=1) <= room))  # exactly k per row
    m = sims.shape[1]
    # the taken keys' indices, lowest first: rank taken keys by m - index
    rank = torch.where(take, m - torch.arange(m, dtype=torch.int64), torch.zeros((), dtype=torch.int64))
    return torch.topk(rank, k, dim=1).indices
