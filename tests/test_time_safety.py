"""Time safety of retrieval (no neighbour from the query's future) in every split and in
scoring, time splits, and a multi-target train -> evaluate -> score round trip with the
metadata expert, all through the same CLI a user types."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app
from mvpp.config import BuildSettings
from mvpp.memory_bank.builder import BankBuilder, BuildItem
from mvpp.memory_bank.metadata import MetaRow
from mvpp.memory_bank.store import open_store
from mvpp.predictor.dataset import SplitConfig, make_splits
from mvpp.predictor.run import Run
from mvpp.predictor.scoring import Scorer
from mvpp.predictor.training import TrainConfig, prepare
from mvpp.retriever.bulk import ranking_scores
from mvpp.retriever.snapshot import read_snapshot

runner = CliRunner()

TOPICS = {"cat": 9.0, "dog": 8.0, "recipe": 6.0, "football": 7.5, "news": 4.0, "dance": 8.5}
START = datetime(2025, 3, 1, tzinfo=timezone.utc)
N_ITEMS = 240


def _human(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


def write_table(path: Path, n: int = N_ITEMS, seed: int = 0) -> Path:
    """Posts with captions, two engagement counts, creators, followers, durations, times."""
    rng = np.random.default_rng(seed)
    words = list(TOPICS)
    creators = [f"creator{i}" for i in range(12)]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["vid", "caption", "tags", "views", "likes", "posted", "scraped",
                    "followers", "duration", "creator"])
        for i in range(n):
            topic = words[i % len(words)]
            followers = float(rng.lognormal(8, 2))
            base = TOPICS[topic] + 0.3 * math.log(followers) + rng.normal(0, 0.5)
            views = math.exp(base)
            likes = views * rng.uniform(0.02, 0.1)
            posted = START + timedelta(hours=float(rng.uniform(0, 60 * 24)))
            w.writerow([
                f"v{i:04d}", f"{topic} video number {i % 7} {rng.choice(['fun', 'wow', 'new'])}",
                f"{topic}, trend", _human(views), _human(likes),
                posted.strftime("%Y-%m-%d %H:%M:%S"), "2025-05-15 12:00:00",
                _human(followers) if i % 10 else "",  # some followers missing
                f"00:{int(rng.integers(5, 59)):02d}", creators[i % len(creators)],
            ])
    return path



@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiktokish")
    table = write_table(root / "posts.csv")
    path = root / "bank"
    result = runner.invoke(bank_app, [
        "build", "--meta", str(table), "--id-col", "vid", "--text-col", "caption",
        "--text-col", "tags", "--label-col", "views", "--label-col", "likes",
        "--label-transform", "log1p", "--time-col", "posted", "--observed-col", "scraped",
        "--meta-col", "followers", "--meta-col", "duration", "--meta-col", "creator",
        "--profile", "lite", "--bank", str(path),
    ])
    assert result.exit_code == 0, result.output
    return path, table


@pytest.fixture(scope="module")
def snapshot(bank):
    with open_store(bank=bank[0]) as store:
        return read_snapshot(store)


def test_bank_keeps_times_and_parsed_metadata(snapshot):
    assert len(snapshot) == N_ITEMS
    assert np.isfinite(snapshot.published_ts).all() and np.isfinite(snapshot.observed_ts).all()
    assert (snapshot.observed_ts > snapshot.published_ts).all()
    meta = snapshot.metadata[1]
    assert isinstance(meta["followers"], float) and isinstance(meta["duration"], float)
    assert meta["creator"] == "creator1" and snapshot.metadata[0]["followers"] is None
    assert snapshot.label_names == ["likes", "views"]


def test_split_by_time_is_earliest_train_latest_test(snapshot):
    splits = make_splits(snapshot, SplitConfig(by_time=True))
    t = snapshot.published_ts
    assert [len(splits[s]) for s in ("train", "val", "test")] == [192, 24, 24]
    assert t[splits["train"]].max() <= t[splits["val"]].min()
    assert t[splits["val"]].max() <= t[splits["test"]].min()


def _assert_no_future(snapshot, data) -> int:
    checked = 0
    train = set(data.splits["train"].tolist())
    for split, idx in data.splits.items():
        nb = data.neighbours[split]
        for row, q in enumerate(idx):
            got = nb.indices[row][nb.indices[row] >= 0]
            assert q not in got, f"{split}: item retrieved itself"
            assert set(got.tolist()) <= train, f"{split}: neighbour outside the training split"
            assert (snapshot.published_ts[got] < snapshot.published_ts[q]).all(), (
                f"{split}: neighbour from the future of {snapshot.item_ids[q]}"
            )
            checked += len(got)
    return checked


@pytest.mark.parametrize("by_time", [False, True])
def test_time_safe_retrieval_in_every_split(snapshot, by_time):
    # time safety is on by default when the bank has times
    data = prepare(snapshot, TrainConfig(k=8, split_by_time=by_time))
    assert data.time_safe
    assert _assert_no_future(snapshot, data) > 0
    # hybrid neighbours re-rank only candidates that passed the time filter
    hybrid = prepare(snapshot, TrainConfig(k=8, split_by_time=by_time, lexical_retrieval=2.0), lexicon="fit")
    assert hybrid.lexicon is not None
    assert _assert_no_future(snapshot, hybrid) > 0
    # the random split is where the filter bites: val / test items get fewer neighbours
    if not by_time:
        unsafe = prepare(snapshot, TrainConfig(k=8, time_safe=False))
        t = snapshot.published_ts
        leaks = sum(
            int((t[unsafe.neighbours[s].indices[r]] >= t[q]).sum())
            for s, idx in unsafe.splits.items()
            for r, q in enumerate(idx)
        )
        assert leaks > 0


@pytest.mark.parametrize("hybrid", [False, True])
def test_the_wider_neighbourhood_obeys_the_filters_and_leaves_the_k_unchanged(snapshot, hybrid):
    cfg = TrainConfig(k=8, split_by_time=False, lexical_retrieval=2.0 if hybrid else 0.0)
    lexicon = "fit" if hybrid else None
    narrow = prepare(snapshot, cfg, lexicon=lexicon)
    wide = prepare(snapshot, cfg, lexicon=lexicon, wide_widths=(5, 30))
    train = set(wide.splits["train"].tolist())
    t = snapshot.published_ts
    for split, idx in wide.splits.items():
        a, b = narrow.neighbours[split], wide.neighbours[split]
        np.testing.assert_array_equal(a.indices, b.indices)  # the k the model attends to
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.wide_indices is None and b.wide_indices is not None and b.wide_indices.shape == (len(idx), 30)
        for row, q in enumerate(idx):
            got = b.wide_indices[row][b.wide_indices[row] >= 0]
            assert q not in got and set(got.tolist()) <= train
            assert (t[got] < t[q]).all()
            s = b.wide_scores[row][: len(got)]
            assert (np.diff(ranking_scores(s)) <= 0).all()  # best first, by the dense ranking


@pytest.fixture(scope="module")
def run_dir(bank, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    result = runner.invoke(app, [
        "train", "--bank", str(bank[0]), "--k", "5", "--epochs", "2", "--set", "train.batch_size=64",
        "--set", "model.d_model=32", "--split-by-time", "--meta-categorical", "creator",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    return out


def test_run_has_metadata_expert_and_every_target(run_dir):
    run = Run.load(run_dir)
    assert run.time_safe and run.train_config.split_by_time
    assert set(run.targets) == {"likes", "views"}
    assert run.model_config.inputs.n_targets == 2 and "M" in run.model_config.expert_names
    fz = run.featurizer
    assert fz is not None and fz.columns == ["followers", "duration", "creator"]
    assert {"age_h", "hour_sin", "hour_cos", "weekday"} <= set(fz.feature_names)
    assert run.model_config.inputs.n_meta_numeric == fz.n_numeric
    assert run.model_config.inputs.meta_cardinalities == fz.cardinalities
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for split in ("val", "test"):
        assert set(metrics[split]) == {"likes", "views"}


def test_evaluate_reports_every_target(run_dir, bank):
    for split in ("train", "val", "test"):
        result = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--bank", str(bank[0]),
                                     "--split", split, "--json"])
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.output)
        assert set(metrics) == {"likes", "views"}
        for m in metrics.values():
            assert m["n"] > 0 and math.isfinite(m["nmse"]) and m["coverage"] is not None
    table = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--bank", str(bank[0])])
    assert "likes" in table.output and "views" in table.output


def test_score_reports_every_target(run_dir, bank, tmp_path):
    _, table = bank
    uploads = tmp_path / "uploads.csv"
    with table.open(encoding="utf-8") as src, uploads.open("w", newline="", encoding="utf-8") as dst:
        reader = csv.DictReader(src)
        w = csv.writer(dst)
        w.writerow(["vid", "caption", "tags", "posted", "followers", "creator"])
        for n, row in enumerate(reader):
            if n >= 6:
                break
            w.writerow([f"new{n}", row["caption"], row["tags"], "2025-04-10 08:00:00",
                        row["followers"], row["creator"]])
    out = tmp_path / "scores.parquet"
    result = runner.invoke(app, [
        "score", "--meta", str(uploads), "--id-col", "vid", "--text-col", "caption",
        "--text-col", "tags", "--time-col", "posted", "--run", str(run_dir),
        "--bank", str(bank[0]), "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6
    for row in rows:
        assert row["status"].startswith("ok")
        for t in ("likes", "views"):
            assert row[f"{t}_lower"] <= row[f"{t}_pred"] <= row[f"{t}_upper"]
            assert row[f"{t}_count"] >= 0


def test_scorer_never_retrieves_the_future(run_dir, bank, snapshot, encoders):
    run = Run.load(run_dir)
    with open_store(bank=bank[0]) as store:
        builder = BankBuilder(store, encoders, BuildSettings())
        scorer = Scorer(run, snapshot, builder, memory="train")
        t = snapshot.published_ts
        train_idx = scorer.predictor.splits["train"]
        train_t = t[train_idx]
        # query times inside the training period: later training items exist and must not come back
        q_times = np.quantile(train_t, [0.1, 0.3, 0.5, 0.7])
        items = []
        for j, qt in enumerate(q_times):
            for topic in list(TOPICS)[:3]:
                iso = datetime.fromtimestamp(float(qt), tz=timezone.utc).isoformat()
                items.append(BuildItem(f"q{j}{topic}", MetaRow(
                    f"q{j}{topic}", title=f"{topic} video number 1 fun {topic}, trend",
                    published_at=iso, published_ts=float(qt),
                    metadata={"followers": 1000.0, "duration": 20.0, "creator": "creator3"},
                )))
        points = builder.encode([(it, None) for it in items])
        nb_idx = _neighbour_rows(snapshot, scorer.predictor.predict_points(points))
        rows = scorer.score(items)
        # an item of the bank scored as new never retrieves itself, nor its future
        own = [BuildItem(snapshot.item_ids[i], MetaRow(
            snapshot.item_ids[i], title=snapshot.titles[i], published_ts=float(t[i]),
        )) for i in train_idx[-5:]]
        own_points = builder.encode([(it, None) for it in own])
        own_idx = _neighbour_rows(snapshot, scorer.predictor.predict_points(own_points))
        # with every labelled item as memory, the same holds
        everything = Scorer(run, snapshot, builder, memory="all").predictor
        all_idx = _neighbour_rows(snapshot, everything.predict_points(points + own_points))
    checked = 0
    for p, got in zip(points, nb_idx, strict=True):
        assert (t[got] < p.published_ts).all()
        assert set(got) <= set(train_idx)
        checked += len(got)
    assert checked > 0
    for p, got in zip(own_points, own_idx, strict=True):
        assert (t[got] < p.published_ts).all()
        assert p.item_id not in {snapshot.item_ids[g] for g in got}
    for p, got in zip(points + own_points, all_idx, strict=True):
        assert len(got) and (t[got] < p.published_ts).all()
        assert p.item_id not in {snapshot.item_ids[g] for g in got}
    by_id = {snapshot.item_ids[i]: t[i] for i in range(len(snapshot))}
    for item, row in zip(items, rows, strict=True):
        assert row.status.startswith("ok")
        assert set(row.predictions) == {"likes", "views"}
        assert all(by_id[nid] < item.meta.published_ts for nid, _ in row.neighbours)


def _neighbour_rows(snapshot, rows) -> list[np.ndarray]:
    """Each scored row's neighbours as snapshot rows."""
    pos = snapshot.index_of()
    return [np.array([pos[n] for n, _ in r.neighbours], np.int64) for r in rows]


def test_no_meta_ablation(bank, tmp_path):
    out = tmp_path / "nometa"
    result = runner.invoke(app, [
        "train", "--bank", str(bank[0]), "--k", "5", "--epochs", "1", "--set", "train.batch_size=64",
        "--set", "model.d_model=32", "--split-by-time", "--ablate", "meta", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    run = Run.load(out)
    assert "M" not in run.model_config.expert_names and run.featurizer is None


def _creators(snapshot, idx) -> np.ndarray:
    return np.array([snapshot.metadata[i]["creator"] for i in idx])


def test_neighbour_group_retrieves_the_creators_earlier_posts_first(snapshot):
    k = 8
    plain = prepare(snapshot, TrainConfig(k=k, split_by_time=True))
    grouped = prepare(snapshot, TrainConfig(k=k, split_by_time=True, neighbour_group="creator",
                                            group_retrieval=2.0))
    assert grouped.groups is not None and grouped.groups.column == "creator"
    assert _assert_no_future(snapshot, grouped) > 0
    t = snapshot.published_ts
    train = grouped.splits["train"]
    n_same = {"plain": 0, "grouped": 0}
    for split, idx in grouped.splits.items():
        for name, data in (("plain", plain), ("grouped", grouped)):
            nb = data.neighbours[split].indices
            for row, q in enumerate(idx):
                got = nb[row][nb[row] >= 0]
                same = _creators(snapshot, got) == snapshot.metadata[q]["creator"]
                n_same[name] += int(same.sum())
                if name == "grouped":
                    # a bonus larger than any cosine gap: every earlier training post of the
                    # creator (up to k) comes back, ahead of every other creator's post
                    allowed = train[(t[train] < t[q]) & (train != q)]
                    n_allowed = int((_creators(snapshot, allowed) == snapshot.metadata[q]["creator"]).sum())
                    assert same.sum() == min(k, n_allowed)
                    assert not (~same[:-1] & same[1:]).any()
    assert n_same["grouped"] > 1.5 * n_same["plain"]


def test_neighbour_group_must_be_a_metadata_column(snapshot):
    with pytest.raises(ValueError, match="'uploader' is not in the bank's metadata.*creator"):
        prepare(snapshot, TrainConfig(k=4, neighbour_group="uploader"))


def test_scorer_retrieves_by_neighbour_group(bank, snapshot, encoders, tmp_path):
    out = tmp_path / "grouped"
    result = runner.invoke(app, [
        "train", "--bank", str(bank[0]), "--k", "4", "--epochs", "1", "--set", "train.batch_size=64",
        "--set", "model.d_model=16", "--split-by-time", "--neighbour-group", "creator",
        "--set", "train.group_retrieval=2", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    run = Run.load(out)
    assert run.train_config.neighbour_group == "creator" and run.train_config.group_retrieval == 2.0
    t = snapshot.published_ts
    with open_store(bank=bank[0]) as store:
        scorer = Scorer(run, snapshot, BankBuilder(store, encoders, BuildSettings()))
        late = float(t.max()) + 3600.0
        items = [
            BuildItem(f"n{c}", MetaRow(f"n{c}", title="news video number 2 wow news, trend",
                                       published_ts=late, metadata={"creator": c}))
            for c in ("creator5", "creator9", "nobody")
        ]
        scored = scorer.predictor.predict_points(scorer.encode([(it, None) for it in items]))
    for item, row, got in zip(items, scored, _neighbour_rows(snapshot, scored), strict=True):
        creators = _creators(snapshot, got)
        score = np.array([s for _, s in row.neighbours])
        if item.meta.metadata["creator"] == "nobody":  # no post of its own: plain cosines
            assert (score <= 1.0 + 1e-5 + run.train_config.lexical_retrieval).all()
            assert "nobody" not in creators
        else:
            assert (creators == item.meta.metadata["creator"]).all()
            assert (score > 2.0).all()
