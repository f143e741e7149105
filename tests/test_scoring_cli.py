"""`mvpp score` as a batch job: the run finds its bank and the bank's columns, every input
row comes back in input order, metadata-only posts are scored, the output of thousands of
rows is a summary, and the memory grows without retraining."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from posts import COLUMNS, N_POSTS, build_args, write_posts
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app

runner = CliRunner()
pytestmark = pytest.mark.slow  # trains a small model end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A text bank and a run trained on it from the bank's own folder, with a relative
    --bank, as a user in that folder would."""
    root = tmp_path_factory.mktemp("scoring")
    table = write_posts(root, videos=False)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        result = runner.invoke(bank_app, build_args(Path("posts.csv"), ["--bank", "bank"]))
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, [
            "train", "--bank", "bank", "--k", "5", "--epochs", "2", "--set", "model.d_model=16",
            "--neighbour-group", "creator", "--out", "run",
        ])
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root, table


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    return path


def _posts(table: Path) -> list[dict]:
    with table.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _score(*args: str):
    return runner.invoke(app, ["score", *map(str, args)])


def test_score_finds_the_runs_bank_and_the_banks_columns(trained, tmp_path):
    root, table = trained
    # the bank's own column names (vid, caption, posted, ...), not the defaults id / title
    uploads = _write(tmp_path / "new.csv", [
        {"vid": "n1", "caption": "cat clip fun day 3", "posted": "2025-04-20 10:00:00", "creator": "c3"},
        {"vid": "n2", "caption": "news clip top day 1", "posted": "2025-04-20 11:00:00", "followers": "900"},
    ])
    out = tmp_path / "a.parquet"
    result = _score("--meta", uploads, "--run", root / "run", "--out", out)  # another cwd, no --bank
    assert result.exit_code == 0, result.output
    assert f"bank: {root / 'bank'} (the run's" in " ".join(result.stderr.split())
    got = pq.read_table(out).to_pylist()
    assert [r["item_id"] for r in got] == ["n1", "n2"] and all(r["status"] == "ok" for r in got)
    # the same as naming everything by hand
    explicit = tmp_path / "b.parquet"
    result = _score(
        "--meta", uploads, "--run", root / "run", "--bank", root / "bank", "--id-col", "vid",
        "--text-col", "caption", "--time-col", "posted", "--out", explicit,
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(explicit).to_pylist() == got


def test_batches_scored_side_by_side_give_what_one_at_a_time_gives(trained, tmp_path):
    root, _ = trained
    words = ["cat", "news", "dog", "food", "travel", "music", "game", "dance", "recipe"]
    uploads = _write(tmp_path / "new.csv", [
        {"vid": f"w{i}", "caption": f"{word} clip day {i}", "creator": f"c{i % 3}"} for i, word in enumerate(words)
    ])
    threads = torch.get_num_threads()
    got = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.parquet"
        result = _score("--meta", uploads, "--run", root / "run", "--out", out, "--batch-size", "2",
                        "--workers", workers, "--quiet")
        assert result.exit_code == 0, result.output
        got[workers] = pq.read_table(out).to_pylist()
    assert [r["item_id"] for r in got["2"]] == [f"w{i}" for i in range(9)]
    for one, two in zip(got["1"], got["2"], strict=True):
        # the same ids, statuses and neighbours; numbers within float noise (one torch
        # thread each instead of two may sum in another order)
        numbers = [k for k, v in one.items() if isinstance(v, float)]
        assert {k: v for k, v in one.items() if k not in numbers} == {k: v for k, v in two.items() if k not in numbers}
        assert [two[k] for k in numbers] == pytest.approx([one[k] for k in numbers], rel=1e-6)
    assert torch.get_num_threads() == threads  # the cores shared while scoring, then given back


def test_every_row_comes_back_in_input_order(trained, tmp_path):
    root, table = trained
    first = _posts(table)[0]
    rows = [
        {"vid": "a", "caption": "dance clip wow day 2", "posted": "2025-04-01 09:00:00"},
        {"vid": "dup", "caption": "cat clip"},
        {"vid": "dup", "caption": "cat clip again"},  # a duplicate id fails, in its place
        {"vid": "meta-only", "posted": "2025-04-02 09:00:00", "creator": first["creator"], "followers": "5000"},
        {"vid": "nothing"},  # no text, no video, no metadata
        {"vid": "gone", "caption": "x", "clip": "missing.mp4"},
        {"vid": "z", "caption": "recipe clip new day 5"},
    ]
    out = tmp_path / "s.csv"
    result = _score("--meta", _write(tmp_path / "new.csv", rows), "--run", root / "run", "--out", out)
    assert result.exit_code == 1, result.output  # some rows failed
    with out.open(newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [r["item_id"] for r in got] == ["a", "dup", "dup", "meta-only", "nothing", "gone", "z"]
    status = [r["status"] for r in got]
    assert status[0] == "ok" and status[1] == "ok" and status[6] == "ok"
    assert status[2].startswith("failed: duplicate id")
    # a post known by its creator and time alone is scored, its neighbours the creator's posts
    assert status[3] == "ok" and got[3]["neighbour_1"]
    creators = {p["vid"]: p["creator"] for p in _posts(table)}
    assert creators[got[3]["neighbour_1"]] == first["creator"]
    assert status[4] == "failed: no text, no video and no metadata"
    assert status[5].startswith("failed: video file not found")


def test_a_batch_prints_a_summary_and_quiet_prints_nothing(trained, tmp_path):
    root, table = trained
    posts = [{**p, "views": "", "likes": "", "vid": f"u{n}"} for n, p in enumerate(_posts(table)[:60])]
    uploads = _write(tmp_path / "many.csv", posts)
    out = tmp_path / "many.parquet"
    result = _score("--meta", uploads, "--run", root / "run", "--out", out)
    assert result.exit_code == 0, result.output
    shown = [line for line in result.stdout.splitlines() if line.startswith("│ u")]
    assert len(shown) == 20  # the first 20 rows, not 60
    text = " ".join(result.output.split())
    assert "first 20 of 60 rows" in text and "memory: all" in text and "60 rows written to" in text
    assert "median" in text  # the predictions' distribution
    assert len(pq.read_table(out)) == 60
    quiet = _score("--meta", uploads, "--run", root / "run", "--out", out, "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_memory_grows_without_retraining(trained, tmp_path):
    """Labelled posts added to the bank after training are neighbours with --memory all
    (the default), never with --memory train, which is what evaluation used."""
    root, table = trained
    late = [
        {"vid": f"late{n}", "caption": "brand new series episode", "views": "90000", "likes": "9000",
         "posted": "2025-05-01 10:00:00", "creator": "c1", "followers": "100"}
        for n in range(4)
    ]
    more = _write(tmp_path / "late.csv", late)
    result = runner.invoke(bank_app, build_args(more, ["--bank", str(root / "bank")]))
    assert result.exit_code == 0, result.output
    uploads = _write(tmp_path / "new.csv", [
        {"vid": "q", "caption": "brand new series episode", "posted": "2025-05-02 10:00:00"},
    ])
    got = {}
    for memory in ("all", "train"):
        out = tmp_path / f"{memory}.parquet"
        result = _score("--meta", uploads, "--run", root / "run", "--out", out, "--memory", memory)
        assert result.exit_code == 0, result.output
        table_ = pq.read_table(out)
        meta = {k.decode(): v.decode() for k, v in table_.schema.metadata.items() if k.startswith(b"mvpp")}
        got[memory] = (table_.to_pylist()[0], meta)
    run_split = json.loads((root / "run" / "splits.json").read_text())
    n_train = len(run_split["train"])
    assert got["train"][1] == {"mvpp.memory": "train", "mvpp.memory_items": str(n_train)}
    assert got["all"][1]["mvpp.memory"] == "all" and int(got["all"][1]["mvpp.memory_items"]) == N_POSTS + 4
    assert all(got["all"][0][f"neighbour_{j}"].startswith("late") for j in (1, 2, 3))
    assert not any(got["train"][0][f"neighbour_{j}"].startswith("late") for j in (1, 2, 3))
    # the new neighbours reach the prediction (a two-epoch model: no claim on its direction)
    assert got["all"][0]["views_pred"] != got["train"][0]["views_pred"]


def test_a_bank_with_other_encoders_is_refused_naming_both(trained, tmp_path):
    root, table = trained
    other = tmp_path / "other"
    result = runner.invoke(bank_app, [*build_args(table, ["--bank", str(other)]), "--frames", "6"])
    assert result.exit_code == 0, result.output
    uploads = _write(tmp_path / "new.csv", [{"vid": "n", "caption": "cat"}])
    result = _score("--meta", uploads, "--run", root / "run", "--bank", other, "--out", tmp_path / "x.csv")
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "n_frames: the bank has 6, the run was trained with 4" in line
    assert "--profile" not in line


def test_query_with_a_run_ranks_as_the_runs_predictor(trained):
    """`mvpp-bank query --run` gives the neighbours the run's predictor would use: its
    lexical re-rank of the title terms on top of the dense cosine."""
    root, table = trained
    title = _posts(table)[3]["caption"]
    args = ["query", "--title", title, "--bank", str(root / "bank"), "-k", "5", "--json"]
    dense = json.loads(runner.invoke(bank_app, args).stdout)
    result = runner.invoke(bank_app, [*args, "--run", str(root / "run")])
    assert result.exit_code == 0, result.output
    ranked = json.loads(result.stdout)
    # the post itself (or a copy of its caption) first, scored cosine + 0.5 x its own terms
    assert len(ranked) == 5 and ranked[0]["title"] == dense[0]["title"] == title
    assert ranked[0]["score"] == pytest.approx(1.5, abs=1e-4) and dense[0]["score"] == pytest.approx(1.0, abs=1e-4)
    result = runner.invoke(bank_app, ["query", "--bank", str(root / "bank"), "--run", str(root / "run"),
                                      str(root / "posts.csv")])
    assert result.exit_code == 2 and "give a --title" in result.output
