"""Train -> evaluate -> score on a small synthetic text bank, through the API and the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_clip
from typer.testing import CliRunner

from mvpp.cli.demo_data import write_synthetic_titles
from mvpp.cli.main import app
from mvpp.config import BuildSettings
from mvpp.memory_bank.builder import BankBuilder, BuildItem, plan_items
from mvpp.memory_bank.metadata import ColumnMap, MetaRow, load_metadata
from mvpp.memory_bank.store import open_store
from mvpp.predictor.run import Run
from mvpp.predictor.scoring import Scorer, evaluate, prepare_for_run
from mvpp.retriever.snapshot import read_snapshot

runner = CliRunner()
pytestmark = pytest.mark.slow  # trains small models end to end



@pytest.fixture(scope="module")
def bank(tmp_path_factory, encoders):
    root = tmp_path_factory.mktemp("synthetic")
    table = write_synthetic_titles(root / "titles.jsonl", n=800)
    rows = load_metadata(table, ColumnMap(label_cols=["comments"]))
    items, failures = plan_items(None, rows)
    path = root / "bank"
    with open_store(bank=path) as store:
        report = BankBuilder(store, encoders, BuildSettings()).build(items, failures)
    assert report.indexed == 800 and report.failed == 0
    return path


@pytest.fixture(scope="module")
def run_dir(bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    result = runner.invoke(
        app,
        ["train", "--bank", str(bank), "--k", "5", "--epochs", "20", "--set", "train.batch_size=64", "--set", "train.lr=3e-3",
         "--set", "model.d_model=32", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    return out


def test_training_learns_and_writes_a_safe_run(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"model.safetensors", "config.json", "splits.json", "metrics.json"} <= names
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    test = metrics["test"]["comments"]
    # topic words drive popularity: the model must beat the mean by a clear margin
    assert test["nmse"] < 0.8
    assert test["src"] > 0.4
    splits = json.loads((run_dir / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (640, 80, 80)
    assert not set(splits["train"]) & set(splits["test"])


def test_evaluate_matches_training_metrics(run_dir, bank):
    result = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--bank", str(bank), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["comments"]
    saved = json.loads((run_dir / "metrics.json").read_text())["metrics"]["test"]["comments"]
    assert got["n"] == saved["n"] == 80
    assert got["nmse"] == pytest.approx(saved["nmse"], abs=1e-5)
    assert got["coverage"] == pytest.approx(saved["coverage"], abs=1e-9)


def test_word_prior_is_out_of_fold_in_training_and_travels_with_the_weights(run_dir, bank):
    run = Run.load(run_dir)
    assert run.model_config.use_word_prior and run.model.word_prior is not None
    assert run.model.word_prior.coef.abs().sum() > 0  # the fitted ridge, loaded from safetensors
    with open_store(bank=bank) as store:
        snap = read_snapshot(store)
    _, data = prepare_for_run(run, snap, word_prior=True)
    table = data.table
    n = table.words.shape[0]
    from_weights = run.model.word_prior(table.words, table.word_weights, n)
    for split in ("val", "test"):  # estimates of the ridge fitted on all training items
        idx = torch.from_numpy(data.splits[split])
        torch.testing.assert_close(table.word_prior[idx], from_weights[idx], atol=1e-4, rtol=1e-4)
    # training items' estimates come from ridges that never saw their labels
    idx = torch.from_numpy(data.splits["train"])
    assert (table.word_prior[idx] - from_weights[idx]).abs().mean() > 1e-3


def test_run_reloads_to_identical_predictions(run_dir, bank, encoders):
    run = Run.load(run_dir)
    with open_store(bank=bank) as store:
        snap = read_snapshot(store)
        a = evaluate(run, snap, "val")
        b = evaluate(Run.load(run_dir), snap, "val")
    assert a["comments"].nmse == b["comments"].nmse


def test_scoring_never_retrieves_the_item_itself(run_dir, bank, encoders):
    run = Run.load(run_dir)
    with open_store(bank=bank) as store:
        snap = read_snapshot(store)
        scorer = Scorer(run, snap, BankBuilder(store, encoders, BuildSettings()), memory="train")
        train_ids = run.split_ids["train"][:20]
        titles = dict(zip(snap.item_ids, snap.titles, strict=True))
        items = [BuildItem(i, MetaRow(i, title=titles[i])) for i in train_ids]
        items.append(BuildItem("empty", MetaRow("empty", title="")))
        rows = scorer.score(items, batch_size=8)
    assert len(rows) == 21
    for row in rows[:20]:
        assert row.status == "ok"
        assert row.neighbours and all(nid != row.item_id for nid, _ in row.neighbours)
        p = row.predictions["comments"]
        assert p["lower"] <= p["pred"] <= p["upper"]
    assert rows[20].status.startswith("failed") and not rows[20].predictions

    # Serving retrieves as training did: the hybrid (dense + lexical) neighbours of a
    # training item, itself excluded, are its training neighbours.
    assert run.train_config.lexical_retrieval > 0 and run.lexicon is not None
    _, data = prepare_for_run(run, snap)
    pos = {i: r for r, i in enumerate(data.splits["train"])}
    for row, item_id in zip(rows[:20], train_ids, strict=True):
        nb = data.neighbours["train"]
        r = pos[snap.item_ids.index(item_id)]
        want = [(snap.item_ids[i], float(s)) for i, s in zip(nb.indices[r], nb.scores[r], strict=True) if i >= 0]
        got = row.neighbours
        assert [n for n, _ in got] == [n for n, _ in want[: len(got)]]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want[: len(got)]], rtol=1e-5)


@pytest.mark.parametrize("decode_ahead", [False, True], ids=["threads", "ahead"])
def test_scoring_videos_keeps_every_row(run_dir, bank, encoders, tmp_path, decode_ahead):
    """Videos are decoded per chunk (ahead, in worker processes, on a GPU); an unreadable
    one fails its own row and the chunk goes on."""
    good = [write_clip(tmp_path / f"v{i}.mp4", seed=i) for i in range(3)]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    items = [
        BuildItem("v0", MetaRow("v0", title="cat kitten prank"), good[0]),
        BuildItem("broken", MetaRow("broken", title="cat kitten prank"), broken),
        BuildItem("text", MetaRow("text", title="news today")),
        BuildItem("v1", None, good[1]),  # video only
        BuildItem("v2", MetaRow("v2", title="cooking"), good[2]),
    ]
    run = Run.load(run_dir)
    with open_store(bank=bank) as store:
        snap = read_snapshot(store)
        settings = BuildSettings(decode_ahead=decode_ahead, decode_workers=2)
        rows = Scorer(run, snap, BankBuilder(store, encoders, settings)).score(items, batch_size=2)
        reference = Scorer(run, snap, BankBuilder(store, encoders, BuildSettings())).score(items[:1])
    assert [r.item_id for r in rows] == ["v0", "broken", "text", "v1", "v2"]
    assert rows[1].status.startswith("failed: not a readable video") and not rows[1].predictions
    for row in rows[:1] + rows[2:]:
        assert row.status.startswith("ok"), row.status
        p = row.predictions["comments"]
        assert p["lower"] <= p["pred"] <= p["upper"]
    # the same item scores the same whichever chunk and decoding path it went through
    assert rows[0].predictions["comments"]["pred"] == pytest.approx(
        reference[0].predictions["comments"]["pred"], abs=1e-5
    )


def test_score_cli_keeps_every_row(run_dir, bank, tmp_path):
    uploads = tmp_path / "uploads.jsonl"
    uploads.write_text(
        "\n".join(json.dumps(r) for r in [
            {"id": "u1", "title": "cat kitten prank amazing"},
            {"id": "u2", "title": "news today"},
            {"id": "u3", "title": ""},
        ])
    )
    out = tmp_path / "scores.parquet"
    result = runner.invoke(
        app, ["score", "--meta", str(uploads), "--run", str(run_dir), "--bank", str(bank), "--out", str(out)]
    )
    assert result.exit_code == 1, result.output  # one item has nothing to score
    rows = pq.read_table(out).to_pylist()
    assert [r["item_id"] for r in rows] == ["u1", "u2", "u3"]
    u1, u2, u3 = rows
    assert u1["status"] == "ok" and u1["neighbour_1"] and u1["neighbour_1_sim"] > 0
    assert u1["comments_lower"] <= u1["comments_pred"] <= u1["comments_upper"]
    assert u1["comments_count"] == pytest.approx(2 ** u1["comments_pred"] - 1, rel=1e-6)
    # the synthetic data makes pranks far more commented than news
    assert u1["comments_pred"] > u2["comments_pred"]
    assert u3["status"].startswith("failed") and math.isnan(u3["comments_pred"])


def test_empty_bank_k0_trains(bank, tmp_path):
    out = tmp_path / "r0"
    result = runner.invoke(
        app, ["train", "--bank", str(bank), "--k", "0", "--epochs", "2", "--set", "model.d_model=16", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["use_retrieval"] is False


def test_missing_run_is_a_clear_error(bank, tmp_path):
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "nope"), "--bank", str(bank)])
    assert result.exit_code == 2
    assert "not a run directory" in " ".join(result.output.split())


def test_seeded_training_is_reproducible(bank, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        runner.invoke(app, ["train", "--bank", str(bank), "--k", "3", "--epochs", "1", "--set", "model.d_model=16",
                            "--out", str(out), "--seed", "3"])
        outs.append(json.loads((out / "metrics.json").read_text())["metrics"]["test"]["comments"]["nmse"])
    assert outs[0] == pytest.approx(outs[1], abs=1e-6)
    assert torch.get_num_threads() >= 1 and np.isfinite(outs[0])


def test_a_run_is_trained_again_from_its_config_json(bank, tmp_path):
    first = tmp_path / "first"
    result = runner.invoke(app, [
        "train", "--bank", str(bank), "--k", "3", "--epochs", "2", "--set", "model.d_model=16",
        "--set", "train.lexicon_min_count=3", "--ablate", "poe", "--seed", "5", "--out", str(first),
    ])
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    result = runner.invoke(app, ["train", "--bank", str(bank), "--config", str(first / "config.json"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert a["train"] == b["train"] and a["model"] == b["model"]
    assert b["model"]["use_poe"] is False and b["train"]["lexicon_min_count"] == 3 and b["train"]["seed"] == 5
    ma, mb = (json.loads((d / "metrics.json").read_text())["metrics"]["test"] for d in (first, again))
    assert ma["comments"]["nmse"] == pytest.approx(mb["comments"]["nmse"], abs=1e-6)


def test_settings_from_a_toml_file_and_overrides(bank, tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text("[train]\nk = 4\nepochs = 1\n\n[model]\nd_model = 8\ndropout = 0.1\n")
    out = tmp_path / "r"
    result = runner.invoke(app, ["train", "--bank", str(bank), "--config", str(config), "--set", "model.alpha=0.7",
                                 "--epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["k"] == 4 and saved["train"]["epochs"] == 2  # the flag wins over the file
    assert saved["model"]["d_model"] == 8 and saved["model"]["dropout"] == 0.1 and saved["model"]["alpha"] == 0.7
    for bad, message in (
        ("[model]\nd_modle = 8\n", "unknown model config key(s): d_modle"),
        ("[train]\nlearning_rate = 1\n", "unknown train config key(s): learning_rate"),
        ("[model]\nmeta_to_decoder = true\n", "no longer has: meta_to_decoder=True"),
        ("[model]\nd_model = \n", "is not valid TOML"),
    ):
        config.write_text(bad)
        result = runner.invoke(app, ["train", "--bank", str(bank), "--config", str(config), "--out", str(out)])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["train", "--bank", str(bank), "--set", "model.d_frame=3", "--out", str(out)])
    assert result.exit_code == 2 and "set from the bank" in result.output
    result = runner.invoke(app, ["train", "--bank", str(bank), "--ablate", "poe,nothing", "--out", str(out)])
    assert result.exit_code == 2 and "--ablate 'nothing'" in result.output


def test_overrides_reach_the_nested_tables_of_the_train_config():
    """`--set train.boost.bags=1` sets one field of a nested table and keeps the others;
    a dotted name on a setting that is not a table, or on the bank's input sizes, is an
    error that names it."""
    from mvpp.predictor.config_file import ConfigError, build_configs

    cfg, _ = build_configs(None, ["train.boost.bags=1", "train.boost.learning_rate=0.05"])
    assert cfg.boost.bags == 1 and cfg.boost.learning_rate == 0.05 and cfg.boost.num_leaves == 31
    for bad, message in (
        ("train.boost.bagz=1", "unknown train.boost config key(s): bagz"),
        ("train.lr.x=1", "train.lr is not a table of settings"),
        ("model.inputs.d_token=3", "set from the bank"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_configs(None, [bad])
