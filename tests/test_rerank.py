"""Lexical re-ranking of dense candidates (hybrid neighbours)."""

from __future__ import annotations

import numpy as np

from mvpp.retriever.bulk import Neighbours, bulk_topk
from mvpp.retriever.rerank import bag_similarity, rerank_lexical


def bags(rows: list[dict[int, float]], width: int = 4) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), width), np.int64)
    w = np.zeros((len(rows), width), np.float32)
    for r, bag in enumerate(rows):
        for j, (term, weight) in enumerate(bag.items()):
            ids[r, j], w[r, j] = term, weight
    return ids, w


def test_bag_similarity_is_the_sparse_dot_product() -> None:
    rng = np.random.default_rng(0)
    vocab, n, c, width = 30, 7, 5, 6
    q_ids = rng.integers(0, vocab + 1, (n, width))
    q_w = rng.random((n, width)).astype(np.float32)
    c_ids = rng.integers(0, vocab + 1, (n, c, width))
    c_w = rng.random((n, c, width)).astype(np.float32)

    def dense(ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        v = np.zeros(vocab + 1)
        np.add.at(v, ids, w)
        v[0] = 0.0  # padding
        return v

    want = np.array([[dense(q_ids[i], q_w[i]) @ dense(c_ids[i, j], c_w[i, j]) for j in range(c)] for i in range(n)])
    np.testing.assert_allclose(bag_similarity(q_ids, q_w, c_ids, c_w, vocab), want, rtol=1e-5, atol=1e-6)


def test_shared_terms_lift_a_candidate_and_weight_zero_keeps_the_dense_order() -> None:
    # one query, four keys: key 0 is nearest in the dense space, key 2 shares the query's rare term
    keys = np.array([[1, 0, 0], [0.9, 0.436, 0], [0.8, 0, 0.6], [0, 1, 0]], np.float32)
    query = np.array([[1, 0, 0]], np.float32)
    cand = bulk_topk(query, keys, 4)
    assert cand.indices[0].tolist() == [0, 1, 2, 3]
    k_ids, k_w = bags([{1: 1.0}, {2: 1.0}, {3: 1.0}, {}])
    q_ids, q_w = bags([{3: 1.0}])
    same = rerank_lexical(cand, q_ids, q_w, k_ids, k_w, 5, 2, 0.0)
    assert same.indices[0].tolist() == [0, 1]
    np.testing.assert_allclose(same.scores, cand.scores[:, :2])
    hybrid = rerank_lexical(cand, q_ids, q_w, k_ids, k_w, 5, 2, 0.5)
    assert hybrid.indices[0].tolist() == [2, 0]
    np.testing.assert_allclose(hybrid.scores[0], [0.8 + 0.5, 1.0], rtol=1e-6)


def test_missing_candidates_stay_missing() -> None:
    cand = Neighbours(np.array([[1, -1, -1]]), np.array([[0.5, -np.inf, -np.inf]], np.float32))
    k_ids, k_w = bags([{1: 1.0}, {1: 1.0}])
    q_ids, q_w = bags([{1: 1.0}])
    out = rerank_lexical(cand, q_ids, q_w, k_ids, k_w, 3, 4, 1.0)
    assert out.indices.tolist() == [[1, -1, -1, -1]]
    assert out.scores[0, 0] == np.float32(1.5) and np.isneginf(out.scores[0, 1:]).all()


def test_runs_saved_before_hybrid_neighbours_keep_dense_ones() -> None:
    from mvpp.predictor.training import TrainConfig

    new = TrainConfig()
    assert new.lexical_retrieval > 0
    again = TrainConfig.from_dict(new.to_dict())
    assert again == new
    old = new.to_dict()
    del old["lexical_retrieval"], old["rerank_candidates"]
    assert TrainConfig.from_dict(old).lexical_retrieval == 0.0


def test_key_rows_read_the_bags_of_a_larger_table() -> None:
    """Keys that are a subset of a table's rows (a search's memory) read their bags through
    `key_rows`, as if the subset's bags had been gathered first."""
    rng = np.random.default_rng(0)
    table_ids, table_w = bags([{int(t): 1.0 for t in rng.integers(1, 6, 2)} for _ in range(9)])
    memory = np.array([7, 2, 5, 0, 8])  # memory positions -> table rows, not in order
    cand = Neighbours(np.array([[3, 0, 4, -1], [1, 2, 0, 3]]),
                      np.array([[0.9, 0.8, 0.7, -np.inf], [0.95, 0.9, 0.6, 0.5]], np.float32))
    q_ids, q_w = bags([{1: 1.0, 2: 0.5}, {4: 1.0}])
    gathered = rerank_lexical(cand, q_ids, q_w, table_ids[memory], table_w[memory], 5, 3, 0.7)
    mapped = rerank_lexical(cand, q_ids, q_w, table_ids, table_w, 5, 3, 0.7, key_rows=memory)
    assert mapped.indices.tolist() == gathered.indices.tolist()
    np.testing.assert_array_equal(mapped.scores, gathered.scores)
    assert not np.array_equal(
        rerank_lexical(cand, q_ids, q_w, table_ids, table_w, 5, 3, 0.7).scores, gathered.scores
    )
