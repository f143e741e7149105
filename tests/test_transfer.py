"""`mvpp-bank export` and `mvpp-bank import`: a bank through a Parquet table and back,
and banks from tables of users' own vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from posts import build_args, write_posts
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders
from mvpp.memory_bank.schema import AUDIO, FRAMES, RETRIEVAL, TEXT
from mvpp.memory_bank.store import open_store

runner = CliRunner()
VECTORS = (RETRIEVAL, TEXT, FRAMES, AUDIO)


def _points(location: list[str]) -> dict:
    flag, value = location
    store = open_store(bank=Path(value)) if flag == "--bank" else open_store(qdrant_url=value)
    with store:
        return {p.item_id: p for p in store.scroll(vectors=VECTORS)}, store.manifest


def _rounded(value):
    """Floats to 12 significant digits: the embedded engine's payload numbers may come
    back one unit in the last place away."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    table = write_posts(root, videos=True)
    result = runner.invoke(bank_app, build_args(table, ["--bank", str(root / "bank")]))
    assert result.exit_code == 0, result.output
    return root, table


@pytest.mark.parametrize("target", ["embedded", "local"])
def test_a_bank_exported_and_imported_is_the_same_bank(built, tmp_path, target):
    root, table = built
    exported = tmp_path / "bank.parquet"
    result = runner.invoke(bank_app, ["export", "--bank", str(root / "bank"), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert "200 items written" in " ".join(result.output.split())
    where = ["--bank", str(tmp_path / "copy")] if target == "embedded" else ["--qdrant-url", f"local:{tmp_path / 'qd'}"]
    result = runner.invoke(bank_app, ["import", str(exported), *where])
    assert result.exit_code == 0, result.output
    original, manifest = _points(["--bank", str(root / "bank")])
    copy, copy_manifest = _points(where)
    assert copy_manifest.to_dict() == manifest.to_dict()
    assert set(copy) == set(original)
    for item_id, a in original.items():
        b = copy[item_id]
        assert _rounded(b.payload()) == _rounded(a.payload()), item_id
        for name in ("retrieval", "tokens", "frames", "audio"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), (item_id, name)
            if x is not None:  # unit vectors normalised again: the last bit may move
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-6 if name == "retrieval" else 1e-3)
    assert sum(p.audio is not None for p in copy.values()) > 0 and sum(p.frames is not None for p in copy.values()) > 0
    # the content hashes came along: importing again, or building the copy from the
    # original table, finds every item unchanged
    again = runner.invoke(bank_app, ["import", str(exported), *where])
    assert again.exit_code == 0 and "200 unchanged" in " ".join(again.output.split())
    if target == "embedded":
        rebuild = runner.invoke(bank_app, build_args(table, where))
        assert rebuild.exit_code == 0 and "200 unchanged" in " ".join(rebuild.output.split()), rebuild.output


@pytest.mark.slow
def test_a_run_evaluates_the_same_on_the_imported_bank(built, tmp_path):
    root, _ = built
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--bank", str(root / "bank"), "--k", "5", "--epochs", "2",
                                 "--set", "model.d_model=16", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "bank.parquet"
    assert runner.invoke(bank_app, ["export", "--bank", str(root / "bank"), "--out", str(exported)]).exit_code == 0
    assert runner.invoke(bank_app, ["import", str(exported), "--bank", str(tmp_path / "copy")]).exit_code == 0
    preds = {}
    for name, bank in (("original", root / "bank"), ("copy", tmp_path / "copy")):
        out = tmp_path / f"{name}.parquet"
        result = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--bank", str(bank), "--split", "test",
                                     "--predictions", str(out)])
        assert result.exit_code == 0, result.output
        preds[name] = pq.read_table(out).to_pylist()
    # the same neighbours and, up to the float noise of vectors normalised once more, numbers
    assert len(preds["copy"]) == len(preds["original"]) > 0
    for a, b in zip(preds["original"], preds["copy"], strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
            else:
                assert b[key] == value, key


def _own_table(path: Path, rows: list[dict], vectors: list[list[float] | None]) -> Path:
    table = pa.table({
        **{key: [r.get(key) for r in rows] for key in ("id", "title", "views", "posted")},
        "vector.retrieval": pa.array(vectors, type=pa.list_(pa.float32())),
    })
    pq.write_table(table, path)
    return path


def test_a_table_of_own_vectors_becomes_a_bank_row_by_row(tmp_path):
    titles = [f"{w} video number {i}" for i, w in enumerate(["cat", "dog", "cake", "goal", "dance", "news"] * 3)]
    text = load_encoders(EncoderSpec.from_profile("lite")).text
    vectors = [v.tolist() for v in text.encode(titles)]
    rows = [{"id": f"v{i}", "title": t, "views": str(100 + i), "posted": f"2025-03-{1 + i:02d}"} for i, t in enumerate(titles)]
    dim = len(vectors[0])
    bad = {
        "short": [0.1] * (dim - 1),
        "nan": [float("nan")] + [0.1] * (dim - 1),
        "zero": [0.0] * dim,
    }
    for name, vec in bad.items():
        rows.append({"id": name, "title": name, "views": "5"})
        vectors.append(vec)
    rows.append({"id": "v0", "title": "a second v0", "views": "1"})
    vectors.append(vectors[0])
    rows.append({"id": "", "title": "no id", "views": "1"})
    vectors.append(vectors[0])
    path = _own_table(tmp_path / "own.parquet", rows, vectors)
    bank = tmp_path / "bank"
    args = ["import", str(path), "--bank", str(bank), "--profile", "lite", "--label-col", "views",
            "--time-col", "posted", "--label-transform", "log1p"]
    result = runner.invoke(bank_app, args)
    assert result.exit_code == 1, result.output
    failures = {json.loads(line)["item_id"]: json.loads(line)["reason"]
                for line in (tmp_path / "bank.failures.jsonl").read_text().splitlines()}
    assert f"{dim - 1} values, the bank's vectors have {dim}" in failures["short"]
    assert "not a finite number" in failures["nan"] and "all-zero" in failures["zero"]
    assert "duplicate id" in failures["v0"] and "empty id" in failures[""]
    with open_store(bank=bank) as store:
        assert store.count() == len(titles)
        manifest = store.manifest
        assert manifest.columns["label_cols"] == ["views"] and manifest.label_transform == "log1p"
        point = store.get(["v3"])[0]
        assert point.targets["views"] == pytest.approx(np.log1p(103)) and point.published_at.startswith("2025-03-04")
    # the vectors are the encoder's: a query encoded by the bank finds its own item
    hits = json.loads(runner.invoke(bank_app, ["query", "--title", titles[4], "--bank", str(bank), "--json"]).stdout)
    assert hits[0]["item_id"] == "v4" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # a rerun resumes: the good rows are unchanged, the bad ones fail again
    again = runner.invoke(bank_app, args)
    assert again.exit_code == 1 and f"0 new, {len(titles)} unchanged, 5 failed" in " ".join(again.output.split())


def test_what_cannot_be_imported_is_said_once(built, tmp_path):
    root, _ = built
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"], "title": ["x"]}), plain)
    result = runner.invoke(bank_app, ["import", str(plain), "--bank", str(tmp_path / "b"), "--profile", "lite"])
    assert result.exit_code != 0 and "no vector column" in result.output
    csv = tmp_path / "t.csv"
    csv.write_text("id,title\na,x\n")
    result = runner.invoke(bank_app, ["import", str(csv), "--bank", str(tmp_path / "b")])
    assert result.exit_code != 0 and "Parquet" in result.output
    exported = tmp_path / "bank.parquet"
    assert runner.invoke(bank_app, ["export", "--bank", str(root / "bank"), "--out", str(exported)]).exit_code == 0
    result = runner.invoke(bank_app, ["import", str(exported), "--bank", str(tmp_path / "c"), "--id-col", "x"])
    assert result.exit_code != 0 and "drop the column flags" in result.output
    result = runner.invoke(bank_app, ["export", "--bank", str(tmp_path / "nothing"), "--out", str(exported)])
    assert result.exit_code != 0 and "no bank" in result.output


def test_the_cached_arrays_are_the_bank_read_again(built, tmp_path):
    """The array cache keeps sequences without their padding and gives back the same arrays."""
    import shutil

    from mvpp.retriever.snapshot import BankSnapshot, read_snapshot

    root, _ = built
    copy = tmp_path / "bank"
    shutil.copytree(root / "bank", copy, ignore=shutil.ignore_patterns("cache"))
    with open_store(bank=copy) as store:
        fresh = read_snapshot(store)
        cached = read_snapshot(store, copy / "cache")  # written now
    loaded = BankSnapshot.load(copy / "cache" / fresh.fingerprint)
    assert loaded is not None and loaded.item_ids == fresh.item_ids == cached.item_ids
    for name in BankSnapshot._ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fresh, name), err_msg=name)
    assert fresh.audio.shape[1] > 0 and fresh.frames.shape[1] > 0 and (fresh.token_len < fresh.tokens.shape[1]).any()
