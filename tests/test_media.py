from __future__ import annotations

import numpy as np
import pytest

from mvpp.media import MediaError, decode_frames, list_videos, probe
from tests.conftest import write_clip


def test_decodes_evenly_spaced_frames(tmp_path):
    clip = decode_frames(write_clip(tmp_path / "a.mp4", n_frames=48), n_frames=10)
    assert clip.frames.shape[0] == 10
    assert clip.frames.dtype == np.uint8 and clip.frames.shape[-1] == 3
    assert clip.mask.all()
    # the square moves: consecutive picked frames differ
    assert all(not np.array_equal(clip.frames[i], clip.frames[i + 1]) for i in range(9))


def test_short_clip_gives_what_it_has_with_mask(tmp_path):
    clip = decode_frames(write_clip(tmp_path / "short.mp4", n_frames=4), n_frames=10)
    assert 1 <= clip.n_frames <= 4
    assert clip.mask.sum() == clip.n_frames and clip.mask.shape == (10,)
    assert not clip.mask[clip.n_frames :].any()


def test_zero_byte_and_non_video_and_missing(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all")
    with pytest.raises(MediaError, match="empty file"):
        decode_frames(tmp_path / "zero.mp4")
    with pytest.raises(MediaError, match="not a readable video"):
        decode_frames(tmp_path / "text.mp4")
    with pytest.raises(MediaError, match="not found"):
        decode_frames(tmp_path / "missing.mp4")


def test_truncated_real_clip_is_an_error(real_videos, tmp_path):
    data = (real_videos / "microlens_repo_archery.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError) as err:
        decode_frames(cut)
    assert err.value.reason


def test_real_clips_decode(real_videos):
    paths = list_videos(real_videos)
    assert len(paths) == 7
    for p in paths:
        clip = decode_frames(p, n_frames=10)
        assert clip.n_frames == 10, p.name
        assert max(clip.frames.shape[1:3]) <= 384
        info = probe(p)
        assert info.duration_s and info.duration_s > 1.0
