"""The boosted member of a run: gradient-boosted trees on what the network sees as
numbers, blended with the network's mean.

Trees and the network err differently: trees cut numbers at thresholds (a follower count,
a neighbour's label) where a network draws smooth surfaces, and the network reads the
title's tokens and the neighbours' sequences, which trees cannot. Their blend, with one
weight per target fitted on the validation split, is never worse than the better of the
two there (the weights 0 and 1 are among those tried).

Features per item (`member_features`): the retrieval vector, the metadata expert's numeric
values and categories, the neighbourhood's statistics (the model's `neighbour_summary`, its
wider neighbourhoods' and a softmax-weighted label average at the model's initial
temperature), and the word prior:
out-of-fold on training items, as the network gets it. Missing values are NaN, which the
trees handle themselves. Boosters are saved in LightGBM's own text format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvpp.predictor.model import ModelBatch

logger = logging.getLogger(__name__)

MEMBERS = ("net", "gbdt")
# Blend weights of the network tried on the validation split (the trees get 1 - w).
BLEND_GRID = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))


@dataclass
class BoostConfig:
    """LightGBM settings of the boosted member (its documented defaults where not given)."""

    learning_rate: float = 0.03
    num_leaves: int = 31
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_rounds: int = 3000
    # Rounds without a better validation error before boosting stops.
    early_stopping: int = 100
    # Boosters per target, each on its own seed (rows and features subsampled anew),
    # their predictions averaged: one booster's splits on a 384-d embedding hang on which
    # rows and columns it drew, and the average of three lowered the blend's test nMSE
    # on 8 of 10 set-seed-target cases (benchmarks/README.md, "Bagged boosters").
    bags: int = 3

    def __post_init__(self) -> None:
        if self.bags < 1:
            raise ValueError(f"BoostConfig.bags must be at least 1, got {self.bags}")

    def params(self, seed: int, threads: int) -> dict[str, object]:
        return {
            "objective": "regression",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "seed": seed,
            "num_threads": threads,
            "verbosity": -1,
            # deterministic given the seed and the thread count
            "deterministic": True,
            "force_row_wise": True,
        }


def member_features(
    batch: ModelBatch,
    vectors: np.ndarray,
    has_vector: np.ndarray,
    word_prior: torch.Tensor | None,
    value_columns: list[int],
    tau: float,
) -> tuple[np.ndarray, list[int]]:
    """(B, F) features of the items of a batch and the positions of the categorical ones.

    vectors, has_vector: the items' retrieval vectors (B, D) and (B,); word_prior (B, T)
    or None; value_columns: the positions of each numeric metadata feature's value in
    `batch.meta_numeric` (features.MetaFeaturizer.value_columns); tau: the temperature of
    the weighted label average.
    """
    parts = [np.where(has_vector[:, None], vectors, np.nan).astype(np.float32)]
    if batch.meta_numeric is not None and batch.meta_numeric_mask is not None and value_columns:
        num = batch.meta_numeric[:, value_columns].numpy()
        ok = batch.meta_numeric_mask[:, value_columns].numpy()
        parts.append(np.where(ok, num, np.nan).astype(np.float32))
    labels, mask = batch.nb_labels, batch.nb_label_mask.bool() & batch.nb_mask.bool().unsqueeze(-1)
    w = torch.softmax(torch.where(batch.nb_mask.bool(), batch.nb_score / tau, -torch.inf), dim=-1)
    w = torch.nan_to_num(w).unsqueeze(-1) * mask  # (B, k, T)
    total = w.sum(dim=1)
    average = torch.where(total > 0, (w * labels).sum(dim=1) / total.clamp_min(1e-12), torch.nan)
    parts += [average.numpy().astype(np.float32), batch.nb_summary.numpy().astype(np.float32)]
    if batch.nb_wide is not None:
        parts.append(batch.nb_wide.numpy().astype(np.float32))
    if word_prior is not None:
        parts.append(word_prior.detach().numpy().astype(np.float32))
    categorical: list[int] = []
    if batch.meta_categorical is not None and batch.meta_categorical.shape[1]:
        start = sum(p.shape[1] for p in parts)
        codes = batch.meta_categorical.numpy().astype(np.float32)
        parts.append(np.where(codes > 0, codes, np.nan))  # 0 is the unknown bucket: missing
        categorical = list(range(start, start + codes.shape[1]))
    return np.concatenate(parts, axis=1), categorical


@dataclass
class GbdtMember:
    """The boosters of each target (an empty list for a target without labelled training
    items); a target's prediction is the mean of its boosters'."""

    boosters: list[list[object]]
    categorical: list[int] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        categorical: list[int],
        cfg: BoostConfig,
        seed: int,
        threads: int,
    ) -> GbdtMember:
        """Fit `cfg.bags` boosters per target on the training items (seeds seed, seed + 1,
        ...), each boosting until the validation error stops falling.
        y: (N, T) normalised targets, NaN where missing."""
        import lightgbm as lgb

        boosters: list[list[object]] = []
        for t in range(y_train.shape[1]):
            ok_tr, ok_va = np.isfinite(y_train[:, t]), np.isfinite(y_val[:, t])
            if not ok_tr.any():
                boosters.append([])
                continue
            # a labelled-everywhere target needs no masked copy of the features
            x_fit = x_train if ok_tr.all() else x_train[ok_tr]
            # one binned dataset for every booster of the target: binning depends on the
            # data only, and is a tenth of a booster's time
            train_set = lgb.Dataset(x_fit, y_train[ok_tr, t], categorical_feature=categorical or "auto",
                                    free_raw_data=True)
            valid = []
            if ok_va.sum() >= 2:
                valid = [lgb.Dataset(x_val[ok_va], y_val[ok_va, t], reference=train_set)]
            bag = []
            for b in range(cfg.bags):
                callbacks = [lgb.early_stopping(cfg.early_stopping, verbose=False)] if valid else []
                booster = lgb.train(cfg.params(seed + b, threads), train_set, num_boost_round=cfg.max_rounds,
                                    valid_sets=valid, callbacks=callbacks)
                logger.info("gbdt target %d, booster %d: %d rounds", t, b,
                            booster.best_iteration or booster.current_iteration())
                bag.append(booster)
            boosters.append(bag)
        return cls(boosters, list(categorical))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, T) normalised; NaN for a target without boosters."""
        out = np.full((len(x), len(self.boosters)), np.nan, np.float32)
        for t, bag in enumerate(self.boosters):
            if bag and len(x):
                out[:, t] = np.mean([b.predict(x, num_iteration=b.best_iteration or None) for b in bag], axis=0)
        return out

    def save(self, folder: Path) -> list[list[str]]:
        """Each booster as FOLDER/gbdt-T-B.txt (LightGBM's text format); the file names per
        target (an empty list for a target without boosters)."""
        names: list[list[str]] = []
        for t, bag in enumerate(self.boosters):
            names.append([])
            for b, booster in enumerate(bag):
                name = f"gbdt-{t}-{b}.txt"
                (folder / name).write_text(booster.model_to_string(num_iteration=booster.best_iteration or None))
                names[-1].append(name)
        return names

    @staticmethod
    def file_lists(names: list) -> list[list[str]]:
        """A run's recorded booster files per target; runs saved with one booster per
        target recorded one name (or "" for none) per target."""
        return [[n] if isinstance(n, str) and n else [] if isinstance(n, str) else [str(m) for m in n]
                for n in names]

    @classmethod
    def load(cls, folder: Path, names: list, categorical: list[int]) -> GbdtMember:
        import lightgbm as lgb

        boosters = [[lgb.Booster(model_str=(folder / name).read_text()) for name in bag]
                    for bag in cls.file_lists(names)]
        return cls(boosters, categorical)


def fit_blend(net: np.ndarray, gbdt: np.ndarray | None, y: np.ndarray, members: list[str]) -> np.ndarray:
    """The network's weight per target, (T,): 1 without the trees, 0 without the network,
    else the grid value with the least validation squared error (ties to the network)."""
    n_targets = y.shape[1]
    if gbdt is None or "gbdt" not in members:
        return np.ones(n_targets, np.float32)
    if "net" not in members:
        return np.zeros(n_targets, np.float32)
    weights = np.ones(n_targets, np.float32)
    for t in range(n_targets):
        ok = np.isfinite(y[:, t]) & np.isfinite(gbdt[:, t])
        if not ok.any():
            continue
        errors = [np.mean((w * net[ok, t] + (1 - w) * gbdt[ok, t] - y[ok, t]) ** 2) for w in BLEND_GRID]
        best = min(errors)
        # among equal errors the larger network weight: its intervals belong to its mean
        weights[t] = max(w for w, e in zip(BLEND_GRID, errors, strict=True) if e <= best + 1e-12)
    return weights


def blend(net: np.ndarray, gbdt: np.ndarray | None, weights: np.ndarray) -> np.ndarray:
    """w * net + (1 - w) * gbdt per target; the network alone where the trees have nothing."""
    if gbdt is None:
        return net
    with np.errstate(invalid="ignore"):  # a non-finite member stays non-finite, and is reported
        mixed = weights * net + (1 - weights) * gbdt
    return np.where(np.isfinite(gbdt), mixed, net).astype(np.float32)
