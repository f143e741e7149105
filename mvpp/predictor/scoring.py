"""Using a trained run: metrics on a split of its bank, and scoring new uploads.

Scoring encodes new items exactly as the builder does, retrieves their neighbours
among the run's training items (never the item itself, even when it is in the bank),
and predicts a mean with an interval per target. An item that cannot be scored keeps
its row, with the reason in `status`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mvpp.media import Clip, MediaError
from mvpp.memory_bank.builder import BankBuilder, BuildItem
from mvpp.memory_bank.decoding import BatchDecoder
from mvpp.memory_bank.metadata import inverse_transform
from mvpp.memory_bank.schema import BankPoint
from mvpp.predictor.dataset import ItemFeatures, find_neighbours, make_batch
from mvpp.predictor.metrics import Metrics
from mvpp.predictor.run import Run
from mvpp.predictor.training import (
    PreparedData,
    TrainConfig,
    predict_split,
    prepare,
    scaled_interval,
    split_metrics,
)
from mvpp.retriever.snapshot import BankSnapshot

logger = logging.getLogger(__name__)

TOP_NEIGHBOURS = 3


def prepare_for_run(
    run: Run, snapshot: BankSnapshot, word_prior: bool = False
) -> tuple[TrainConfig, PreparedData]:
    """The run's training config and its data on `snapshot`: the run's splits, target
    normalisation, metadata features and vocabulary, never refitted.

    The model computes the word prior from its own weights; `word_prior` also refits the
    ridge to give the table the training items' out-of-fold estimates as in training
    (the same folds and penalties: the fit is deterministic given the run's seed).
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
    )
    return cfg, data


def evaluate(run: Run, snapshot: BankSnapshot, split: str = "test") -> dict[str, Metrics]:
    """Metrics of the run on one of its splits, computed over the whole split."""
    cfg, data = prepare_for_run(run, snapshot)
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; the run has {sorted(data.splits)}")
    pred = predict_split(run.model, data, split, cfg)
    return split_metrics(data, split, pred, run.interval_scale, cfg.interval)


@dataclass
class ScoreRow:
    item_id: str
    status: str = "ok"
    predictions: dict[str, dict[str, float]] = field(default_factory=dict)
    neighbours: list[tuple[str, float]] = field(default_factory=list)

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


class Scorer:
    """Scores new items with a run, its bank snapshot and the bank's encoders."""

    def __init__(self, run: Run, snapshot: BankSnapshot, builder: BankBuilder) -> None:
        self.run = run
        self.snapshot = snapshot
        self.builder = builder
        self.cfg, self.data = prepare_for_run(run, snapshot)
        self.train_idx = self.data.splits["train"]
        self.pos_in_train = {snapshot.item_ids[i]: p for p, i in enumerate(self.train_idx)}

    def score(
        self,
        items: list[BuildItem],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> list[ScoreRow]:
        """One row per item, in order; videos are decoded as the builder's settings say
        (on a GPU, the next chunk's while this one is scored)."""
        rows: list[ScoreRow] = []
        chunks = [items[lo : lo + batch_size] for lo in range(0, len(items), batch_size)]
        with BatchDecoder(self.builder.settings, self.builder.decode) as decoder:
            decoded = decoder.batches([[it.video for it in chunk if it.video is not None] for chunk in chunks])
            for chunk, clips in zip(chunks, decoded, strict=True):
                rows.extend(self._score_chunk(chunk, clips))
                if progress:
                    progress(len(chunk))
        return rows

    def _score_chunk(self, items: list[BuildItem], clips: list[Clip | MediaError]) -> list[ScoreRow]:
        """`clips`: the decoded videos of the items that have one, in order."""
        rows = [ScoreRow(it.item_id) for it in items]
        ready: list[tuple[int, BuildItem, Any]] = []
        videos = iter(clips)
        for i, item in enumerate(items):
            clip = None
            if item.video is not None:
                clip = next(videos)
                if isinstance(clip, MediaError):
                    rows[i].status = f"failed: {clip.reason}"
                    continue
            if clip is None and not item.title:
                rows[i].status = "failed: no text and no video"
                continue
            ready.append((i, item, clip))
        if not ready:
            return rows
        try:
            points = self.builder.encode([(item, clip) for _, item, clip in ready])
        except Exception as exc:  # an encoder failure fails this chunk, not the run
            logger.exception("encoding failed")
            for i, _, _ in ready:
                rows[i].status = f"failed: encoding error ({type(exc).__name__}: {exc})"
            return rows
        pred, nb_idx, nb_sim = self._predict(points)
        mean = self.run.norm.inverse(pred.mean.numpy())
        lower, upper = scaled_interval(pred, self.run.norm, self.run.interval_scale)
        for j, (i, _, _) in enumerate(ready):
            row = rows[i]
            for t, name in enumerate(self.run.targets):
                row.predictions[name] = {
                    "pred": float(mean[j, t]),
                    "lower": float(lower[j, t]),
                    "upper": float(upper[j, t]),
                }
            row.neighbours = [
                (self.snapshot.item_ids[n], float(s))
                for n, s in zip(nb_idx[j], nb_sim[j], strict=True)
                if n >= 0
            ][:TOP_NEIGHBOURS]
            if not row.neighbours:
                row.status = "ok (no neighbours)"
        return rows

    def _predict(self, points: list[BankPoint]):
        snap = self.snapshot
        d = snap.retrieval.shape[1]
        queries = np.zeros((len(points), d), np.float32)
        has_q = np.zeros(len(points), bool)
        for j, p in enumerate(points):
            if p.retrieval is not None:
                queries[j], has_q[j] = p.retrieval, True
        own = np.array([self.pos_in_train.get(p.item_id, -1) for p in points], dtype=np.int64)
        q_time = np.array(
            [p.published_ts if p.published_ts is not None else np.nan for p in points], np.float64
        )
        feats = self._features(points)
        bags = None
        if feats.words is not None and feats.word_weights is not None:
            bags = (feats.words.numpy(), feats.word_weights.numpy())
        groups = self.data.groups
        nb = find_neighbours(
            queries,
            snap,
            self.train_idx,
            self.cfg.k,
            query_key_index=own,
            query_time=q_time if self.run.time_safe else None,
            query_bags=bags,
            rerank=self.data.rerank,
            query_group=groups.encode([p.metadata for p in points]) if groups is not None else None,
            groups=groups,
        )
        nb.indices[~has_q] = -1
        nb.scores[~has_q] = -np.inf
        batch = make_batch(self.data.table, feats, nb.indices, nb.scores)
        q = ((1 - self.cfg.interval) / 2, 1 - (1 - self.cfg.interval) / 2)
        pred = self.run.model.predict(batch, n_samples=self.cfg.mc_samples, quantiles=q, seed=self.cfg.seed)
        return pred, nb.indices, nb.scores

    def _features(self, points: list[BankPoint]) -> ItemFeatures:
        snap = self.snapshot
        n_tok = max(snap.tokens.shape[1], 1)
        n_frm = max(snap.frames.shape[1], self.builder.settings.n_frames if snap.frames.shape[1] else 0)
        b = len(points)
        tokens = torch.zeros(b, snap.tokens.shape[1] or n_tok, snap.tokens.shape[2])
        frames = torch.zeros(b, n_frm, snap.frames.shape[2])
        token_len = torch.zeros(b, dtype=torch.long)
        frame_len = torch.zeros(b, dtype=torch.long)
        for j, p in enumerate(points):
            if p.tokens is not None and len(p.tokens):
                n = min(len(p.tokens), tokens.shape[1])
                tokens[j, :n] = torch.from_numpy(np.asarray(p.tokens[:n], np.float32))
                token_len[j] = n
            if p.frames is not None and len(p.frames) and n_frm:
                n = min(len(p.frames), n_frm)
                frames[j, :n] = torch.from_numpy(np.asarray(p.frames[:n], np.float32))
                frame_len[j] = n
        feats = ItemFeatures(tokens, token_len, frames, frame_len)
        if self.run.lexicon is not None:
            ids, weights = self.run.lexicon.encode([p.title for p in points])
            feats.words, feats.word_weights = torch.from_numpy(ids), torch.from_numpy(weights)
        fz = self.run.featurizer
        if fz is not None and fz.n_features:
            num, mask, cat = fz.transform(
                [p.metadata for p in points],
                [p.duration_s for p in points],
                [p.published_ts for p in points],
                [p.observed_ts for p in points],
            )
            feats.meta_numeric = torch.from_numpy(num)
            feats.meta_numeric_mask = torch.from_numpy(mask)
            feats.meta_categorical = torch.from_numpy(cat)
        return feats
