"""A cross-fitted ridge regression of the targets on the titles' TF-IDF bag of words.

Exact title words (a series name, a creator's catchphrase, a hashtag) carry popularity
signal that sentence embeddings blur, but a network that learns one embedding row per
word memorises the few training titles each word occurs in. A ridge regression on the
same words is the classic well-regularised way to use them; its estimate (the "word
prior") becomes one more input of the predictor.

The network must see on its training items what it will see on new ones: an estimate
from a ridge that never saw the item's own label. Training items therefore get
out-of-fold estimates (K-fold over the training split), and every other item the
estimate of the ridge fitted on the whole training split. The L2 penalty is picked per
target by the out-of-fold error, so nothing is tuned on validation data.

Bags of words are the lexicon's padded form: ids (N, W) with 0 as padding and weights
(N, W). The solver is conjugate gradients on the normal equations, which only needs
products with that sparse matrix; it holds it as compressed sparse rows (and their
transpose), 20x faster per product than gathering coefficient rows for every slot, which
matters at 10^6 titles (5 folds x 5 penalties x tens of iterations).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sparse
import torch

logger = logging.getLogger(__name__)


@dataclass
class WordPriorConfig:
    """How the word ridge is fitted."""

    folds: int = 5
    # L2 penalties tried per target (targets are standardised, word vectors unit-norm).
    l2_grid: Sequence[float] = field(default_factory=lambda: (0.3, 1.0, 3.0, 10.0, 30.0))
    max_iter: int = 400
    # Conjugate gradients stop once the residual norm falls below tol * ||X^T y||.
    tol: float = 1e-5

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"WordPriorConfig.folds must be at least 2, got {self.folds}")
        if not self.l2_grid or any(v <= 0 for v in self.l2_grid):
            raise ValueError("WordPriorConfig.l2_grid must hold positive penalties")


@dataclass
class WordRidge:
    """Fitted ridge: estimate = bias + sum_w weight_w * coef[id_w] (per target)."""

    coef: np.ndarray  # (V + 1, T) float32; row 0 (padding) is zero
    bias: np.ndarray  # (T,) float32
    l2: np.ndarray  # (T,) chosen penalties

    def predict(self, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(N, W), (N, W) -> (N, T)."""
        return ridge_estimate(ids, weights, self.coef, self.bias)


def ridge_estimate(ids: Any, weights: Any, coef: Any, bias: Any) -> Any:
    """bias + sum_w weight_w coef[id_w]: ids and weights (N, W), coef (V + 1, T) with row 0
    (padding) zero, bias (T,) or 0 -> (N, T). Numpy arrays (fitting) or torch tensors (the
    model's WordPrior): one formula for both."""
    if isinstance(coef, torch.Tensor):  # padded slots may hold anything, even NaN
        weights = torch.where(ids > 0, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
        return torch.einsum("nw,nwt->nt", weights, coef[ids]) + bias
    return np.einsum("nw,nwt->nt", np.where(ids > 0, weights, 0.0), coef[ids]) + bias


class _BagMatrix:
    """The bags (N, W) as a sparse (N, V + 1) matrix X, padding left out: X @ w and X^T @ r."""

    def __init__(self, ids: np.ndarray, weights: np.ndarray, n_rows: int) -> None:
        keep = ids > 0
        starts = np.concatenate([[0], np.cumsum(keep.sum(1))])
        self.x = sparse.csr_matrix((weights[keep], ids[keep], starts), shape=(len(ids), n_rows))
        self.xt = self.x.T.tocsr()

    def matvec(self, w: np.ndarray) -> np.ndarray:  # (V + 1, T) -> (N, T)
        return np.asarray(self.x @ w)

    def rmatvec(self, r: np.ndarray) -> np.ndarray:  # (N, T) -> (V + 1, T)
        return np.asarray(self.xt @ r)


def _solve(
    x: _BagMatrix,
    y: np.ndarray,
    mask: np.ndarray,
    l2: np.ndarray,
    cfg: WordPriorConfig,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge of y (N, T) on the bags x with an unpenalised bias on the rows where mask
    (N, T) is true, each target separately (all at once): returns coef (V + 1, T), bias (T,).

    The bias is eliminated by centring: minimising over it leaves a ridge on X - mean(X)
    and y - mean(y), with (X - 1 m^T) w computed as X w - m.w.
    """
    m = mask.astype(np.float64)
    count = np.maximum(m.sum(0), 1.0)  # (T,)
    y0 = np.where(mask, y, 0.0)
    y_mean = y0.sum(0) / count  # (T,)
    x_mean = x.rmatvec(m) / count  # (V + 1, T) column means per target

    def apply(w: np.ndarray) -> np.ndarray:  # (X_c^T D X_c + l2 I) w
        xw = (x.matvec(w) - (x_mean * w).sum(0)) * m  # (N, T)
        xtxw = x.rmatvec(xw) - x_mean * xw.sum(0)
        return xtxw + l2 * w

    resid_y = (y0 - y_mean) * m
    b = x.rmatvec(resid_y) - x_mean * resid_y.sum(0)  # (V + 1, T)
    b[0] = 0.0  # the padding row stays zero
    w = start[0].astype(np.float64) if start is not None else np.zeros_like(b)
    r = b - apply(w)
    r[0] = 0.0
    p = r.copy()
    rr = (r * r).sum(0)
    stop = (cfg.tol * np.linalg.norm(b, axis=0)) ** 2
    for _ in range(cfg.max_iter):
        if np.all(rr <= stop):
            break
        ap = apply(p)
        ap[0] = 0.0
        alpha = rr / np.maximum((p * ap).sum(0), 1e-300)
        w += alpha * p
        r -= alpha * ap
        rr_new = (r * r).sum(0)
        p = r + (rr_new / np.maximum(rr, 1e-300)) * p
        rr = rr_new
    bias = y_mean - (x_mean * w).sum(0)
    return w, bias


def fit_word_ridge(
    ids: np.ndarray,
    weights: np.ndarray,
    y: np.ndarray,
    vocab_size: int,
    cfg: WordPriorConfig | None = None,
    seed: int = 0,
) -> tuple[WordRidge, np.ndarray]:
    """Fit on the training items: ids, weights (N, W), targets y (N, T) with NaN for
    missing. Returns the ridge fitted on all N items and the out-of-fold estimates (N, T)."""
    cfg = cfg or WordPriorConfig()
    n, t = y.shape
    n_rows = vocab_size + 1
    mask = np.isfinite(y)
    y = np.where(mask, y, 0.0).astype(np.float64)
    weights = weights.astype(np.float64)
    fold = np.random.default_rng(seed).permutation(n) % cfg.folds
    grid = sorted(cfg.l2_grid, reverse=True)  # strong penalties first: warm starts converge fast
    oof = {lam: np.zeros((n, t)) for lam in grid}
    for f in range(cfg.folds):
        inside, held = fold != f, fold == f
        bags = _BagMatrix(ids[inside], weights[inside], n_rows)  # one matrix for the fold's penalties
        start = None
        for lam in grid:
            start = _solve(bags, y[inside], mask[inside], np.full(t, lam), cfg, start)
            oof[lam][held] = ridge_estimate(ids[held], weights[held], start[0], start[1])
    err = np.stack([(np.where(mask, oof[lam] - y, 0.0) ** 2).sum(0) for lam in grid])  # (G, T)
    best = err.argmin(0)  # (T,)
    l2 = np.array([grid[i] for i in best])
    out_of_fold = np.stack([oof[grid[best[j]]][:, j] for j in range(t)], axis=1)
    coef, bias = _solve(_BagMatrix(ids, weights, n_rows), y, mask, l2, cfg)
    logger.info("word prior: L2 %s by %d-fold error", l2.tolist(), cfg.folds)
    ridge = WordRidge(coef.astype(np.float32), bias.astype(np.float32), l2)
    return ridge, out_of_fold.astype(np.float32)
