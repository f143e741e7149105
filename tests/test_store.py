"""Storage backends: the same behaviour on the embedded engine and on qdrant-client local mode."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mvpp.memory_bank.schema import (
    FRAMES,
    RETRIEVAL,
    TEXT,
    BankMismatchError,
    BankPoint,
    Manifest,
    SearchFilter,
)
from mvpp.memory_bank.store import (
    BankBusyError,
    BankNotInitialisedError,
    BankStore,
    EdgeBankStore,
    NotABankError,
    ServerBankStore,
    open_store,
)

REPO = Path(__file__).resolve().parents[1]
N, DIM, FRAME_DIM, TOKEN_DIM, N_FRAMES, MAX_TOKENS = 200, 16, 8, 8, 4, 5
F16_ATOL = 2e-3  # float16 keeps ~3 decimal digits on unit-norm rows
SPLITS = ("train", "val", "test")

MakeStore = Callable[..., BankStore]


def manifest(**overrides: object) -> Manifest:
    base: dict[str, object] = dict(
        profile="test",
        text_model="text-x",
        captioner_model=None,
        frame_model="frame-x",
        retrieval_dim=DIM,
        token_dim=TOKEN_DIM,
        frame_dim=FRAME_DIM,
        n_frames=N_FRAMES,
        max_tokens=MAX_TOKENS,
        label_names=["views"],
    )
    base.update(overrides)
    return Manifest(**base)  # type: ignore[arg-type]


def same_payload(a: object, b: object) -> bool:
    """Equal payloads, floats to 1e-12: the embedded engine may move a float by one ulp
    (its JSON layer does not always round-trip the last bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_payload(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_payload(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12)
    return type(a) is type(b) and a == b


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_points(n: int = N, seed: int = 0) -> list[BankPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for i in range(n):
        has_video = i % 4 != 0
        has_text = i % 5 != 0
        labelled = i % 3 != 0
        has_retrieval = i % 11 != 5  # items found only by their frames / tokens
        points.append(
            BankPoint(
                item_id=f"item-{i}",
                retrieval=unit_rows(rng.standard_normal(DIM)).astype(np.float32)
                if has_retrieval
                else None,
                frames=rng.standard_normal((N_FRAMES, FRAME_DIM)).astype(np.float32)
                if has_video
                else None,
                tokens=rng.standard_normal((1 + i % MAX_TOKENS, TOKEN_DIM)).astype(np.float32)
                if has_text
                else None,
                title=f"title {i}" if has_text else "",
                captions=[f"caption {i}"] if has_video else [],
                labels={"views": float(10 * i)} if labelled else {},
                targets={"views": float(np.log2(1 + 10 * i))} if labelled else {},
                published_at=None,
                published_ts=float(1_600_000_000 + 1000 * i) if i % 7 != 0 else None,
                metadata={"followers": i, "tags": ["a", "b"], "nested": {"x": 1.5}},
                content_hash=f"hash-{i}",
                duration_s=float(i % 30) + 0.5,
                video=f"v{i}.mp4" if has_video else None,
            )
        )
    return points


def open_backend(backend: str, folder: Path) -> BankStore:
    if backend == "edge":
        return EdgeBankStore(folder)
    return ServerBankStore(path=str(folder), collection="bank")


@pytest.fixture(scope="module", params=["edge", "server"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path) -> Iterator[MakeStore]:
    """Opens (and finally closes) stores of the backend under test, all on one location."""
    opened: list[BankStore] = []

    def make() -> BankStore:
        store = open_backend(backend, tmp_path / "bank")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture(scope="module")
def points() -> list[BankPoint]:
    return make_points()


@pytest.fixture(scope="module")
def bank(
    backend: str, tmp_path_factory: pytest.TempPathFactory, points: list[BankPoint]
) -> Iterator[BankStore]:
    """A filled bank shared by the tests that only read it."""
    store = open_backend(backend, tmp_path_factory.mktemp(backend) / "bank")
    store.init(manifest())
    store.upsert(points)
    yield store
    store.close()


@pytest.fixture
def fresh_bank(make_store: MakeStore, points: list[BankPoint]) -> BankStore:
    store = make_store()
    store.init(manifest())
    store.upsert(points)
    return store


def matching(points: list[BankPoint], flt: SearchFilter, with_retrieval: bool = False) -> set[str]:
    """The item ids a filter must keep, computed in Python."""
    out = set()
    for p in points:
        if with_retrieval and p.retrieval is None:
            continue
        if p.item_id in flt.exclude_ids:
            continue
        if flt.labelled_only and not p.labelled:
            continue
        if flt.published_before is not None and (
            p.published_ts is None or not p.published_ts < flt.published_before
        ):
            continue
        if flt.has_video is not None and p.has_video != flt.has_video:
            continue
        out.add(p.item_id)
    return out


CUTOFF = 1_600_000_000 + 1000 * 120.0
FILTERS = {
    "exclude_ids": SearchFilter(exclude_ids=["item-0", "item-1", "item-57"]),
    "labelled_only": SearchFilter(labelled_only=True),
    "published_before": SearchFilter(published_before=CUTOFF),
    "has_video": SearchFilter(has_video=True),
    "no_video": SearchFilter(has_video=False),
    "combined": SearchFilter(
        exclude_ids=["item-4"], labelled_only=True, has_video=True, published_before=CUTOFF
    ),
}


# -- manifest ---------------------------------------------------------------------------


def test_new_bank_then_reopen_keeps_manifest(make_store: MakeStore) -> None:
    store = make_store()
    assert store.manifest is None
    assert store.count() == 0
    assert store.search(np.ones(DIM, np.float32), 5) == []
    assert list(store.scroll()) == []
    assert store.get(["x"]) == [None]
    with pytest.raises(BankNotInitialisedError):
        store.upsert(make_points(1))

    store.init(manifest())
    assert store.manifest == manifest()
    store.upsert(make_points(3))
    store.close()

    reopened = make_store()
    assert reopened.manifest == manifest()
    assert reopened.count() == 3
    # new label names are merged in (order kept) and persisted
    reopened.init(manifest(label_names=["likes", "views"], profile="other"))
    assert reopened.manifest is not None
    assert reopened.manifest.label_names == ["views", "likes"]
    assert reopened.manifest.profile == "test"  # the stored manifest wins
    reopened.close()
    assert make_store().manifest.label_names == ["views", "likes"]  # type: ignore[union-attr]


def test_mismatched_manifest_names_both_values(make_store: MakeStore) -> None:
    store = make_store()
    store.init(manifest())
    with pytest.raises(BankMismatchError) as err:
        store.init(manifest(retrieval_dim=32, frame_model="other-frames"))
    message = str(err.value)
    for part in ("retrieval_dim", "16", "32", "frame-x", "other-frames"):
        assert part in message
    assert store.manifest == manifest()


# -- writes and reads -------------------------------------------------------------------


def test_upsert_get_round_trip(bank: BankStore, points: list[BankPoint]) -> None:
    assert bank.count() == N
    ids = [p.item_id for p in points[:20]] + ["missing"]
    got = bank.get(ids, vectors=(RETRIEVAL, FRAMES, TEXT))
    assert got[-1] is None
    for p, g in zip(points[:20], got[:-1], strict=True):
        assert g is not None
        assert same_payload(g.payload(), p.payload())
        if p.retrieval is None:
            assert g.retrieval is None
        else:
            assert g.retrieval is not None and g.retrieval.dtype == np.float32
            np.testing.assert_allclose(g.retrieval, p.retrieval, atol=1e-6)
        for mine, stored in ((p.frames, g.frames), (p.tokens, g.tokens)):
            if mine is None:
                assert stored is None
            else:
                assert stored is not None and stored.dtype == np.float32
                assert stored.shape == mine.shape
                # cosine storage: rows come back unit-normalised, float16-rounded
                np.testing.assert_allclose(stored, unit_rows(mine), atol=F16_ATOL)
    assert got[0] is not None and got[0].frames is None  # item-0 has no video
    # a field without a value is not stored, and reads back as the record's default
    bare = BankPoint(item_id="bare", retrieval=None, title="t")
    assert set(bare.payload()) == {"item_id", "title", "labels", "targets", "labelled", "has_video", "has_audio",
                                   "metadata", "content_hash", "encoding_key"}
    assert BankPoint.from_payload(bare.payload(), None) == bare
    # only the requested vectors come back
    (only_payload,) = bank.get([points[1].item_id], vectors=())
    assert only_payload is not None and only_payload.frames is None
    assert only_payload.retrieval is None and only_payload.title == points[1].title


def test_reupsert_replaces(fresh_bank: BankStore, points: list[BankPoint]) -> None:
    bank = fresh_bank
    p = points[5]
    assert p.frames is not None
    changed = BankPoint(
        item_id=p.item_id,
        retrieval=points[6].retrieval,
        frames=None,
        tokens=p.tokens,
        title="new title",
        content_hash="new-hash",
    )
    bank.upsert([changed])
    assert bank.count() == N
    (g,) = bank.get([p.item_id], vectors=(RETRIEVAL, FRAMES))
    assert g is not None and g.title == "new title" and g.frames is None and not g.labelled
    np.testing.assert_allclose(g.retrieval, points[6].retrieval, atol=1e-6)
    assert bank.hashes([p.item_id]) == {p.item_id: "new-hash"}


def test_hashes(bank: BankStore, points: list[BankPoint]) -> None:
    ids = [p.item_id for p in points[::7]] + ["nope-1", "nope-2"]
    assert bank.hashes(ids) == {p.item_id: p.content_hash for p in points[::7]}
    assert bank.hashes([]) == {}


def test_content_hashes_are_the_scrolled_points(fresh_bank: BankStore, points: list[BankPoint]) -> None:
    """What the bank's fingerprint reads: every point's id and content hash (empty when the
    point has none), as whole points would give them."""
    no_hash = dataclasses.replace(points[3], content_hash="")
    fresh_bank.upsert([no_hash])
    pairs = list(fresh_bank.content_hashes())
    assert pairs == [(q.item_id, q.content_hash) for q in fresh_bank.scroll(vectors=())]
    assert len(pairs) == len(points) and dict(pairs)[no_hash.item_id] == ""
    assert sorted(pairs) == sorted((q.item_id, q.content_hash) for q in [no_hash, *points[:3], *points[4:]])


@pytest.mark.parametrize("name", list(FILTERS))
def test_count_with_filters(bank: BankStore, points: list[BankPoint], name: str) -> None:
    flt = FILTERS[name]
    assert bank.count(flt) == len(matching(points, flt))


def test_scroll_returns_everything_with_vectors(bank: BankStore, points: list[BankPoint]) -> None:
    by_id = {p.item_id: p for p in points}
    seen = list(bank.scroll(vectors=(RETRIEVAL, FRAMES, TEXT), batch_size=37))
    assert sorted(p.item_id for p in seen) == sorted(by_id)
    for s in seen:
        p = by_id[s.item_id]
        assert (s.retrieval is None) == (p.retrieval is None)
        if p.retrieval is not None:
            np.testing.assert_allclose(s.retrieval, p.retrieval, atol=1e-6)
        assert (s.frames is None) == (p.frames is None)
        assert (s.tokens is None) == (p.tokens is None)
        if p.tokens is not None and s.tokens is not None:
            np.testing.assert_allclose(s.tokens, unit_rows(p.tokens), atol=F16_ATOL)
        assert same_payload(s.payload(), p.payload())
    flt = FILTERS["combined"]
    scrolled = {p.item_id for p in bank.scroll(vectors=(), flt=flt, batch_size=10)}
    assert scrolled == matching(points, flt)


# -- search -----------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True])
def test_search_finds_itself(bank: BankStore, points: list[BankPoint], exact: bool) -> None:
    for p in points[::25]:
        hits = bank.search(p.retrieval, 5, exact=exact)
        assert len(hits) == 5
        assert hits[0].item_id == p.item_id
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert same_payload(hits[0].payload, p.payload())
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@pytest.mark.parametrize("name", list(FILTERS))
def test_search_filters(bank: BankStore, points: list[BankPoint], name: str) -> None:
    flt = FILTERS[name]
    expected = matching(points, flt, with_retrieval=True)
    query = points[1].retrieval
    # k above the bank size: the hits are exactly the points the filter keeps
    hits = bank.search(query, N + 10, flt=flt, exact=True)
    assert {h.item_id for h in hits} == expected
    # and a small k returns the best of them
    top = bank.search(query, 5, flt=flt)
    scores = {p.item_id: float(p.retrieval @ query) for p in points if p.retrieval is not None}
    best = sorted(expected, key=lambda i: -scores[i])[:5]
    assert [h.item_id for h in top] == best


@pytest.mark.parametrize("using", [FRAMES, TEXT])
def test_multivector_search_finds_itself(
    bank: BankStore, points: list[BankPoint], using: str
) -> None:
    for p in points[1:60:7]:
        rows = p.frames if using == FRAMES else p.tokens
        if rows is None:
            continue
        hits = bank.search(rows, 3, using=using, exact=True)
        assert hits[0].item_id == p.item_id
        assert hits[0].score == pytest.approx(1.0, abs=F16_ATOL)
        # all-zero padding rows do not dilute the score
        padded = np.vstack([rows, np.zeros((3, rows.shape[1]), np.float32)])
        again = bank.search(padded, 3, using=using)
        assert again[0].item_id == p.item_id
        assert again[0].score == pytest.approx(1.0, abs=F16_ATOL)
    # points without such a vector are never returned
    hits = bank.search(np.ones((2, FRAME_DIM), np.float32), N, using=using, exact=True)
    with_vec = {
        p.item_id for p in points if (p.frames if using == FRAMES else p.tokens) is not None
    }
    assert {h.item_id for h in hits} == with_vec


def test_search_batch_equals_single_searches(bank: BankStore, points: list[BankPoint]) -> None:
    queries = [p.retrieval for p in points[:14] if p.retrieval is not None]
    flts = [None, *[FILTERS[n] for n in FILTERS], SearchFilter(exclude_ids=["item-8"])]
    flts = (flts * 2)[: len(queries)]
    batched = bank.search_batch(queries, 7, flts=flts)
    single = [bank.search(q, 7, flt=f) for q, f in zip(queries, flts, strict=True)]
    assert [[h.item_id for h in r] for r in batched] == [[h.item_id for h in r] for r in single]
    for rb, rs in zip(batched, single, strict=True):
        np.testing.assert_allclose([h.score for h in rb], [h.score for h in rs], atol=1e-6)
    frame_queries = [p.frames for p in points[1:4] if p.frames is not None]
    frame_hits = bank.search_batch(frame_queries, 2, using=FRAMES)
    assert [r[0].item_id for r in frame_hits] == [p.item_id for p in points[1:4]]
    assert bank.search_batch([], 3) == []
    with pytest.raises(ValueError):
        bank.search_batch(queries[:2], 3, flts=[None])


def test_bad_shapes_are_clear_errors(bank: BankStore) -> None:
    with pytest.raises(ValueError, match="retrieval"):
        bank.search(np.ones(DIM + 1, np.float32), 3)
    with pytest.raises(ValueError, match="frames"):
        bank.search(np.ones((2, FRAME_DIM + 1), np.float32), 3, using=FRAMES)
    bad = make_points(1)[0]
    bad.frames = np.ones((2, FRAME_DIM + 1), np.float32)
    with pytest.raises(ValueError, match="frames"):
        bank.upsert([bad])


def test_size_and_context_manager(make_store: MakeStore) -> None:
    with make_store() as store:
        store.init(manifest())
        store.upsert(make_points(10))
        store.flush()
        size = store.size_bytes()
        if store.backend == "embedded":
            assert size is not None and size > 0
        else:
            assert size is None
    with pytest.raises(RuntimeError, match="closed"):
        store.count()


# -- embedded backend -------------------------------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_edge_upsert_survives_kill(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    result = _run_python(
        f"""
        import os
        from tests.test_store import make_points, manifest
        from mvpp.memory_bank.store import EdgeBankStore
        store = EdgeBankStore({str(path)!r})
        store.init(manifest())
        store.upsert(make_points())
        os._exit(9)  # no flush, no close
        """
    )
    assert result.returncode == 9, result.stderr
    with EdgeBankStore(path) as store:
        assert store.count() == N
        points = make_points()
        got = store.get([p.item_id for p in points], vectors=(RETRIEVAL, FRAMES))
        assert all(
            g is not None and same_payload(g.payload(), p.payload())
            for p, g in zip(points, got, strict=True)
        )
        assert store.search(points[3].retrieval, 1)[0].item_id == points[3].item_id


def test_edge_open_twice_shares_the_shard(tmp_path: Path) -> None:
    first = EdgeBankStore(tmp_path / "bank")
    second = EdgeBankStore(tmp_path / "bank")  # before the bank exists
    first.init(manifest())
    second.init(manifest(label_names=["likes"]))  # joins the shard `first` created
    first.upsert(make_points(5))
    assert second.count() == 5
    assert first.manifest is not None and first.manifest.label_names == ["views", "likes"]
    third = EdgeBankStore(tmp_path / "bank")
    first.close()
    assert second.count() == 5 and third.count() == 5
    second.close()
    third.close()
    with EdgeBankStore(tmp_path / "bank") as again:
        assert again.count() == 5


def test_edge_bank_open_in_another_process_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    with EdgeBankStore(path) as store:
        store.init(manifest())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from mvpp.memory_bank.store import EdgeBankStore; "
            f"s = EdgeBankStore({str(path)!r}); print('ready', flush=True); sys.stdin.read()",
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with pytest.raises(BankBusyError, match="another process"):
            EdgeBankStore(path)
    finally:
        child.communicate("", timeout=60)


def test_edge_folder_that_is_not_a_bank(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(NotABankError, match="not an mvpp bank"):
        EdgeBankStore(tmp_path / "stuff")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotABankError):
        EdgeBankStore(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with EdgeBankStore(tmp_path / "empty") as store:  # an empty folder is a new bank
        store.init(manifest())
        assert (tmp_path / "empty" / "manifest.json").is_file()


# -- server backend ---------------------------------------------------------------------


def test_server_unreachable_names_the_url() -> None:
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        ServerBankStore(url="http://127.0.0.1:9", timeout=2)


def test_server_collection_that_is_not_a_bank(tmp_path: Path) -> None:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(tmp_path / "q"))
    client.create_collection(
        "other", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT)
    )
    client.close()
    with pytest.raises(NotABankError, match="other"):
        ServerBankStore(path=str(tmp_path / "q"), collection="other")


def test_open_store_chooses_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(tmp_path / "b") as store:
        assert isinstance(store, EdgeBankStore) and store.backend == "embedded"
        assert store.location == str((tmp_path / "b").resolve())
    monkeypatch.chdir(tmp_path)
    with open_store() as store:
        assert isinstance(store, EdgeBankStore)
        assert Path(store.location) == (tmp_path / "mvpp-bank").resolve()
    # a URL wins over a path, and is dialled at once
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        open_store(tmp_path / "b", qdrant_url="http://127.0.0.1:9")


class _FakeQdrant(BaseHTTPRequestHandler):
    """Answers like a Qdrant server of version `version`, or refuses every request."""

    version = "1.12.0"
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.status != 200:
            body: dict[str, object] = {"status": {"error": "Must provide an API key"}}
        elif self.path == "/":
            body = {"title": "qdrant - vector search engine", "version": self.version}
        else:
            body = {"result": {"exists": False}, "status": "ok", "time": 0.0}
        data = json.dumps(body).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[Callable[..., str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(**attrs: object) -> str:
        handler = type("Handler", (_FakeQdrant,), attrs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_server_too_old_or_refusing_is_a_clear_error(fake_server: Callable[..., str]) -> None:
    with pytest.raises(RuntimeError, match="1.12.0.*1.16"):
        ServerBankStore(url=fake_server(version="1.12.0"))
    with pytest.raises(PermissionError, match="API key"):
        ServerBankStore(url=fake_server(status=403))
    with ServerBankStore(url=fake_server(version="1.17.1")) as store:  # reachable, no bank yet
        assert store.manifest is None and store.backend == "server"


def test_graph_searches_keep_at_least_k_candidates():
    from mvpp.memory_bank.store.base import SEARCH_EF, search_ef

    assert search_ef(10) == SEARCH_EF  # filtered searches need more candidates than k
    assert search_ef(SEARCH_EF + 500) == SEARCH_EF + 500  # and never fewer than k


def test_an_embedded_bank_searches_an_8_bit_copy_and_rescores(tmp_path):
    """The retrieval vectors get an int8 copy for the graph; searches through it return
    the originals' cosines, as exact searches do."""
    rng = np.random.default_rng(3)
    manifest = Manifest(profile="lite", text_model="t", captioner_model=None, frame_model="f", retrieval_dim=16,
                        token_dim=8, frame_dim=4, n_frames=4, max_tokens=8)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with open_store(bank=tmp_path / "bank") as store:
        store.init(manifest)
        store.upsert([BankPoint(item_id=f"i{j:03d}", retrieval=vecs[j]) for j in range(300)])
        store.optimize()
        config = json.loads((tmp_path / "bank" / "shard" / "edge_config.json").read_text())
        assert config["vectors"]["retrieval"]["quantization_config"]["scalar"]["type"] == "int8"
        for q in vecs[:20]:
            graph = store.search(q, 10)
            exact = store.search(q, 10, exact=True)
            assert [h.item_id for h in graph] == [h.item_id for h in exact]
            np.testing.assert_allclose([h.score for h in graph], [h.score for h in exact], atol=1e-6)
            np.testing.assert_allclose([h.score for h in exact], np.sort(vecs @ q)[::-1][:10], atol=1e-5)
