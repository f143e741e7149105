"""Baselines fitted on the same splits and inputs as an mvpp run."""

from __future__ import annotations

import numpy as np

from mvpp.predictor.metrics import Metrics, regression_metrics
from mvpp.predictor.run import Run
from mvpp.retriever.snapshot import BankSnapshot


def lightgbm_on_inputs(
    run: Run, snap: BankSnapshot, splits: dict[str, np.ndarray], seed: int, prior: np.ndarray | None = None
) -> dict[str, Metrics]:
    """One LightGBM per target on the text embeddings and the run's metadata features
    (their standardised values, categories as LightGBM categoricals; missing values stay
    missing), optionally with a prior as one more feature per target; early stopping on
    validation, metrics on test: what a practitioner fits first."""
    import lightgbm as lgb

    fz = run.featurizer

    def features(idx: np.ndarray) -> np.ndarray:
        if fz is None:
            num, cat = np.zeros((len(idx), 0), np.float32), np.zeros((len(idx), 0), np.float32)
        else:
            num, mask, cat = fz.transform_snapshot(snap, idx)
            # each feature's standardised value (trees need no piecewise encoding of it)
            cols = fz.value_columns
            num = np.where(mask[:, cols], num[:, cols], np.nan)
        extra = prior[idx] if prior is not None else np.zeros((len(idx), 0), np.float32)
        return np.hstack([snap.retrieval[idx], num, extra, cat.astype(np.float32)])

    x = {s: features(idx) for s, idx in splits.items()}
    n_numeric = len(fz.numeric) if fz is not None else 0
    n_dense = snap.retrieval.shape[1] + n_numeric + (prior.shape[1] if prior is not None else 0)
    cat_cols = list(range(n_dense, n_dense + (len(fz.categorical) if fz is not None else 0)))
    out = {}
    for name in run.targets:
        j = snap.label_names.index(name)
        y = {s: snap.targets[idx, j] for s, idx in splits.items()}
        ok = {s: ~np.isnan(v) for s, v in y.items()}
        params = {
            "objective": "regression", "learning_rate": 0.03, "num_leaves": 31,
            "min_data_in_leaf": 20, "bagging_fraction": 0.8, "bagging_freq": 1,
            "feature_fraction": 0.5, "lambda_l2": 1.0, "seed": seed, "verbosity": -1,
            # one thread: OpenMP threads on a busy machine spin far more than they work
            "num_threads": 1,
        }
        train_set = lgb.Dataset(x["train"][ok["train"]], y["train"][ok["train"]],
                                categorical_feature=cat_cols or "auto")
        val_set = lgb.Dataset(x["val"][ok["val"]], y["val"][ok["val"]], reference=train_set)
        model = lgb.train(params, train_set, num_boost_round=3000, valid_sets=[val_set],
                          callbacks=[lgb.early_stopping(100, verbose=False)])
        pred = model.predict(x["test"][ok["test"]], num_iteration=model.best_iteration)
        out[name] = regression_metrics(y["test"][ok["test"]], pred)
    return out
