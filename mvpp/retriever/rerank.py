"""Lexical re-ranking of dense candidates: hybrid retrieval scores.

Sentence vectors find titles that mean the same; exact shared terms (a series name, a
creator's running joke, a hashtag) find the videos whose popularity moves together
much more often. The dense search returns a generous candidate list; each candidate's
score becomes

    score = cosine(query, key) + weight * <bag(query), bag(key)>

where a bag is an L2-normalised TF-IDF vector over terms (so the second term is a
cosine too), and the best k candidates are kept. Bags are padded arrays of term ids
(0 = padding) and weights, as `predictor.lexicon.Lexicon.encode` makes them; this
module knows nothing of how terms are chosen.
"""

from __future__ import annotations

import numpy as np

from mvpp.retriever.bulk import Neighbours, ranking_scores

# Queries re-ranked per block: bounds memory at block x vocabulary floats.
RERANK_BLOCK = 512


def bag_similarity(
    query_ids: np.ndarray,
    query_weights: np.ndarray,
    cand_ids: np.ndarray,
    cand_weights: np.ndarray,
    vocab_size: int,
) -> np.ndarray:
    """Dot products of each query's bag with its candidates' bags.

    query_ids / query_weights: (N, W); cand_ids / cand_weights: (N, C, W') -> (N, C).
    Ids run from 1 to vocab_size; 0 is padding and counts for nothing.
    """
    import torch

    n = len(query_ids)
    out = np.zeros(cand_ids.shape[:2], np.float32)
    for lo in range(0, n, RERANK_BLOCK):
        q_ids = torch.from_numpy(np.ascontiguousarray(query_ids[lo : lo + RERANK_BLOCK], np.int64))
        q_w = torch.from_numpy(np.ascontiguousarray(query_weights[lo : lo + RERANK_BLOCK], np.float32))
        b = len(q_ids)
        dense = torch.zeros(b, vocab_size + 1)
        dense.scatter_add_(1, q_ids, torch.where(q_ids > 0, q_w, torch.zeros_like(q_w)))  # (B, V + 1)
        dense[:, 0] = 0.0
        c_ids = torch.from_numpy(np.ascontiguousarray(cand_ids[lo : lo + RERANK_BLOCK], np.int64))
        c_w = torch.from_numpy(np.ascontiguousarray(cand_weights[lo : lo + RERANK_BLOCK], np.float32))
        picked = torch.gather(dense, 1, c_ids.reshape(b, -1)).view_as(c_w)  # (B, C, W')
        out[lo : lo + b] = (picked * c_w).sum(-1).numpy()
    return out


def rerank_lexical(
    candidates: Neighbours,
    query_ids: np.ndarray,
    query_weights: np.ndarray,
    key_ids: np.ndarray,
    key_weights: np.ndarray,
    vocab_size: int,
    k: int,
    weight: float,
    key_rows: np.ndarray | None = None,
) -> Neighbours:
    """The top k of `candidates` (indices into the keys) by cosine + weight * bag similarity.

    candidates: (N, C) from `bulk_topk`, -1 / -inf where fewer qualified; query bags
    (N, W); key bags (R, W), read at rows `key_rows[index]` (M,) when given (the keys
    are a subset of a larger table's rows), else at the candidates' indices. Returns
    (N, k) with the hybrid scores.
    """
    idx, score = candidates.indices, candidates.scores
    valid = idx >= 0
    if weight != 0.0 and idx.size:
        lexical = np.zeros(idx.shape, np.float32)
        # the candidates' bags are gathered a block of queries at a time: (B, C, W) for
        # the whole set would grow with it (80,000 queries x 200 candidates: gigabytes)
        for lo in range(0, len(idx), RERANK_BLOCK):
            safe = np.maximum(idx[lo : lo + RERANK_BLOCK], 0)
            if key_rows is not None:
                safe = key_rows[safe]
            lexical[lo : lo + RERANK_BLOCK] = bag_similarity(
                query_ids[lo : lo + RERANK_BLOCK], query_weights[lo : lo + RERANK_BLOCK],
                key_ids[safe], key_weights[safe], vocab_size,
            )
        score = np.where(valid, score + weight * lexical, -np.inf).astype(np.float32)
    # stable: among equal scores the dense order (nearest first, then lowest index) is kept
    order = np.argsort(-ranking_scores(score), axis=1, kind="stable")[:, :k]
    top_idx = np.take_along_axis(idx, order, 1)
    top_score = np.take_along_axis(score, order, 1)
    if top_idx.shape[1] < k:  # fewer candidates than k: pad
        pad = k - top_idx.shape[1]
        top_idx = np.pad(top_idx, ((0, 0), (0, pad)), constant_values=-1)
        top_score = np.pad(top_score, ((0, 0), (0, pad)), constant_values=-np.inf)
    return Neighbours(top_idx, top_score.astype(np.float32))
