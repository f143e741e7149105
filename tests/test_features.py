"""Metadata features: parsing, train-only statistics, masks, unknown buckets, time features."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from conftest import shared_path

from mvpp.memory_bank.metadata import (
    ColumnMap,
    load_metadata,
    parse_count,
    parse_duration,
    parse_rows,
)
from mvpp.predictor.config import InputSizes, ModelConfig
from mvpp.predictor.features import MetaFeaturizer, hour_of_day, weekday
from mvpp.predictor.model import MetadataEncoder


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("541.2K", 541_200.0), ("1.4M", 1_400_000.0), ("1,203", 1203.0), ("3 videos", 3.0),
     ("1 video", 1.0), ("2.5K views", 2500.0), ("12", 12.0), ("", None)],
)
def test_parse_count_human_formats(text, value):
    assert parse_count(text) == value


def test_parse_count_still_rejects_words():
    for text in ("videos", "lots of views", "3 4 videos"):
        with pytest.raises(ValueError):
            parse_count(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:31", 31.0), ("01:05", 65.0), ("12:00", 720.0), ("1:02:03", 3723.0),
     ("00:07.5", 7.5), (42, 42.0), ("42", 42.0), ("", None), (None, None)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_other_text():
    for text in ("1:75", "abc", "10:00 pm"):
        with pytest.raises(ValueError):
            parse_duration(text)


def test_metadata_rows_parse_counts_durations_and_observed_time():
    rows = [
        {"id": "a", "title": "x", "followers": "541.2K", "music": "3 videos", "dur": "00:31",
         "creator": "alice", "posted": "2025-05-21 09:44:45", "scraped": "2025-05-29 15:38:41"},
        {"id": "b", "title": "y", "followers": "", "music": "1,203", "dur": "1:02:03",
         "creator": "", "posted": "2025-05-22 10:00:00", "scraped": ""},
    ]
    cols = ColumnMap(meta_cols=["followers", "music", "dur", "creator"], time_col="posted",
                     observed_col="scraped")
    a, b = parse_rows(rows, cols)
    assert a.metadata == {"followers": 541200.0, "music": 3.0, "dur": 31.0, "creator": "alice"}
    assert b.metadata == {"followers": None, "music": 1203.0, "dur": 3723.0, "creator": None}
    assert a.observed_ts - a.published_ts == pytest.approx(8 * 86400 + 5 * 3600 + 53 * 60 + 56)
    assert a.observed_at.startswith("2025-05-29T15:38:41")
    assert b.observed_ts is None and not b.problems


# -- numeric features ----------------------------------------------------------------------


def test_counts_get_log1p_and_train_statistics_only():
    train = [{"followers": v} for v in (0.0, 9.0, 99.0, 999.0)]
    fz = MetaFeaturizer.fit(train, derived=False, clip_range=False)
    (f,) = fz.numeric
    assert f.log1p and f.name == "followers"
    logs = np.log1p([0.0, 9.0, 99.0, 999.0])
    assert f.mean == pytest.approx(logs.mean()) and f.std == pytest.approx(logs.std())
    # the statistics do not move with the items transformed later
    num, mask, cat = fz.transform([{"followers": 9999.0}, {"followers": 99.0}])
    assert mask.all() and cat.shape == (2, 0)
    assert num[0, 0] == pytest.approx((math.log1p(9999.0) - logs.mean()) / logs.std(), rel=1e-5)
    assert num[1, 0] == pytest.approx((math.log1p(99.0) - logs.mean()) / logs.std(), rel=1e-5)
    train_num, _, _ = fz.transform(train)
    assert train_num[:, 0].mean() == pytest.approx(0.0, abs=1e-6)
    assert train_num[:, 0].std() == pytest.approx(1.0, rel=1e-5)


def test_signed_column_is_not_logged():
    fz = MetaFeaturizer.fit([{"score": v} for v in (-2.0, 0.0, 2.0)], derived=False)
    assert not fz.numeric[0].log1p
    num, _, _ = fz.transform([{"score": 2.0}])
    assert num[0, 0] == pytest.approx(2.0 / np.std([-2.0, 0.0, 2.0]), rel=1e-5)


def test_missing_values_are_masked_not_zero_filled():
    train = [{"followers": 10.0}, {"followers": None}, {"followers": 1000.0}, {}]
    fz = MetaFeaturizer.fit(train, derived=False, bins=0)
    assert fz.numeric[0].mean == pytest.approx(np.log1p([10.0, 1000.0]).mean())
    num, mask, _ = fz.transform([{"followers": None}, {}, {"followers": "n/a"}, {"followers": 10.0}])
    assert mask[:, 0].tolist() == [False, False, False, True]
    assert (num[~mask] == 0).all()
    # the model sees missing (mask False) differently from a real value that standardises to 0
    enc = MetadataEncoder(fz.n_numeric, [], 4, 8)
    _, avail = enc(torch.from_numpy(num), torch.from_numpy(mask), None, 4)
    assert avail.tolist() == [False, False, False, True]


def test_mostly_numeric_column_masks_stray_text_and_text_column_is_categorical():
    train = [{"n": float(i), "kind": "a" if i % 2 else "b"} for i in range(20)]
    train.append({"n": "oops", "kind": "a"})
    fz = MetaFeaturizer.fit(train, derived=False)
    assert [f.name for f in fz.numeric] == ["n"]
    assert [c.name for c in fz.categorical] == ["kind"] and fz.categorical[0].vocab == ["a", "b"]


# -- categorical features ------------------------------------------------------------------


def test_unseen_rare_and_missing_categories_go_to_bucket_zero():
    train = [{"creator": c} for c in ["ann", "ann", "bob", "bob", "bob", "cy"]]
    fz = MetaFeaturizer.fit(train, derived=False, min_count=2)
    (c,) = fz.categorical
    assert c.vocab == ["ann", "bob"] and fz.cardinalities == [2]
    _, _, cat = fz.transform(
        [{"creator": "ann"}, {"creator": "bob"}, {"creator": "cy"}, {"creator": "zed"},
         {"creator": None}, {}]
    )
    assert cat[:, 0].tolist() == [1, 2, 0, 0, 0, 0]
    # min_count 1 keeps the singleton
    fz1 = MetaFeaturizer.fit(train, derived=False, min_count=1)
    assert fz1.categorical[0].vocab == ["ann", "bob", "cy"]


def test_numeric_id_forced_categorical_and_empty_vocab_dropped():
    train = [{"creator_id": 7.0}, {"creator_id": 7.0}, {"creator_id": 8.0}, {"solo": "x"}]
    fz = MetaFeaturizer.fit(train, categorical=["creator_id", "solo"], derived=False)
    assert fz.n_numeric == 0
    assert [c.name for c in fz.categorical] == ["creator_id"]  # "solo" has no frequent value
    _, _, cat = fz.transform([{"creator_id": "7"}, {"creator_id": 7}, {"creator_id": 8.0}])
    assert cat[:, 0].tolist() == [1, 1, 0]


# -- derived features ---------------------------------------------------------------------


def test_time_features_hour_weekday_age_duration():
    pub = [ts("2025-05-19T06:00:00"), ts("2025-05-24T18:00:00"), None]  # Monday, Saturday
    obs = [ts("2025-05-19T16:00:00"), None, ts("2025-05-29T00:00:00")]
    dur = [30.0, None, 120.0]
    fz = MetaFeaturizer.fit([{}, {}, {}], dur, pub, obs, bins=0)
    names = fz.feature_names
    assert names == ["duration_s", "age_h", "hour_sin", "hour_cos", "weekday"]
    assert fz.cardinalities == [7]
    num, mask, cat = fz.transform([{}, {}, {}], dur, pub, obs)
    assert mask.tolist() == [
        [True, True, True, True],
        [False, False, True, True],
        [True, False, False, False],
    ]
    assert cat[:, 0].tolist() == [1, 6, 0]  # Monday = 1, Saturday = 6, unknown = 0
    # one observed age (10 h): log1p, standardised to 0 with std 1
    age = fz.numeric[1]
    assert age.log1p and age.mean == pytest.approx(math.log1p(10.0)) and age.std == 1.0
    # hour 6 and 18: sin 1 and -1
    s = fz.numeric[2]
    assert num[0, 2] * s.std + s.mean == pytest.approx(1.0, abs=1e-5)
    assert num[1, 2] * s.std + s.mean == pytest.approx(-1.0, abs=1e-5)
    assert hour_of_day(np.array([ts("2025-05-19T13:30:00")]))[0] == pytest.approx(13.5)
    days = [ts(f"2025-05-{d}T12:00:00") for d in range(19, 26)]
    assert weekday(np.array(days)).tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_no_times_no_time_features():
    fz = MetaFeaturizer.fit([{"a": 1.0}, {"a": 2.0}])
    assert fz.feature_names == ["a"]
    assert MetaFeaturizer.fit([{}, {}]).n_features == 0


def test_piecewise_quantile_encoding():
    train = [{"followers": float(v)} for v in range(1, 101)]
    fz = MetaFeaturizer.fit(train, derived=False, bins=4)
    (f,) = fz.numeric
    assert len(f.edges) == 5 and f.width == 5 and fz.n_numeric == 5
    assert fz.numeric_columns == ["followers", "followers#1", "followers#2", "followers#3",
                                  "followers#4"]
    assert fz.value_columns == [0]
    items = [{"followers": v} for v in (0.0, 1.0, 25.0, 50.0, 100.0, 1e9)] + [{}]
    num, mask, _ = fz.transform(items)
    pieces = num[:6, 1:]
    assert ((pieces >= 0) & (pieces <= 1)).all()
    # the pieces fill up in order as the value grows; beyond the training range they saturate
    assert pieces[1].tolist() == [0, 0, 0, 0] and pieces[4].tolist() == [1, 1, 1, 1]
    assert pieces[5].tolist() == [1, 1, 1, 1] and pieces[0].tolist() == [0, 0, 0, 0]
    fill = pieces.sum(axis=1)
    assert (np.diff(fill) >= 0).all() and 0 < fill[2] < fill[3] < 4
    assert not mask[6].any() and (num[6] == 0).all() and mask[:6].all()
    # the periodic hour gets no pieces; a constant column gets none either
    pub = [ts("2025-05-19T06:00:00") + 3600 * i for i in range(10)]
    fz2 = MetaFeaturizer.fit([{"c": 1.0}] * 10, None, pub, None, bins=4)
    widths = {f.name: f.width for f in fz2.numeric}
    assert widths == {"c": 1, "hour_sin": 1, "hour_cos": 1}


# -- persistence and sizes ----------------------------------------------------------------


def test_round_trip_through_json_and_model_sizes():
    train = [{"followers": float(10**i), "creator": "ab"[i % 2]} for i in range(6)]
    pub = [ts("2025-05-19T06:00:00") + 3600 * i for i in range(6)]
    fz = MetaFeaturizer.fit(train, None, pub, None, bins=0)
    back = MetaFeaturizer.from_dict(json.loads(json.dumps(fz.to_dict())))
    assert back == fz
    items = [{"followers": 5.0, "creator": "b"}, {"creator": "q"}, {}]
    for a, b in zip(fz.transform(items, None, pub[:3]), back.transform(items, None, pub[:3]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert fz.columns == ["followers", "creator"]
    assert (fz.n_numeric, fz.cardinalities) == (3, [2, 7])
    cfg = ModelConfig(inputs=InputSizes(n_meta_numeric=fz.n_numeric, meta_cardinalities=fz.cardinalities))
    assert "M" in cfg.expert_names
    with pytest.raises(ValueError, match="format"):
        MetaFeaturizer.from_dict({"format": 99})


def test_encoder_takes_featurizer_output():
    train = [{"f": float(i), "c": "xy"[i % 2]} for i in range(10)]
    fz = MetaFeaturizer.fit(train, derived=False)
    num, mask, cat = fz.transform(train + [{}])
    enc = MetadataEncoder(fz.n_numeric, fz.cardinalities, 4, 8)
    out, avail = enc(torch.from_numpy(num), torch.from_numpy(mask), torch.from_numpy(cat), 11)
    assert out.shape == (11, 8) and avail[:10].all() and not avail[10]


def test_real_tiktok_table_parses_and_featurizes():
    path = shared_path("tiktok_vn", "raw_data.csv")
    cols = ColumnMap(
        id_col="vid_id", text_cols=["vid_caption", "vid_hashtags"],
        label_cols=["vid_nview", "vid_nlike", "vid_ncomment", "vid_nshare"],
        time_col="vid_postTime", observed_col="vid_scrapeTime",
        meta_cols=["user_nfollower", "music_nused", "vid_duration", "user_name"],
    )
    rows = load_metadata(path, cols)
    assert len(rows) == 10_102 and not any(r.problems for r in rows)
    for col in ("user_nfollower", "music_nused", "vid_duration"):
        values = [r.metadata[col] for r in rows if r.metadata[col] is not None]
        assert len(values) > 9_000 and all(isinstance(v, float) for v in values), col
    assert all(r.published_ts and r.observed_ts and r.observed_ts > r.published_ts for r in rows)
    fz = MetaFeaturizer.fit(
        [r.metadata for r in rows], None, [r.published_ts for r in rows],
        [r.observed_ts for r in rows],
    )
    assert fz.feature_names == ["user_nfollower", "music_nused", "vid_duration", "age_h",
                                "hour_sin", "hour_cos", "user_name", "weekday"]
    assert all(f.log1p for f in fz.numeric[:4])
    # creators posting at least twice have an embedding; the others share bucket 0
    assert 500 < fz.cardinalities[0] < 6_883


def test_values_beyond_the_training_range_saturate():
    train = [{"followers": v} for v in (0.0, 9.0, 99.0, 999.0)]
    fz = MetaFeaturizer.fit(train, derived=False)
    (f,) = fz.numeric
    logs = np.log1p([0.0, 9.0, 99.0, 999.0])
    z = (logs - logs.mean()) / logs.std()
    assert f.lo == pytest.approx(z.min()) and f.hi == pytest.approx(z.max())
    num, mask, _ = fz.transform([{"followers": 1e7}, {"followers": 99.0}, {"followers": 999.0}])
    assert mask.all()
    # far above the range reads as the largest training value, value and pieces alike
    np.testing.assert_allclose(num[0], num[2], rtol=1e-6)
    assert num[1, 0] == pytest.approx(z[2], rel=1e-5)
    # runs saved before the range was kept transform as they did: no clipping
    d = fz.to_dict()
    for feat in d["numeric"]:
        feat.pop("lo"), feat.pop("hi")
    old = MetaFeaturizer.from_dict(d)
    assert old.numeric[0].lo is None
    assert old.transform([{"followers": 1e7}])[0][0, 0] > num[0, 0]
