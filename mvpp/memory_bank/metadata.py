"""Metadata tables (CSV, Parquet, JSONL) -> per-item records, with per-row problems.

Column names are mapped by `ColumnMap`. Counts may be written for humans
("541.2K", "1.4M", "1,203"); labels become targets through a `LabelTransform`.
Nothing here raises on a bad row: a row's problem is returned as a reason.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LABEL_TRANSFORMS = ("log2p1", "log2", "log1p", "none")

# A number (scientific notation too), an optional K / M / B multiplier and an optional
# unit word ("3 videos").
_COUNT_RE = re.compile(
    r"^\s*((?:[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+)(?:[eE][-+]?\d+)?)\s*([kKmMbB]?)(?:\s+[^\W\d_]+)?\s*$"
)
# Labels above this are data errors, not counts (more than a thousand views per person alive).
MAX_LABEL = 1e15
# mm:ss or hh:mm:ss, optionally with fractional seconds.
_DURATION_RE = re.compile(r"^\s*(\d+):([0-5]?\d)(?::([0-5]?\d))?(\.\d+)?\s*$")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9}


class MetadataError(ValueError):
    """The table as a whole cannot be used (missing file, unknown format, missing id column)."""


def parse_count(value: Any) -> float | None:
    """'541.2K' -> 541200.0, '1,203' -> 1203.0, '3 videos' -> 3.0, '' / None / NaN -> None.

    Raises ValueError for text that is not a number.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return None
        number = float(value)
    else:
        text = str(value).strip()
        if text == "" or text.lower() in {"nan", "none", "null", "na", "n/a"}:
            return None
        match = _COUNT_RE.match(text)
        if not match:
            raise ValueError(f"not a number: {text!r}")
        digits, suffix = match.groups()
        number = float(digits.replace(",", "")) * _SUFFIX[suffix.lower()]
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def parse_duration(value: Any) -> float | None:
    """'00:31' -> 31.0, '1:02:03' -> 3723.0 seconds; plain numbers are seconds already.

    '' / None / NaN -> None; raises ValueError for anything else.
    """
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            a, b, c, frac = match.groups()
            h, m, sec = (0, int(a), int(b)) if c is None else (int(a), int(b), int(c))
            return float(h * 3600 + m * 60 + sec) + (float(frac) if frac else 0.0)
    try:
        return parse_count(value)
    except ValueError:
        raise ValueError(f"not a duration: {value!r}") from None


def transform_label(value: float, kind: str) -> float:
    """Raw label -> training target. Counts must be >= 0 (and > 0 for log2)."""
    if kind == "none":
        return float(value)
    if value < 0:
        raise ValueError(f"negative count {value:g}")
    if kind == "log2p1":
        return math.log2(1.0 + value)
    if kind == "log1p":
        return math.log1p(value)
    if kind == "log2":
        if value <= 0:
            raise ValueError(f"log2 needs a positive count, got {value:g}")
        return math.log2(value)
    raise ValueError(f"unknown label transform {kind!r}; choose one of {LABEL_TRANSFORMS}")


def inverse_transform(target: float, kind: str) -> float:
    """Target -> count on the original scale.

    A prediction may fall below the transform of a zero count; counts are never
    negative, so such targets map to 0.
    """
    if kind == "none":
        return target
    if kind == "log2p1":
        return max(0.0, 2.0**target - 1.0)
    if kind == "log1p":
        return max(0.0, math.expm1(target))
    if kind == "log2":
        return 2.0**target
    raise ValueError(f"unknown label transform {kind!r}")


def parse_time(value: Any) -> tuple[str | None, float | None]:
    """Publish time -> (ISO 8601 string, unix seconds). Accepts ISO strings, common
    date formats and unix timestamps (seconds or milliseconds)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int, float)) or re.fullmatch(r"\s*\d{9,13}(\.\d+)?\s*", str(value)):
        ts = float(value)
        if ts > 1e11:  # milliseconds
            ts /= 1000.0
        dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    else:
        text = str(value).strip()
        if not text:
            return None, None
        dt = None
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            for fmt in ("%Y-%m-%d %H:%M:%S", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%m/%d/%Y", "%d/%m/%Y"):
                try:
                    dt = datetime.strptime(text, fmt)
                    break
                except ValueError:
                    continue
        if dt is None:
            raise ValueError(f"unreadable time {text!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(), dt.timestamp()


@dataclass
class ColumnMap:
    """Which columns of the metadata table mean what."""

    id_col: str = "id"
    text_cols: list[str] = field(default_factory=lambda: ["title"])
    label_cols: list[str] = field(default_factory=list)
    time_col: str | None = None
    # When the labels were observed (scrape time); parsed like the publish time.
    observed_col: str | None = None
    meta_cols: list[str] = field(default_factory=list)
    video_col: str | None = None
    # The default text column may be absent (a labels-only table); named ones may not.
    require_text: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The column names (what a bank's manifest records), without `require_text`."""
        return {
            "id_col": self.id_col,
            "text_cols": list(self.text_cols),
            "label_cols": list(self.label_cols),
            "time_col": self.time_col,
            "observed_col": self.observed_col,
            "meta_cols": list(self.meta_cols),
            "video_col": self.video_col,
        }


@dataclass
class MetaRow:
    """One item's metadata, already parsed. `problems` are per-row reasons to fail it."""

    item_id: str
    title: str = ""
    labels: dict[str, float] = field(default_factory=dict)
    published_at: str | None = None
    published_ts: float | None = None
    observed_at: str | None = None
    observed_ts: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    video: str | None = None
    problems: list[str] = field(default_factory=list)


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV / Parquet / JSONL file as dicts (strings kept as strings)."""
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"metadata file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in {".jsonl", ".ndjson"}:
        rows = []
        with path.open(encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise MetadataError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
        return rows
    if suffix in {".csv", ".tsv", ".txt"}:
        delimiter = "\t" if suffix == ".tsv" else ","
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return list(csv.DictReader(fh, delimiter=delimiter))
    raise MetadataError(f"unknown metadata format {suffix!r}: use .csv, .tsv, .parquet or .jsonl")


def category_key(value: Any) -> str | None:
    """A metadata value as a category label: 12.0 and '12' are the same category; a
    missing value (None, NaN, blank) is None."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        f = float(value)
        if math.isnan(f):
            return None
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)
    text = str(value).strip()
    return text or None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip() == ""
    )


def _meta_value(value: Any) -> Any:
    """Numbers (human-formatted too, durations as seconds) become floats; other values
    stay strings. An infinite number is a missing value."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        return parse_duration(value)
    except ValueError:
        text = str(value).strip()
        return None if text.lower() in {"inf", "-inf", "infinity", "-infinity"} else text


def table_columns(rows: list[dict[str, Any]]) -> set[str]:
    """Every column the rows have (JSONL rows may each name other fields)."""
    return set().union(*(row.keys() for row in rows)) if rows else set()


def parse_rows(
    rows: list[dict[str, Any]],
    columns: ColumnMap,
    source: str = "",
    seen: set[str] | None = None,
    first_row: int = 1,
) -> list[MetaRow]:
    """Map raw rows to MetaRows, one per row. A row's problems (duplicate id after the
    first occurrence, empty id, bad label or time) fail that row alone.

    A table read in parts passes the same `seen` (ids of the parts before) to every
    call, and each part's `first_row` (its first row's number in the table)."""
    if rows:
        present = table_columns(rows)
        wanted = [columns.id_col, *columns.label_cols, *columns.meta_cols]
        wanted += [c for c in (columns.time_col, columns.observed_col, columns.video_col) if c]
        if columns.require_text:
            wanted += columns.text_cols
        missing = [c for c in wanted if c not in present]
        if missing:
            raise MetadataError(
                f"{source or 'metadata'}: column(s) {', '.join(map(repr, missing))} not found; "
                f"the table has {', '.join(map(repr, sorted(present)))}"
            )
    seen = set() if seen is None else seen
    out: list[MetaRow] = []
    for n, row in enumerate(rows, first_row):
        raw_id = row.get(columns.id_col)
        if _is_missing(raw_id):
            # kept, so that every input row is accounted for
            out.append(MetaRow(item_id="", problems=[f"empty id: {columns.id_col!r} is blank in data row {n}"]))
            continue
        item_id = str(raw_id).strip()
        rec = MetaRow(item_id=item_id)
        if item_id in seen:
            rec.problems.append("duplicate id in the metadata table")
        seen.add(item_id)
        texts = [str(row.get(c)).strip() for c in columns.text_cols if not _is_missing(row.get(c))]
        rec.title = " ".join(t for t in texts if t)
        for col in columns.label_cols:
            try:
                value = parse_count(row.get(col))
            except ValueError as exc:
                rec.problems.append(f"label {col!r}: {exc}")
                continue
            if value is None:
                continue  # an unlabelled target is normal
            if value < 0:
                rec.problems.append(f"label {col!r}: negative value {value:g}")
                continue
            if value > MAX_LABEL:
                rec.problems.append(f"label {col!r}: {value:g} is beyond any real count (> {MAX_LABEL:g})")
                continue
            rec.labels[col] = value
        if columns.time_col:
            try:
                rec.published_at, rec.published_ts = parse_time(row.get(columns.time_col))
            except (ValueError, OverflowError, OSError) as exc:
                rec.problems.append(f"time {columns.time_col!r}: {exc}")
        if columns.observed_col:
            try:
                rec.observed_at, rec.observed_ts = parse_time(row.get(columns.observed_col))
            except (ValueError, OverflowError, OSError) as exc:
                rec.problems.append(f"time {columns.observed_col!r}: {exc}")
        for col in columns.meta_cols:
            rec.metadata[col] = _meta_value(row.get(col))
        if columns.video_col and not _is_missing(row.get(columns.video_col)):
            rec.video = str(row.get(columns.video_col)).strip()
        out.append(rec)
    return out


def load_metadata(path: Path, columns: ColumnMap) -> list[MetaRow]:
    return parse_rows(read_table(path), columns, source=str(path))
