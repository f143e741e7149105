"""One prediction path: an item of a run's split, scored as a new upload (its row given to
`mvpp score` without its labels, with the run's training items as memory), gets the
mean and interval `evaluate` gives it, under every option the CLI offers, on both
backends; and one encoding path: `build`, `query` and `score` give an item the same
vectors."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from posts import N_META_ONLY, N_POSTS, N_VIDEOS, build_args, write_posts
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app
from mvpp.config import BuildSettings
from mvpp.memory_bank.builder import BankBuilder, plan_items
from mvpp.memory_bank.decoding import decode_item
from mvpp.memory_bank.metadata import ColumnMap, load_metadata
from mvpp.memory_bank.schema import AUDIO, FRAMES, RETRIEVAL, TEXT
from mvpp.memory_bank.store import open_store
from mvpp.predictor.run import Run
from mvpp.predictor.scoring import RunPredictor, Scorer
from mvpp.retriever.retriever import Query, Retriever
from mvpp.retriever.snapshot import read_snapshot, snapshot_from_points

runner = CliRunner()
pytestmark = pytest.mark.slow  # trains small models end to end


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """Four banks: with and without video frames, embedded and on qdrant-client's local mode."""
    out = {}
    for videos in (True, False):
        root = tmp_path_factory.mktemp("videos" if videos else "text")
        table = write_posts(root, videos)
        for backend in ("embedded", "local"):
            location = (
                ["--bank", str(root / "bank")] if backend == "embedded"
                else ["--qdrant-url", f"local:{root / 'qdrant'}"]
            )
            result = runner.invoke(bank_app, build_args(table, location))
            assert result.exit_code == 0, result.output
            out[(videos, backend)] = (table, location)
    return out


# Each option of `mvpp train` on and off at least once, on both backends and both banks.
CASES = {
    "everything": (True, "embedded", []),
    "plain": (False, "embedded", ["--ablate", "meta", "--ablate", "word-prior", "--ablate", "lexical-retrieval",
                                  "--no-time-safe", "--target", "views"]),
    "local-grouped": (True, "local", ["--neighbour-group", "creator", "--no-time-safe",
                                      "--target", "likes"]),
    "local-text-time-split": (False, "local", ["--split-by-time", "--neighbour-group", "creator",
                                               "--ablate", "meta", "--ablate", "neighbour-summary"]),
    "frames-no-prior": (True, "embedded", ["--ablate", "word-prior", "--neighbour-group", "creator",
                                           "--ablate", "retrieval"]),
    # neighbours from the run's HNSW index (thresholds of 1 KB: the graph is walked)
    "index-grouped": (True, "embedded", ["--neighbour-index", "ann", "--neighbour-group", "creator",
                                         "--set", "train.ann={full_scan_threshold=1, indexing_threshold=1}"]),
    "index-time-split": (False, "local", ["--neighbour-index", "ann", "--split-by-time",
                                          "--set", "train.ann={full_scan_threshold=1, indexing_threshold=1}"]),
}


def _open(location: list[str]):
    flag, value = location
    return open_store(bank=Path(value)) if flag == "--bank" else open_store(qdrant_url=value)


@pytest.mark.parametrize("case", list(CASES))
def test_scoring_a_split_item_gives_what_evaluate_gave(case, banks, encoders, tmp_path):
    videos, backend, flags = CASES[case]
    table, location = banks[(videos, backend)]
    run_dir = tmp_path / "run"
    result = runner.invoke(app, [
        "train", *location, "--k", "5", "--epochs", "2", "--set", "train.batch_size=32", "--set", "model.d_model=16",
        "--out", str(run_dir), *flags,
    ])
    assert result.exit_code == 0, result.output
    run = Run.load(run_dir)
    indexed = "--neighbour-index" in flags
    assert ("recall@10" in result.output) == indexed
    assert len(list((run_dir / "neighbour-index").glob("*/index.json"))) == int(indexed)
    columns = ColumnMap(id_col="vid", text_cols=["caption"], time_col="posted",
                        meta_cols=["followers", "creator"], video_col="clip")
    rows = {r.item_id: r for r in load_metadata(table, columns)}
    for r in rows.values():
        r.labels = {}  # a new upload has no labels
        r.video = str(table.parent / "clips" / r.video) if r.video else None
    with _open(location) as store:
        snap = read_snapshot(store)
        predictor = RunPredictor(run, snap, "train")
        scorer = Scorer(run, snap, BankBuilder(store, encoders, BuildSettings(n_frames=4)), memory="train")
        checked = 0
        for split in ("train", "val", "test"):
            evaluated = predictor.evaluate(split).rows
            ids = [r.item_id for r in evaluated]
            items, failures = plan_items(None, [rows[i] for i in ids])
            assert not failures
            scored = scorer.score(items, batch_size=7)  # other batches than evaluate's
            for ev, sc in zip(evaluated, scored, strict=True):
                assert (ev.item_id, ev.status) == (sc.item_id, sc.status)
                assert [n for n, _ in ev.neighbours] == [n for n, _ in sc.neighbours]
                for t in run.targets:
                    for key in ("pred", "lower", "upper"):
                        assert sc.predictions[t][key] == pytest.approx(ev.predictions[t][key], abs=1e-4)
                    ev_flat = ev.flat(run.targets, run.manifest.label_transform)
                    sc_flat = sc.flat(run.targets, run.manifest.label_transform)
                    assert sc_flat[f"{t}_count"] == pytest.approx(ev_flat[f"{t}_count"], rel=1e-3)
                checked += 1
        assert checked == sum(len(v) for v in run.split_ids.values())
        if indexed:  # evaluation and scoring searched the graph training left in the run
            assert predictor.search.index is not None
            assert predictor.search.index.folder.parent == run_dir / "neighbour-index"
            assert len(list((run_dir / "neighbour-index").iterdir())) == 1
    # metadata-only posts were indexed, trained on and scored
    meta_only = {f"p{i:03d}" for i in range(N_POSTS - N_META_ONLY, N_POSTS)}
    assert meta_only <= {i for ids in run.split_ids.values() for i in ids}


def test_one_encoding_path_for_build_query_and_score(banks, encoders, tmp_path):
    """An item's stored point (build), its query encoding and its scoring encoding hold
    the same vectors: unit rows, multivectors at their storage precision."""
    table, location = banks[(True, "embedded")]
    columns = ColumnMap(id_col="vid", text_cols=["caption"], time_col="posted",
                        meta_cols=["followers", "creator"], video_col="clip")
    rows = load_metadata(table, columns)
    items, _ = plan_items(table.parent / "clips", rows[:N_VIDEOS + 3])
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", *location, "--k", "3", "--epochs", "1", "--set", "model.d_model=8", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    with _open(location) as store:
        settings = BuildSettings(n_frames=4)
        scorer = Scorer(Run.load(run_dir), read_snapshot(store), BankBuilder(store, encoders, settings))
        clips = [decode_item(str(it.video), 4, settings.frame_max_side) if it.video else None for it in items]
        scorer_points = scorer.encode(list(zip(items, clips, strict=True)))
        retriever = Retriever(store, encoders, BuildSettings(n_frames=4))
        queries = retriever.encode([Query(clip=it.video, title=it.title, item_id=it.item_id) for it in items])
        stored = store.get([it.item_id for it in items], vectors=(RETRIEVAL, FRAMES, TEXT, AUDIO))
        manifest = store.manifest
    assert sum(p.frames is not None for p in stored) == N_VIDEOS
    assert sum(p.audio is not None for p in stored) == N_VIDEOS // 2
    for fresh in (scorer_points, [q.point for q in queries]):
        for name in ("retrieval", "tokens", "frames", "audio"):
            for a, b in zip(fresh, stored, strict=True):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None), name
                if x is not None:
                    # float noise of batched inference only, never a scale
                    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=2e-3)
                    np.testing.assert_allclose(x, y, atol=2e-3 if name != "retrieval" else 1e-5)
    # the predictor's arrays of fresh points and of stored ones agree to storage precision
    a, b = snapshot_from_points(scorer_points, manifest, fresh=True), snapshot_from_points(stored, manifest, fresh=True)
    every = np.arange(len(a))
    for name in ("tokens", "frames", "audio"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(x.lengths, y.lengths) and x.shape == y.shape, name
        np.testing.assert_allclose(x.padded(every), y.padded(every), atol=1e-3)


def test_score_cli_matches_evaluate_on_real_posts(tmp_path):
    """Through the CLI, on real TikTok posts: `evaluate --predictions` and `score` of the
    same rows without their labels agree per item; the run finds its bank and the bank's
    columns by itself."""
    from conftest import shared_path

    raw = shared_path("tiktok_vn", "raw_data.csv")
    with raw.open(encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        posts = list(itertools.islice(reader, 1200))
    table = tmp_path / "posts.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, header)
        w.writeheader()
        w.writerows(posts)
    bank = tmp_path / "bank"
    build = runner.invoke(bank_app, [
        "build", "--meta", str(table), "--id-col", "vid_id", "--text-col", "vid_caption",
        "--text-col", "vid_hashtags", "--label-col", "vid_nview", "--label-col", "vid_nlike",
        "--label-transform", "log1p", "--time-col", "vid_postTime", "--meta-col", "user_nfollower",
        "--meta-col", "user_name", "--profile", "lite", "--bank", str(bank),
    ])
    assert build.exit_code in (0, 1), build.output
    run_dir = tmp_path / "run"
    train = runner.invoke(app, [
        "train", "--bank", str(bank), "--k", "8", "--epochs", "2", "--set", "model.d_model=32",
        "--neighbour-group", "user_name", "--out", str(run_dir),
    ])
    assert train.exit_code == 0, train.output
    predictions = tmp_path / "evaluated.parquet"
    ev = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--split", "test", "--json",
                             "--predictions", str(predictions)])
    assert ev.exit_code == 0, ev.output
    assert f"bank: {bank} (the run's" in " ".join(ev.stderr.split())  # no --bank: the run's own
    evaluated = pq.read_table(predictions).to_pylist()
    test_ids = {r["item_id"] for r in evaluated}
    uploads = tmp_path / "uploads.csv"
    with uploads.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, header)
        w.writeheader()
        for row in posts:
            if row["vid_id"] in test_ids:
                w.writerow({**row, "vid_nview": "", "vid_nlike": ""})
    scores = tmp_path / "scores.parquet"
    sc = runner.invoke(app, ["score", "--meta", str(uploads), "--run", str(run_dir), "--memory", "train",
                             "--out", str(scores)])
    assert sc.exit_code == 0, sc.output
    scored = {r["item_id"]: r for r in pq.read_table(scores).to_pylist()}
    assert len(scored) == len(evaluated) > 50
    for e in evaluated:
        s = scored[e["item_id"]]
        assert s["status"] == e["status"]
        for t in ("vid_nview", "vid_nlike"):
            for key in ("pred", "lower", "upper"):
                assert s[f"{t}_{key}"] == pytest.approx(e[f"{t}_{key}"], abs=1e-3)
            assert s[f"{t}_count"] == pytest.approx(e[f"{t}_count"], rel=1e-3)
    metrics = json.loads(ev.stdout)
    y = np.array([e["vid_nview_true"] for e in evaluated])
    p = np.array([scored[e["item_id"]]["vid_nview_pred"] for e in evaluated])
    nmse = float(np.nanmean((y - p) ** 2) / np.nanvar(y))
    assert nmse == pytest.approx(metrics["vid_nview"]["nmse"], abs=1e-4)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_score_cli_matches_evaluate_at_a_reduced_text_precision(precision, tmp_path):
    """A bank built with `--text-precision` is encoded at that precision by every later
    command without being told: `score` of a run's test posts (labels removed, the
    training items as memory) repeats `evaluate --predictions` per item, neighbours too."""
    table = write_posts(tmp_path, videos=False)
    bank = tmp_path / "bank"
    build = runner.invoke(bank_app, [*build_args(table, ["--bank", str(bank)]), "--text-precision", precision])
    assert build.exit_code == 0, build.output
    run_dir = tmp_path / "run"
    train = runner.invoke(app, ["train", "--bank", str(bank), "--k", "5", "--epochs", "2",
                                "--set", "model.d_model=16", "--out", str(run_dir)])
    assert train.exit_code == 0, train.output
    predictions = tmp_path / "evaluated.parquet"
    ev = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--split", "test", "--predictions", str(predictions)])
    assert ev.exit_code == 0, ev.output
    evaluated = pq.read_table(predictions).to_pylist()
    test_ids = {r["item_id"] for r in evaluated}
    uploads = tmp_path / "uploads.csv"
    with table.open(encoding="utf-8") as src, uploads.open("w", newline="", encoding="utf-8") as dst:
        reader = csv.DictReader(src)
        w = csv.DictWriter(dst, reader.fieldnames or [])
        w.writeheader()
        w.writerows({**r, "views": "", "likes": ""} for r in reader if r["vid"] in test_ids)
    scores = tmp_path / "scores.parquet"
    sc = runner.invoke(app, ["score", "--meta", str(uploads), "--run", str(run_dir), "--memory", "train",
                             "--out", str(scores)])
    assert sc.exit_code == 0, sc.output
    scored = {r["item_id"]: r for r in pq.read_table(scores).to_pylist()}
    assert len(scored) == len(evaluated) >= 15
    for e in evaluated:
        s = scored[e["item_id"]]
        assert s["status"] == e["status"] == "ok"
        for j in (1, 2, 3):
            assert s[f"neighbour_{j}"] == e[f"neighbour_{j}"]
            assert s[f"neighbour_{j}_sim"] == pytest.approx(e[f"neighbour_{j}_sim"], abs=1e-6)
        for t in ("views", "likes"):
            for key in ("pred", "lower", "upper"):
                assert s[f"{t}_{key}"] == pytest.approx(e[f"{t}_{key}"], abs=1e-4)
