"""A damaged file is named in one line with what to do, never a traceback; a damaged cache
is rebuilt by itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app
from mvpp.memory_bank.store import open_store
from mvpp.predictor.run import Run
from mvpp.retriever.snapshot import read_snapshot

runner = CliRunner()
pytestmark = pytest.mark.slow  # builds and trains a small bank


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    table = root / "t.jsonl"
    topics = ["cat", "dog", "cooking", "football", "news"]
    table.write_text("\n".join(
        json.dumps({"id": f"i{i}", "title": f"{topics[i % 5]} clip {i}", "views": 10 + 7 * (i % 13)})
        for i in range(80)
    ))
    bank = root / "bank"
    result = runner.invoke(bank_app, ["build", "--meta", str(table), "--label-col", "views", "--profile", "lite",
                                      "--bank", str(bank)])
    assert result.exit_code == 0, result.output
    run = root / "run"
    result = runner.invoke(app, ["train", "--bank", str(bank), "--epochs", "2", "--set", "model.d_model=8", "--out", str(run)])
    assert result.exit_code == 0, result.output
    return root, bank, run


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:"), text
    return text


def _segment(bank: Path) -> Path:
    (segment,) = [p for p in (bank / "shard" / "segments").iterdir() if p.is_dir()]
    return segment


def _copy(bank: Path, tmp_path: Path) -> Path:
    damaged = tmp_path / "bank"
    shutil.copytree(bank, damaged, ignore=shutil.ignore_patterns("cache"))
    return damaged


def test_a_truncated_vector_file(trained, tmp_path):
    _, bank, run = trained
    damaged = _copy(bank, tmp_path)
    vectors = _segment(damaged) / "vector_storage-text" / "vectors" / "chunk_0.mmap"
    with vectors.open("r+b") as fh:
        fh.truncate(1000)
    line = _one_error_line(runner.invoke(app, ["train", "--bank", str(damaged), "--out", str(tmp_path / "r")]))
    assert f"the bank at {damaged} cannot be read" in line
    assert "restore it from a copy or a snapshot, or build it again" in line


def test_a_deleted_payload_page(trained, tmp_path):
    _, bank, run = trained
    damaged = _copy(bank, tmp_path)
    (_segment(damaged) / "payload_storage" / "page_0.dat").unlink()
    for args in (["info"], ["query", "--title", "cat"]):
        line = _one_error_line(runner.invoke(bank_app, [*args, "--bank", str(damaged)]))
        assert f"the bank at {damaged} cannot be read" in line
    line = _one_error_line(runner.invoke(app, ["evaluate", "--run", str(run), "--bank", str(damaged)]))
    assert "cannot be read" in line


def test_a_truncated_cache_is_rebuilt(trained):
    _, bank, run = trained
    with open_store(bank=bank) as store:
        read_snapshot(store, bank / "cache")
    (arrays,) = (bank / "cache").glob("*/arrays.npz")
    good = runner.invoke(app, ["evaluate", "--run", str(run), "--json"])
    arrays.write_bytes(arrays.read_bytes()[:500])
    again = runner.invoke(app, ["evaluate", "--run", str(run), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == json.loads(good.stdout)
    assert "damaged" in again.output  # said, as a warning
    with open_store(bank=bank) as store:  # and written anew
        assert read_snapshot(store, bank / "cache").item_ids


def test_a_bank_that_changed_keeps_one_cache(trained, tmp_path):
    _, bank, _ = trained
    copy = _copy(bank, tmp_path)
    with open_store(bank=copy) as store:
        first = read_snapshot(store, copy / "cache").fingerprint
    table = tmp_path / "more.csv"
    table.write_text("id,title\nlate1,a post added later\n")
    assert runner.invoke(bank_app, ["build", "--meta", str(table), "--bank", str(copy), "--profile", "lite"]).exit_code == 0
    with open_store(bank=copy) as store:
        second = read_snapshot(store, copy / "cache").fingerprint
    assert second != first
    assert [p.name for p in (copy / "cache").iterdir()] == [second]  # the old arrays are gone


@pytest.mark.parametrize("damage", ["truncated weights", "truncated config", "config without a key",
                                    "config not an object"])
def test_a_damaged_run_is_named(trained, tmp_path, damage):
    _, bank, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights, config = copy / "model.safetensors", copy / "config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
        config_data = json.loads(config.read_text())
        config_data.pop("weights_sha256")  # a run saved before weights were fingerprinted
        config.write_text(json.dumps(config_data))
        named = weights
    elif damage == "truncated config":
        config.write_text(config.read_text()[:200])
        named = config
    elif damage == "config without a key":
        data = json.loads(config.read_text())
        del data["target_norm"]
        config.write_text(json.dumps(data))
        named = config
    else:
        config.write_text("[1, 2]")
        named = config
    for command in (["evaluate", "--run", str(copy)],
                    ["score", "--meta", str(bank.parent / "t.jsonl"), "--run", str(copy), "--out", str(tmp_path / "s.csv")]):
        line = _one_error_line(runner.invoke(app, command))
        assert str(named) in line, line


def test_a_run_saved_before_neighbour_indexes_keeps_exact_neighbours(trained, tmp_path):
    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = json.loads((copy / "config.json").read_text())
    assert Run.load(copy).train_config.neighbour_index == "auto"
    for name in ("neighbour_index", "ann_threshold", "ann"):
        del data["train"][name]
    (copy / "config.json").write_text(json.dumps(data))
    assert Run.load(copy).train_config.neighbour_index == "exact"
