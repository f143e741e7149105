"""Embedded backend: Qdrant's engine in-process (qdrant-edge-py), one shard per bank folder.

Layout of a bank folder:
    manifest.json   the Manifest, replaced atomically; written last on creation, so a
                    folder with a manifest always holds a complete shard
    shard/          the EdgeShard (WAL, segments, payload indexes, HNSW)

The engine allows one open shard per folder (its WAL is locked). Stores opened on the same
folder within a process share one shard; another process gets BankBusyError.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from ..schema import (
    INDEXED_FIELDS,
    RETRIEVAL,
    BankPoint,
    Hit,
    Manifest,
    SearchFilter,
    point_id,
)
from .base import (
    FULL_SCAN_THRESHOLD_KB,
    HASH_FIELDS,
    MULTIVECTOR_NAMES,
    RETRIEVAL_EF_CONSTRUCT,
    RETRIEVAL_GRAPH_M,
    RETRIEVAL_INT8_QUANTILE,
    SCROLL_BATCH,
    UPSERT_BATCH,
    BankBusyError,
    BankDamagedError,
    BankNotInitialisedError,
    BankStore,
    NotABankError,
    bank_vectors,
    check_vector_names,
    chunks,
    hash_pairs,
    merge_manifest,
    multivector_storage,
    point_vectors,
    prepare_query,
    record_to_point,
    rescore_oversampling,
    search_ef,
    vector_dims,
)
from .heap import release_freed_memory

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shard"

# The engine has no background flush: without one the WAL keeps every upsert since the
# last flush (about 50 KB per point with a 32 x 384 text multivector). Flushing after this
# many bytes of vectors keeps it, and the replay on the next open, bounded.
AUTO_FLUSH_BYTES = 256 * 1024 * 1024

# Ids per retrieve call when looking up hashes.
RETRIEVE_BATCH = 1024

_SCHEMA_TYPES = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
    "datetime": qe.PayloadSchemaType.Datetime,
    "uuid": qe.PayloadSchemaType.Uuid,
    "text": qe.PayloadSchemaType.Text,
}


_DISTANCES = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot}
_DATATYPES = {"float16": qe.VectorStorageDatatype.Float16, "uint8": qe.VectorStorageDatatype.Uint8}


@dataclass
class _OpenShard:
    """A shard and its manifest, shared by every store open on the same folder."""

    shard: qe.EdgeShard
    manifest: Manifest
    refs: int = 1
    unflushed_bytes: int = 0


_OPEN: dict[Path, _OpenShard] = {}
_OPEN_LOCK = threading.Lock()


def edge_config(manifest: Manifest) -> qe.EdgeConfig:
    multi = qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim)
    # m=0: no HNSW graph for multivectors (one node per frame / token row would make
    # optimisation dominate build time); their searches are exact scans, and the build
    # candidates, a required field, are never used.
    no_graph = qe.HnswIndexConfig(m=0, ef_construct=RETRIEVAL_EF_CONSTRUCT, full_scan_threshold=FULL_SCAN_THRESHOLD_KB)
    dims = vector_dims(manifest)
    multivectors: dict[str, qe.EdgeVectorParams] = {}
    for name in bank_vectors(MULTIVECTOR_NAMES, manifest):
        distance, datatype = multivector_storage(name, manifest)
        multivectors[name] = qe.EdgeVectorParams(
            size=dims[name],
            distance=_DISTANCES[distance],
            multivector_config=multi,
            datatype=_DATATYPES[datatype],
            hnsw_config=no_graph,
        )
    int8 = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=RETRIEVAL_INT8_QUANTILE, always_ram=True)
    graph = qe.HnswIndexConfig(m=RETRIEVAL_GRAPH_M, ef_construct=RETRIEVAL_EF_CONSTRUCT,
                               full_scan_threshold=FULL_SCAN_THRESHOLD_KB)
    retrieval = qe.EdgeVectorParams(size=dims[RETRIEVAL], distance=qe.Distance.Cosine, quantization_config=int8,
                                    hnsw_config=graph)
    return qe.EdgeConfig(vectors={RETRIEVAL: retrieval, **multivectors})


def search_params(exact: bool, k: int) -> qe.SearchParams:
    """Exact scans of the originals, or the graph walked on the 8-bit copy (where the
    vector has one) with the best rescored on the originals."""
    if exact:
        return qe.SearchParams(exact=True, quantization=qe.QuantizationSearchParams(ignore=True))
    rescore = qe.QuantizationSearchParams(rescore=True, oversampling=rescore_oversampling(k))
    return qe.SearchParams(hnsw_ef=search_ef(k), quantization=rescore)


def _match_bool(value: bool) -> qe.MatchValue:
    # The binding reads a Python bool as the integer 1 / 0 (bool subclasses int), which
    # never matches a stored boolean; numpy.bool_ is not an int and arrives as a boolean.
    return qe.MatchValue(np.bool_(value))  # type: ignore[arg-type]


def edge_filter(flt: SearchFilter | None) -> qe.Filter | None:
    if flt is None or flt.is_empty():
        return None
    must: list[Any] = []
    must_not: list[Any] = []
    if flt.exclude_ids:
        must_not.append(qe.HasIdCondition({point_id(i) for i in flt.exclude_ids}))
    if flt.labelled_only:
        must.append(qe.FieldCondition(key="labelled", match=_match_bool(True)))
    if flt.published_before is not None:
        must.append(
            qe.FieldCondition(
                key="published_ts", range=qe.RangeFloat(lt=float(flt.published_before))
            )
        )
    if flt.has_video is not None:
        must.append(qe.FieldCondition(key="has_video", match=_match_bool(flt.has_video)))
    if flt.has_audio is not None:
        must.append(qe.FieldCondition(key="has_audio", match=_match_bool(flt.has_audio)))
    return qe.Filter(must=must or None, must_not=must_not or None)


def _read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise NotABankError(f"cannot read the bank manifest {path}: {exc}") from exc


def _write_manifest(path: Path, manifest: Manifest) -> None:
    # tmp + fsync + replace: a crash leaves the old manifest or the new one, never half
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_dict(), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_manifest_tmp(name: str) -> bool:
    return name.startswith(".manifest-") and name.endswith(".json")


class _GuardedShard:
    """A shard whose reads turn the engine's errors (a bare Exception whose text says what
    the engine could not read) into BankDamagedError naming the bank and what to do.
    Writes are left as they are: a point the engine refuses is that point's failure."""

    READS = frozenset({"retrieve", "scroll", "count", "query", "query_batch"})

    def __init__(self, shard: qe.EdgeShard, folder: Path) -> None:
        self._shard = shard
        self._folder = folder

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._shard, name)
        if name not in self.READS:
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                if type(exc) is not Exception:  # the engine's errors are plain Exceptions
                    raise
                raise BankDamagedError(str(self._folder), _one_line(exc)) from exc

        return guarded


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _load_shard(folder: Path) -> qe.EdgeShard:
    shard_path = folder / SHARD_DIR
    if not shard_path.is_dir():
        raise NotABankError(f"{folder} has a {MANIFEST_FILE} but no {SHARD_DIR}/ folder")
    try:
        return _GuardedShard(qe.EdgeShard.load(str(shard_path)), folder)  # type: ignore[return-value]
    except Exception as exc:
        if "WouldBlock" in str(exc) or "Can't init WAL" in str(exc):
            raise BankBusyError(
                f"the bank at {folder} is open in another process; close it there, "
                "or share one bank through a Qdrant server (--qdrant-url)"
            ) from exc
        raise BankDamagedError(str(folder), _one_line(exc)) from exc


def _disk_usage(root: Path) -> int:
    total = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    # allocated blocks, not apparent size: the engine preallocates sparse
                    # mmap files and WAL segments
                    blocks = getattr(st, "st_blocks", None)
                    total += blocks * 512 if blocks is not None else st.st_size
    return total


class EdgeBankStore(BankStore):
    """A bank in a local folder, on the embedded Qdrant engine."""

    backend = "embedded"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser().resolve()
        self.location = str(self.path)
        self._open: _OpenShard | None = None
        self._closed = False
        with _OPEN_LOCK:
            self._attach_existing()
        if self._open is None:
            self._check_free_folder()

    # -- opening ------------------------------------------------------------------------

    def _attach_existing(self) -> None:
        """Share the shard already open in this process, or load it from disk if any.

        Caller holds _OPEN_LOCK.
        """
        shared = _OPEN.get(self.path)
        if shared is not None:
            shared.refs += 1
            self._open = shared
            return
        manifest_path = self.path / MANIFEST_FILE
        if manifest_path.is_file():
            manifest = _read_manifest(manifest_path)
            shared = _OpenShard(shard=_load_shard(self.path), manifest=manifest)
            _OPEN[self.path] = shared
            self._open = shared
            log.debug("opened bank %s (%s)", self.path, manifest.profile)

    def _check_free_folder(self) -> None:
        """A folder without a manifest may hold only what an interrupted creation leaves
        (the shard, a temporary manifest): `_create` clears that."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise NotABankError(f"{self.path} is a file, not a bank folder")
        others = sorted(
            p.name
            for p in self.path.iterdir()
            if p.name != SHARD_DIR and not _is_manifest_tmp(p.name)
        )
        if others:
            raise NotABankError(
                f"{self.path} exists and is not an mvpp bank (no {MANIFEST_FILE}); "
                "choose a new or empty folder"
            )

    def _clear_interrupted_creation(self) -> None:
        """Remove a shard left without a manifest by a creation killed midway.

        The manifest is written before any point, so such a shard is empty; one that holds
        points (a manifest deleted by hand) is left alone.
        """
        for tmp in self.path.glob(".manifest-*.json"):
            tmp.unlink(missing_ok=True)
        shard_path = self.path / SHARD_DIR
        if not shard_path.exists():
            return
        try:
            shard = _load_shard(self.path)  # BankBusyError if another process is creating it
        except BankBusyError:
            raise
        except Exception as exc:
            raise NotABankError(
                f"{self.path} holds an unreadable shard but no {MANIFEST_FILE} ({exc}); "
                "delete the folder and build again"
            ) from exc
        try:
            n_points = int(shard.count(qe.CountRequest(exact=True)))
        finally:
            shard.close()
        if n_points:
            raise NotABankError(
                f"{self.path} holds a shard with {n_points} points but no {MANIFEST_FILE}; "
                "restore the manifest, or delete the folder and build again"
            )
        log.warning("bank %s: removing the empty shard of an interrupted creation", self.path)
        shutil.rmtree(shard_path)

    def _shard(self) -> qe.EdgeShard | None:
        if self._closed:
            raise RuntimeError(f"the bank store at {self.path} is closed")
        return self._open.shard if self._open is not None else None

    def _require(self) -> _OpenShard:
        if self._shard() is None or self._open is None:
            raise BankNotInitialisedError(
                f"the bank at {self.path} has no manifest yet: call init(manifest) first"
            )
        return self._open

    # -- manifest -----------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest | None:
        return self._open.manifest if self._open is not None else None

    def init(self, manifest: Manifest) -> None:
        self._shard()  # raises if closed
        with _OPEN_LOCK:
            if self._open is None:
                # another store in this process may have created the bank since we opened
                self._attach_existing()
            if self._open is None:
                self._create(manifest)
                return
            merged, changed = merge_manifest(self._open.manifest, manifest)
            if changed:
                _write_manifest(self.path / MANIFEST_FILE, merged)
                self._open.manifest = merged
                log.info("bank %s: label names now %s", self.path, merged.label_names)

    def _create(self, manifest: Manifest) -> None:
        """Create shard, payload indexes, then the manifest. Caller holds _OPEN_LOCK."""
        self._check_free_folder()
        self._clear_interrupted_creation()
        self.path.mkdir(parents=True, exist_ok=True)
        shard = _GuardedShard(qe.EdgeShard.create(str(self.path / SHARD_DIR), edge_config(manifest)), self.path)
        try:
            for field, kind in INDEXED_FIELDS.items():
                shard.update(qe.UpdateOperation.create_field_index(field, _SCHEMA_TYPES[kind]))
            shard.flush()
            _write_manifest(self.path / MANIFEST_FILE, manifest)
        except BaseException:
            shard.close()
            # nothing of value in it yet, and left behind it would block the next attempt
            shutil.rmtree(self.path / SHARD_DIR, ignore_errors=True)
            raise
        shared = _OpenShard(shard=shard, manifest=manifest)
        _OPEN[self.path] = shared
        self._open = shared
        log.info("created bank %s (%s)", self.path, manifest.profile)

    # -- writes -------------------------------------------------------------------------

    def upsert(self, points: list[BankPoint]) -> None:
        opened = self._require()
        dims = vector_dims(opened.manifest)
        for batch in chunks(points, UPSERT_BATCH):
            edge_points = []
            n_floats = 0
            for p in batch:
                vectors = point_vectors(p, dims, opened.manifest.token_storage)
                n_floats += dims[RETRIEVAL] if RETRIEVAL in vectors else 0
                for name in MULTIVECTOR_NAMES:
                    if name in vectors:
                        n_floats += len(vectors[name]) * dims[name]
                edge_points.append(
                    qe.Point(id=point_id(p.item_id), vector=vectors, payload=p.payload())
                )
            # returns once the operation is in the WAL: durable against a killed process
            opened.shard.update(qe.UpdateOperation.upsert_points(edge_points))
            opened.unflushed_bytes += 4 * n_floats
            if opened.unflushed_bytes >= AUTO_FLUSH_BYTES:
                self.flush()

    def optimize(self) -> None:
        opened = self._require()
        if opened.shard.optimize():
            log.info("bank %s: segments optimised", self.path)

    # -- reads --------------------------------------------------------------------------

    def hashes(self, item_ids: list[str]) -> dict[str, str]:
        shard = self._shard()
        if shard is None or not item_ids:
            return {}
        out: dict[str, str] = {}
        for batch in chunks(item_ids, RETRIEVE_BATCH):
            records = shard.retrieve([point_id(i) for i in batch], with_payload=HASH_FIELDS, with_vector=False)
            out.update(hash_pairs(records))
        return out

    def content_hashes(self) -> Iterator[tuple[str, str]]:
        shard = self._shard()
        if shard is None:
            return
        offset: Any = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(offset=offset, limit=SCROLL_BATCH, with_payload=HASH_FIELDS, with_vector=False)
            )
            yield from hash_pairs(records)
            if offset is None:
                return

    def count(self, flt: SearchFilter | None = None) -> int:
        shard = self._shard()
        if shard is None:
            return 0
        return int(shard.count(qe.CountRequest(exact=True, filter=edge_filter(flt))))

    def scroll(
        self,
        vectors: tuple[str, ...] = (RETRIEVAL,),
        flt: SearchFilter | None = None,
        batch_size: int = 512,
    ) -> Iterator[BankPoint]:
        names = bank_vectors(check_vector_names(vectors), self.manifest)
        shard = self._shard()
        if shard is None:
            return
        offset: Any = None
        qfilter = edge_filter(flt)
        storage = self._token_storage()
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset,
                    limit=batch_size,
                    filter=qfilter,
                    with_payload=True,
                    with_vector=list(names) if names else False,
                )
            )
            for rec in records:
                yield record_to_point(rec.payload, rec.vector, storage)
            if offset is None:
                return

    def get(
        self, item_ids: list[str], vectors: tuple[str, ...] = (RETRIEVAL,)
    ) -> list[BankPoint | None]:
        names = bank_vectors(check_vector_names(vectors), self.manifest)
        shard = self._shard()
        if shard is None or not item_ids:
            return [None] * len(item_ids)
        ids = [point_id(i) for i in item_ids]
        storage = self._token_storage()
        by_id: dict[str, BankPoint] = {}
        for batch in chunks(ids, RETRIEVE_BATCH):
            records = shard.retrieve(
                list(dict.fromkeys(batch)),
                with_payload=True,
                with_vector=list(names) if names else False,
            )
            for rec in records:
                by_id[str(rec.id)] = record_to_point(rec.payload, rec.vector, storage)
        return [by_id.get(pid) for pid in ids]

    def _request(
        self,
        query: np.ndarray,
        k: int,
        using: str,
        flt: SearchFilter | None,
        exact: bool,
        dims: dict[str, int],
    ) -> tuple[qe.QueryRequest | None, int]:
        q, rows = prepare_query(query, using, dims)
        if rows == 0 or k <= 0:
            return None, rows
        request = qe.QueryRequest(
            limit=int(k),
            query=qe.Query.Nearest(q, using=using),
            filter=edge_filter(flt),
            with_payload=True,
            params=search_params(exact, k),
        )
        return request, rows

    @staticmethod
    def _hits(points: list[Any], rows: int) -> list[Hit]:
        return [
            Hit(
                item_id=str((p.payload or {}).get("item_id", p.id)),
                score=p.score / rows,
                payload=p.payload or {},
            )
            for p in points
        ]

    def search(
        self,
        query: np.ndarray,
        k: int,
        using: str = RETRIEVAL,
        flt: SearchFilter | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        shard = self._shard()
        if shard is None or self._open is None:
            return []
        request, rows = self._request(query, k, using, flt, exact, vector_dims(self._open.manifest))
        if request is None:
            return []
        return self._hits(shard.query(request), rows)

    def search_batch(
        self,
        queries: list[np.ndarray],
        k: int,
        using: str = RETRIEVAL,
        flts: list[SearchFilter | None] | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        filters = self._check_flts(queries, flts)
        shard = self._shard()
        if shard is None or self._open is None:
            return [[] for _ in queries]
        dims = vector_dims(self._open.manifest)
        prepared = [
            self._request(q, k, using, f, exact, dims)
            for q, f in zip(queries, filters, strict=True)
        ]
        requests = [r for r, _ in prepared if r is not None]
        results = iter(shard.query_batch(qe.QueryBatchRequest(requests)) if requests else [])
        return [self._hits(next(results), rows) if r is not None else [] for r, rows in prepared]

    # -- housekeeping -------------------------------------------------------------------

    def size_bytes(self) -> int | None:
        return _disk_usage(self.path) if self.path.is_dir() else 0

    def flush(self) -> None:
        shard = self._shard()
        if shard is not None and self._open is not None:
            shard.flush()
            self._open.unflushed_bytes = 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _OPEN_LOCK:
            opened, self._open = self._open, None
            if opened is None:
                return
            opened.refs -= 1
            if opened.refs == 0:
                _OPEN.pop(self.path, None)
                opened.shard.flush()
                opened.shard.close()
                del opened  # the engine frees the shard with its last reference
                release_freed_memory()
                log.debug("closed bank %s", self.path)
