"""Approximate neighbours: the HNSW path gives what the exact search gives."""

from __future__ import annotations

import numpy as np
import pytest

from mvpp.retriever.ann import AnnConfig, AnnIndex, MemoryKeys
from mvpp.retriever.bulk import bulk_topk, candidate_topk
from mvpp.retriever.packed import PackedSequences
from mvpp.retriever.search import ApproximateSearch, GroupBoost, NeighbourSearch, QueryBatch
from mvpp.retriever.snapshot import BankSnapshot

# Thresholds of 1 KB: the engine builds and walks the graph even for a few hundred keys.
GRAPH_ALWAYS = AnnConfig(full_scan_threshold=1, indexing_threshold=1)


def _items(n: int, dim: int = 16, seed: int = 0):
    """Clustered unit vectors (near-duplicates, as in real banks), some without a vector,
    some undated, creators shared by several items."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 10, dim))
    vecs = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    has = rng.random(n) > 0.05
    vecs[~has] = 0.0
    times = rng.uniform(0, 1e6, n)
    times[rng.random(n) < 0.05] = np.nan
    groups = rng.integers(-1, n // 8, n)
    return vecs.astype(np.float32), has, times, groups


def _snapshot(vecs, has, times, groups) -> BankSnapshot:
    n = len(vecs)
    return BankSnapshot(
        item_ids=[f"v{i:05d}" for i in range(n)],
        retrieval=vecs,
        has_retrieval=has,
        targets=np.zeros((n, 1), np.float32),
        label_names=["y"],
        published_ts=times,
        frames=PackedSequences.empty(n),
        tokens=PackedSequences.empty(n),
        titles=[""] * n,
        metadata=[{"creator": f"c{g}"} if g >= 0 else {} for g in groups],
    )


def test_candidates_holding_every_key_rank_as_the_exact_search():
    vecs, has, times, groups = _items(300)
    queries = np.arange(0, 300, 3)
    common = dict(
        query_has_vector=has[queries], key_has_vector=has, query_key_index=queries,
        query_time=times[queries], key_time=times, query_group=groups[queries], key_group=groups,
        group_weight=0.2,
    )
    exact = bulk_topk(vecs[queries], vecs, 25, **common)
    every = np.tile(np.arange(300), (len(queries), 1))
    every = np.concatenate([every, every[:, :40]], axis=1)  # repeats count once
    cand = candidate_topk(vecs[queries], vecs, every, 25, **common)
    np.testing.assert_array_equal(cand.indices, exact.indices)
    np.testing.assert_array_equal(cand.scores, exact.scores)


@pytest.mark.parametrize("with_groups", [False, True])
def test_index_search_equals_exact_search(tmp_path, with_groups):
    vecs, has, times, groups = _items(600)
    snap = _snapshot(vecs, has, times, groups)
    boost = GroupBoost.fit(snap.metadata, "creator", 0.2) if with_groups else None
    memory = np.arange(0, 600)[np.arange(600) % 5 != 0]  # a training split
    exact = NeighbourSearch(snap, memory, 10, True, groups=boost, wide=40)
    approx = NeighbourSearch(
        snap, memory, 10, True, groups=boost, wide=40, approximate=ApproximateSearch(tmp_path, GRAPH_ALWAYS)
    )
    assert approx.index is not None and approx.index.meta["vectors"] == int(has[memory].sum())
    queries = QueryBatch.from_snapshot(snap, np.arange(600), groups=boost)
    a, b = exact.search(queries), approx.search(queries)
    np.testing.assert_array_equal(b.indices, a.indices)
    np.testing.assert_array_equal(b.scores, a.scores)
    np.testing.assert_array_equal(b.wide_indices, a.wide_indices)
    assert approx.recall(queries, 10) == 1.0
    # searched in any grouping of queries, an item gets the same neighbours
    part = approx.search(queries.subset(slice(7, 9)))
    np.testing.assert_array_equal(part.indices, b.indices[7:9])


def test_an_index_is_built_once_per_memory(tmp_path):
    vecs, has, times, groups = _items(200)
    cfg = GRAPH_ALWAYS
    first = AnnIndex.open_or_build(tmp_path, MemoryKeys(vecs, has, times), cfg)
    again = AnnIndex.open_or_build(tmp_path, MemoryKeys(vecs, has, times), cfg)
    assert again.folder == first.folder and again.meta == first.meta
    moved = times.copy()
    moved[0] += 1.0
    other = AnnIndex.open_or_build(tmp_path, MemoryKeys(vecs, has, moved), cfg)
    assert other.folder != first.folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.digest, other.digest])


def test_a_damaged_index_is_built_again(tmp_path, caplog):
    vecs, has, times, _ = _items(100)
    first = AnnIndex.open_or_build(tmp_path, MemoryKeys(vecs, has, times), GRAPH_ALWAYS)
    first.close()
    (first.folder / "index.json").write_text("{not json", encoding="utf-8")
    again = AnnIndex.open_or_build(tmp_path, MemoryKeys(vecs, has, times), GRAPH_ALWAYS)
    assert "damaged" in caplog.text and again.digest == first.digest
    found = again.candidates(vecs[:3], 5, np.array([0, 1, 2]), times[:3])
    assert found.shape == (3, 5) and not np.isin(np.array([0, 1, 2]), found[np.arange(3), :1]).any()


def test_worker_processes_answer_as_one_process(tmp_path, monkeypatch):
    import mvpp.retriever.ann as ann

    vecs, has, times, groups = _items(400)
    index = AnnIndex.open_or_build(tmp_path, MemoryKeys(vecs, has, times, groups), GRAPH_ALWAYS)
    own = np.arange(400)
    alone = index.candidates(vecs, 20, own, times, groups)
    monkeypatch.setattr(ann, "PARALLEL_FROM", 10)
    monkeypatch.setattr(ann, "PARALLEL_CHUNK", 64)
    index.close()
    shared = index.candidates(vecs, 20, own, times, groups, workers=2)
    np.testing.assert_array_equal(shared, alone)
    # a short search beside running workers goes to them: this process loads no graph
    few = index.candidates(vecs[:5], 20, own[:5], times[:5], groups[:5], workers=2)
    np.testing.assert_array_equal(few, alone[:5])
    assert index._loaded is None
    index.close()


def test_which_search_a_run_uses():
    from mvpp.predictor.training import ANN_THRESHOLD, TrainConfig, uses_index

    assert uses_index(TrainConfig(), ANN_THRESHOLD) and not uses_index(TrainConfig(), ANN_THRESHOLD - 1)
    assert uses_index(TrainConfig(neighbour_index="ann"), 10) and not uses_index(TrainConfig(neighbour_index="exact"), 10**7)
    from mvpp.predictor.config_file import build_configs

    assert build_configs(None, [])[0].neighbour_index == "auto"
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), "ann": {"m": 8, "ef_construct": 50}})
    assert cfg.ann == AnnConfig(m=8, ef_construct=50)
    with pytest.raises(ValueError, match="neighbour_index"):
        TrainConfig(neighbour_index="hnsw")
    with pytest.raises(ValueError, match="ann"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "ann": {"links": 8}})


def test_train_refuses_an_unknown_search(tmp_path):
    from typer.testing import CliRunner

    from mvpp.cli.main import app

    result = CliRunner().invoke(app, ["train", "--bank", str(tmp_path / "bank"), "--neighbour-index", "hnsw",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "neighbour_index must be one of" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("indexed", [False, True])
def test_a_split_searched_in_chunks_gets_the_same_neighbours(tmp_path, monkeypatch, indexed):
    import mvpp.predictor.dataset as dataset

    vecs, has, times, groups = _items(300)
    snap = _snapshot(vecs, has, times, groups)
    splits = {"train": np.arange(0, 240), "val": np.arange(240, 270), "test": np.arange(270, 300)}
    approximate = ApproximateSearch(tmp_path, GRAPH_ALWAYS) if indexed else None
    whole, _ = dataset.split_neighbours(snap, splits, 5, True, wide=20, approximate=approximate)
    monkeypatch.setattr(dataset, "SEARCH_CHUNK", 7)
    chunked, _ = dataset.split_neighbours(snap, splits, 5, True, wide=20, approximate=approximate)
    for name in splits:
        np.testing.assert_array_equal(chunked[name].indices, whole[name].indices)
        np.testing.assert_array_equal(chunked[name].scores, whole[name].scores)
        np.testing.assert_array_equal(chunked[name].wide_indices, whole[name].wide_indices)


def test_a_search_for_another_k_shares_the_memory_and_answers_as_a_new_one(tmp_path):
    vecs, has, times, groups = _items(300)
    snap = _snapshot(vecs, has, times, groups)
    memory = np.arange(0, 300, 2)
    search = NeighbourSearch(snap, memory, 10, True, wide=40, approximate=ApproximateSearch(tmp_path, GRAPH_ALWAYS))
    fewer = search.with_k(3)
    assert fewer.index is search.index and fewer._vectors is search._vectors and search.k == 10
    queries = QueryBatch.from_snapshot(snap, np.arange(300))
    fresh = NeighbourSearch(snap, memory, 3, True, approximate=ApproximateSearch(tmp_path, GRAPH_ALWAYS))
    a, b = fewer.search(queries), fresh.search(queries)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.wide_indices is None
