"""Using a trained run: metrics on a split of its bank, and scoring new uploads.

Both go through one path, `RunPredictor`: the items' features are assembled by the same
`FeatureTable` (from the bank's rows, or from freshly encoded points gathered in a
snapshot of their own), their neighbours come from the same `NeighbourSearch` over a
memory of labelled bank items, and the model predicts a mean with an interval per target.
So an item of a split, scored as a new upload with the run's training items as memory,
gets exactly the prediction `evaluate` gives it.

Memories: "train" (the run's training items: what evaluation uses) and "all" (every
labelled item of the bank, so items added after training inform predictions at once).
Never the item itself, and with time safety only items published before it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvpp.config import usable_cores
from mvpp.media import Clip, MediaError
from mvpp.memory_bank.builder import BankBuilder, BuildItem, content_problem, with_stored_vectors
from mvpp.memory_bank.decoding import BatchDecoder
from mvpp.memory_bank.encoders.base import resolve_device
from mvpp.memory_bank.metadata import ColumnMap, inverse_transform
from mvpp.memory_bank.schema import AUDIO, FRAMES, RETRIEVAL, TEXT, BankPoint
from mvpp.predictor.boosting import blend
from mvpp.predictor.dataset import FeatureTable, make_batch
from mvpp.predictor.metrics import Metrics, regression_metrics
from mvpp.predictor.model import Prediction
from mvpp.predictor.run import INDEX_DIR, Run
from mvpp.predictor.training import (
    PreparedData,
    TrainConfig,
    boost_features,
    neighbour_policy,
    predict_batch,
    prepare,
    scaled_interval,
    uses_index,
    with_mean,
)
from mvpp.retriever.bulk import Neighbours
from mvpp.retriever.search import ApproximateSearch, NeighbourSearch, QueryBatch
from mvpp.retriever.snapshot import BankSnapshot, snapshot_from_points

logger = logging.getLogger(__name__)

TOP_NEIGHBOURS = 3
NON_FINITE = "the model gave a prediction that is not a finite number (its weights may be damaged: train the run again)"
MEMORIES = ("all", "train")
DEFAULT_MEMORY = "all"


def prepare_for_run(
    run: Run, snapshot: BankSnapshot, word_prior: bool = False
) -> tuple[TrainConfig, PreparedData]:
    """The run's training preparation replayed on `snapshot`: its splits, target
    normalisation, metadata features and vocabulary, never refitted, with neighbours for
    every split (for analyses of training; predictions go through `RunPredictor`).

    `word_prior` also refits the ridge to give the table the training items' out-of-fold
    estimates as in training (the same folds and penalties: the fit is deterministic
    given the run's seed).
    """
    cfg = copy.deepcopy(run.train_config)
    cfg.targets = list(run.targets)
    cfg.time_safe = run.time_safe
    data = prepare(
        snapshot,
        cfg,
        splits=run.splits_in(snapshot),
        norm=run.norm,
        meta=run.featurizer,
        lexicon=run.lexicon,
        word_prior=word_prior,
        wide_widths=run.model_config.wide_widths,
        index_root=index_root(run),
    )
    return cfg, data


@dataclass
class ScoreRow:
    """One scored item: a mean and interval per target (target scale), its top neighbours
    with their retrieval scores, and a status ("ok", or "failed: reason")."""

    item_id: str
    status: str = "ok"
    predictions: dict[str, dict[str, float]] = field(default_factory=dict)
    # every neighbour the prediction used, best first (tables show the first three)
    neighbours: list[tuple[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")

    def flat(self, targets: list[str], transform: str) -> dict[str, Any]:
        row: dict[str, Any] = {"item_id": self.item_id, "status": self.status}
        for t in targets:
            p = self.predictions.get(t, {})
            for key in ("pred", "lower", "upper"):
                row[f"{t}_{key}"] = p.get(key, math.nan)
            row[f"{t}_count"] = (
                inverse_transform(p["pred"], transform) if "pred" in p else math.nan
            )
        for j in range(TOP_NEIGHBOURS):
            nid, sim = self.neighbours[j] if j < len(self.neighbours) else (None, math.nan)
            row[f"neighbour_{j + 1}"] = nid
            row[f"neighbour_{j + 1}_sim"] = sim
        return row


@dataclass
class Evaluation:
    """Metrics of a run on a split, and the per-item predictions they were computed from."""

    metrics: dict[str, Metrics]
    rows: list[ScoreRow]


# Index folders of runs whose own folder is read-only, for the life of the process.
_TEMP_INDEX_ROOTS: dict[Path, tempfile.TemporaryDirectory] = {}


def index_root(run: Run) -> Path:
    """Where the run's neighbour indexes are kept: its folder, where training left the
    one it searched; a temporary folder when the run's folder is read-only (an index
    for another memory is then built for this process only)."""
    root = run.path / INDEX_DIR
    if os.access(root if root.exists() else run.path, os.W_OK):
        return root
    if run.path not in _TEMP_INDEX_ROOTS:
        logger.warning("%s is read-only: neighbour indexes it lacks are built in a temporary folder", run.path)
        _TEMP_INDEX_ROOTS[run.path] = tempfile.TemporaryDirectory(prefix="mvpp-neighbour-index-")
    return Path(_TEMP_INDEX_ROOTS[run.path].name)


class RunPredictor:
    """A run applied to items: of its bank (by row) or new ones (as encoded points).

    memory: "train" retrieves among the run's training items, as training and `evaluate`
    do; "all" among every labelled item of the bank.
    """

    def __init__(self, run: Run, snapshot: BankSnapshot, memory: str = "train") -> None:
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, not {memory!r}")
        self.run = run
        self.memory_name = memory
        cfg = run.train_config
        self.bank = snapshot.with_targets(run.targets)
        self.table = FeatureTable(self.bank, run.norm, run.featurizer, run.lexicon)
        rerank, self.groups = neighbour_policy(self.bank, self.table, run.lexicon, cfg)
        self.splits = run.splits_in(snapshot)
        rows = self.splits["train"] if memory == "train" else np.flatnonzero(self.bank.labelled)
        self.wide_widths = run.model_config.wide_widths
        approximate = ApproximateSearch(index_root(run), cfg.ann, cfg.threads) if uses_index(cfg, len(rows)) else None
        self.search = NeighbourSearch(
            self.bank, rows, cfg.k, run.time_safe, rerank, self.groups, max(self.wide_widths, default=0), approximate
        )
        self._row_of = snapshot.index_of()
        # Everything else a prediction reads is left as built, so calls may run in
        # several threads at once (a service does).
        self._projection_lock = threading.Lock()

    @property
    def memory_size(self) -> int:
        return len(self.search)

    # -- the one prediction path ------------------------------------------------------

    def _queries(self, source: BankSnapshot, table: FeatureTable, rows: np.ndarray, own_rows: np.ndarray) -> QueryBatch:
        """The search's view of rows of `source` (features in `table`); `own_rows` are the
        items' rows in the bank (-1: not in it), never their own neighbours."""
        return QueryBatch(
            vectors=source.retrieval[rows],
            has_vector=source.has_retrieval[rows],
            own_row=own_rows,
            time=source.published_ts[rows],
            bags=(table.words[rows].numpy(), table.word_weights[rows].numpy())
            if self.search.rerank is not None and table.words is not None and table.word_weights is not None
            else None,
            groups=self.groups.encode([source.metadata[i] for i in rows]) if self.groups is not None else None,
        )

    def _predict(
        self, source: BankSnapshot, table: FeatureTable, rows: np.ndarray, own_rows: np.ndarray
    ) -> tuple[Prediction, Neighbours]:
        """Predictions (normalised scale) and neighbours of rows of `source`."""
        cfg = self.run.train_config
        nb = self.search.search(self._queries(source, table, rows, own_rows))
        model = self.run.model
        if model.training:
            model.eval()
        with self._projection_lock:  # the bank table holds one projection at a time
            self.table.project(model, nb.indices[nb.indices >= 0])
            batch = make_batch(self.table, table.items(torch.from_numpy(rows)), nb, self.wide_widths)
        pred = predict_batch(model, batch, cfg.mc_samples, cfg.quantiles, cfg.seed)
        gbdt = self.run.gbdt
        if gbdt is not None and self.run.blend_weights is not None:
            x, _ = boost_features(model, batch, source, rows, self.run.featurizer)
            pred = with_mean(pred, blend(pred.mean.numpy(), gbdt.predict(x), self.run.blend_weights))
        return pred, nb

    def _fresh(self, points: list[BankPoint]) -> tuple[BankSnapshot, FeatureTable, np.ndarray]:
        """New items laid out as the bank lays out its own (`snapshot_from_points`), their
        feature table, and their rows in the bank (-1 where absent)."""
        fresh = snapshot_from_points(points, self.run.manifest, fresh=True).with_targets(self.run.targets)
        table = FeatureTable(fresh, self.run.norm, self.run.featurizer, self.run.lexicon)
        return fresh, table, np.array([self._row_of.get(p.item_id, -1) for p in points], np.int64)

    def neighbours(self, points: list[BankPoint], k: int | None = None) -> list[list[tuple[str, float]]]:
        """The neighbours the run would give new items (its re-rank and groups), up to k
        (default: the run's), best first, with their scores."""
        if not points:
            return []
        fresh, table, own = self._fresh(points)
        search = self.search
        if k is not None and k != search.k:
            search = search.with_k(k)  # no wider neighbourhood: only the k are shown
        nb = search.search(self._queries(fresh, table, np.arange(len(points)), own))
        return [
            [(self.bank.item_ids[n], float(sc)) for n, sc in zip(idx, score, strict=True) if n >= 0]
            for idx, score in zip(nb.indices, nb.scores, strict=True)
        ]

    def _rows(self, item_ids: list[str], pred: Prediction, nb: Neighbours) -> list[ScoreRow]:
        """Target-scale predictions with their calibrated intervals, as rows."""
        run = self.run
        mean = run.norm.inverse(pred.mean.numpy())
        lower, upper = scaled_interval(pred, run.norm, run.interval_scale)
        out = []
        finite = np.isfinite(mean).all(axis=1) & np.isfinite(lower).all(axis=1) & np.isfinite(upper).all(axis=1)
        for j, item_id in enumerate(item_ids):
            row = ScoreRow(item_id)
            if not finite[j]:
                row.status = f"failed: {NON_FINITE}"
                out.append(row)
                continue
            for t, name in enumerate(run.targets):
                row.predictions[name] = {
                    "pred": float(mean[j, t]),
                    "lower": float(lower[j, t]),
                    "upper": float(upper[j, t]),
                }
            row.neighbours = [
                (self.bank.item_ids[n], float(s))
                for n, s in zip(nb.indices[j], nb.scores[j], strict=True)
                if n >= 0
            ]
            if not row.neighbours:
                row.status = "ok (no neighbours)"
            out.append(row)
        return out

    def predict_rows(self, rows: np.ndarray, batch_size: int = 512) -> list[ScoreRow]:
        """Predictions for bank items (rows of the snapshot), in order."""
        out: list[ScoreRow] = []
        rows = np.asarray(rows, np.int64)
        for lo in range(0, len(rows), batch_size):
            part = rows[lo : lo + batch_size]
            pred, nb = self._predict(self.bank, self.table, part, part)
            out += self._rows([self.bank.item_ids[i] for i in part], pred, nb)
        return out

    def predict_points(self, points: list[BankPoint]) -> list[ScoreRow]:
        """Predictions for freshly encoded items, in order. Their arrays are laid out as the
        bank lays out its own (`snapshot_from_points`), so an item of the bank encoded
        afresh gets the features, hence the prediction, of its bank row."""
        if not points:
            return []
        fresh, table, own = self._fresh(points)
        pred, nb = self._predict(fresh, table, np.arange(len(points)), own)
        return self._rows([p.item_id for p in points], pred, nb)

    def evaluate(self, split: str = "test") -> Evaluation:
        """Metrics of the run on one of its splits, over the whole split."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; the run has {sorted(self.splits)}")
        rows = self.splits[split]
        preds = self.predict_rows(rows, self.run.train_config.eval_batch_size)
        failed = [r for r in preds if not r.ok]
        if failed:
            raise ValueError(
                f"{len(failed)} of {len(preds)} {split} items could not be predicted "
                f"({failed[0].status.removeprefix('failed: ')}); no metrics are reported"
            )
        y = self.bank.targets[rows]
        metrics = {}
        interval = self.run.train_config.interval
        for j, name in enumerate(self.run.targets):
            col = [[r.predictions[name][key] for r in preds] for key in ("pred", "lower", "upper")]
            mean, lower, upper = (np.asarray(c, np.float64).reshape(-1) for c in col)
            metrics[name] = regression_metrics(y[:, j], mean, lower, upper, interval)
        return Evaluation(metrics, preds)


def evaluate(run: Run, snapshot: BankSnapshot, split: str = "test", memory: str = "train") -> dict[str, Metrics]:
    """Metrics of the run on one of its splits, computed over the whole split."""
    return RunPredictor(run, snapshot, memory).evaluate(split).metrics


def default_workers(device: str | None) -> int:
    """Scoring calls to run at once: on a CPU two, each with half the cores (a call of a
    few dozen titles keeps one core busier than it keeps two: MiniLM on 2 cores scored
    143-161 titles/s in two single-threaded calls of 16 against 107-110 in one call with
    both threads); on a GPU one, which the device already runs in parallel."""
    return 1 if resolve_device(device).startswith("cuda") else min(2, usable_cores())


@contextlib.contextmanager
def cores_shared_by(workers: int) -> Iterator[None]:
    """torch's threads set for `workers` calls at once (the cores shared among them), and
    set back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, usable_cores() // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Scorer:
    """Scores new items with a run, its bank snapshot and the bank's encoders."""

    def __init__(
        self, run: Run, snapshot: BankSnapshot, builder: BankBuilder, memory: str = DEFAULT_MEMORY
    ) -> None:
        self.run = run
        self.builder = builder
        self.predictor = RunPredictor(run, snapshot, memory)

    def score(
        self,
        items: list[BuildItem],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
        workers: int = 1,
    ) -> list[ScoreRow]:
        """One row per item, in order. An item whose encoder inputs the bank holds already
        (the same title and video) takes the stored vectors; the others are encoded as the
        build encodes, their videos decoded as the builder's settings say (on a GPU, the
        next chunk's while this one is scored). `workers`: chunks scored at once, in
        threads (each chunk is scored as it would be alone)."""
        rows: list[ScoreRow] = []
        stored = self._stored(items)
        chunks = [list(range(lo, min(lo + batch_size, len(items)))) for lo in range(0, len(items), batch_size)]
        to_decode = [[items[i].video for i in chunk if items[i].video is not None and stored[i] is None] for chunk in chunks]

        def done(chunk: list[int], scored: list[ScoreRow]) -> None:
            rows.extend(scored)
            if progress:
                progress(len(chunk))

        with BatchDecoder(self.builder.settings, self.builder.decode) as decoder:
            if workers <= 1:
                for chunk, clips in zip(chunks, decoder.batches(to_decode), strict=True):
                    done(chunk, self._score_chunk([items[i] for i in chunk], [stored[i] for i in chunk], clips))
                return rows
            with ThreadPoolExecutor(workers, thread_name_prefix="mvpp-score") as pool:
                running: deque[tuple[list[int], Future[list[ScoreRow]]]] = deque()
                for chunk, clips in zip(chunks, decoder.batches(to_decode), strict=True):
                    job = pool.submit(self._score_chunk, [items[i] for i in chunk], [stored[i] for i in chunk], clips)
                    running.append((chunk, job))
                    while len(running) > workers:  # at most one chunk waits, decoded, for a worker
                        first, result = running.popleft()
                        done(first, result.result())
                for first, result in running:
                    done(first, result.result())
        return rows

    def encode(self, items: list[tuple[BuildItem, Clip | None]]) -> list[BankPoint]:
        """Points of new items, encoded as the bank's build encodes its own."""
        return self.builder.encode(items)

    def _stored(self, items: list[BuildItem], chunk: int = 1024) -> list[BankPoint | None]:
        """Per item, its stored point when the bank holds its encoder inputs already."""
        store, manifest = self.builder.store, self.builder.store.manifest
        out: list[BankPoint | None] = [None] * len(items)
        if manifest is None:
            return out
        for lo in range(0, len(items), chunk):
            part = items[lo : lo + chunk]
            found = store.get([it.item_id for it in part], vectors=(RETRIEVAL, FRAMES, TEXT, AUDIO))
            for j, (item, point) in enumerate(zip(part, found, strict=True)):
                if point is None or not point.encoding_key:
                    continue
                try:
                    if point.encoding_key == self.builder.encoding_key(item, manifest):
                        out[lo + j] = point
                except OSError:
                    continue  # an unreadable video: decoding reports it
        return out

    def _score_chunk(
        self, items: list[BuildItem], stored: list[BankPoint | None], clips: list[Clip | MediaError]
    ) -> list[ScoreRow]:
        """`clips`: the decoded videos of the items that have one and no stored point, in order."""
        rows = [ScoreRow(it.item_id) for it in items]
        ready: list[tuple[int, BuildItem, Clip | None]] = []
        reused: list[tuple[int, BankPoint]] = []
        videos = iter(clips)
        for i, (item, known) in enumerate(zip(items, stored, strict=True)):
            if known is not None:
                reused.append((i, with_stored_vectors(item, known)))
                continue
            clip = None
            if item.video is not None:
                result = next(videos)
                if isinstance(result, MediaError):
                    rows[i].status = f"failed: {result.reason}"
                    continue
                clip = result
            problem = content_problem(item, clip)
            if problem:
                rows[i].status = f"failed: {problem}"
                continue
            ready.append((i, item, clip))
        if not ready and not reused:
            return rows
        try:
            points = self.encode([(item, clip) for _, item, clip in ready]) if ready else []
            order = [i for i, _, _ in ready] + [i for i, _ in reused]
            scored = self.predictor.predict_points(points + [p for _, p in reused])
        except Exception as exc:  # an encoder or model failure fails this chunk, not the run
            logger.exception("scoring failed")
            for i in [i for i, _, _ in ready] + [i for i, _ in reused]:
                rows[i].status = f"failed: scoring error ({type(exc).__name__}: {exc})"
            return rows
        for i, row in zip(order, scored, strict=True):
            rows[i] = row
        return rows


def upload_columns(
    run: Run,
    bank_columns: dict,
    present: set[str],
    id_col: str | None = None,
    text_col: list[str] | None = None,
    time_col: str | None = None,
    observed_col: str | None = None,
    meta_col: list[str] | None = None,
    video_col: str | None = None,
) -> ColumnMap:
    """How to read a table of new items (columns `present`): the names given first, then
    the columns the bank was built from (optional ones only where the table has them),
    then the plain defaults."""

    def optional(given: str | None, key: str) -> str | None:
        if given:
            return given
        name = bank_columns.get(key)
        return name if name and name in present else None

    # The run's and the bank's metadata columns are read where the table has them (absent
    # ones are missing values, masked, not an error): the run's feed its metadata expert,
    # the neighbour group its retrieval, and any of them makes a row without text or video
    # a post to score, as it made it one to index.
    run_cols = run.featurizer.columns if run.featurizer else []
    group = [run.train_config.neighbour_group] if run.train_config.neighbour_group else []
    wanted = list(dict.fromkeys([*(meta_col or [*run_cols, *bank_columns.get("meta_cols", [])]), *group]))
    return ColumnMap(
        id_col=id_col or bank_columns.get("id_col") or "id",
        text_cols=text_col or bank_columns.get("text_cols") or ["title"],
        time_col=optional(time_col, "time_col"),
        observed_col=optional(observed_col, "observed_col"),
        video_col=optional(video_col, "video_col"),
        require_text=bool(text_col),
        meta_cols=[c for c in wanted if c in present or meta_col],
    )
