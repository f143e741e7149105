"""The boosted member: blend weights, files, and the training length fitted to the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvpp.predictor.boosting import BoostConfig, GbdtMember, blend, fit_blend
from mvpp.predictor.model import ModelOutput, popularity_loss
from mvpp.predictor.training import MAX_EPOCHS, MIN_EPOCHS, STEPS_TARGET, training_epochs


def test_the_blend_is_never_worse_than_its_better_member_on_validation():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 2))
    net = y + rng.normal(0, 0.8, size=y.shape)
    trees = y + rng.normal(0, 0.8, size=y.shape)
    trees[:, 1] = y[:, 1] + rng.normal(0, 3.0, size=200)  # the trees are bad at target 1
    w = fit_blend(net, trees, y, ["net", "gbdt"])
    mixed = blend(net, trees, w)
    for t in range(2):
        err = np.mean((mixed[:, t] - y[:, t]) ** 2)
        assert err <= min(np.mean((net[:, t] - y[:, t]) ** 2), np.mean((trees[:, t] - y[:, t]) ** 2)) + 1e-12
    assert 0.3 < w[0] < 0.7 and w[1] > 0.85  # two equal members share; a bad one is left out
    assert (fit_blend(net, trees, y, ["net"]) == 1).all() and (fit_blend(net, trees, y, ["gbdt"]) == 0).all()
    # a target the trees have nothing for keeps the network's mean
    trees[:5, 0] = np.nan
    np.testing.assert_allclose(blend(net, trees, w)[:5, 0], net[:5, 0], rtol=1e-6)


def test_boosters_round_trip_through_their_text_files(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    x[:, 4] = rng.integers(1, 4, 300)  # a categorical column
    y = np.stack([x[:, 0] * 2 + (x[:, 4] == 2), np.full(300, np.nan)], axis=1).astype(np.float32)
    member = GbdtMember.fit(x[:240], y[:240], x[240:], y[240:], [4], BoostConfig(max_rounds=200), seed=0, threads=1)
    assert len(member.boosters[0]) == BoostConfig().bags and member.boosters[1] == []  # no label for target 1
    names = member.save(tmp_path)
    assert names == [["gbdt-0-0.txt", "gbdt-0-1.txt", "gbdt-0-2.txt"], []]
    assert (tmp_path / "gbdt-0-0.txt").read_text().startswith("tree")
    again = GbdtMember.load(tmp_path, names, [4])
    np.testing.assert_allclose(again.predict(x[240:]), member.predict(x[240:]))
    pred = member.predict(x[240:])
    assert np.corrcoef(pred[:, 0], y[240:, 0])[0, 1] > 0.9 and np.isnan(pred[:, 1]).all()
    # the target's prediction is the mean of its boosters', each drawn on its own seed
    alone = [b.predict(x[240:], num_iteration=b.best_iteration or None) for b in member.boosters[0]]
    assert not np.allclose(alone[0], alone[1])
    np.testing.assert_allclose(pred[:, 0], np.mean(alone, axis=0), rtol=1e-6)


def test_bags_of_one_are_the_single_booster_of_before(tmp_path):
    """`bags = 1` gives the booster a run fitted before bagging (seed, data and settings
    alike), and a run saved then (one file name per target) loads."""
    import lightgbm as lgb

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, :1] - x[:, 1:2] + rng.normal(0, 0.3, (300, 1))).astype(np.float32)
    cfg = BoostConfig(max_rounds=150, bags=1)
    member = GbdtMember.fit(x[:240], y[:240], x[240:], y[240:], [], cfg, seed=5, threads=1)
    single = lgb.train(cfg.params(5, 1), lgb.Dataset(x[:240], y[:240, 0]), num_boost_round=cfg.max_rounds,
                       valid_sets=[lgb.Dataset(x[240:], y[240:, 0])],
                       callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False)])
    np.testing.assert_allclose(member.predict(x)[:, 0], single.predict(x, num_iteration=single.best_iteration))
    (tmp_path / "gbdt-0.txt").write_text(single.model_to_string(num_iteration=single.best_iteration))
    old = GbdtMember.load(tmp_path, ["gbdt-0.txt", ""], [])
    assert [len(bag) for bag in old.boosters] == [1, 0]
    np.testing.assert_allclose(old.predict(x)[:, 0], member.predict(x)[:, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="bags must be at least 1"):
        BoostConfig(bags=0)


def test_training_length_is_fitted_to_the_data():
    assert training_epochs(62) == 10  # MicroLens
    assert training_epochs(30) == 20  # TikTok-VN
    assert training_epochs(13) == 47  # a 4,000-item set
    assert training_epochs(3900) == MIN_EPOCHS  # a million items
    assert training_epochs(1) == MAX_EPOCHS
    assert training_epochs(STEPS_TARGET) == MIN_EPOCHS


def test_mse_nll_fits_the_mean_by_squared_error_and_the_variance_by_likelihood():
    y = torch.tensor([[0.0], [0.0]])
    mask = torch.ones_like(y, dtype=torch.bool)
    mu = torch.tensor([[1.0], [1.0]], requires_grad=True)
    logvar = torch.tensor([[0.0], [np.log(4.0)]], requires_grad=True)
    out = ModelOutput(mu, logvar, torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2),
                      torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 0))
    popularity_loss(out, y, mask, 0.0, kind="mse_nll")[0].backward()
    # the mean's gradient is the squared error's, whatever the variance
    torch.testing.assert_close(mu.grad[0], mu.grad[1])
    # the variance moves towards the squared residual (1): the item at 4 is pushed down
    assert logvar.grad[1] > 0  # var 4 > residual 1: pushed down
    with pytest.raises(ValueError, match="unknown loss"):
        popularity_loss(out, y, mask, 0.0, kind="huber")
