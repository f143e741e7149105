"""Approximate neighbours of many items: an HNSW index over a memory, in Qdrant's engine.

Exact bulk search (`bulk.bulk_topk`) does work quadratic in the bank: minutes at 10^5
items, hours at 10^6. Above a size (`TrainConfig.neighbour_index`), the dense stage of the
neighbour search asks this index for candidates instead, with the protocol's filters as
payload filters (publish time strictly before the query's, never the query itself), and
`bulk.candidate_topk` scores and ranks them exactly as the exact search would.

An index is an embedded Qdrant shard (qdrant-edge) of the memory's retrieval vectors,
with point id = the key's position in the memory, payload `t` (publish time, absent when
unknown) and `g` (group code, absent when none). Graph builds are not reproducible (the
engine builds with several threads), so an index is built once and saved: a run keeps the
index its training used, and evaluation and scoring search that same graph. Its folder is
named by a digest of everything it holds, so an index never serves another memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from mvpp.memory_bank.store.base import rescore_oversampling, search_ef
from mvpp.memory_bank.store.heap import release_freed_memory
from mvpp.retriever.bulk import KeyRows

log = logging.getLogger(__name__)

INDEX_META = "index.json"
INDEX_FORMAT = 1
VECTOR = "v"
TIME = "t"
GROUP = "g"
# Points per upsert call while building, and vectors per update of the digest.
BUILD_BATCH = 4096
HASH_CHUNK = 65_536
QUANTIZATIONS = ("int8", "none")
# The 8-bit copy's range: the vectors' components between these quantiles of all of them.
INT8_QUANTILE = 0.99

# Queries per engine call (`EdgeShard.query_batch` plans them together).
QUERY_BATCH = 256
# Queries from which `candidates` spreads them over worker processes (starting one costs
# about a second; once started they take every search, however short, so that this
# process never maps a graph of its own beside theirs), and queries per task given to a
# worker.
PARALLEL_FROM = 8192
PARALLEL_CHUNK = 4096


@dataclass
class AnnConfig:
    """The HNSW graph of a neighbour index (Qdrant's parameters, same names).

    m / ef_construct: links per node and build-time candidates (the engine's defaults).
    full_scan_threshold: in KB of vectors; a search whose filter leaves fewer keys scans
    them exactly instead of walking the graph (the engine's default).
    indexing_threshold: in KB of vectors; a smaller segment gets no graph (0: the
    engine's default). Tests set both tiny to force the graph on a few hundred keys.
    quantization: "int8" keeps an 8-bit copy of the vectors in RAM, which the graph is
    built and walked with, and rescores each search's best with the originals; "none"
    walks the float32 vectors. On 100,000 synthetic items int8 built the graph in 18 s
    instead of 54 and searched in 1.1 ms instead of 2.6, with the same recall@10
    (0.9991; benchmarks/README.md).
    Searches keep `store.base.search_ef(limit)` candidates.
    """

    m: int = 16
    ef_construct: int = 100
    full_scan_threshold: int = 10_000
    indexing_threshold: int = 0
    quantization: str = "int8"

    def __post_init__(self) -> None:
        if self.m < 2 or self.ef_construct < 4:
            raise ValueError(f"AnnConfig: m must be >= 2 and ef_construct >= 4, got {self.m}, {self.ef_construct}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"AnnConfig.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.full_scan_threshold < 1 or self.indexing_threshold < 0:
            raise ValueError("AnnConfig: full_scan_threshold must be >= 1 and indexing_threshold >= 0")


@dataclass
class MemoryKeys:
    """The keys of a memory as an index sees them, in memory order.

    vectors: (M, D) L2-normalised, an array or `bulk.KeyRows`; has_vector: (M,) False
    for a key without one (never in the index); times: (M,) unix seconds, NaN when
    unknown, or None (no time filter); groups: (M,) codes, -1 for none, or None (no
    groups).
    """

    vectors: np.ndarray | KeyRows
    has_vector: np.ndarray
    times: np.ndarray | None = None
    groups: np.ndarray | None = None

    def digest(self, cfg: AnnConfig) -> str:
        """Everything an index over these keys depends on, hashed, with the graph's
        parameters."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({"format": INDEX_FORMAT, **asdict(cfg)}, sort_keys=True).encode())
        # hashed a chunk at a time: never a whole copy of the vectors (1.2 GB for 10^6),
        # and the same digest as the whole array's bytes at once
        for lo in range(0, len(self.vectors), HASH_CHUNK):
            h.update(np.ascontiguousarray(self.vectors[lo : lo + HASH_CHUNK], np.float32).data)
        h.update(np.ascontiguousarray(self.has_vector, np.bool_).data)
        for part in (self.times, self.groups):
            h.update(b"-" if part is None else np.ascontiguousarray(part).data)
        return h.hexdigest()


class AnnIndex:
    """An HNSW index over the keys of a memory that have a retrieval vector.

    Open one with `AnnIndex.open_or_build`; `candidates` gives, per query, the positions
    (in the memory) of its best keys by cosine among those its filters allow.
    """

    def __init__(self, folder: Path, meta: dict) -> None:
        self.folder = folder
        self.meta = meta
        # loaded on the first search in this process: a process whose long searches
        # all go to workers never holds the graph itself (2.3 GB for 10^6 keys)
        self._loaded: qe.EdgeShard | None = None
        # worker processes, kept between searches until `close` (each loads the graph)
        self._pool: ProcessPoolExecutor | None = None
        self._pool_size = 0
        self._lock = threading.Lock()  # searches may come from several threads (a service)

    @property
    def _shard(self) -> qe.EdgeShard:
        with self._lock:
            if self._loaded is None:
                try:
                    self._loaded = qe.EdgeShard.load(str(self.folder / "shard"))
                except Exception as exc:  # the engine raises its own error types for damaged files
                    raise RuntimeError(
                        f"the neighbour index {self.folder} is damaged ({exc}): delete the folder to build it again"
                    ) from exc
            return self._loaded

    @property
    def digest(self) -> str:
        return str(self.meta["digest"])

    @property
    def built_seconds(self) -> float:
        return float(self.meta.get("build_seconds", 0.0))

    @classmethod
    def open_or_build(cls, root: Path, keys: MemoryKeys, cfg: AnnConfig) -> AnnIndex:
        """The index of these keys under `root` (a folder named by their digest), built
        there first when missing."""
        digest = keys.digest(cfg)
        folder = Path(root) / digest
        found = cls.open(folder)
        if found is not None:
            return found
        Path(root).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
        try:
            cls._build(work, keys, cfg, digest)
            release_freed_memory()  # the build's buffers (several GB for 10^6 keys), its shard gone
            try:
                work.replace(folder)
            except OSError:  # built meanwhile by another process: theirs serves
                shutil.rmtree(work, ignore_errors=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        opened = cls.open(folder)
        if opened is None:
            raise RuntimeError(f"the neighbour index just built in {folder} cannot be opened")
        return opened

    @classmethod
    def open(cls, folder: Path) -> AnnIndex | None:
        """A saved index; None when `folder` holds none or a damaged one (logged)."""
        folder = Path(folder)
        meta_path = folder / INDEX_META
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != INDEX_FORMAT or meta.get("digest") != folder.name:
                raise ValueError(f"format {meta.get('format')}, digest {meta.get('digest')}")
            if not (folder / "shard" / "edge_config.json").exists():
                raise ValueError("its shard is missing")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("the neighbour index %s is damaged (%s): building it again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return cls(folder, meta)

    @staticmethod
    def _build(folder: Path, keys: MemoryKeys, cfg: AnnConfig, digest: str) -> None:
        import time

        vectors, has_vector, times, groups = keys.vectors, keys.has_vector, keys.times, keys.groups

        start = time.perf_counter()
        dim = int(vectors.shape[1])
        hnsw = qe.HnswIndexConfig(m=cfg.m, ef_construct=cfg.ef_construct, full_scan_threshold=cfg.full_scan_threshold)
        optimizers = qe.EdgeOptimizersConfig(indexing_threshold=cfg.indexing_threshold) if cfg.indexing_threshold else None
        quantization = None
        if cfg.quantization == "int8":
            quantization = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=INT8_QUANTILE, always_ram=True)
        config = qe.EdgeConfig(
            vectors={
                VECTOR: qe.EdgeVectorParams(
                    size=dim, distance=qe.Distance.Cosine, hnsw_config=hnsw, quantization_config=quantization
                )
            },
            optimizers=optimizers,
            # written once, then only read: no write-ahead log, whose lock would let one
            # process at a time open the index
            wal_enabled=False,
        )
        shard = qe.EdgeShard.create(str(folder / "shard"), config)
        try:
            if times is not None:
                shard.update(qe.UpdateOperation.create_field_index(TIME, qe.PayloadSchemaType.Float))
            if groups is not None:
                shard.update(qe.UpdateOperation.create_field_index(GROUP, qe.PayloadSchemaType.Integer))
            keys = np.flatnonzero(has_vector)
            log.info("neighbour index: %d vectors of %d keys", len(keys), len(has_vector))
            for lo in range(0, len(keys), BUILD_BATCH):
                part = keys[lo : lo + BUILD_BATCH]
                block = np.asarray(vectors[part], np.float32)
                points = []
                for j, pos in enumerate(part):
                    payload: dict = {}
                    if times is not None and np.isfinite(times[pos]):
                        payload[TIME] = float(times[pos])
                    if groups is not None and groups[pos] >= 0:
                        payload[GROUP] = int(groups[pos])
                    points.append(qe.Point(id=int(pos), vector={VECTOR: block[j].tolist()}, payload=payload))
                shard.update(qe.UpdateOperation.upsert_points(points))
            shard.optimize()  # builds the graph
            shard.flush()
        finally:
            shard.close()
        meta = {
            "format": INDEX_FORMAT,
            "digest": digest,
            "keys": len(has_vector),
            "vectors": int(np.count_nonzero(has_vector)),
            "dim": dim,
            "config": asdict(cfg),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        (folder / INDEX_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        log.info("neighbour index built in %.1f s", meta["build_seconds"])

    def candidates(
        self,
        vectors: np.ndarray,
        limit: int,
        own: np.ndarray,
        times: np.ndarray | None,
        groups: np.ndarray | None = None,
        workers: int = 1,
    ) -> np.ndarray:
        """(B, limit) memory positions of each query's best keys by cosine, -1 where fewer
        qualify; with `groups`, (B, 2 * limit): then also the best `limit` among the keys
        of the query's own group (-1 for a query without a group).

        vectors: (B, D) queries; own: (B,) the query's own position in the memory or -1
        (never returned); times: (B,) publish times (NaN: no time filter) or None.
        workers: processes that share a long list of queries (the engine's binding
        answers one query at a time per process); each query's answer is the same
        whichever process searches it.
        """
        n = len(vectors)
        if workers <= 1 or (n < PARALLEL_FROM and self._pool is None):
            return self._search(vectors, limit, own, times, groups)
        parts = np.array_split(np.arange(n), max(workers, -(-n // PARALLEL_CHUNK)))
        found = self._workers(workers).map(
            _search_in_worker,
            [
                (vectors[p], limit, own[p], None if times is None else times[p], None if groups is None else groups[p])
                for p in parts
            ],
        )
        return np.concatenate(list(found), axis=0)

    def _workers(self, n: int) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_size != n:
                if self._pool is not None:
                    self._pool.shutdown()
                context = multiprocessing.get_context("spawn")  # forking a process that runs torch threads is unsafe
                self._pool = ProcessPoolExecutor(
                    n, mp_context=context, initializer=_open_in_worker, initargs=(str(self.folder),)
                )
                self._pool_size = n
                weakref.finalize(self, self._pool.shutdown)
            return self._pool

    def _search(
        self,
        vectors: np.ndarray,
        limit: int,
        own: np.ndarray,
        times: np.ndarray | None,
        groups: np.ndarray | None,
    ) -> np.ndarray:
        """`candidates`, in this process."""
        n = len(vectors)
        width = limit * (2 if groups is not None else 1)
        out = np.full((n, width), -1, np.int64)
        requests: list[tuple[int, int, qe.QueryRequest]] = []  # (query, column offset, request)
        params = qe.SearchParams(
            hnsw_ef=search_ef(limit),
            # the 8-bit copy ranks, the originals rescore the best (no-op without a copy)
            quantization=qe.QuantizationSearchParams(rescore=True, oversampling=rescore_oversampling(limit)),
        )
        for i in range(n):
            must: list = []
            if times is not None and np.isfinite(times[i]):
                must.append(qe.FieldCondition(key=TIME, range=qe.RangeFloat(lt=float(times[i]))))
            must_not = [qe.HasIdCondition({int(own[i])})] if own[i] >= 0 else None
            query = np.asarray(vectors[i], np.float32).tolist()
            requests.append((i, 0, self._request(query, limit, must, must_not, params)))
            if groups is not None and groups[i] >= 0:
                same = qe.FieldCondition(key=GROUP, match=qe.MatchValue(int(groups[i])))
                requests.append((i, limit, self._request(query, limit, [*must, same], must_not, params)))
        for lo in range(0, len(requests), QUERY_BATCH):
            part = requests[lo : lo + QUERY_BATCH]
            found = self._shard.query_batch(qe.QueryBatchRequest([r for _, _, r in part]))
            for (i, offset, _), hits in zip(part, found, strict=True):
                ids = [int(p.id) for p in hits][:limit]
                out[i, offset : offset + len(ids)] = ids
        return out

    @staticmethod
    def _request(
        query: list[float], limit: int, must: list, must_not: list | None, params: qe.SearchParams
    ) -> qe.QueryRequest:
        return qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(query, using=VECTOR),
            filter=qe.Filter(must=must or None, must_not=must_not) if must or must_not else None,
            with_payload=False,
            with_vector=False,
            params=params,
        )

    def close(self) -> None:
        """Stop the worker processes and unload the graph (a later search loads it again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
            release_freed_memory()


# The index a worker process opened (see `AnnIndex.candidates`).
_WORKER_INDEX: AnnIndex | None = None


def _open_in_worker(folder: str) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = AnnIndex.open(Path(folder))
    if _WORKER_INDEX is None:
        raise RuntimeError(f"a worker cannot open the neighbour index {folder}")


def _search_in_worker(task: tuple) -> np.ndarray:
    assert _WORKER_INDEX is not None
    return _WORKER_INDEX._search(*task)
