"""A bank as one Parquet table, and back: `mvpp-bank export` and `mvpp-bank import`.

The table is a metadata table that `mvpp-bank build --meta` reads (the bank's columns:
id, text, labels, times, metadata, video), with more columns per item:

- `vector.retrieval`: a fixed-size list of float32, the retrieval vector (null: none);
- `vector.text`, `vector.frames`, `vector.audio`: lists of fixed-size float16 rows, the
  multivectors the bank has (null: none);
- `mvpp.captions`, `mvpp.duration_s`, and `mvpp.content_hash` / `mvpp.encoding_key`
  (what a rebuild and scoring compare), so an imported bank behaves as the exported one.

The file's key-value metadata holds the bank's manifest (`mvpp.manifest`) and how to
read the table (`mvpp.columns`): importing an exported file needs no flags. A table a
user made with vectors of their own names its columns as for `build`, and the encoders
whose vectors they are, which the bank then uses for new items.

Both directions stream: export writes row groups as it scrolls, import reads the table
in parts of `IMPORT_CHUNK` rows, so neither holds the whole bank in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvpp.memory_bank.builder import (
    BankBuilder,
    BuildItem,
    BuildReport,
    Failure,
    FailureSink,
    ProgressFn,
    content_problem,
    make_point,
    stored_form,
)
from mvpp.memory_bank.metadata import ColumnMap, MetadataError, parse_rows
from mvpp.memory_bank.schema import (
    AUDIO,
    FRAMES,
    RETRIEVAL,
    TEXT,
    BankPoint,
    Manifest,
    content_hash,
)
from mvpp.memory_bank.store.base import BankStore, bank_vectors, vector_dims

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_KEY = b"mvpp.manifest"
COLUMNS_KEY = b"mvpp.columns"
FORMAT_KEY = b"mvpp.format"
# Named vector -> its column.
VECTOR_COLUMNS = {
    RETRIEVAL: "vector.retrieval",
    TEXT: "vector.text",
    FRAMES: "vector.frames",
    AUDIO: "vector.audio",
}
CAPTIONS = "mvpp.captions"
DURATION = "mvpp.duration_s"
CONTENT_HASH = "mvpp.content_hash"
ENCODING_KEY = "mvpp.encoding_key"
EXTRA_COLUMNS = (CAPTIONS, DURATION, CONTENT_HASH, ENCODING_KEY)
# Rows per row group written, and per part read: a few tens of MB of vectors.
EXPORT_BATCH = 2048
IMPORT_CHUNK = 8192


class TableFormatError(MetadataError):
    """A table that cannot be imported as a whole (its columns, not a row)."""


# -- export --------------------------------------------------------------------------


def export_columns(manifest: Manifest, meta_keys: list[str]) -> ColumnMap:
    """How an exported table names its columns: the bank's recorded names, one text
    column (the bank keeps the joined text), every label and metadata field."""
    rec = manifest.columns or {}
    meta_cols = list(dict.fromkeys([*(rec.get("meta_cols") or []), *meta_keys]))
    columns = ColumnMap(
        id_col=rec.get("id_col") or "id",
        text_cols=[(rec.get("text_cols") or ["title"])[0]],
        label_cols=list(manifest.label_names),
        time_col=rec.get("time_col") or "published_at",
        observed_col=rec.get("observed_col") or "observed_at",
        meta_cols=meta_cols,
        video_col=rec.get("video_col") or "video",
        require_text=False,
    )
    names = [columns.id_col, *columns.text_cols, *columns.label_cols, columns.time_col, columns.observed_col,
             *columns.meta_cols, columns.video_col, *VECTOR_COLUMNS.values(), *EXTRA_COLUMNS]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TableFormatError(f"the bank's columns {clash} would share a name in the table")
    return columns


def _schema(columns: ColumnMap, manifest: Manifest, vectors: tuple[str, ...]):
    import pyarrow as pa

    dims = vector_dims(manifest)
    fields = [pa.field(columns.id_col, pa.string()), pa.field(columns.text_cols[0], pa.string())]
    fields += [pa.field(c, pa.float64()) for c in columns.label_cols]
    fields += [pa.field(c, pa.string()) for c in (columns.time_col, columns.observed_col)]
    # metadata values are numbers or text; as text they read back as they were
    fields += [pa.field(c, pa.string()) for c in columns.meta_cols]
    fields += [pa.field(columns.video_col, pa.string()), pa.field(CAPTIONS, pa.list_(pa.string())),
               pa.field(DURATION, pa.float64()), pa.field(CONTENT_HASH, pa.string()),
               pa.field(ENCODING_KEY, pa.string())]
    for name in vectors:
        if name == RETRIEVAL:
            fields.append(pa.field(VECTOR_COLUMNS[name], pa.list_(pa.float32(), dims[name])))
        else:
            fields.append(pa.field(VECTOR_COLUMNS[name], pa.list_(pa.list_(pa.float16(), dims[name]))))
    return pa.schema(fields)


def _meta_text(value: Any) -> str | None:
    if value is None:
        return None
    return repr(value) if isinstance(value, float) else str(value)


def _record_batch(points: list[BankPoint], columns: ColumnMap, schema, vectors: tuple[str, ...]):
    import pyarrow as pa

    data: dict[str, Any] = {
        columns.id_col: [p.item_id for p in points],
        columns.text_cols[0]: [p.title for p in points],
    }
    for c in columns.label_cols:
        data[c] = [p.labels.get(c) for p in points]
    assert columns.time_col is not None and columns.observed_col is not None and columns.video_col is not None
    data[columns.time_col] = [p.published_at for p in points]
    data[columns.observed_col] = [p.observed_at for p in points]
    for c in columns.meta_cols:
        data[c] = [_meta_text(p.metadata.get(c)) for p in points]
    data[columns.video_col] = [p.video for p in points]
    data[CAPTIONS] = [list(p.captions) for p in points]
    data[DURATION] = [p.duration_s for p in points]
    data[CONTENT_HASH] = [p.content_hash or None for p in points]
    data[ENCODING_KEY] = [p.encoding_key or None for p in points]
    arrays = []
    for f in schema:
        if f.name in data:
            arrays.append(pa.array(data[f.name], type=f.type))
    for name in vectors:
        arrays.append(_vector_array([getattr(p, _FIELD[name]) for p in points], schema.field(VECTOR_COLUMNS[name]).type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# Named vector -> BankPoint attribute.
_FIELD = {RETRIEVAL: "retrieval", TEXT: "tokens", FRAMES: "frames", AUDIO: "audio"}


def _vector_array(values: list[np.ndarray | None], typ):
    """One vector column from per-item arrays (None or zero rows: null)."""
    import pyarrow as pa

    present = [v is not None and np.asarray(v).size > 0 for v in values]
    mask = pa.array([not p for p in present])
    if pa.types.is_fixed_size_list(typ):  # the retrieval vector: one row per item
        dim = typ.list_size
        flat = np.zeros((len(values), dim), np.float32)
        for i, v in enumerate(values):
            if present[i]:
                flat[i] = np.asarray(v, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=mask)
    dim = typ.value_type.list_size
    rows = [np.asarray(v, np.float16).reshape(-1, dim) if present[i] else np.zeros((0, dim), np.float16)
            for i, v in enumerate(values)]
    offsets = np.zeros(len(rows) + 1, np.int32)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.concatenate(rows) if rows else np.zeros((0, dim), np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float16()), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask)


def export_bank(store: BankStore, path: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write every item of the bank to a Parquet table at `path` (replaced only once
    complete); returns the number of items written."""
    import pyarrow.parquet as pq

    manifest = store.manifest
    if manifest is None:
        raise TableFormatError("the bank is empty: nothing to export")
    meta_keys: list[str] = []
    if not (manifest.columns or {}).get("meta_cols"):  # a bank that did not record them
        keys: set[str] = set()
        for p in store.scroll(vectors=()):
            keys.update(p.metadata)
        meta_keys = sorted(keys)
    columns = export_columns(manifest, meta_keys)
    dims = vector_dims(manifest)
    vectors = tuple(n for n in bank_vectors(tuple(VECTOR_COLUMNS), manifest) if dims[n] > 0)
    schema = _schema(columns, manifest, vectors).with_metadata({
        MANIFEST_KEY: json.dumps(manifest.to_dict()),
        COLUMNS_KEY: json.dumps(columns.to_dict()),
        FORMAT_KEY: str(FORMAT_VERSION),
    })
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    written = 0
    with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        batch: list[BankPoint] = []
        for point in store.scroll(vectors=vectors):
            batch.append(point)
            if len(batch) == EXPORT_BATCH:
                writer.write_batch(_record_batch(batch, columns, schema, vectors))
                written += len(batch)
                if progress:
                    progress(len(batch))
                batch = []
        if batch:
            writer.write_batch(_record_batch(batch, columns, schema, vectors))
            written += len(batch)
            if progress:
                progress(len(batch))
    partial.replace(path)
    return written


# -- import --------------------------------------------------------------------------


@dataclass
class TableHeader:
    """What a table says of itself: its rows, its vector columns, and for an exported
    table the bank's manifest and how to read its columns (None for a user's table)."""

    rows: int
    vector_columns: list[str]
    manifest: Manifest | None = None
    columns: ColumnMap | None = None


def read_header(path: Path) -> TableHeader:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise TableFormatError(f"table not found: {path}")
    if path.suffix.lower() not in {".parquet", ".pq"}:
        raise TableFormatError(f"{path}: import reads Parquet tables (.parquet)")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise TableFormatError(f"{path} is not a readable Parquet file ({exc})") from exc
    meta = pf.schema_arrow.metadata or {}
    names = pf.schema_arrow.names
    header = TableHeader(pf.metadata.num_rows, [c for c in VECTOR_COLUMNS.values() if c in names])
    if MANIFEST_KEY in meta:
        header.manifest = Manifest.from_dict(json.loads(meta[MANIFEST_KEY]))
        header.columns = ColumnMap(**json.loads(meta[COLUMNS_KEY]), require_text=False)
    return header


@dataclass
class ItemVectors:
    """What an imported row brings beside its metadata."""

    retrieval: np.ndarray | None = None
    tokens: np.ndarray | None = None
    frames: np.ndarray | None = None
    audio: np.ndarray | None = None
    captions: list[str] = field(default_factory=list)
    duration_s: float | None = None
    video: str | None = None
    content_hash: str | None = None
    encoding_key: str | None = None

    @property
    def any_vector(self) -> bool:
        return any(v is not None for v in (self.retrieval, self.tokens, self.frames, self.audio))

    def digest(self) -> str:
        h = hashlib.sha256()
        for v in (self.retrieval, self.tokens, self.frames, self.audio):
            h.update(b"-" if v is None else np.ascontiguousarray(v, np.float32).tobytes())
        return h.hexdigest()[:24]


def _vector_rows(column, name: str, dim: int, multivector: bool) -> list[np.ndarray | None | str]:
    """Per row: the vector(s) as float32 ((dim,) or (m, dim)), None when absent, or why
    the row's value cannot be used."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(col)
    out: list[np.ndarray | None | str] = [None] * n
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise TableFormatError(f"column {name!r} must hold lists of numbers, not {col.type}")
    valid = np.asarray(col.is_valid())
    lengths = np.asarray(pc.list_value_length(col).fill_null(0))
    if multivector:
        inner = col.flatten()
        if not (pa.types.is_list(inner.type) or pa.types.is_large_list(inner.type)
                or pa.types.is_fixed_size_list(inner.type)):
            raise TableFormatError(f"column {name!r} must hold lists of vectors, not {col.type}")
        widths = np.asarray(pc.list_value_length(inner).fill_null(0))
        values = np.asarray(inner.flatten().cast(pa.float32()), np.float32)
    else:
        widths = None
        values = np.asarray(col.flatten().cast(pa.float32()), np.float32)
    pos = row = 0
    for i in range(n):
        if not valid[i]:
            continue
        m = int(lengths[i])
        if multivector:
            assert widths is not None
            w = widths[row : row + m]
            size = int(w.sum())
            if m and (w != dim).any():
                out[i] = f"{name}: rows of {sorted(set(w.tolist()) - {dim})[0]} values, the bank's have {dim}"
            elif m:
                out[i] = values[pos : pos + size].reshape(m, dim)
            row += m
            pos += size
        else:
            if m != dim:
                out[i] = f"{name}: {m} values, the bank's vectors have {dim}"
            else:
                out[i] = values[pos : pos + m]
            pos += m
    for i, v in enumerate(out):
        if isinstance(v, np.ndarray):
            if not np.isfinite(v).all():
                out[i] = f"{name}: not a finite number in the vector"
            elif not (np.linalg.norm(v, axis=-1) > 0).all():
                out[i] = f"{name}: an all-zero vector has no direction"
    return out


class TableImporter(BankBuilder):
    """The builder's indexing (resume by content hash, failures per item, labels kept
    across builds) with vectors read from a table instead of encoders."""

    def __init__(self, store: BankStore, manifest: Manifest, settings=None) -> None:
        super().__init__(store, None, settings)  # type: ignore[arg-type]  # nothing is encoded
        self._manifest = manifest
        self.vectors: dict[str, ItemVectors] = {}

    def manifest(self, label_names=(), columns: ColumnMap | None = None) -> Manifest:
        m = copy.deepcopy(self._manifest)
        m.label_names = list(dict.fromkeys([*m.label_names, *label_names]))
        if columns is not None:
            m.columns = columns.to_dict()
        return m

    def item_hash(self, item: BuildItem, manifest: Manifest) -> str:
        vec = self.vectors[item.item_id]
        if vec.content_hash:
            return vec.content_hash
        meta = item.meta
        return content_hash({
            "id": item.item_id,
            "title": meta.title if meta else "",
            "labels": meta.labels if meta else {},
            "time": meta.published_at if meta else None,
            "observed": meta.observed_at if meta else None,
            "metadata": meta.metadata if meta else {},
            "vectors": vec.digest(),
            "captions": vec.captions,
            "encoders": [manifest.text_model, manifest.captioner_model, manifest.frame_model, manifest.audio_model],
            "transform": manifest.label_transform,
        })

    def encoding_key(self, item: BuildItem, manifest: Manifest) -> str:
        vec = self.vectors[item.item_id]
        if vec.encoding_key:
            return vec.encoding_key
        if vec.frames is not None or vec.audio is not None:
            return ""  # vectors of a video the bank cannot fingerprint: never reused
        return super().encoding_key(item, manifest)

    def content_problem(self, item: BuildItem, clip) -> str | None:
        return None if self.vectors[item.item_id].any_vector else content_problem(item, clip)

    def encode(self, items) -> list[BankPoint]:
        points = []
        storage = self.token_storage()
        for item, _ in items:
            vec = self.vectors[item.item_id]
            point = stored_form(make_point(item, vec.retrieval, vec.frames, vec.tokens, vec.captions, vec.duration_s,
                                       vec.audio), storage)
            point.video = vec.video
            points.append(point)
        return points


def import_table(
    path: Path,
    store: BankStore,
    manifest: Manifest,
    columns: ColumnMap,
    failures_file: Path | None = None,
    progress: ProgressFn | None = None,
    settings=None,
    record_columns: bool = True,
) -> BuildReport:
    """Index the rows of a Parquet table with their own vectors.

    `manifest`: the bank's (an exported table's, or one made for the encoders that made a
    user's vectors); `columns`: how to read the table; `record_columns`: record them in the
    manifest (a user's table: scoring reads new tables with the same names). Every row
    fails alone: a bad id, label or time, a vector of the wrong size, not finite, or all
    zero. A rerun skips rows already imported with the same content.
    """
    import pyarrow.parquet as pq

    start = time.perf_counter()
    progress = progress or (lambda n, status: None)
    header = read_header(path)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    dims = vector_dims(manifest)
    wanted = {name: col for name, col in VECTOR_COLUMNS.items() if col in names}
    for name, col in wanted.items():
        if dims[name] <= 0:
            raise TableFormatError(f"the table has {col!r} but the bank has no {name} vectors")
    if not wanted:
        raise TableFormatError(f"{path} has no vector column ({', '.join(VECTOR_COLUMNS.values())}): "
                               "build a bank from a table without vectors with `mvpp-bank build --meta`")
    plain = [n for n in names if n not in wanted.values()]
    importer = TableImporter(store, manifest, settings)
    report = BuildReport(planned=header.rows, failures_file=failures_file)
    bank_manifest = importer.begin(list(columns.label_cols), columns if record_columns else None)
    sink = FailureSink(failures_file)
    seen: set[str] = set()
    first = 1
    try:
        for batch in pf.iter_batches(batch_size=IMPORT_CHUNK):
            rows = batch.select(plain).to_pylist()
            metas = parse_rows(rows, columns, str(path), seen, first)
            vectors = {name: _vector_rows(batch.column(col), col, dims[name], name != RETRIEVAL)
                       for name, col in wanted.items()}
            items: list[BuildItem] = []
            importer.vectors = {}
            for j, meta in enumerate(metas):
                row = rows[j]
                problems = list(meta.problems)
                got = {name: vectors[name][j] for name in wanted}
                problems += [v for v in got.values() if isinstance(v, str)]
                if problems:
                    sink.add(Failure(meta.item_id, "; ".join(problems), position=first - 1 + j), report)
                    progress(1, "failed")
                    continue
                importer.vectors[meta.item_id] = ItemVectors(
                    retrieval=got.get(RETRIEVAL),  # type: ignore[arg-type]
                    tokens=got.get(TEXT),  # type: ignore[arg-type]
                    frames=got.get(FRAMES),  # type: ignore[arg-type]
                    audio=got.get(AUDIO),  # type: ignore[arg-type]
                    captions=list(row.get(CAPTIONS) or []),
                    duration_s=row.get(DURATION),
                    video=meta.video,
                    content_hash=row.get(CONTENT_HASH),
                    encoding_key=row.get(ENCODING_KEY),
                )
                items.append(BuildItem(meta.item_id, meta, None, first - 1 + j))
            importer.index(items, bank_manifest, sink, report, progress)
            first += batch.num_rows
        importer.finish(report, progress)
    finally:
        sink.close()
    report.elapsed_s = time.perf_counter() - start
    return report
