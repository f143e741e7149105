"""Server backend: a collection on a Qdrant server or cluster, through qdrant-client.

`path=":memory:"` or a folder runs the same code on qdrant-client's local mode (no server):
that is how the tests cover this backend. Local mode searches are always exact and it
ignores payload indexes, so neither is requested from it.

The manifest lives in the collection's metadata (key `mvpp_manifest`), created together
with the collection. Collection metadata needs Qdrant server 1.16 or newer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from mvpp.config import ClusterSettings

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

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:6333"
# Collection metadata (where the manifest lives) arrived in Qdrant 1.16.
MIN_SERVER_VERSION = (1, 16)
MANIFEST_KEY = "mvpp_manifest"
RETRIEVE_BATCH = 1024

_SCHEMA_TYPES = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
    "datetime": models.PayloadSchemaType.DATETIME,
    "uuid": models.PayloadSchemaType.UUID,
    "text": models.PayloadSchemaType.TEXT,
}


_DISTANCES = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT}
_DATATYPES = {"float16": models.Datatype.FLOAT16, "uint8": models.Datatype.UINT8}


def vectors_config(manifest: Manifest) -> dict[str, models.VectorParams]:
    multi = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    # m=0: no HNSW graph over frame / token rows; multivector searches are exact scans
    no_graph = models.HnswConfigDiff(m=0)
    dims = vector_dims(manifest)
    int8 = models.ScalarQuantization(
        scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=RETRIEVAL_INT8_QUANTILE, always_ram=True
        )
    )
    vectors = {
        RETRIEVAL: models.VectorParams(
            size=dims[RETRIEVAL], distance=models.Distance.COSINE, quantization_config=int8,
            hnsw_config=models.HnswConfigDiff(m=RETRIEVAL_GRAPH_M, ef_construct=RETRIEVAL_EF_CONSTRUCT,
                                              full_scan_threshold=FULL_SCAN_THRESHOLD_KB),
        ),
    }
    for name in bank_vectors(MULTIVECTOR_NAMES, manifest):
        distance, datatype = multivector_storage(name, manifest)
        vectors[name] = models.VectorParams(
            size=dims[name],
            distance=_DISTANCES[distance],
            multivector_config=multi,
            datatype=_DATATYPES[datatype],
            hnsw_config=no_graph,
        )
    return vectors


def server_filter(flt: SearchFilter | None) -> models.Filter | None:
    if flt is None or flt.is_empty():
        return None
    must: list[Any] = []
    must_not: list[Any] = []
    if flt.exclude_ids:
        must_not.append(models.HasIdCondition(has_id=[point_id(i) for i in flt.exclude_ids]))
    if flt.labelled_only:
        must.append(models.FieldCondition(key="labelled", match=models.MatchValue(value=True)))
    if flt.published_before is not None:
        must.append(
            models.FieldCondition(
                key="published_ts", range=models.Range(lt=float(flt.published_before))
            )
        )
    for key in ("has_video", "has_audio"):
        value = getattr(flt, key)
        if value is not None:
            must.append(models.FieldCondition(key=key, match=models.MatchValue(value=bool(value))))
    return models.Filter(must=must or None, must_not=must_not or None)


def _local_client(path: str) -> QdrantClient:
    if path == ":memory:":
        return QdrantClient(location=":memory:")
    try:
        return QdrantClient(path=path)
    except RuntimeError as exc:
        # local mode locks its folder: one client (one process) at a time
        if "already accessed" in str(exc):
            raise BankBusyError(
                f"the local Qdrant folder {path} is open in another client or process; close it "
                "there, or share one bank through a Qdrant server (--qdrant-url)"
            ) from exc
        raise


class ServerBankStore(BankStore):
    """A bank in a collection of a Qdrant server (or of qdrant-client's local mode)."""

    backend = "server"

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        collection: str = "mvpp",
        path: str | None = None,
        timeout: int = 30,
        cluster: ClusterSettings | None = None,
    ) -> None:
        self.collection = collection
        self.cluster = cluster or ClusterSettings()
        self._local = path is not None
        if path is not None:
            self.location = f"{path}#{collection}"
            self._client = _local_client(str(path))
        else:
            url = url or DEFAULT_URL
            self.location = f"{url}#{collection}"
            # the client's own version check runs in a thread and only warns; _probe below
            # checks the version and fails clearly on an unreachable server instead
            self._client = QdrantClient(
                url=url, api_key=api_key, timeout=timeout, check_compatibility=False
            )
        self.url = url
        self._closed = False
        try:
            if not self._local:
                self._probe()
            self._manifest = self._read_manifest()
        except BaseException:
            self._client.close()
            raise

    def _probe(self) -> None:
        """Fail early and clearly: unreachable server, refused key, too old a server."""
        try:
            version = self._client.info().version
            self._client.collection_exists(self.collection)  # needs the API key, info does not
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise PermissionError(
                    f"the Qdrant server at {self.url} refused access ({exc.status_code}); "
                    "check the API key"
                ) from exc
            raise
        except Exception as exc:
            raise ConnectionError(
                f"cannot reach the Qdrant server at {self.url}: {exc}. Start one "
                "(docker compose up -d) or pass another URL."
            ) from exc
        try:
            major, minor = (int(x) for x in version.split(".")[:2])
        except ValueError:
            log.warning("Qdrant server at %s reports version %r", self.url, version)
            return
        if (major, minor) < MIN_SERVER_VERSION:
            raise RuntimeError(
                f"the Qdrant server at {self.url} runs {version}; a bank needs "
                f"{'.'.join(map(str, MIN_SERVER_VERSION))} or newer (collection metadata)"
            )

    # -- manifest -----------------------------------------------------------------------

    def _read_manifest(self) -> Manifest | None:
        if not self._client.collection_exists(self.collection):
            return None
        metadata = self._client.get_collection(self.collection).config.metadata or {}
        if MANIFEST_KEY not in metadata:
            raise NotABankError(
                f"collection {self.collection!r} at {self.location} exists but is not an mvpp "
                "bank (no manifest in its metadata); choose another collection name"
            )
        return Manifest.from_dict(metadata[MANIFEST_KEY])

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    def init(self, manifest: Manifest) -> None:
        self._check_open()
        if self._manifest is None:
            # another client may have created it since this store was opened
            self._manifest = self._read_manifest()
        if self._manifest is None:
            self._create(manifest)
            return
        merged, changed = merge_manifest(self._manifest, manifest)
        if changed:
            self._client.update_collection(
                self.collection, metadata={MANIFEST_KEY: merged.to_dict()}
            )
            self._manifest = merged
            log.info("bank %s: label names now %s", self.location, merged.label_names)

    def _create(self, manifest: Manifest) -> None:
        self._client.create_collection(
            self.collection,
            vectors_config=vectors_config(manifest),
            metadata={MANIFEST_KEY: manifest.to_dict()},
            **self.cluster.collection_params(),
        )
        if not self._local:
            for field, kind in INDEXED_FIELDS.items():
                self._client.create_payload_index(
                    self.collection, field, field_schema=_SCHEMA_TYPES[kind], wait=True
                )
        self._manifest = manifest
        log.info("created bank %s (%s)", self.location, manifest.profile)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the bank store {self.location} is closed")

    def _ready(self) -> bool:
        self._check_open()
        return self._manifest is not None

    # -- writes -------------------------------------------------------------------------

    def upsert(self, points: list[BankPoint]) -> None:
        if not self._ready() or self._manifest is None:
            raise BankNotInitialisedError(
                f"the bank {self.location} has no manifest yet: call init(manifest) first"
            )
        dims = vector_dims(self._manifest)
        for batch in chunks(points, UPSERT_BATCH):
            structs = [
                models.PointStruct(
                    id=point_id(p.item_id), vector=point_vectors(p, dims, self._manifest.token_storage),
                    payload=p.payload(),
                )
                for p in batch
            ]
            # wait=True: the server has applied it (and written its WAL) when this returns
            self._client.upsert(self.collection, points=structs, wait=True)

    # -- reads --------------------------------------------------------------------------

    def _retrieve(self, ids: list[str], payload: Any, vectors: Any) -> list[Any]:
        out: list[Any] = []
        for batch in chunks(ids, RETRIEVE_BATCH):
            out.extend(
                self._client.retrieve(
                    self.collection,
                    ids=list(dict.fromkeys(batch)),
                    with_payload=payload,
                    with_vectors=vectors,
                )
            )
        return out

    def hashes(self, item_ids: list[str]) -> dict[str, str]:
        if not self._ready() or not item_ids:
            return {}
        return dict(hash_pairs(self._retrieve([point_id(i) for i in item_ids], HASH_FIELDS, False)))

    def count(self, flt: SearchFilter | None = None) -> int:
        if not self._ready():
            return 0
        result = self._client.count(self.collection, count_filter=server_filter(flt), exact=True)
        return int(result.count)

    def content_hashes(self) -> Iterator[tuple[str, str]]:
        if not self._ready():
            return
        offset: Any = None
        while True:
            records, offset = self._client.scroll(
                self.collection, limit=SCROLL_BATCH, offset=offset, with_payload=HASH_FIELDS, with_vectors=False
            )
            yield from hash_pairs(records)
            if offset is None:
                return

    def scroll(
        self,
        vectors: tuple[str, ...] = (RETRIEVAL,),
        flt: SearchFilter | None = None,
        batch_size: int = 512,
    ) -> Iterator[BankPoint]:
        names = bank_vectors(check_vector_names(vectors), self.manifest)
        if not self._ready():
            return
        qfilter = server_filter(flt)
        storage = self._token_storage()
        offset: Any = None
        while True:
            records, offset = self._client.scroll(
                self.collection,
                scroll_filter=qfilter,
                limit=batch_size,
                offset=offset,
                with_payload=True,
                with_vectors=list(names) if names else False,
            )
            for rec in records:
                yield record_to_point(rec.payload, rec.vector, storage)
            if offset is None:
                return

    def get(
        self, item_ids: list[str], vectors: tuple[str, ...] = (RETRIEVAL,)
    ) -> list[BankPoint | None]:
        names = bank_vectors(check_vector_names(vectors), self.manifest)
        if not self._ready() or not item_ids:
            return [None] * len(item_ids)
        ids = [point_id(i) for i in item_ids]
        records = self._retrieve(ids, True, list(names) if names else False)
        storage = self._token_storage()
        by_id = {str(rec.id): record_to_point(rec.payload, rec.vector, storage) for rec in records}
        return [by_id.get(pid) for pid in ids]

    def _params(self, exact: bool, k: int) -> models.SearchParams | None:
        # local mode is always exact and warns on any search params
        if self._local:
            return None
        if exact:  # the originals, not the 8-bit copy of the retrieval vectors
            return models.SearchParams(exact=True, quantization=models.QuantizationSearchParams(ignore=True))
        rescore = models.QuantizationSearchParams(rescore=True, oversampling=rescore_oversampling(k))
        return models.SearchParams(hnsw_ef=search_ef(k), quantization=rescore)

    @staticmethod
    def _hits(points: list[models.ScoredPoint], rows: int) -> list[Hit]:
        return [
            Hit(
                item_id=str((p.payload or {}).get("item_id", p.id)),
                score=float(p.score) / rows,
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
        if not self._ready() or self._manifest is None:
            return []
        q, rows = prepare_query(query, using, vector_dims(self._manifest))
        if rows == 0 or k <= 0:
            return []
        response = self._client.query_points(
            self.collection,
            query=q,
            using=using,
            limit=int(k),
            query_filter=server_filter(flt),
            search_params=self._params(exact, k),
            with_payload=True,
        )
        return self._hits(response.points, rows)

    def search_batch(
        self,
        queries: list[np.ndarray],
        k: int,
        using: str = RETRIEVAL,
        flts: list[SearchFilter | None] | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        filters = self._check_flts(queries, flts)
        if not self._ready() or self._manifest is None:
            return [[] for _ in queries]
        dims = vector_dims(self._manifest)
        prepared = []
        for query, flt in zip(queries, filters, strict=True):
            q, rows = prepare_query(query, using, dims)
            request = None
            if rows > 0 and k > 0:
                request = models.QueryRequest(
                    query=q,
                    using=using,
                    limit=int(k),
                    filter=server_filter(flt),
                    params=self._params(exact, k),
                    with_payload=True,
                )
            prepared.append((request, rows))
        requests = [r for r, _ in prepared if r is not None]
        responses = iter(
            self._client.query_batch_points(self.collection, requests=requests) if requests else []
        )
        return [
            self._hits(next(responses).points, rows) if r is not None else []
            for r, rows in prepared
        ]

    # -- housekeeping -------------------------------------------------------------------

    def size_bytes(self) -> int | None:
        return None

    def flush(self) -> None:
        # the server persists on its own schedule (its WAL makes writes durable already);
        # local mode writes every operation through
        self._check_open()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
