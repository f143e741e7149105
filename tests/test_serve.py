"""`mvpp serve`: every endpoint through the framework's test client, the same numbers as
`mvpp score`, safety (keys, sizes, types, bad input), batching, and the page in a real
browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from conftest import write_clip
from fastapi.testclient import TestClient
from posts import build_args, write_posts
from typer.testing import CliRunner

from mvpp.cli import serve as serve_cli
from mvpp.cli.bank import app as bank_app
from mvpp.cli.main import app as main_app
from mvpp.serve.app import AppSettings, create_app
from mvpp.serve.batching import DEFAULT_WINDOW_S
from mvpp.serve.service import DEFAULT_DECODE_SECONDS, ScoreRequest, ScoringService, ServiceSettings

runner = CliRunner()
pytestmark = pytest.mark.slow  # builds a bank and trains a small run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    table = write_posts(root, videos=True)
    result = runner.invoke(bank_app, build_args(table, ["--bank", str(root / "bank")]))
    assert result.exit_code == 0, result.output
    result = runner.invoke(main_app, ["train", "--bank", str(root / "bank"), "--k", "5", "--epochs", "3",
                                      "--set", "model.d_model=16", "--neighbour-group", "creator",
                                      "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root


class _Shared:
    """The module's one service, lent to each app: an app closes what it loaded when it
    stops, and the next test's app needs it open."""

    def __init__(self, service: ScoringService) -> None:
        self._service = service

    def __getattr__(self, name: str):
        return getattr(self._service, name)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def service(trained):
    svc = ScoringService(ServiceSettings(run=trained / "run"))
    yield _Shared(svc)
    svc.close()


def _client(service, **settings) -> TestClient:
    return TestClient(create_app(lambda: service, AppSettings(**settings)))


def _ready(client: TestClient) -> TestClient:
    for _ in range(200):
        if client.get("/healthz").status_code == 200:
            return client
        time.sleep(0.02)
    raise AssertionError("the service did not become ready")


ITEMS = [
    {"vid": "n1", "caption": "cat clip fun day 3", "posted": "2025-04-20 10:00:00", "creator": "c3"},
    {"vid": "n2", "caption": "news clip top day 1", "followers": "900"},
    {"vid": "n3"},  # nothing to score: fails alone
    {"vid": "n4", "creator": "c1", "posted": "2025-04-21 10:00:00"},  # metadata only
]


def test_health_is_ready_only_once_loaded(service):
    gate = threading.Event()

    def load():
        gate.wait(10)
        return service

    with TestClient(create_app(load)) as client:
        assert client.get("/healthz").json() == {"status": "loading"}
        assert client.get("/healthz").status_code == 503
        assert client.post("/v1/score", json={"items": ITEMS}).status_code == 503
        gate.set()
        assert _ready(client).get("/healthz").json() == {"status": "ok"}


def test_score_returns_what_mvpp_score_returns(trained, service, tmp_path):
    with _client(service) as client:
        response = _ready(client).post("/v1/score", json={"items": ITEMS})
    assert response.status_code == 200, response.text
    got = response.json()["items"]
    assert [g["id"] for g in got] == ["n1", "n2", "n3", "n4"]
    assert got[2]["status"] == "failed: no text, no video and no metadata" and got[2]["predictions"] == {}
    assert all(g["status"].startswith("ok") for i, g in enumerate(got) if i != 2)
    table = tmp_path / "new.jsonl"
    table.write_text("\n".join(json.dumps(i) for i in ITEMS))
    out = tmp_path / "s.parquet"
    result = runner.invoke(main_app, ["score", "--meta", str(table), "--run", str(trained / "run"), "--out", str(out)])
    assert result.exit_code == 1  # n3
    cli = {r["item_id"]: r for r in pq.read_table(out).to_pylist()}
    for g in got:
        if not g["status"].startswith("ok"):
            continue
        row = cli[g["id"]]
        for target, p in g["predictions"].items():
            for key in ("pred", "lower", "upper", "count"):
                assert p[key] == pytest.approx(row[f"{target}_{key}"], rel=1e-6, abs=1e-6)
        assert g["neighbours"][0]["id"] == row["neighbour_1"]
        assert g["neighbours"][0]["title"] and isinstance(g["neighbours"][0]["labels"], dict)


def test_info_neighbours_and_docs(trained, service):
    with _client(service) as client:
        info = _ready(client).get("/v1/info").json()
        assert info["targets"] == ["likes", "views"] and info["memory"] == "all"
        assert info["columns"]["id"] == "vid" and info["columns"]["text"] == ["caption"]
        assert info["encoders"]["text_precision"] == "float32"
        got = client.get("/v1/neighbours", params={"text": "cat clip fun day 3", "k": 4}).json()["neighbours"]
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/v1/score", "/v1/neighbours", "/v1/info", "/healthz"} <= set(schema["paths"])
    result = runner.invoke(bank_app, ["query", "--title", "cat clip fun day 3", "-k", "4", "--json",
                                      "--bank", str(trained / "bank")])
    want = json.loads(result.stdout)
    assert [n["id"] for n in got] == [w["item_id"] for w in want]
    assert [n["score"] for n in got] == pytest.approx([w["score"] for w in want], abs=1e-6)


def test_api_key_guards_the_api_but_not_health_or_page(service):
    with _client(service, api_key="s3cret") as client:
        _ready(client)
        assert client.get("/").status_code == 200 and "How popular" in client.get("/").text
        assert client.get("/v1/info").status_code == 401
        assert client.post("/v1/score", json={"items": ITEMS}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/v1/info", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_uploads(service, tmp_path):
    clip = write_clip(tmp_path / "mine.mp4", seed=4)
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00 ftypisom" + b"garbage" * 100)
    before = set(Path(tempfile.gettempdir()).glob("mvpp-upload-*"))
    with _client(service, max_upload_bytes=200_000) as client:
        _ready(client)
        ok = client.post("/v1/score", files={"video": ("mine.mp4", clip.read_bytes(), "video/mp4")},
                         data={"item": json.dumps({"caption": "cat clip wow"})})
        assert ok.status_code == 200, ok.text
        (item,) = ok.json()["items"]
        assert item["id"] == "mine" and item["status"].startswith("ok")
        bad = client.post("/v1/score", files={"video": ("b.mp4", corrupt.read_bytes(), "video/mp4")})
        assert bad.status_code == 200 and bad.json()["items"][0]["status"].startswith("failed: ")
        nb = client.post("/v1/neighbours", files={"video": ("b.mp4", corrupt.read_bytes(), "video/mp4")})
        assert nb.status_code == 422 and nb.json()["field"] == "video"
        nb = client.post("/v1/neighbours", files={"video": ("m.mp4", clip.read_bytes(), "video/mp4")}, data={"k": "3"})
        assert nb.status_code == 200 and len(nb.json()["neighbours"]) == 3
        wrong = client.post("/v1/score", files={"video": ("x.txt", b"hello", "text/plain")})
        assert wrong.status_code == 415 and wrong.json()["field"] == "video"
        big = client.post("/v1/score", files={"video": ("big.mp4", b"0" * 300_000, "video/mp4")})
        assert big.status_code == 413 and "larger than the limit" in big.json()["error"]
        item_json = client.post("/v1/score", files={"video": ("m.mp4", clip.read_bytes(), "video/mp4")},
                                data={"item": "{not json"})
        assert item_json.status_code == 422 and item_json.json()["field"] == "item"
    assert set(Path(tempfile.gettempdir()).glob("mvpp-upload-*")) == before  # every upload removed


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (None, 400, "body"),
        ({}, 422, "items"),
        ({"items": []}, 422, "items"),
        ({"items": [{"vid": "a", "nonsense": 1}]}, 422, "items.0.nonsense"),
        ({"items": [{"vid": "a"}], "extra": 1}, 422, "extra"),
        ({"items": [{"vid": {"nested": 1}}]}, 422, "items.0.vid"),
    ],
)
def test_bad_requests_name_their_field(service, body, status, field):
    with _client(service) as client:
        _ready(client)
        if body is None:
            response = client.post("/v1/score", content=b"{oops", headers={"content-type": "application/json"})
        else:
            response = client.post("/v1/score", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"].startswith(field) and "Traceback" not in response.text


def test_requests_arriving_together_are_scored_together(service):
    app = create_app(lambda: service, AppSettings(batch_window_s=0.05))

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            for _ in range(200):
                if (await client.get("/healthz")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            requests = [client.post("/v1/score", json={"items": [{"vid": "same", "caption": f"cat clip {i}"}]})
                        for i in range(12)]
            return await asyncio.gather(*requests)

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    # the same id in twelve requests: each is its own table, none is a duplicate
    assert all(r.json()["items"][0]["status"].startswith("ok") for r in responses)
    preds = {r.json()["items"][0]["predictions"]["views"]["pred"] for r in responses}
    assert len(preds) > 1  # different captions, different predictions, nothing mixed up


def test_cli_defaults_agree_with_the_service():
    assert serve_cli.DEFAULT_WINDOW_MS == DEFAULT_WINDOW_S * 1000
    assert serve_cli.DEFAULT_DECODE_SECONDS == DEFAULT_DECODE_SECONDS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_a_real_browser(trained, service, tmp_path):
    """Headless Chromium loads the page, a title is submitted, and the prediction with its
    interval and the neighbours appear; a screenshot is kept beside the test's files."""
    import uvicorn

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/?title=cat+clip+fun+day+3&submit=1"
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=900,1200"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "page.png"
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.should_exit = True
        thread.join(10)
    assert 'data-state="done"' in dom, dom[-2000:]
    assert 'data-target="views"' in dom and 'class="interval"' in dom
    assert dom.count("<tr>") >= 4  # the header and neighbours
    assert shot.exists() and shot.stat().st_size > 5000


def test_requests_queued_during_a_call_are_the_next_batch_without_waiting():
    """The window is for company that may still come; requests that queued while the last
    call ran are scored together as soon as it ends."""
    from mvpp.serve.batching import MicroBatcher

    window = 2.0
    calls: list[list[int]] = []

    def score(requests: list[int]) -> list[int]:
        calls.append(list(requests))
        time.sleep(0.3)
        return [r * 10 for r in requests]

    async def scenario() -> tuple[list[int], float]:
        batcher = MicroBatcher(score, size=lambda r: 1, window_s=window)
        t0 = time.perf_counter()
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(window + 0.1)  # the first call is running now
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        results = await asyncio.gather(first, *rest)
        elapsed = time.perf_counter() - t0
        await batcher.close()
        return results, elapsed

    results, elapsed = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40, 50]
    assert calls == [[0], [1, 2, 3, 4, 5]]
    assert elapsed < 2 * window  # the second batch did not wait a window of its own


def test_calls_run_side_by_side_up_to_the_workers():
    """With two workers a second batch is scored while the first still runs (each waits
    at a barrier the other must reach); with one, calls never overlap."""
    from mvpp.serve.batching import MicroBatcher

    def scenario(workers: int) -> tuple[list[int], int]:
        barrier = threading.Barrier(2, timeout=1.0)
        running, most = 0, 0
        lock = threading.Lock()

        def score(requests: list[int]) -> list[int]:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            with contextlib.suppress(threading.BrokenBarrierError):  # alone: no partner comes
                barrier.wait()
            with lock:
                running -= 1
            return [r + 1 for r in requests]

        async def run() -> list[int]:
            batcher = MicroBatcher(score, size=lambda r: 1, window_s=0.0, max_items=1, workers=workers)
            results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
            await batcher.close()
            return list(results)

        return asyncio.run(run()), most

    assert scenario(2) == ([1, 2, 3, 4], 2)
    assert scenario(1) == ([1, 2, 3, 4], 1)
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(lambda r: r, size=len, workers=0)


def test_calls_in_several_threads_score_as_one_at_a_time(service):
    """Scoring calls share the encoders, the search and the bank table's projection of
    the neighbours: run side by side they give what they give one after another."""
    requests = [
        ScoreRequest([{"vid": f"t{i}-{j}", "caption": f"{word} clip day {i + j}", "creator": f"c{j % 3}"}
                      for j in range(3)])
        for i, word in enumerate(["cat", "news", "dog", "food", "travel", "music", "cat", "game"])
    ]
    alone = [service.score_many([req])[0] for req in requests]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda req: service.score_many([req])[0], requests))
            assert together == alone
    assert all(item["status"].startswith("ok") for result in alone for item in result)
