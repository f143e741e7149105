"""What the HTTP service does, without HTTP: a run, its bank and its encoders loaded once,
scoring rows exactly as `mvpp score` scores a table's rows, and neighbours exactly as
`mvpp-bank query` finds them.

Scoring calls may run in several threads at once (`workers`): the encoders, the
neighbour search and the model only read what they share, and the one structure a call
writes (the bank table's projection of the neighbours) is locked. `serve.batching`
merges requests that arrive together into one call.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvpp.config import BankLocation, BuildSettings
from mvpp.media import MediaError
from mvpp.memory_bank.builder import BankBuilder, plan_items
from mvpp.memory_bank.decoding import Decoded, decode_item
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders
from mvpp.memory_bank.metadata import inverse_transform, parse_rows
from mvpp.memory_bank.schema import BankMismatchError
from mvpp.memory_bank.store import open_store
from mvpp.predictor.run import Run
from mvpp.predictor.scoring import DEFAULT_MEMORY, Scorer, ScoreRow, default_workers, upload_columns
from mvpp.retriever.retriever import Query, Retriever
from mvpp.retriever.snapshot import read_snapshot

logger = logging.getLogger(__name__)

# Seconds a clip may take to decode before it fails (a pathological file must not hold
# the service).
DEFAULT_DECODE_SECONDS = 60.0
# Neighbours returned per scored item.
NEIGHBOURS_SHOWN = 10


class TimedDecode:
    """`decode_item` in a worker process, given up after `limit` seconds (the worker is
    then replaced): a clip that hangs the decoder fails alone, with its reason."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._one_clip = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def __call__(self, path: str, n_frames: int, max_side: int) -> Decoded:
        # one clip in the worker at a time: a clip that runs out of time takes the worker
        # down, and must not take another thread's clip with it
        with self._one_clip:
            future = self._executor().submit(decode_item, path, n_frames, max_side)
            try:
                return future.result(timeout=self.limit)
            except FutureTimeout:
                self.close(kill=True)
                return MediaError(path, f"decoding took longer than {self.limit:g} s")
            except Exception as exc:  # the worker died: a fresh one for the next clip
                self.close(kill=True)
                return MediaError(path, f"the decoder process crashed on this video ({type(exc).__name__})")

    def close(self, kill: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        if kill:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.kill()
        pool.shutdown(wait=not kill, cancel_futures=True)


@dataclass
class ScoreRequest:
    """The rows of one request (dicts keyed by the bank's column names) and its uploaded
    clips (row position -> file)."""

    rows: list[dict[str, Any]]
    videos: dict[int, Path] = field(default_factory=dict)


@dataclass
class ServiceSettings:
    run: Path
    bank: BankLocation | None = None  # None: the run's own
    memory: str = DEFAULT_MEMORY
    device: str | None = None
    decode_seconds: float = DEFAULT_DECODE_SECONDS
    # scoring calls at once (None: `default_workers`); the caller shares torch's threads
    # among them (`cores_shared_by`)
    workers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ScoringService:
    """A run applied to rows and clips; every call is thread-safe, and up to `workers`
    scoring calls run at once."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.workers = settings.workers or default_workers(settings.device)
        self.run = Run.load(settings.run)
        location = settings.bank or self.run.bank
        if location is None:
            raise ValueError(f"the run {settings.run} records no bank: give one")
        self.location = location
        self.store = open_store(
            bank=None if location.is_server else location.path,
            qdrant_url=location.qdrant_url,
            api_key=location.api_key,
            collection=location.collection,
        )
        manifest = self.store.manifest
        if manifest is None:
            raise ValueError(f"no bank at {location.describe()}")
        manifest.check_compatible(
            self.run.manifest, mine="the bank has", theirs="the run was trained with",
            advice="Serve the run with the bank it was trained on.",
        )
        self.manifest = manifest
        snapshot = read_snapshot(self.store, None if location.is_server else location.path / "cache")
        self.decode = TimedDecode(settings.decode_seconds)
        build = BuildSettings(n_frames=manifest.n_frames, max_tokens=manifest.max_tokens, decode_ahead=False)
        encoders = load_encoders(EncoderSpec.for_bank(manifest), device=settings.device)
        self.builder = BankBuilder(self.store, encoders, build, decode=self.decode)
        self.scorer = Scorer(self.run, snapshot, self.builder, settings.memory)
        self.retriever = Retriever(self.store, encoders, build, decode=self.decode)
        self.columns = manifest.columns or self.run.manifest.columns
        bank = self.scorer.predictor.bank
        self._titles = dict(zip(bank.item_ids, bank.titles, strict=True))
        self._labels = dict(zip(bank.item_ids, bank.raw_labels, strict=True)) if bank.raw_labels else {}
        # encode once now: the first request must not pay for loading the models
        self.retriever.encode([Query(title="warm up")])

    def close(self) -> None:
        self.decode.close(kill=True)
        self.store.close()

    # -- what the endpoints return -------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "run": str(self.settings.run),
            "targets": list(self.run.targets),
            "label_transform": self.run.manifest.label_transform,
            "memory": self.settings.memory,
            "memory_items": self.scorer.predictor.memory_size,
            "bank": self.location.describe(),
            "bank_items": self.store.count(),
            "encoders": {
                **{k: getattr(self.manifest, k) for k in ("profile", "text_model", "captioner_model", "frame_model")},
                "text_precision": EncoderSpec.for_bank(self.manifest).text_precision,
            },
            "columns": self.upload_fields(),
        }

    def upload_fields(self) -> dict[str, Any]:
        """The field names an item may carry (the bank's columns, as `mvpp score` reads a
        table)."""
        cols = upload_columns(self.run, self.columns, set())
        return {
            "id": cols.id_col,
            "text": cols.text_cols,
            "time": self.columns.get("time_col"),
            "observed": self.columns.get("observed_col"),
            "meta": list(dict.fromkeys([*(self.run.featurizer.columns if self.run.featurizer else []),
                                        *self.columns.get("meta_cols", [])])),
        }

    def score(self, rows: list[dict[str, Any]], videos: dict[int, Path] | None = None) -> list[dict[str, Any]]:
        """One result per row, in order (a row that cannot be scored says why in its
        status). `videos`: row position -> an uploaded clip of that row."""
        return self.score_many([ScoreRequest(rows, videos or {})])[0]

    def score_many(self, requests: list[ScoreRequest]) -> list[list[dict[str, Any]]]:
        """Several requests in one scoring call; each is read on its own (ids need only be
        unique within a request), as `mvpp score` reads one table."""
        planned = []
        for req in requests:
            present = {key for row in req.rows for key in row}
            columns = upload_columns(self.run, self.columns, present)
            columns.video_col = None
            columns.require_text = False
            # a field an item leaves out is a missing value, as an empty cell of a table
            rows = [{key: row.get(key) for key in present} for row in req.rows]
            items, failures = plan_items(None, parse_rows(rows, columns, source="request"))
            for item in items:
                item.video = req.videos.get(item.position, item.video)
            planned.append((items, failures))
        everything = [item for items, _ in planned for item in items]
        scored = iter(self.scorer.score(everything, batch_size=max(1, len(everything))))
        results = []
        for items, failures in planned:
            out = [(it.position, self._result(next(scored))) for it in items]
            out += [(f.position, {"id": f.item_id, "status": f"failed: {f.reason}", "predictions": {},
                                  "neighbours": []}) for f in failures]
            results.append([r for _, r in sorted(out, key=lambda pr: pr[0])])
        return results

    def _result(self, row: ScoreRow) -> dict[str, Any]:
        transform = self.run.manifest.label_transform
        return {
            "id": row.item_id,
            "status": row.status,
            "predictions": {
                t: {**p, "count": inverse_transform(p["pred"], transform)} for t, p in row.predictions.items()
            },
            "neighbours": [
                {"id": nid, "score": score, "title": self._titles.get(nid, ""), "labels": self._labels.get(nid, {})}
                for nid, score in row.neighbours[:NEIGHBOURS_SHOWN]
            ],
        }

    def neighbours(self, text: str = "", clip: Path | None = None, k: int = 10) -> list[dict[str, Any]]:
        """What `mvpp-bank query` returns for a title and/or a clip."""
        hits = self.retriever.query(Query(clip=clip, title=text), k=k)
        return [
            {"id": h.item_id, "score": round(float(h.score), 6), "title": h.payload.get("title"),
             "labels": h.payload.get("labels"), "published_at": h.payload.get("published_at")}
            for h in hits
        ]


__all__ = [
    "BankMismatchError", "ScoreRequest", "ScoringService", "ServiceSettings", "TimedDecode",
]
