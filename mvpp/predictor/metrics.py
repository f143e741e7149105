"""Regression metrics over a whole split (never averaged per batch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Metrics:
    n: int
    nmse: float
    mae: float
    src: float
    r2: float
    coverage: float | None = None  # share of true values inside the predicted interval
    interval: float | None = None  # nominal level of that interval, e.g. 0.9

    def to_dict(self) -> dict[str, float | int | None]:
        """The metrics as JSON-safe values: one that could not be computed (no labelled
        item, a constant target) is None, never NaN."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) < 2:
        return math.nan
    ry, rp = _rank(np.asarray(y, np.float64)), _rank(np.asarray(p, np.float64))
    sy, sp = ry.std(), rp.std()
    if sy == 0 or sp == 0:
        return 0.0
    return float(((ry - ry.mean()) * (rp - rp.mean())).mean() / (sy * sp))


def regression_metrics(
    y: np.ndarray,
    pred: np.ndarray,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    interval: float | None = None,
) -> Metrics:
    """nMSE = mean((y - y^)^2) / var(y); MAE; Spearman SRC; R^2; interval coverage.

    NaN targets are left out.
    """
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64)
    keep = ~np.isnan(y)
    y, pred = y[keep], pred[keep]
    n = len(y)
    if n == 0:
        return Metrics(0, math.nan, math.nan, math.nan, math.nan)
    mse = float(np.mean((y - pred) ** 2))
    var = float(np.var(y))
    nmse = mse / var if var > 0 else math.nan
    coverage = None
    if lower is not None and upper is not None:
        lo, hi = np.asarray(lower)[keep], np.asarray(upper)[keep]
        coverage = float(np.mean((y >= lo) & (y <= hi)))
    return Metrics(
        n=n,
        nmse=nmse,
        mae=float(np.mean(np.abs(y - pred))),
        src=spearman(y, pred),
        r2=1.0 - nmse if var > 0 else math.nan,
        coverage=coverage,
        interval=interval,
    )
