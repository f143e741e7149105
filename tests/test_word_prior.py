"""The word prior: a cross-fitted ridge on the titles' bag of words, and its use by the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvpp.predictor.config import InputSizes, ModelConfig
from mvpp.predictor.model import PopularityModel, WordPrior
from mvpp.predictor.word_prior import WordPriorConfig, _BagMatrix, _solve, fit_word_ridge


def _bags(n: int, vocab: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random padded bags (ids, weights) and their dense matrix (n, vocab + 1)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab + 1, (n, width))
    ids[:, width // 2 :] *= rng.random((n, width - width // 2)) < 0.5  # ragged: some padding
    weights = np.where(ids > 0, rng.random((n, width)), 0.0)
    dense = np.zeros((n, vocab + 1))
    np.add.at(dense, (np.repeat(np.arange(n), width), ids.ravel()), weights.ravel())
    return ids, weights, dense


def _closed_form(dense: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    x = dense[:, 1:]
    xm, ym = x.mean(0), y.mean()
    a = (x - xm).T @ (x - xm) + l2 * np.eye(x.shape[1])
    coef = np.linalg.solve(a, (x - xm).T @ (y - ym))
    return coef, ym - xm @ coef


def test_solver_matches_the_closed_form_ridge_per_target_with_missing_labels() -> None:
    ids, weights, dense = _bags(400, 30, 6, seed=0)
    rng = np.random.default_rng(1)
    y = rng.normal(size=(400, 2))
    mask = np.ones_like(y, dtype=bool)
    mask[:50, 1] = False  # the second target is missing on some rows
    cfg = WordPriorConfig(tol=1e-12, max_iter=2000)
    coef, bias = _solve(_BagMatrix(ids, weights, 31), y, mask, np.array([2.0, 5.0]), cfg)
    assert np.all(coef[0] == 0)  # padding row
    for t, l2 in enumerate((2.0, 5.0)):
        ref_coef, ref_bias = _closed_form(dense[mask[:, t]], y[mask[:, t], t], l2)
        np.testing.assert_allclose(coef[1:, t], ref_coef, atol=1e-8)
        assert bias[t] == pytest.approx(ref_bias, abs=1e-8)


def test_out_of_fold_estimates_never_see_their_own_label() -> None:
    ids, weights, _ = _bags(200, 20, 5, seed=2)
    y = np.random.default_rng(3).normal(size=(200, 1))
    _, oof = fit_word_ridge(ids, weights, y, 20, seed=0)
    changed = y.copy()
    changed[7, 0] += 100.0
    _, oof2 = fit_word_ridge(ids, weights, changed, 20, seed=0)
    assert oof2[7, 0] == pytest.approx(oof[7, 0], abs=1e-9)  # its own estimate is unmoved
    assert np.abs(oof2 - oof).max() > 1e-3  # while other folds' estimates see the change


def test_penalty_is_chosen_by_out_of_fold_error() -> None:
    ids, weights, dense = _bags(1000, 15, 4, seed=4)
    rng = np.random.default_rng(5)
    signal = dense @ np.r_[0.0, rng.normal(size=15) * 3]
    y = np.stack([signal + 0.1 * rng.normal(size=1000), rng.normal(size=1000)], axis=1)
    y[::10, 1] = np.nan  # missing labels are ignored, not zeros
    cfg = WordPriorConfig(l2_grid=(0.01, 100.0))
    ridge, oof = fit_word_ridge(ids, weights, y, 15, cfg)
    assert ridge.l2.tolist() == [0.01, 100.0]  # words explain target 0; target 1 is noise
    assert np.corrcoef(oof[:, 0], y[:, 0])[0, 1] > 0.95
    np.testing.assert_allclose(ridge.predict(ids, weights)[:, 0], signal, atol=0.1)


def test_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        WordPriorConfig(folds=1)
    with pytest.raises(ValueError):
        WordPriorConfig(l2_grid=(1.0, 0.0))


def test_module_matches_the_fitted_ridge_and_ignores_padding() -> None:
    ids, weights, _ = _bags(50, 12, 4, seed=6)
    y = np.random.default_rng(7).normal(size=(50, 2))
    ridge, _ = fit_word_ridge(ids, weights, y, 12)
    module = WordPrior(12, 2)
    module.load(torch.from_numpy(ridge.coef), torch.from_numpy(ridge.bias))
    w = torch.from_numpy(weights).float()
    w[torch.from_numpy(ids) == 0] = float("nan")  # padded slots may hold anything
    out = module(torch.from_numpy(ids), w, 50)
    np.testing.assert_allclose(out.numpy(), ridge.predict(ids, weights), atol=1e-5)
    # no title at all: the intercept
    np.testing.assert_allclose(module(None, None, 3).numpy(), np.tile(ridge.bias, (3, 1)))


def test_word_prior_is_switched_by_config_and_kept_in_the_weights() -> None:
    def config(lexicon_size: int, **kw: object) -> ModelConfig:
        return ModelConfig(inputs=InputSizes(lexicon_size=lexicon_size, n_targets=2), d_model=8, d_z=4, **kw)

    on = PopularityModel(config(10))
    assert on.word_prior is not None and "word_prior.coef" in on.state_dict()
    assert PopularityModel(config(10, use_word_prior=False)).word_prior is None
    assert PopularityModel(config(0)).word_prior is None
    assert config(10, use_text=False, use_frames=True).has_word_prior is False


def test_runs_saved_before_the_word_prior_load_without_one() -> None:
    """A run's config of an earlier version (input sizes at the top level, no
    use_word_prior) loads as the model it was: without a word prior."""
    old = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("inputs", "use_word_prior")}
    old.update(lexicon_size=10, d_frame=512, d_token=384, n_targets=1, use_lexicon=False)
    cfg = ModelConfig.from_dict(old)
    assert cfg.inputs.lexicon_size == 10 and not cfg.has_word_prior and PopularityModel(cfg).word_prior is None
