from __future__ import annotations

import json
import math

import pytest

from mvpp.memory_bank.metadata import (
    ColumnMap,
    MetadataError,
    inverse_transform,
    load_metadata,
    parse_count,
    parse_time,
    transform_label,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("541.2K", 541_200.0), ("1.4M", 1_400_000.0), ("1,203", 1203.0), ("454", 454.0),
     (" 2b ", 2e9), (7, 7.0), ("", None), (None, None), (float("nan"), None)],
)
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_parse_count_rejects_words():
    with pytest.raises(ValueError, match="not a number"):
        parse_count("lots")


@pytest.mark.parametrize("kind", ["log2p1", "log1p", "log2", "none"])
def test_transform_round_trip(kind):
    for count in (1.0, 22.0, 640.0):
        assert inverse_transform(transform_label(count, kind), kind) == pytest.approx(count)


def test_transform_errors():
    with pytest.raises(ValueError, match="negative"):
        transform_label(-1, "log2p1")
    with pytest.raises(ValueError, match="positive"):
        transform_label(0, "log2")
    assert transform_label(0, "log2p1") == 0.0
    assert transform_label(3, "log2p1") == pytest.approx(2.0)


def test_parse_time_formats():
    iso, ts = parse_time("2025-02-03T10:00:00Z")
    assert ts == pytest.approx(1738576800.0)
    assert parse_time(1738576800)[1] == pytest.approx(ts)
    assert parse_time(1738576800000)[1] == pytest.approx(ts)
    assert parse_time("")[1] is None
    with pytest.raises(ValueError):
        parse_time("yesterday-ish")


def test_csv_rows_with_problems(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text(
        "id,title,views,when,followers\n"
        "a,First,1.2K,2025-01-01,10\n"
        "b,,abc,2025-01-02,\n"
        "c,Third,-4,2025-01-03,5K\n"
        "a,Again,3,2025-01-04,1\n"
        "d,Fourth,,2025-01-05,x\n"
    )
    cols = ColumnMap(label_cols=["views"], time_col="when", meta_cols=["followers"])
    rows = {r.item_id + str(i): r for i, r in enumerate(load_metadata(path, cols))}
    a, b, c, a2, d = rows.values()
    assert a.labels == {"views": 1200.0} and not a.problems and a.metadata == {"followers": 10.0}
    assert "not a number" in b.problems[0] and b.metadata["followers"] is None
    assert "negative" in c.problems[0] and c.metadata["followers"] == 5000.0
    assert a2.problems == ["duplicate id in the metadata table"]
    assert d.labels == {} and not d.problems and d.metadata["followers"] == "x"


def test_jsonl_and_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": "x1", "title": "hello", "likes": 3}, {"id": "x2", "title": "bye", "likes": None}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    cols = ColumnMap(label_cols=["likes"])
    for name in ("m.jsonl", "m.parquet"):
        rows = load_metadata(tmp_path / name, cols)
        assert [(r.item_id, r.title, r.labels) for r in rows] == [
            ("x1", "hello", {"likes": 3.0}), ("x2", "bye", {})]


def test_missing_column_and_format_errors(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,title\n1,a\n")
    with pytest.raises(MetadataError, match="'views' not found"):
        load_metadata(path, ColumnMap(label_cols=["views"]))
    with pytest.raises(MetadataError, match="not found"):
        load_metadata(tmp_path / "nope.csv", ColumnMap())
    (tmp_path / "m.xlsx").write_text("")
    with pytest.raises(MetadataError, match="unknown metadata format"):
        load_metadata(tmp_path / "m.xlsx", ColumnMap())
    # the default text column may be absent
    path.write_text("id,views\n1,3\n")
    rows = load_metadata(path, ColumnMap(label_cols=["views"], require_text=False))
    assert rows[0].title == "" and math.isclose(rows[0].labels["views"], 3.0)


@pytest.mark.parametrize("kind", ["log2p1", "log1p"])
def test_targets_below_zero_count_give_zero_not_negative_counts(kind: str) -> None:
    assert inverse_transform(-0.13, kind) == 0.0
    assert inverse_transform(1.0, kind) > 0.0
