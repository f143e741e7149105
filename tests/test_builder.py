"""The bank builder: planning, failures, resumable and idempotent builds, on the lite encoders."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_clip
from decode_helpers import crash_on_marker, raise_on_marker, report_niceness

from mvpp.config import BuildSettings
from mvpp.media import Clip, MediaError
from mvpp.memory_bank import decoding as decoding_module
from mvpp.memory_bank.builder import BankBuilder, BuildItem, BuildReport, Failure, plan_items
from mvpp.memory_bank.decoding import CRASH_REASON, BatchDecoder
from mvpp.memory_bank.encoders.profiles import Encoders, EncoderSpec, load_encoders
from mvpp.memory_bank.metadata import ColumnMap, MetaRow, parse_rows
from mvpp.memory_bank.schema import FRAMES, RETRIEVAL, TEXT, BankMismatchError, SearchFilter
from mvpp.memory_bank.store import EdgeBankStore, NotABankError

REPO = Path(__file__).resolve().parents[1]
LITE_FRAME_DIM = 45


@pytest.fixture(scope="module")
def encoders() -> Encoders:
    enc = load_encoders(EncoderSpec.from_profile("lite"), device="cpu")
    enc.describe()  # load the models once for the whole module
    return enc


def settings(**overrides: object) -> BuildSettings:
    base: dict[str, object] = dict(n_frames=4, batch_size=4, decode_workers=2)
    base.update(overrides)
    return BuildSettings(**base)  # type: ignore[arg-type]


def rows(*records: dict[str, object], labels: tuple[str, ...] = ("views",), **cols: object) -> list[MetaRow]:
    """Metadata rows as a table would give them (every column in every row)."""
    columns = ColumnMap(label_cols=list(labels), **cols)  # type: ignore[arg-type]
    names = {key for r in records for key in r}
    return parse_rows([{n: r.get(n, "") for n in names} for r in records], columns)


def build(
    bank: Path,
    encoders: Encoders,
    videos: Path | None,
    meta: list[MetaRow] | None,
    **kw: object,
) -> BuildReport:
    items, failures = plan_items(videos, meta)
    with EdgeBankStore(bank) as store:
        return BankBuilder(store, encoders, settings(**kw)).build(
            items, failures, bank.parent / f"{bank.name}.failures.jsonl"
        )


def read_failures(bank: Path) -> dict[str, str]:
    path = bank.parent / f"{bank.name}.failures.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    out = {}
    for line in lines:
        rec = json.loads(line)
        assert rec["reason"], rec
        out[rec["item_id"]] = rec["reason"]
    assert len(out) == len(lines), "an item is reported twice"
    return out


def all_points(bank: Path) -> dict[str, object]:
    with EdgeBankStore(bank) as store:
        points = list(store.scroll(vectors=(RETRIEVAL, FRAMES, TEXT)))
        assert store.count() == len(points)
    ids = [p.item_id for p in points]
    assert len(ids) == len(set(ids)), "an item is indexed twice"
    return {p.item_id: p for p in points}


def faststart_copy(src: Path, dst: Path) -> Path:
    """`src` remuxed with its index first, as web videos are: cut short, it still opens."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)
    return dst


# -- planning ---------------------------------------------------------------------------


def test_plan_pairs_rows_with_videos(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/b.webm", "c.mp4", "x.mp4", "sub/x.mp4", "bad.mp4"):
        (videos / name).write_bytes(b"0")
    meta = rows(
        {"id": "a", "title": "A", "views": "10"},
        {"id": "t", "title": "text only", "views": ""},
        {"id": "r", "title": "renamed", "views": "1", "file": "sub/x.mp4"},
        {"id": "bad", "title": "bad label", "views": "lots"},
        {"id": "a", "title": "A again", "views": "3"},
        video_col="file",
    )
    items, failures = plan_items(videos, meta)
    got = {it.item_id: (it.video.relative_to(videos).as_posix() if it.video else None) for it in items}
    assert got == {
        "a": "a.mp4",  # by stem
        "t": None,  # text-only
        "r": "sub/x.mp4",  # through the video column
        "b": "b.mp4",  # no row: unlabelled, the first file of its stem
        "c": "c.mp4",
        "x": "x.mp4",  # sub/x.mp4 belongs to row r, so x.mp4 is no duplicate
    }
    assert {it.item_id for it in items if it.meta is None} == {"b", "c", "x"}
    reasons = {(f.item_id, Path(f.video).name if f.video else None): f.reason for f in failures}
    assert set(reasons) == {("bad", None), ("a", None), ("b", "b.webm")}
    assert "not a number" in reasons[("bad", None)]  # and bad.mp4 is not indexed unlabelled
    assert "duplicate id" in reasons[("a", None)]
    assert "duplicate id" in reasons[("b", "b.webm")] and "b.mp4" in reasons[("b", "b.webm")]


def test_plan_videos_dir_alone_and_missing_video_column(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    for name in ("z.mov", "y.mkv", "notes.txt"):
        (tmp_path / "v" / name).write_bytes(b"0")
    items, failures = plan_items(tmp_path / "v", None)
    assert [it.item_id for it in items] == ["y", "z"] and not failures
    assert all(it.meta is None and it.video is not None for it in items)
    items, failures = plan_items(
        tmp_path / "v", rows({"id": "q", "title": "Q", "views": "1", "file": "gone.mp4"}, video_col="file")
    )
    assert [f.item_id for f in failures] == ["q"] and "not found" in failures[0].reason
    assert {it.item_id for it in items} == {"y", "z"}


# -- building ---------------------------------------------------------------------------


@pytest.mark.slow
def test_failures_never_stop_the_batch(tmp_path: Path, encoders: Encoders) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        write_clip(videos / f"good{i}.mp4", seed=i)
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "text.mp4").write_text("not a video")
    data = (videos / "good0.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(data[: len(data) // 2])  # index at the end: unreadable
    long_clip = write_clip(tmp_path / "long.mp4", n_frames=96, seed=9)
    whole = faststart_copy(long_clip, tmp_path / "long-faststart.mp4").read_bytes()
    (videos / "short.mp4").write_bytes(whole[: len(whole) // 2])  # opens, then ends early
    meta = rows(
        {"id": "good0", "title": "a dog in the park", "views": "1.2K"},
        {"id": "good1", "title": "", "views": "5"},
        {"id": "good1", "title": "second row", "views": "6"},  # duplicate id
        {"id": "good2", "title": "cat", "views": "-3"},  # negative
        {"id": "good3", "title": "bird", "views": "many"},  # not a number
        {"id": "words", "title": "text only item", "views": "7"},
        {"id": "nothing", "title": "", "views": "7"},  # no text and no video
        {"id": "zero", "title": "zero bytes", "views": "1"},
    )
    report = build(tmp_path / "bank", encoders, videos, meta)
    reasons = read_failures(tmp_path / "bank")
    assert set(reasons) == {"good1", "good2", "good3", "nothing", "zero", "text", "cut", "short"}
    assert report.failed == len(reasons) == len(report.failures)
    assert "duplicate id" in reasons["good1"]
    assert "negative" in reasons["good2"]
    assert "not a number" in reasons["good3"]
    assert reasons["nothing"] == "no text, no video and no metadata"
    assert "empty file" in reasons["zero"]
    assert "not a readable video" in reasons["text"] and "not a readable video" in reasons["cut"]
    assert "truncated" in reasons["short"]
    points = all_points(tmp_path / "bank")
    # the first good1 row is kept (a bare clip); the videos of the failed rows good2 and good3
    # are not indexed unlabelled instead
    assert set(points) == {"good0", "good1", "good4", "words"}
    assert points["good1"].title == "" and points["good1"].labels == {"views": 5.0}
    assert report.indexed == 4 and report.planned == 4 + len(reasons)


@pytest.mark.slow
def test_items_text_only_unlabelled_and_labelled(tmp_path: Path, encoders: Encoders) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, seed in (("v1", 1), ("v2", 2), ("loose", 3)):
        write_clip(videos / f"{name}.mp4", seed=seed)
    meta = rows(
        {"id": "v1", "title": "a man riding a bike", "views": "1,203", "t": "2024-01-02"},
        {"id": "v2", "title": "", "views": "", "t": ""},  # a video, no text, unlabelled
        {"id": "txt", "title": "funny cat video", "views": "541.2K", "t": "1700000000"},
        time_col="t",
    )
    report = build(tmp_path / "bank", encoders, videos, meta)
    assert (report.indexed, report.failed) == (4, 0)
    p = all_points(tmp_path / "bank")
    assert set(p) == {"v1", "v2", "txt", "loose"}
    v1, v2, txt, loose = p["v1"], p["v2"], p["txt"], p["loose"]
    # a titled clip: retrieval vector of its title, frames, title tokens, label and target
    assert v1.retrieval is not None and v1.frames is not None and v1.tokens is not None
    assert v1.frames.shape == (4, LITE_FRAME_DIM)
    assert v1.labels == {"views": 1203.0} and v1.targets["views"] == pytest.approx(np.log2(1204))
    assert v1.published_at.startswith("2024-01-02") and v1.duration_s == pytest.approx(2.0, abs=0.1)
    # text-only: no frames
    assert txt.frames is None and txt.retrieval is not None and txt.labels == {"views": 541200.0}
    assert txt.published_ts == 1700000000.0
    # bare clips (no row, or a row without text or labels): frames only, unlabelled
    for bare in (v2, loose):
        assert bare.retrieval is None and bare.tokens is None and bare.frames is not None
        assert not bare.labels and not bare.targets
    with EdgeBankStore(tmp_path / "bank") as store:
        assert store.count(SearchFilter(labelled_only=True)) == 2
        assert store.count(SearchFilter(has_video=True)) == 3
        assert store.manifest is not None and store.manifest.label_names == ["views"]


@pytest.mark.slow
def test_rebuild_skips_unchanged_and_redoes_changed(tmp_path: Path, encoders: Encoders) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_clip(videos / f"v{i}.mp4", seed=i)
    table = [{"id": f"v{i}", "title": f"clip {i}", "views": str(i)} for i in range(3)]
    table.append({"id": "t", "title": "words only", "views": "4"})
    first = build(tmp_path / "bank", encoders, videos, rows(*table))
    assert (first.indexed, first.unchanged, first.failed) == (4, 0, 0)
    hashes = {k: p.content_hash for k, p in all_points(tmp_path / "bank").items()}

    again = build(tmp_path / "bank", encoders, videos, rows(*table))
    assert (again.indexed, again.unchanged, again.failed) == (0, 4, 0)

    table[0]["views"] = "100"  # a new label
    table[3]["title"] = "other words"  # a new title
    write_clip(videos / "v1.mp4", seed=42)  # a new video under the same name
    changed = build(tmp_path / "bank", encoders, videos, rows(*table))
    assert (changed.indexed, changed.unchanged) == (3, 1)
    after = all_points(tmp_path / "bank")
    assert len(after) == 4 and after["v2"].content_hash == hashes["v2"]
    assert after["v0"].labels == {"views": 100.0} and after["t"].title == "other words"
    # other build settings never mix into a bank
    with pytest.raises(BankMismatchError, match="n_frames"):
        build(tmp_path / "bank", encoders, videos, rows(*table), n_frames=6)


@pytest.mark.slow
def test_interrupted_build_resumes_without_duplicates(tmp_path: Path, encoders: Encoders) -> None:
    """Ctrl-C midway (KeyboardInterrupt out of the build), then the same build again."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(12):
        write_clip(videos / f"v{i:02d}.mp4", n_frames=12, seed=i)
    table = [{"id": f"t{i:03d}", "title": f"text item {i}", "views": str(i)} for i in range(40)]
    items, failures = plan_items(videos, rows(*table))
    seen = {"indexed": 0}

    def interrupt_after_two_batches(n: int, status: str) -> None:
        if status == "indexed":
            seen["indexed"] += n
            if seen["indexed"] >= 40 + 2 * 4:  # the text items, then two video batches
                raise KeyboardInterrupt

    with EdgeBankStore(tmp_path / "bank") as store:
        builder = BankBuilder(store, encoders, settings(text_batch_size=16))
        with pytest.raises(KeyboardInterrupt):
            builder.build(items, failures, None, interrupt_after_two_batches)
    partial = all_points(tmp_path / "bank")
    assert 40 <= len(partial) < 52

    with EdgeBankStore(tmp_path / "bank") as store:
        report = BankBuilder(store, encoders, settings()).build(items, failures, None)
    assert report.failed == 0 and report.unchanged == len(partial)
    assert report.indexed == 52 - len(partial)
    assert set(all_points(tmp_path / "bank")) == {it.item_id for it in items}


def test_label_transform_failures(tmp_path: Path, encoders: Encoders) -> None:
    meta = rows(
        {"id": "zero", "title": "no views yet", "views": "0"},
        {"id": "some", "title": "some views", "views": "8"},
    )
    report = build(tmp_path / "bank", encoders, None, meta, label_transform="log2")
    assert [f.item_id for f in report.failures] == ["zero"]
    assert "log2 needs a positive count" in report.failures[0].reason
    assert all_points(tmp_path / "bank")["some"].targets == {"views": 3.0}


def test_unexpected_decoder_error_fails_only_that_item(
    tmp_path: Path, encoders: Encoders, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        write_clip(videos / f"v{i}.mp4", seed=i)
    real = decoding_module.decode_frames

    def flaky(path: Path, *args: object) -> object:
        if Path(path).stem == "v1":
            raise RuntimeError("decoder exploded")
        return real(path, *args)

    monkeypatch.setattr(decoding_module, "decode_frames", flaky)
    report = build(tmp_path / "bank", encoders, videos, None)
    assert report.indexed == 2
    assert [(f.item_id, f.reason) for f in report.failures] == [
        ("v1", "decoding failed (RuntimeError: decoder exploded)")
    ]


def _mixed_videos(folder: Path, n_good: int) -> None:
    folder.mkdir()
    for i in range(n_good):
        write_clip(folder / f"good{i}.mp4", seed=i)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video")


@pytest.mark.slow
def test_decoding_ahead_in_processes_builds_the_same_bank(tmp_path: Path, encoders: Encoders) -> None:
    videos = tmp_path / "videos"
    _mixed_videos(videos, 5)
    # batches of 2: three batches, so one is always decoding while another encodes
    ahead = build(tmp_path / "ahead", encoders, videos, None, batch_size=2, decode_ahead=True)
    threads = build(tmp_path / "threads", encoders, videos, None, batch_size=2, decode_ahead=False)
    assert ahead.indexed == threads.indexed == 5
    assert read_failures(tmp_path / "ahead") == read_failures(tmp_path / "threads")
    assert set(read_failures(tmp_path / "ahead")) == {"zero", "text"}
    a, t = all_points(tmp_path / "ahead"), all_points(tmp_path / "threads")
    assert set(a) == set(t) == {f"good{i}" for i in range(5)}
    for item_id in a:
        assert a[item_id].frames.shape == t[item_id].frames.shape
        np.testing.assert_allclose(a[item_id].frames, t[item_id].frames, atol=1e-6)


@pytest.mark.slow
def test_a_crashing_decoder_process_fails_only_its_video(tmp_path: Path, encoders: Encoders) -> None:
    videos = tmp_path / "videos"
    _mixed_videos(videos, 5)
    write_clip(videos / "crash.mp4", seed=7)
    items, failures = plan_items(videos, None)
    with EdgeBankStore(tmp_path / "bank") as store:
        builder = BankBuilder(
            store, encoders, settings(batch_size=3, decode_ahead=True), decode=crash_on_marker
        )
        report = builder.build(items, failures, tmp_path / "bank.failures.jsonl")
    assert report.indexed == 5
    assert read_failures(tmp_path / "bank") == {
        "crash": CRASH_REASON,
        "text": read_failures(tmp_path / "bank")["text"],
        "zero": "empty file (0 bytes)",
    }
    assert set(all_points(tmp_path / "bank")) == {f"good{i}" for i in range(5)}


def test_decoder_errors_cross_the_process_boundary(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "good.mp4", seed=1)
    (tmp_path / "text.mp4").write_text("not a video")
    paths = [clip, tmp_path / "text.mp4", tmp_path / "crash.mp4", tmp_path / "missing.mp4"]
    decoder = BatchDecoder(settings(decode_ahead=True), decode=raise_on_marker)
    [out] = list(decoder.batches([paths]))
    assert isinstance(out[0], Clip) and out[0].n_frames == 4
    assert isinstance(out[1], MediaError) and "not a readable video" in out[1].reason
    # an exception escaping the decode function fails its item with what was raised
    assert isinstance(out[2], MediaError) and "RuntimeError: decoder exploded" in out[2].reason
    assert isinstance(out[3], MediaError) and out[3].reason == "file not found"
    assert out[3].path == str(paths[3])


def test_decoder_workers_run_at_a_lower_priority(tmp_path: Path) -> None:
    """Decoding ahead must not slow the thread that feeds the GPU (measured in
    benchmarks/README.md: at nice 0 the build got slower than with no overlap at all)."""
    base = os.nice(0)
    paths = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for niceness in (0, 7):
        with BatchDecoder(settings(decode_ahead=True, decode_niceness=niceness), decode=report_niceness) as dec:
            [out] = list(dec.batches([paths]))
        assert {e.reason for e in out} == {f"nice {min(19, base + niceness)}"}


def test_build_after_a_creation_killed_before_its_manifest(tmp_path: Path, encoders: Encoders) -> None:
    bank = tmp_path / "bank"
    meta = rows({"id": "a", "title": "first", "views": "1"})
    build(bank, encoders, None, meta)
    (bank / "manifest.json").unlink()  # as if killed between creating the shard and the manifest
    with pytest.raises(NotABankError, match="1 points"):  # never throws away indexed points
        build(bank, encoders, None, meta)
    # an empty shard without a manifest is what a killed creation leaves: it is replaced
    import shutil

    shutil.rmtree(bank)
    with EdgeBankStore(bank) as store:
        store.init(BankBuilder(store, encoders, settings()).manifest())
    (bank / "manifest.json").rename(bank / ".manifest-x1.json")
    report = build(bank, encoders, None, meta)
    assert report.indexed == 1 and set(all_points(bank)) == {"a"}
    assert sorted(p.name for p in bank.iterdir()) == ["manifest.json", "shard"]


def test_failure_records_are_json_lines(tmp_path: Path) -> None:
    line = Failure("id with \"quotes\" and ünicode", "reason: x", "/v/a.mp4").to_json()
    assert json.loads(line) == {
        "item_id": "id with \"quotes\" and ünicode",
        "reason": "reason: x",
        "video": "/v/a.mp4",
    }
    assert BuildItem("a").title == ""


# -- kill -9 ----------------------------------------------------------------------------


@pytest.mark.slow
def test_build_interrupted_by_ctrl_c_and_kill_9_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLI build stopped by Ctrl-C, the same build killed with SIGKILL midway, then run
    once more: the bank ends with every item exactly once."""
    from typer.testing import CliRunner

    from mvpp.cli.bank import app

    videos = tmp_path / "videos"
    videos.mkdir()
    table = []
    empties = []
    for i in range(40):
        path = videos / f"c{i:03d}.mp4"
        if i % 8 == 7:  # empty files fail while the build runs: signs of progress to wait for
            path.write_bytes(b"")
            empties.append(path)
        else:
            write_clip(path, seed=i)
        table.append({"id": path.stem, "title": f"clip {i} of a dog in the park", "views": str(i)})
    meta = tmp_path / "meta.csv"
    with meta.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "title", "views"])
        writer.writeheader()
        writer.writerows(table)
    bank = tmp_path / "bank"
    failures = tmp_path / "bank.failures.jsonl"
    args = [
        "build", str(videos), "--meta", str(meta), "--label-col", "views", "--profile", "lite",
        "--bank", str(bank), "--batch-size", "4", "--workers", "1", "--frames", "4",
    ]
    n_good = 40 - len(empties)

    def count() -> int:
        with EdgeBankStore(bank) as store:
            return store.count()

    # Ctrl-C: KeyboardInterrupt while the third batch is being indexed
    index_batch = BankBuilder._index_batch
    calls = []

    def interrupted(self: BankBuilder, *a: object, **kw: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        index_batch(self, *a, **kw)

    monkeypatch.setattr(BankBuilder, "_index_batch", interrupted)
    result = CliRunner().invoke(app, args)
    monkeypatch.undo()
    assert result.exit_code == 130 and isinstance(result.exception, SystemExit), result.output
    after_ctrl_c = count()
    assert after_ctrl_c == 4 + 3  # batches of 4; the second one had an empty file

    # kill -9 once the rerun has got past two more empty files
    failures.unlink()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvpp.cli.bank", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if failures.exists() and failures.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    after_kill = count()  # the killed process left a bank that opens
    assert after_ctrl_c < after_kill < n_good

    for path in empties:  # now every item can be indexed
        path.unlink()
        write_clip(path, seed=99)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert summary_unchanged(result.stderr) == after_kill
    assert failures.read_text() == ""
    with EdgeBankStore(bank) as store:
        ids = [p.item_id for p in store.scroll(vectors=())]
        assert store.count() == 40 == len(ids) == len(set(ids))
        assert store.count(SearchFilter(labelled_only=True)) == 40


def summary_unchanged(output: str) -> int:
    """The 'unchanged' column of the build's summary table."""
    import re

    match = re.search(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│", output)
    assert match, output
    return int(match[2])
