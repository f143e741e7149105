from __future__ import annotations

import numpy as np

from mvpp.predictor.metrics import regression_metrics, spearman
from mvpp.retriever import bulk
from mvpp.retriever.bulk import SCORE_RESOLUTION, bulk_topk


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Brute-force ranking: by the score at SCORE_RESOLUTION, then by index."""
    rounded = np.round(scores / SCORE_RESOLUTION)
    return np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -rounded), axis=1)[:, :k]


def test_bulk_matches_brute_force_and_excludes_self():
    rng = np.random.default_rng(0)
    keys = _unit(rng, 300, 16)
    nb = bulk_topk(keys, keys, 5, query_key_index=np.arange(300), block=64)
    sims = keys @ keys.T
    np.fill_diagonal(sims, -np.inf)
    expect = _ranked(sims, 5)
    assert (nb.indices == expect).all()
    assert (nb.indices != np.arange(300)[:, None]).all()
    np.testing.assert_allclose(nb.scores, np.take_along_axis(sims, expect, 1), rtol=1e-5)


def test_float32_keys_converted_in_chunks_give_the_float64_search(monkeypatch):
    """A float32 memory is never copied whole to float64: its chunks' products are the
    same products, so the neighbours and scores are those of the float64 keys."""
    rng = np.random.default_rng(7)
    keys = _unit(rng, 500, 24)
    times = rng.uniform(0, 1, 500)
    expect = bulk_topk(keys[:90], keys.astype(np.float64), 7, query_key_index=np.arange(90),
                       query_time=times[:90], key_time=times)
    monkeypatch.setattr(bulk, "KEY_CHUNK", 64)  # 8 chunks, the last one short
    got = bulk_topk(keys[:90], keys, 7, query_key_index=np.arange(90), query_time=times[:90], key_time=times,
                    block=16)
    np.testing.assert_array_equal(got.indices, expect.indices)
    np.testing.assert_array_equal(got.scores, expect.scores)
    # the same keys as rows of a larger array, gathered chunk by chunk
    source = np.concatenate([_unit(rng, 200, 24), keys])
    rows = bulk.KeyRows(source, np.arange(200, 700))
    assert rows.shape == keys.shape
    got = bulk_topk(keys[:90], rows, 7, query_key_index=np.arange(90), query_time=times[:90], key_time=times,
                    block=16)
    np.testing.assert_array_equal(got.indices, expect.indices)
    np.testing.assert_array_equal(got.scores, expect.scores)


def test_float32_screening_gives_the_float64_search(monkeypatch):
    """Keys narrower than float64 are screened in float32 and the survivors scored in
    float64: with copies, near-ties at the ranking resolution, groups, times, items
    without vectors and masked keys, the result is the float64 search's, bit for bit."""
    rng = np.random.default_rng(11)
    base = _unit(rng, 600, 32)
    copies = base[rng.integers(0, 20, 150)] + rng.normal(0, 1e-7, (150, 32)).astype(np.float32)
    # keys whose cosine with key 0 sits right at the ranking resolution's steps
    steps = base[:1] + np.outer(np.linspace(0, 3e-4, 40), _unit(rng, 1, 32)[0]).astype(np.float32)
    keys = np.concatenate([base, copies, base[:5], steps])
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    m = len(keys)
    has_vector = rng.random(m) > 0.05
    keys[~has_vector] = 0.0
    key_time = rng.uniform(0, 100, m)
    key_time[rng.random(m) < 0.03] = np.nan
    key_group = rng.integers(-1, 8, m)
    queries = np.concatenate([keys[:60], keys[600:640], _unit(rng, 20, 32)])
    n = len(queries)
    common = dict(
        key_mask=rng.random(m) > 0.1,
        query_has_vector=np.concatenate([has_vector[:60], has_vector[600:640], np.ones(20, bool)]),
        key_has_vector=has_vector,
        query_key_index=np.concatenate([np.arange(60), np.arange(600, 640), np.full(20, -1)]),
        query_time=np.where(rng.random(n) < 0.1, np.nan, rng.uniform(0, 100, n)),
        key_time=key_time,
        query_group=rng.integers(-1, 8, n),
        key_group=key_group,
        group_weight=0.05,
    )
    packed = bulk.PackedKeys.of(bulk.KeyRows(keys, np.arange(m)))  # the oneDNN screen, where there is one
    for k in (1, 7, 50, m + 5):
        expect = bulk_topk(queries, keys.astype(np.float64), k, **common)
        for screened in (keys, packed) if packed is not None else (keys,):
            got = bulk_topk(queries, screened, k, block=32, **common)
            np.testing.assert_array_equal(got.indices, expect.indices)
            np.testing.assert_array_equal(got.scores, expect.scores)
    monkeypatch.setattr(bulk, "MAX_CANDIDATE_PAIRS", 40)  # rows scored a few at a time
    expect = bulk_topk(queries, keys.astype(np.float64), 10, **common)
    got = bulk_topk(queries, bulk.KeyRows(keys, np.arange(m)), 10, **common)
    np.testing.assert_array_equal(got.indices, expect.indices)
    np.testing.assert_array_equal(got.scores, expect.scores)
    plain = {key: common[key] for key in ("query_key_index",)}
    np.testing.assert_array_equal(bulk_topk(queries, keys.astype(np.float16), 10, **plain).indices,
                                  bulk_topk(queries, keys.astype(np.float16).astype(np.float64), 10, **plain).indices)


def test_copies_tie_by_index_whatever_the_noise_and_the_batch():
    """Copies of an item (equal up to encoder float noise) tie, and ties go to the lowest
    index: an item's neighbours do not depend on the queries searched with it."""
    rng = np.random.default_rng(4)
    base = _unit(rng, 40, 16)
    copies = base[[3] * 12] + rng.normal(0, 1e-7, (12, 16)).astype(np.float32)
    keys = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    query = base[3] + rng.normal(0, 1e-7, 16).astype(np.float32)
    alone = bulk_topk(query[None], keys, 5)
    batched = bulk_topk(np.concatenate([base[:7], query[None], base[7:]]), keys, 5, block=4)
    np.testing.assert_array_equal(alone.indices[0], batched.indices[7])
    np.testing.assert_array_equal(alone.indices[0], [3, 40, 41, 42, 43])


def test_key_mask_and_fewer_keys_than_k():
    rng = np.random.default_rng(1)
    keys = _unit(rng, 10, 8)
    mask = np.zeros(10, bool)
    mask[[2, 5]] = True
    nb = bulk_topk(keys[:3], keys, 4, key_mask=mask)
    assert set(nb.indices[0, :2]) == {2, 5}
    assert (nb.indices[:, 2:] == -1).all() and np.isinf(nb.scores[:, 2:]).all()


def test_time_filter_never_returns_the_future():
    rng = np.random.default_rng(2)
    keys = _unit(rng, 200, 8)
    key_time = rng.uniform(0, 100, 200)
    q_time = rng.uniform(0, 100, 50)
    q_time[0] = np.nan  # undated query: no time filter
    nb = bulk_topk(keys[:50], keys, 10, query_time=q_time, key_time=key_time)
    for i in range(1, 50):
        got = nb.indices[i][nb.indices[i] >= 0]
        assert (key_time[got] < q_time[i]).all()
    assert (nb.indices[0] >= 0).all()


def test_group_bonus_is_added_to_same_group_keys_only():
    rng = np.random.default_rng(3)
    keys = _unit(rng, 120, 8)
    queries = _unit(rng, 30, 8)
    key_group = rng.integers(-1, 6, 120)  # -1: no group, never matches
    query_group = rng.integers(-1, 6, 30)
    key_time = rng.uniform(0, 100, 120)
    q_time = rng.uniform(50, 100, 30)
    nb = bulk_topk(queries, keys, 7, query_group=query_group, key_group=key_group, group_weight=0.4,
                   query_time=q_time, key_time=key_time, block=8)
    sims = queries @ keys.T
    same = (query_group[:, None] == key_group[None, :]) & (query_group[:, None] >= 0)
    boosted = np.where(key_time[None, :] < q_time[:, None], sims + 0.4 * same, -np.inf)
    expect = _ranked(boosted, 7)
    assert (nb.indices == expect).all()
    np.testing.assert_allclose(nb.scores, np.take_along_axis(boosted, expect, 1), rtol=1e-5)
    # the bonus reorders: some query has a same-group key it would not get by cosine alone
    plain = bulk_topk(queries, keys, 7, query_time=q_time, key_time=key_time)
    assert (nb.indices != plain.indices).any()
    # weight 0 or no query groups: the plain search
    for kwargs in ({"group_weight": 0.0}, {"query_group": None}):
        args = {"query_group": query_group, "key_group": key_group, "group_weight": 0.4, **kwargs}
        again = bulk_topk(queries, keys, 7, query_time=q_time, key_time=key_time, **args)
        assert (again.indices == plain.indices).all()


def test_k_zero_and_empty_bank():
    q = np.ones((3, 4), np.float32) / 2
    assert bulk_topk(q, np.zeros((0, 4), np.float32), 5).indices.shape == (3, 5)
    assert (bulk_topk(q, np.zeros((0, 4), np.float32), 5).indices == -1).all()
    assert bulk_topk(q, q, 0).indices.shape == (3, 0)


def test_metrics_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 5.0])
    m = regression_metrics(y, p, lower=y - 0.1, upper=y + 0.1, interval=0.9)
    mse = np.mean((y - p) ** 2)
    assert m.nmse == np.float64(mse / np.var(y))
    assert m.mae == np.mean(np.abs(y - p))
    assert m.r2 == 1 - m.nmse
    assert m.coverage == 1.0
    assert abs(spearman(y, p) - 1.0) < 1e-12
    assert abs(spearman(y, -p) + 1.0) < 1e-12
    # ties get average ranks
    assert abs(spearman(np.array([1, 2, 2, 3.0]), np.array([1, 2, 3, 4.0])) - 0.9486833) < 1e-6
    # NaN targets are left out
    assert regression_metrics(np.array([1, np.nan, 3.0]), np.array([1, 100, 3.0])).nmse == 0.0
