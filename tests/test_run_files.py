"""Runs on disk: written whole or not at all, refused when torn or not finite, and used
against another bank only with a word about what it lacks."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mvpp.predictor.run as run_module
from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app
from mvpp.memory_bank.store import open_store
from mvpp.predictor.run import Run, RunError
from mvpp.predictor.scoring import NON_FINITE, RunPredictor
from mvpp.retriever.snapshot import read_snapshot

runner = CliRunner()
pytestmark = pytest.mark.slow  # builds and trains small banks

TOPICS = ["cat", "dog", "cooking", "football", "news"]


def _table(path, n):
    path.write_text("\n".join(
        json.dumps({"id": f"i{i}", "title": f"{TOPICS[i % 5]} clip {i}", "views": 10 + 7 * (i % 13)})
        for i in range(n)
    ))
    return path


def _build(table, bank):
    result = runner.invoke(bank_app, ["build", "--meta", str(table), "--label-col", "views", "--profile", "lite",
                                      "--bank", str(bank)])
    assert result.exit_code == 0, result.output


def _train(bank, out, *extra):
    return runner.invoke(app, ["train", "--bank", str(bank), "--epochs", "2", "--set", "model.d_model=8", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    bank = root / "bank"
    _build(_table(root / "t.jsonl", 80), bank)
    run = root / "run"
    result = _train(bank, run)
    assert result.exit_code == 0, result.output
    return root, bank, run


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_dying_while_written_leaves_the_old_run_whole(trained, monkeypatch):
    root, bank, run = trained
    before = {p.name: _digest(p) for p in run.iterdir()}

    def dies(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "_write_json", dies)  # dies after the weights are written
    result = _train(bank, run, "--seed", "7")
    assert result.exit_code == 2 and "disk full" in result.output
    assert {p.name: _digest(p) for p in run.iterdir()} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".run")]  # no half-written folder left
    Run.load(run)


def test_weights_of_another_run_are_refused(trained, tmp_path):
    root, bank, run = trained
    other = tmp_path / "other"
    assert _train(bank, other, "--seed", "3").exit_code == 0
    (run.parent / "torn").mkdir()
    torn = run.parent / "torn"
    for name in ("config.json", "splits.json"):
        (torn / name).write_bytes((run / name).read_bytes())
    (torn / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(RunError, match="is not the weights .*config.json was written with"):
        Run.load(torn)


def test_weights_that_are_not_finite_are_refused(trained, tmp_path):
    root, bank, run = trained
    copy = tmp_path / "nan"
    copy.mkdir()
    state = load_file(str(run / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(copy / "model.safetensors"))
    config = json.loads((run / "config.json").read_text())
    config["weights_sha256"] = _digest(copy / "model.safetensors")
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "splits.json").write_text((run / "splits.json").read_text())
    with pytest.raises(RunError, match="not finite"):
        Run.load(copy)


def test_a_prediction_that_is_not_finite_fails_its_row_and_no_metric_is_made_of_it(trained):
    root, bank, run_dir = trained
    run = Run.load(run_dir)
    with open_store(bank=bank) as store:
        snap = read_snapshot(store)
    with torch.no_grad():
        run.model.decoder.net[-1].bias.fill_(float("inf"))  # as if the weights had been damaged
    predictor = RunPredictor(run, snap, "train")
    rows = predictor.predict_rows(predictor.splits["test"][:3])
    assert all(r.status == f"failed: {NON_FINITE}" for r in rows)
    assert all(math.isnan(r.flat(run.targets, "log2p1")["views_pred"]) for r in rows)
    with pytest.raises(ValueError, match="could not be predicted"):
        predictor.evaluate("test")


def test_a_bank_lacking_some_of_the_runs_items_is_said(trained, tmp_path):
    root, bank, run = trained
    part = tmp_path / "part"
    _build(_table(tmp_path / "t.jsonl", 40), part)
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--bank", str(part), "--json"])
    assert result.exit_code == 0, result.output
    assert "40 of the run's 80 items are not in this bank" in " ".join(result.stderr.split())
    n = json.loads(result.stdout)["views"]["n"]
    assert 0 < n < 8
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--bank", str(part), "--strict"])
    assert result.exit_code == 2 and "40 of the run's 80 items" in " ".join(result.output.split())
