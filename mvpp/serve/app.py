"""`mvpp serve`: the scoring service over HTTP (FastAPI on uvicorn).

FastAPI because it is a well-kept ASGI stack whose request models give a typed
OpenAPI schema at /docs and 4xx errors that name the offending field, with a test
client that needs no server. Encoding and the model run in a worker thread; requests
that arrive together are scored together (serve.batching).

Endpoints: POST /v1/score (JSON items, or a multipart clip upload), GET and POST
/v1/neighbours, GET /v1/info, GET /healthz, and the page at /.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mvpp.serve import DEFAULT_MAX_UPLOAD_MB
from mvpp.serve.batching import DEFAULT_MAX_ITEMS, DEFAULT_WINDOW_S, MicroBatcher
from mvpp.serve.service import ScoreRequest, ScoringService

logger = logging.getLogger(__name__)

# Items per JSON request (larger batches belong to `mvpp score`).
MAX_ITEMS_PER_REQUEST = 1000
UPLOAD_CHUNK = 1 << 20
# Room for a request's form fields beside its clip.
FIELDS_ALLOWANCE = 1 << 20
VIDEO_FIELD = "video"
ITEM_FIELD = "item"


@dataclass
class AppSettings:
    api_key: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    batch_window_s: float = DEFAULT_WINDOW_S
    batch_max_items: int = DEFAULT_MAX_ITEMS


class ApiError(Exception):
    """A 4xx answer: `status`, a message, and the request field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


# -- request and response models (the OpenAPI schema) ---------------------------------

Value = str | int | float | bool | None


class ScoreBody(BaseModel):
    """Items to score: each a dict of the run's columns (`GET /v1/info` lists them), as
    `mvpp score --meta` reads a table's rows."""

    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Value]] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class Neighbour(BaseModel):
    id: str
    score: float
    title: str | None = None
    labels: dict[str, float] | None = None


class TargetPrediction(BaseModel):
    pred: float
    lower: float
    upper: float
    count: float


class ScoredItem(BaseModel):
    id: str
    status: str
    predictions: dict[str, TargetPrediction]
    neighbours: list[Neighbour]


class ScoreResponse(BaseModel):
    items: list[ScoredItem]


class NeighboursResponse(BaseModel):
    neighbours: list[Neighbour]


# -- the app -----------------------------------------------------------------------------


def create_app(load: Callable[[], ScoringService], settings: AppSettings | None = None) -> FastAPI:
    """The app; `load` makes the service, in a background thread after startup, so
    /healthz can answer "loading" until it is ready."""
    settings = settings or AppSettings()
    state: dict[str, Any] = {"service": None, "error": None, "batcher": None}

    def loader() -> None:
        try:
            service = load()
        except Exception as exc:  # reported by /healthz; the process keeps answering
            logger.exception("the service could not load")
            state["error"] = f"{type(exc).__name__}: {exc}"
            return
        state["service"] = service
        state["batcher"] = MicroBatcher(
            service.score_many, lambda r: len(r.rows), settings.batch_window_s, settings.batch_max_items,
            workers=service.workers,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=loader, name="mvpp-load", daemon=True)
        thread.start()
        yield
        if state["batcher"] is not None:
            await state["batcher"].close()
        if state["service"] is not None:
            state["service"].close()

    app = FastAPI(
        title="mvpp",
        description="Micro-video popularity before any engagement: a mean and an interval per target, "
        "and the past videos that explain it.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FIELDS_ALLOWANCE)

    def service() -> ScoringService:
        if state["error"]:
            raise ApiError(503, f"the service failed to load: {state['error']}")
        if state["service"] is None:
            raise ApiError(503, "the service is loading")
        return state["service"]

    def authorise(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.message, **({"field": exc.field} if exc.field else {})}
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse({"error": first.get("msg", "invalid request"), "field": field}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse({"error": "internal error (see the service's log)"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if state["error"]:
            return JSONResponse({"status": "failed", "error": state["error"]}, status_code=503)
        if state["service"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("mvpp.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/v1/info")
    async def info(request: Request) -> dict[str, Any]:
        """The run, its targets, the memory, the bank and its encoders, and the fields an item may have."""
        authorise(request)
        return service().info()

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": ScoreBody.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                VIDEO_FIELD: {"type": "string", "format": "binary"},
                                ITEM_FIELD: {"type": "string", "description": "the item's fields, as JSON"},
                            },
                            "required": [VIDEO_FIELD],
                        }
                    },
                },
                "required": True,
            }
        },
    )
    async def score(request: Request) -> dict[str, Any]:
        """Popularity of new items: JSON {"items": [...]}, or one clip uploaded as
        multipart `video` with its fields as JSON in `item`. One result per item, in
        order; an item that cannot be scored says why in its status."""
        authorise(request)
        svc = service()
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            async with _uploaded(request, settings) as (fields, path):
                row = _item_fields(fields.get(ITEM_FIELD), svc)
                row.setdefault(svc.upload_fields()["id"], Path(fields[VIDEO_FIELD + "_name"]).stem or "upload")
                results = await state["batcher"].submit(ScoreRequest([row], {0: path}))
        else:
            try:
                body = ScoreBody.model_validate(await request.json())
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"the body is not valid JSON ({exc.msg})", "body") from exc
            except ValueError as exc:
                raise _validation_error(exc) from exc
            _check_fields(body.items, svc)
            results = await state["batcher"].submit(ScoreRequest([dict(i) for i in body.items]))
        return {"items": results}

    @app.get("/v1/neighbours", response_model=NeighboursResponse)
    async def neighbours(request: Request, text: str = "", k: int = 10) -> dict[str, Any]:
        """The k most similar items of the bank to a text (what `mvpp-bank query --title` returns)."""
        authorise(request)
        if not text.strip():
            raise ApiError(422, "give a text", "text")
        _check_k(k)
        return {"neighbours": await asyncio.to_thread(service().neighbours, text, None, k)}

    @app.post(
        "/v1/neighbours",
        response_model=NeighboursResponse,
        openapi_extra={
            "requestBody": {
                "content": {"multipart/form-data": {"schema": {
                    "type": "object",
                    "properties": {VIDEO_FIELD: {"type": "string", "format": "binary"},
                                   "text": {"type": "string"}, "k": {"type": "integer"}},
                    "required": [VIDEO_FIELD],
                }}},
                "required": True,
            }
        },
    )
    async def neighbours_of_clip(request: Request) -> dict[str, Any]:
        """The k most similar items of the bank to an uploaded clip (and text)."""
        authorise(request)
        svc = service()
        async with _uploaded(request, settings) as (fields, path):
            try:
                k = int(fields.get("k") or 10)
            except ValueError as exc:
                raise ApiError(422, "k must be an integer", "k") from exc
            _check_k(k)
            from mvpp.media import MediaError

            try:
                found = await asyncio.to_thread(svc.neighbours, str(fields.get("text") or ""), path, k)
            except MediaError as exc:
                raise ApiError(422, f"the clip cannot be used: {exc.reason}", VIDEO_FIELD) from exc
        return {"neighbours": found}

    return app


def _check_k(k: int) -> None:
    if not 1 <= k <= 1000:
        raise ApiError(422, "k must lie between 1 and 1000", "k")


def _validation_error(exc: ValueError) -> ApiError:
    errors = getattr(exc, "errors", lambda: [])()
    first = errors[0] if errors else {}
    field = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return ApiError(422, first.get("msg", str(exc)), field)


def _check_fields(items: list[dict[str, Value]], svc: ScoringService) -> None:
    """Every field of every item must be one of the run's columns."""
    known = _known_fields(svc)
    for n, item in enumerate(items):
        for key in item:
            if key not in known:
                raise ApiError(422, f"unknown field {key!r}; an item may have {sorted(known)}", f"items.{n}.{key}")


def _known_fields(svc: ScoringService) -> set[str]:
    fields = svc.upload_fields()
    return {fields["id"], *fields["text"], *(c for c in (fields["time"], fields["observed"]) if c), *fields["meta"]}


def _item_fields(raw: str | None, svc: ScoringService) -> dict[str, Value]:
    if not raw:
        return {}
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"not valid JSON ({exc.msg})", ITEM_FIELD) from exc
    if not isinstance(item, dict) or not all(isinstance(v, (str, int, float, bool, type(None))) for v in item.values()):
        raise ApiError(422, "must be a JSON object of field values", ITEM_FIELD)
    _check_fields([item], svc)
    return item


class BodyLimit:
    """Stops reading a request body past `limit` bytes, whether or not it declared its
    length: the route answers 413 instead of buffering an endless upload."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"the request is larger than the limit of {self.limit // (1024 * 1024)} MB",
                               VIDEO_FIELD)
            return message

        await self.app(scope, counted, send)


class _uploaded:
    """The multipart form of a request with its clip streamed to a temporary file, which
    is always removed. Refuses bodies over the size limit (413) and non-video files (415)."""

    def __init__(self, request: Request, settings: AppSettings) -> None:
        self.request = request
        self.settings = settings
        self.folder: str | None = None

    async def __aenter__(self) -> tuple[dict[str, Any], Path]:
        limit = self.settings.max_upload_bytes
        declared = self.request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the upload is larger than the limit of {limit // (1024 * 1024)} MB", VIDEO_FIELD)
        form = await self.request.form(max_files=1, max_fields=8)
        upload = form.get(VIDEO_FIELD)
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "upload the clip as the multipart file field 'video'", VIDEO_FIELD)
        if not (upload.content_type or "").startswith("video/"):
            raise ApiError(415, f"only video files are accepted, not {upload.content_type!r}", VIDEO_FIELD)
        self.folder = tempfile.mkdtemp(prefix="mvpp-upload-")
        path = Path(self.folder) / "clip"
        size = 0
        with path.open("wb") as fh:
            while chunk := await upload.read(UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the upload is larger than the limit of {limit // (1024 * 1024)} MB", VIDEO_FIELD)
                fh.write(chunk)
        await upload.close()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        fields[VIDEO_FIELD + "_name"] = os.path.basename(upload.filename or "upload")
        return fields, path

    async def __aexit__(self, *exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
