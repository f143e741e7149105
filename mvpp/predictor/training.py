"""Training the predictor on a bank snapshot, with retrieval per the protocol.

AdamW, KL warm-up, early stopping on validation nMSE (mean over targets), then a
calibration of the interval width on the validation split so that the nominal
coverage holds on held-out data.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvpp.predictor.boosting import (
    MEMBERS,
    BoostConfig,
    GbdtMember,
    blend,
    fit_blend,
    member_features,
)
from mvpp.predictor.config import ModelConfig, check_keys, drop_removed
from mvpp.predictor.dataset import (
    FeatureTable,
    GroupBoost,
    LexicalRerank,
    SplitConfig,
    TargetNorm,
    make_batch,
    make_splits,
    split_neighbours,
)
from mvpp.predictor.features import DEFAULT_MIN_COUNT, MetaFeaturizer
from mvpp.predictor.lexicon import DEFAULT_MIN_COUNT as LEXICON_MIN_COUNT
from mvpp.predictor.lexicon import DEFAULT_NGRAMS as LEXICON_NGRAMS
from mvpp.predictor.lexicon import Lexicon
from mvpp.predictor.metrics import Metrics, regression_metrics
from mvpp.predictor.model import LOSSES, ModelBatch, PopularityModel, Prediction, popularity_loss
from mvpp.predictor.word_prior import WordPriorConfig, WordRidge, fit_word_ridge
from mvpp.retriever.ann import AnnConfig, AnnIndex
from mvpp.retriever.bulk import Neighbours
from mvpp.retriever.search import ApproximateSearch, QueryBatch
from mvpp.retriever.snapshot import BankSnapshot

logger = logging.getLogger(__name__)

# Dense neighbour search: "exact" scans every key, "ann" takes candidates from an HNSW
# index (retriever.ann), "auto" does so from ANN_THRESHOLD memory items on. Exact search
# is quadratic (about 15 s for 20,000 items, 14 min for 100,000 on 2 cores), the index
# costs its build (about 50 s for 100,000) and a few ms per query; benchmarks/README.md.
NEIGHBOUR_INDEXES = ("auto", "exact", "ann")
ANN_THRESHOLD = 50_000
# Queries whose index neighbours are compared with exact ones (recall@RECALL_AT).
RECALL_SAMPLE = 1000
RECALL_AT = 10

# Hybrid neighbours: weight of the titles' TF-IDF cosine next to the dense cosine, and
# dense candidates re-ranked per query. A re-rank of the dense top 200 keeps almost all
# of a full hybrid search's gain on MicroLens (k-NN label average, see benchmarks/README.md).
LEXICAL_RETRIEVAL_WEIGHT = 0.5
RERANK_CANDIDATES = 200
# Bonus of a same-group neighbour (`--neighbour-group`), on the scale of the cosine: 2
# puts the group's items ahead of nearly every other key. On TikTok validation (seeds 0
# and 1) 2 beat 1, which beat 0.5 (see benchmarks/README.md).
GROUP_RETRIEVAL_WEIGHT = 2.0


@dataclass
class TrainConfig:
    """Everything about a training run except the model's own hyper-parameters."""

    k: int = 10
    # Most epochs; None: fitted to the data (`training_epochs`), so that a small set gets
    # as many optimiser steps as a large one and a large one no more passes than it needs.
    epochs: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    lambda_kl: float = 1e-3
    kl_warmup_epochs: int = 5
    patience: int = 5
    grad_clip: float = 5.0
    loss: str = "gaussian_nll"
    # beta-NLL exponent (see model.popularity_loss); 0 is the plain Gaussian NLL.
    beta_nll: float = 0.0
    seed: int = 0
    targets: list[str] = field(default_factory=list)  # empty: every label of the bank
    split_by_time: bool = False
    time_safe: bool | None = None  # None: on whenever the bank has publish times
    interval: float = 0.9
    mc_samples: int = 64
    calibrate_interval: bool = True
    eval_batch_size: int = 512
    threads: int | None = None
    # Neighbours' projected features come from a table refreshed every this many steps
    # instead of being projected in every batch: several times faster on CPU, the
    # neighbour side then passes no gradient, and projecting afresh every step measured
    # no better (benchmarks/README.md).
    projection_refresh_steps: int = 20
    # Metadata expert inputs (features.MetaFeaturizer): the bank's metadata columns to use
    # (empty: all), columns to treat as categories even when numeric (e.g. a creator id),
    # and the training count below which a category goes to the unknown bucket.
    meta_cols: list[str] = field(default_factory=list)
    meta_categorical: list[str] = field(default_factory=list)
    meta_min_count: int = DEFAULT_MIN_COUNT
    # Clip numeric metadata to its training range (features.MetaFeaturizer.fit).
    meta_clip_range: bool = True
    # Title bag of terms (lexicon.Lexicon): training titles a term must appear in, and
    # the longest run of adjacent words that makes a term.
    lexicon_min_count: int = LEXICON_MIN_COUNT
    lexicon_ngrams: int = LEXICON_NGRAMS
    # Word prior (word_prior.fit_word_ridge): folds of its cross-fitting.
    word_prior_folds: int = WordPriorConfig().folds
    # Hybrid neighbours (retriever.rerank): the dense search's best `rerank_candidates`
    # are re-scored as cosine + lexical_retrieval * TF-IDF cosine of the titles' bags of
    # terms (the run's vocabulary); 0 keeps the dense neighbours.
    lexical_retrieval: float = LEXICAL_RETRIEVAL_WEIGHT
    rerank_candidates: int = RERANK_CANDIDATES
    # Neighbour groups (dataset.GroupBoost): a metadata column (e.g. the creator) whose
    # equal values make a key score `group_retrieval` more; empty: no groups.
    neighbour_group: str = ""
    group_retrieval: float = GROUP_RETRIEVAL_WEIGHT
    # Dense search of the neighbours (NEIGHBOUR_INDEXES), the memory size from which
    # "auto" uses the index, and the index's graph.
    neighbour_index: str = "auto"
    ann_threshold: int = ANN_THRESHOLD
    ann: AnnConfig = field(default_factory=AnnConfig)
    # Torch device of the model while training and predicting; None: CUDA when present.
    device: str | None = None
    # The run's members (boosting.MEMBERS): the network, the boosted trees, or both,
    # blended with weights fitted on the validation split.
    members: list[str] = field(default_factory=lambda: list(MEMBERS))
    boost: BoostConfig = field(default_factory=BoostConfig)

    @property
    def quantiles(self) -> tuple[float, float]:
        """The predictive interval's lower and upper quantiles (0.05, 0.95 for 0.9)."""
        return (1 - self.interval) / 2, 1 - (1 - self.interval) / 2

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if isinstance(self.boost, dict):
            check_keys("train.boost", self.boost, BoostConfig)
            self.boost = BoostConfig(**self.boost)
        if isinstance(self.ann, dict):
            check_keys("train.ann", self.ann, AnnConfig)
            self.ann = AnnConfig(**self.ann)
        if self.neighbour_index not in NEIGHBOUR_INDEXES:
            raise ValueError(f"TrainConfig.neighbour_index must be one of {NEIGHBOUR_INDEXES}, got {self.neighbour_index!r}")
        if self.ann_threshold < 1:
            raise ValueError("TrainConfig.ann_threshold must be at least 1")
        self.members = list(self.members)
        unknown = [m for m in self.members if m not in MEMBERS]
        if unknown or not self.members:
            raise ValueError(f"TrainConfig.members must be some of {MEMBERS}, got {self.members}")
        if self.projection_refresh_steps < 1:
            raise ValueError("TrainConfig.projection_refresh_steps must be at least 1")
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.beta_nll <= 1.0:
            raise ValueError(f"TrainConfig.beta_nll must lie in [0, 1], got {self.beta_nll}")
        if self.k < 0 or (self.epochs is not None and self.epochs < 1) or self.batch_size < 1:
            raise ValueError("TrainConfig: k must be >= 0, epochs and batch_size >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of `to_dict`. Unknown keys are an error that names them; configs of
        earlier versions load (options since removed left off)."""
        # a run saved before hybrid neighbours existed (a run's config holds every field)
        legacy = "lexical_retrieval" not in d and {"mc_samples", "eval_batch_size", "calibrate_interval"} <= set(d)
        d = drop_removed("train", dict(d), {"ema_decay": 0.0})
        if d.get("projection_refresh_steps") == 0:
            raise ValueError(
                "train config switches on an option this version no longer has: "
                "projection_refresh_steps=0 (see benchmarks/README.md, \"Removed options\")"
            )
        if legacy:  # runs saved before hybrid neighbours existed were trained on dense ones
            d = {"lexical_retrieval": 0.0, **d}
        check_keys("train", d, cls)
        return cls(**d)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_nmse: float
    val_src: float
    seconds: float


@dataclass
class PreparedData:
    """A snapshot restricted to the chosen targets, split, with neighbours."""

    snapshot: BankSnapshot
    target_idx: list[int]
    splits: dict[str, np.ndarray]
    neighbours: dict[str, Neighbours]
    norm: TargetNorm
    table: FeatureTable
    time_safe: bool
    featurizer: MetaFeaturizer | None = None
    lexicon: Lexicon | None = None
    word_ridge: WordRidge | None = None
    # How the neighbours were re-ranked (None: dense); serving re-ranks the same way.
    rerank: LexicalRerank | None = None
    # Same-group bonus of the neighbours (None: no groups); serving uses the same.
    groups: GroupBoost | None = None
    # The wider neighbourhoods summarised in each batch (ModelConfig.wide_widths).
    wide_widths: tuple[int, ...] = ()
    # The HNSW index the dense neighbours came from (None: exact search), and the share
    # of the exact top RECALL_AT it found on a sample of queries.
    neighbour_index: AnnIndex | None = None
    neighbour_recall: float | None = None
    # keeps a temporary index folder alive as long as the data (see `prepare`)
    index_folder: Any = None

    @property
    def target_names(self) -> list[str]:
        return [self.snapshot.label_names[i] for i in self.target_idx]

    def targets(self, idx: np.ndarray) -> np.ndarray:
        return self.snapshot.targets[idx][:, self.target_idx]


def resolve_targets(snapshot: BankSnapshot, wanted: list[str]) -> list[int]:
    if not snapshot.label_names:
        raise ValueError("the bank has no labelled items: build it with --label-col")
    if not wanted:
        return list(range(len(snapshot.label_names)))
    missing = [t for t in wanted if t not in snapshot.label_names]
    if missing:
        raise ValueError(
            f"target(s) {missing} not in the bank; it has {snapshot.label_names}"
        )
    return [snapshot.label_names.index(t) for t in wanted]


def prepare(
    snapshot: BankSnapshot,
    cfg: TrainConfig,
    splits: dict[str, np.ndarray] | None = None,
    norm: TargetNorm | None = None,
    meta: MetaFeaturizer | str | None = "fit",
    lexicon: Lexicon | str | None = None,
    word_prior: bool = False,
    wide_widths: tuple[int, ...] = (),
    index_root: Path | None = None,
) -> PreparedData:
    """Targets, splits, neighbours, normalisation and feature table of a snapshot.

    meta: "fit" fits the metadata features on the training split; a MetaFeaturizer (a
    saved run's) is used as is; None means no metadata features. lexicon: likewise for
    the titles' bag-of-words vocabulary. word_prior: fit the word ridge on the training
    split (needs a lexicon) and give training items its out-of-fold estimates; a saved
    run's ridge lives in its model instead. wide_widths: the wider neighbourhoods the
    model reads (their largest is searched beside the k neighbours). index_root: where
    the neighbour index is kept when the run uses one (a run's folder); None: a
    temporary folder that lives as long as the data (`save_run` copies it into the run).
    """
    target_idx = resolve_targets(snapshot, cfg.targets)
    # Restrict "labelled" to the chosen targets by viewing only those columns.
    view = snapshot.with_targets([snapshot.label_names[i] for i in target_idx])
    has_time = bool(np.isfinite(snapshot.published_ts).any())
    time_safe = has_time if cfg.time_safe is None else cfg.time_safe
    if time_safe and not has_time:
        raise ValueError("--time-safe needs publish times: build the bank with --time-col")
    if cfg.split_by_time and not has_time:
        raise ValueError("--split-by-time needs publish times: build the bank with --time-col")
    if splits is None:
        n_labelled = int(view.labelled.sum())
        if n_labelled < MIN_LABELLED:
            raise ValueError(
                f"too few labelled items to train: {n_labelled}, need at least {MIN_LABELLED} "
                "(build the bank with more rows that have --label-col values)"
            )
        splits = make_splits(view, SplitConfig(seed=cfg.seed, by_time=cfg.split_by_time))
    if len(splits["train"]) == 0:
        raise ValueError("no labelled training items in the bank")
    train_targets = view.targets[splits["train"]]
    unlabelled = [n for j, n in enumerate(view.label_names) if np.isnan(train_targets[:, j]).all()]
    if unlabelled:
        raise ValueError(
            f"target(s) {unlabelled} have no labelled item in the training split; "
            "choose others with --target, or build the bank with their labels"
        )
    norm = norm or TargetNorm.fit(view.targets[splits["train"]])
    if isinstance(meta, str):
        if meta != "fit":
            raise ValueError(f"meta must be 'fit', a MetaFeaturizer or None, not {meta!r}")
        meta = MetaFeaturizer.fit_snapshot(
            view,
            splits["train"],
            columns=cfg.meta_cols or None,
            categorical=cfg.meta_categorical,
            min_count=cfg.meta_min_count,
            clip_range=cfg.meta_clip_range,
        )
    if isinstance(lexicon, str):
        if lexicon != "fit":
            raise ValueError(f"lexicon must be 'fit', a Lexicon or None, not {lexicon!r}")
        titles = [view.titles[i] for i in splits["train"]] if view.titles else []
        lexicon = Lexicon.fit(titles, min_count=cfg.lexicon_min_count, ngrams=cfg.lexicon_ngrams)
    if lexicon is not None and (lexicon.size == 0 or not view.titles):
        lexicon = None  # no title shares a word with enough others: nothing to learn
    table = FeatureTable(view, norm, meta, lexicon)
    rerank, groups = neighbour_policy(view, table, lexicon, cfg)
    approximate, holder = None, None
    if uses_index(cfg, len(splits["train"])):
        if index_root is None:
            holder = tempfile.TemporaryDirectory(prefix="mvpp-neighbour-index-")
            index_root = Path(holder.name)
        approximate = ApproximateSearch(index_root, cfg.ann, cfg.threads)
    neighbours, search = split_neighbours(
        view, splits, cfg.k, time_safe, rerank, groups, max(wide_widths, default=0), approximate
    )
    recall = None
    if search.index is not None:
        search.index.close()  # the workers' graphs go before this process loads its own
        every = np.concatenate(list(splits.values()))
        sample = np.random.default_rng(cfg.seed).choice(every, min(RECALL_SAMPLE, len(every)), replace=False)
        recall = search.recall(QueryBatch.from_snapshot(view, np.sort(sample), rerank, groups), RECALL_AT)
        logger.info("neighbour index: recall@%d %.4f against exact search (%d queries)", RECALL_AT, recall, len(sample))
        search.index.close()  # its workers and graph are not needed while training
    ridge = None
    if word_prior and table.words is not None and table.word_weights is not None:
        ridge = _fit_word_prior(table, splits["train"], lexicon.size, cfg)
    return PreparedData(
        view, list(range(len(target_idx))), splits, neighbours, norm, table, time_safe, meta,
        lexicon, ridge, rerank, groups, tuple(wide_widths), search.index, recall, holder,
    )


def uses_index(cfg: TrainConfig, memory_size: int) -> bool:
    """Whether a search among `memory_size` keys takes its candidates from an index."""
    if cfg.neighbour_index == "auto":
        return memory_size >= cfg.ann_threshold
    return cfg.neighbour_index == "ann"


def neighbour_policy(
    snapshot: BankSnapshot, table: FeatureTable, lexicon: Lexicon | None, cfg: TrainConfig
) -> tuple[LexicalRerank | None, GroupBoost | None]:
    """The hybrid re-rank and the group bonus of a run's neighbours over `snapshot`
    (`table` is its feature table); None where switched off."""
    rerank = None
    if lexicon is not None and table.words is not None and table.word_weights is not None and cfg.lexical_retrieval:
        rerank = LexicalRerank(
            table.words.numpy(), table.word_weights.numpy(), lexicon.size, cfg.lexical_retrieval,
            cfg.rerank_candidates,
        )
    groups = None
    if cfg.neighbour_group and cfg.group_retrieval != 0.0:
        groups = GroupBoost.fit(snapshot.metadata, cfg.neighbour_group, cfg.group_retrieval)
    return rerank, groups


def _fit_word_prior(table: FeatureTable, train: np.ndarray, vocab_size: int, cfg: TrainConfig) -> WordRidge:
    """Fit the word ridge on the training items; the table gets every item's estimate,
    out-of-fold on training items (see word_prior)."""
    assert table.words is not None and table.word_weights is not None
    ids, weights = table.words.numpy(), table.word_weights.numpy()
    ridge, oof = fit_word_ridge(
        ids[train], weights[train], table.targets[train].numpy(), vocab_size,
        WordPriorConfig(folds=cfg.word_prior_folds), seed=cfg.seed,
    )
    prior = ridge.predict(ids, weights).astype(np.float32)
    prior[train] = oof
    table.word_prior = torch.from_numpy(prior)
    return ridge


def model_config_for(data: PreparedData, base: ModelConfig | None = None) -> ModelConfig:
    """The model config with input sizes and modality switches fitted to the bank."""
    snap = data.snapshot
    cfg = copy.deepcopy(base) if base else ModelConfig()
    sizes = cfg.inputs
    sizes.d_token = max(1, snap.tokens.shape[2])
    sizes.d_frame = max(1, snap.frames.shape[2])
    sizes.n_targets = len(data.target_idx)
    fz = data.featurizer
    sizes.n_meta_numeric = fz.n_numeric if fz is not None else 0
    sizes.meta_cardinalities = fz.cardinalities if fz is not None else []
    sizes.lexicon_size = data.lexicon.size if data.lexicon is not None else 0
    # A modality absent from the whole bank has nothing to learn from.
    if snap.frames.shape[1] == 0:
        cfg.use_frames = False
    if snap.tokens.shape[1] == 0:
        cfg.use_text = False
    sizes.d_audio = max(1, snap.audio.shape[2])
    if snap.audio.shape[1] == 0:
        cfg.use_audio = False
    return ModelConfig.from_dict(cfg.to_dict())


def batch_for(data: PreparedData, split: str, pos: np.ndarray) -> tuple[ModelBatch, torch.Tensor]:
    """The model batch and normalised targets (B, T) of split items at positions `pos`."""
    items = torch.from_numpy(data.splits[split][pos])
    nb = data.neighbours[split]
    batch = make_batch(data.table, data.table.items(items), nb.take(pos), data.wide_widths)
    return batch, data.table.targets[items]


def iterate_batches(
    data: PreparedData, split: str, batch_size: int, rng: np.random.Generator | None = None
):
    """Yields (positions within the split, ModelBatch, targets (B, T) normalised)."""
    n = len(data.splits[split])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for lo in range(0, n, batch_size):
        pos = order[lo : lo + batch_size]
        yield (pos, *batch_for(data, split, pos))


def predict_split(
    model: PopularityModel,
    data: PreparedData,
    split: str,
    cfg: TrainConfig,
    mc_samples: int | None = None,
    features: list[tuple[np.ndarray, list[int]]] | None = None,
) -> Prediction:
    """The network's predictions (normalised scale) for every item of a split, in split
    order. `features`, when given, receives the boosted member's features of each batch
    (with the positions of the categorical ones)."""
    parts: list[Prediction] = []
    samples = cfg.mc_samples if mc_samples is None else mc_samples
    q = cfg.quantiles
    model.eval()
    nb = data.neighbours[split].indices
    data.table.project(model, nb[nb >= 0])  # exact: the current weights, no dropout
    for pos, batch, _ in iterate_batches(data, split, cfg.eval_batch_size):
        parts.append(predict_batch(model, batch, samples, q, cfg.seed))
        if features is not None:
            rows = data.splits[split][pos]
            features.append(boost_features(model, batch, data.snapshot, rows, data.featurizer))
    return concat_predictions(parts, len(data.target_idx), q)


def concat_predictions(parts: list[Prediction], n_targets: int, q: tuple[float, float]) -> Prediction:
    if not parts:
        empty = torch.zeros(0, n_targets)
        return Prediction(empty, empty, empty, empty, q)
    return Prediction(
        torch.cat([p.mean for p in parts]),
        torch.cat([p.std for p in parts]),
        torch.cat([p.lower for p in parts]),
        torch.cat([p.upper for p in parts]),
        q,
    )


def boost_features(
    model: PopularityModel,
    batch: ModelBatch,
    source: BankSnapshot,
    rows: np.ndarray,
    featurizer: MetaFeaturizer | None,
) -> tuple[np.ndarray, list[int]]:
    """The boosted member's features of a batch of rows of `source` (boosting.member_features):
    the word prior as the network gets it (out-of-fold on training items)."""
    prior = batch.word_prior
    if prior is None and model.word_prior is not None:
        with torch.no_grad():
            prior = model.word_prior(batch.words, batch.word_weights, batch.batch_size).cpu()
    value_columns = featurizer.value_columns if featurizer is not None else []
    return member_features(
        batch, source.retrieval[rows], source.has_retrieval[rows], prior, value_columns, model.config.tau_init
    )


def with_mean(pred: Prediction, mean: np.ndarray) -> Prediction:
    """The prediction moved to another mean, its interval shifted with it (the blend keeps
    the network's interval shape)."""
    m = torch.from_numpy(np.asarray(mean, np.float32))
    shift = m - pred.mean
    return Prediction(m, pred.std, pred.lower + shift, pred.upper + shift, pred.quantiles)


def predict_batch(
    model: PopularityModel, batch: ModelBatch, n_samples: int, quantiles: tuple[float, float], seed: int
) -> Prediction:
    """The model's prediction for a batch built on the CPU, on the CPU whatever the
    model's device."""
    device = next(model.parameters()).device
    pred = model.predict(batch.to(device), n_samples=n_samples, quantiles=quantiles, seed=seed)
    return Prediction(pred.mean.cpu(), pred.std.cpu(), pred.lower.cpu(), pred.upper.cpu(), pred.quantiles)


def split_metrics(
    data: PreparedData,
    split: str,
    pred: Prediction,
    interval_scale: np.ndarray | None = None,
    interval: float | None = None,
) -> dict[str, Metrics]:
    """Metrics per target on the original target scale (e.g. log2 counts)."""
    y = data.targets(data.splits[split])
    mean = data.norm.inverse(pred.mean.numpy())
    lower, upper = scaled_interval(pred, data.norm, interval_scale)
    out = {}
    for j, name in enumerate(data.target_names):
        out[name] = regression_metrics(y[:, j], mean[:, j], lower[:, j], upper[:, j], interval)
    return out


def mean_metrics(data: PreparedData, split: str, mean: np.ndarray) -> dict[str, Metrics]:
    """Metrics of a mean alone (normalised scale in, target scale out), no interval."""
    y = data.targets(data.splits[split])
    values = data.norm.inverse(mean)
    return {name: regression_metrics(y[:, j], values[:, j]) for j, name in enumerate(data.target_names)}


def scaled_interval(
    pred: Prediction, norm: TargetNorm, scale: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds on the target scale, widened or narrowed about the mean by `scale`."""
    mean = pred.mean.numpy()
    lo, hi = pred.lower.numpy(), pred.upper.numpy()
    if scale is not None:
        lo = mean - (mean - lo) * scale
        hi = mean + (hi - mean) * scale
    return norm.inverse(lo), norm.inverse(hi)


def calibrate_scale(data: PreparedData, pred: Prediction, level: float) -> np.ndarray:
    """Per-target factor s so that [mean - s*(mean-lo), mean + s*(hi-mean)] covers `level`
    of the validation targets (split-conformal on the model's own interval shape)."""
    y = data.norm.forward(data.targets(data.splits["val"]))
    mean, lo, hi = pred.mean.numpy(), pred.lower.numpy(), pred.upper.numpy()
    scales = np.ones(y.shape[1], np.float32)
    for j in range(y.shape[1]):
        ok = ~np.isnan(y[:, j])
        if ok.sum() < 20:
            continue
        r = y[ok, j] - mean[ok, j]
        half = np.where(r >= 0, hi[ok, j] - mean[ok, j], mean[ok, j] - lo[ok, j])
        ratio = np.abs(r) / np.maximum(half, 1e-6)
        n = len(ratio)
        rank = min(n - 1, int(math.ceil((n + 1) * level)) - 1)
        scales[j] = float(np.sort(ratio)[rank])
    return scales


def _finite_mean(values: list[float]) -> float:
    """Mean of the finite values; NaN when there is none (a target without a measure)."""
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else math.nan


#: `mvpp train --ablate NAME` for the neighbour search: the TrainConfig field and its "off".
TRAIN_ABLATIONS: dict[str, tuple[str, float]] = {"lexical-retrieval": ("lexical_retrieval", 0.0)}

# Fewest labelled items a run trains on: 80/10/10 must leave one item to validate and test.
MIN_LABELLED = 10
# Training length fitted to the data (TrainConfig.epochs None): enough epochs for
# STEPS_TARGET optimiser steps, at least MIN_EPOCHS and at most MAX_EPOCHS. MicroLens
# (62 steps an epoch) gets 10, TikTok-VN (30) 20, a 4,000-post set (13) 47, a million
# items 3; early stopping on validation ends any of them sooner.
STEPS_TARGET = 600
MIN_EPOCHS = 3
MAX_EPOCHS = 100


def training_epochs(steps_per_epoch: int) -> int:
    """Epochs of a run whose length is fitted to the data (see STEPS_TARGET)."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(STEPS_TARGET / max(1, steps_per_epoch)))))


# Share of the steps spent warming the learning rate up (one-cycle schedule).
WARMUP_SHARE = 0.1


def one_cycle(opt: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up to `lr` over WARMUP_SHARE of the steps, then cosine annealing.

    Short runs (a small bank, few epochs) still get at least one warm-up step and one
    annealing step; fewer than three steps train at a constant `lr`.
    """
    if total_steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # OneCycleLR's warm-up ends at step pct_start * total - 1, which must be at least 1
    pct = max(WARMUP_SHARE, 2.0 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=pct)


ProgressFn = Callable[[str, dict], None]


@dataclass
class TrainResult:
    model: PopularityModel
    model_config: ModelConfig
    data: PreparedData
    history: list[EpochLog]
    best_epoch: int
    interval_scale: np.ndarray
    metrics: dict[str, dict[str, Metrics]]  # split -> target -> metrics, of the blend
    seconds_per_epoch: float
    gbdt: GbdtMember | None = None
    blend_weights: np.ndarray | None = None  # (T,) the network's weight
    # member -> split -> target -> metrics of each member alone (with both members)
    member_metrics: dict[str, dict[str, dict[str, Metrics]]] = field(default_factory=dict)
    # Wall time of the boosted member's fit (features included); None without it.
    gbdt_seconds: float | None = None


def train(
    snapshot: BankSnapshot,
    cfg: TrainConfig,
    model_cfg: ModelConfig | None = None,
    progress: ProgressFn | None = None,
    data: PreparedData | None = None,
) -> TrainResult:
    """Train on the snapshot; returns the best model (by validation nMSE) and metrics.

    `data` reuses splits and neighbours prepared earlier (benchmarks compare several
    models on exactly the same data).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    notify = progress or (lambda event, info: None)
    base_cfg = model_cfg or ModelConfig()
    data = data or prepare(
        snapshot,
        cfg,
        meta="fit" if base_cfg.use_meta else None,
        lexicon="fit" if base_cfg.use_word_prior or cfg.lexical_retrieval else None,
        word_prior=base_cfg.use_word_prior,
        wide_widths=base_cfg.wide_widths,
    )
    mcfg = model_config_for(data, model_cfg)
    if mcfg.wide_widths != data.wide_widths:
        raise ValueError(f"the data summarises wider neighbourhoods {data.wide_widths}, the model reads "
                         f"{mcfg.wide_widths}: prepare(wide_widths=ModelConfig.wide_widths)")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = PopularityModel(mcfg).to(device)
    if model.word_prior is not None:
        if data.word_ridge is None:
            raise ValueError("the model uses the word prior but the data has no word ridge: prepare(word_prior=True)")
        model.word_prior.load(
            torch.from_numpy(data.word_ridge.coef), torch.from_numpy(data.word_ridge.bias)
        )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = math.ceil(len(data.splits["train"]) / cfg.batch_size)
    epochs = cfg.epochs or training_epochs(n_batches)
    sched = one_cycle(opt, cfg.lr, epochs * n_batches)
    notify("start", {"epochs": epochs, "batches": n_batches, "splits": {k: len(v) for k, v in data.splits.items()}})
    best = (math.inf, -1, copy.deepcopy(model.state_dict()))
    history: list[EpochLog] = []
    train_seconds = []
    bad_epochs = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        warm = min(1.0, (epoch + 1) / max(1, cfg.kl_warmup_epochs))
        model.train()
        losses = []
        data.table.clear_projection()
        order = rng.permutation(len(data.splits["train"]))
        for step, lo in enumerate(range(0, len(order), cfg.batch_size)):
            if step % cfg.projection_refresh_steps == 0:
                # the neighbours of the next steps' items, not the whole bank: at 10^6
                # items a refresh of every row would cost more than the steps themselves
                window = order[lo : lo + cfg.projection_refresh_steps * cfg.batch_size]
                needed = data.neighbours["train"].take(window).indices
                data.table.project(model, needed[needed >= 0])
            batch, y = batch_for(data, "train", order[lo : lo + cfg.batch_size])
            out = model(batch.to(device))
            y = y.to(device)
            loss, _parts = popularity_loss(out, y, ~torch.isnan(y), cfg.lambda_kl * warm, cfg.loss, cfg.beta_nll)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            notify("step", {"loss": losses[-1]})
        train_seconds.append(time.perf_counter() - t0)
        val = split_metrics(data, "val", predict_split(model, data, "val", cfg, mc_samples=0))
        val_nmse = _finite_mean([m.nmse for m in val.values()])
        val_src = _finite_mean([m.src for m in val.values()])
        log = EpochLog(epoch + 1, float(np.mean(losses)), val_nmse, val_src, time.perf_counter() - t0)
        history.append(log)
        notify("epoch", asdict(log))
        if not math.isfinite(log.train_loss):
            raise ValueError(f"training diverged in epoch {epoch + 1} (loss {log.train_loss}): try a lower --lr")
        # a validation split too small to measure (one item, or equal targets) gives no
        # nMSE: then every epoch counts as the best so far and training runs its course
        if not math.isfinite(val_nmse) or val_nmse < best[0]:
            best = (val_nmse if math.isfinite(val_nmse) else math.inf, epoch + 1, copy.deepcopy(model.state_dict()))
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    model.load_state_dict(best[2])
    model.eval()
    notify("members", {"members": cfg.members})
    t_members = time.perf_counter()
    net, gbdt, weights = fit_members(model, data, cfg)
    gbdt_seconds = time.perf_counter() - t_members if gbdt else None
    blended = {s: with_mean(net[s], blend(net[s].mean.numpy(), gbdt.get(s), weights)) for s in ("val", "test")}
    scale = (
        calibrate_scale(data, blended["val"], cfg.interval)
        if cfg.calibrate_interval
        else np.ones(len(data.target_idx), np.float32)
    )
    metrics = {s: split_metrics(data, s, blended[s], scale, cfg.interval) for s in ("val", "test")}
    member_metrics: dict[str, dict[str, dict[str, Metrics]]] = {}
    if gbdt:
        # the means alone: the members' intervals are not calibrated, only the blend's
        member_metrics["net"] = {s: mean_metrics(data, s, net[s].mean.numpy()) for s in ("val", "test")}
        member_metrics["gbdt"] = {s: mean_metrics(data, s, gbdt[s]) for s in ("val", "test")}
    return TrainResult(
        model.cpu(), mcfg, data, history, best[1], scale, metrics, float(np.mean(train_seconds)),
        gbdt=gbdt.get("member"), blend_weights=weights, member_metrics=member_metrics, gbdt_seconds=gbdt_seconds,
    )


def fit_members(
    model: PopularityModel, data: PreparedData, cfg: TrainConfig
) -> tuple[dict[str, Prediction], dict, np.ndarray]:
    """The network's predictions on validation and test; with the boosted member, the
    trees fitted on the training items (features as the network saw them) and their
    predictions; and the blend weights, fitted on validation."""
    use_gbdt = "gbdt" in cfg.members
    features: dict[str, list[tuple[np.ndarray, list[int]]]] = {s: [] for s in ("train", "val", "test")}
    net: dict[str, Prediction] = {}
    for split in ("train", "val", "test") if use_gbdt else ("val", "test"):
        samples = 0 if split == "train" else None  # training items: only the features are needed
        pred = predict_split(model, data, split, cfg, mc_samples=samples, features=features[split] if use_gbdt else None)
        if split != "train":
            net[split] = pred
    y = {s: data.norm.forward(data.targets(data.splits[s])).astype(np.float32) for s in ("train", "val", "test")}
    gbdt: dict = {}
    if use_gbdt:
        categorical = features["train"][0][1]
        x: dict[str, np.ndarray] = {}
        for s, parts in features.items():  # one copy of a split's features at a time (1.3 GB at 10^6)
            x[s] = np.concatenate([f for f, _ in parts]) if parts else np.zeros((0, 0), np.float32)
            parts.clear()
        member = GbdtMember.fit(x["train"], y["train"], x["val"], y["val"], categorical, cfg.boost, cfg.seed,
                                cfg.threads or torch.get_num_threads())
        gbdt = {"member": member, "val": member.predict(x["val"]), "test": member.predict(x["test"])}
    weights = fit_blend(net["val"].mean.numpy(), gbdt.get("val"), y["val"], cfg.members)
    return net, gbdt, weights
