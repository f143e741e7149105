"""Accuracy on MicroLens-100k (text + retrieval), the MMRA paper's benchmark.

Builds (once) a text-only lite bank of the 19,738 titles with log2(comments) targets,
then for each seed makes the 80/10/10 split and the neighbours (k=10, training items
only, never the item itself), and trains / fits on exactly the same data:

- mvpp, the full model, and its ablations (no retrieval, no PoE, no label interaction,
  no word prior, and dense neighbours instead of the hybrid lexical re-rank);
- baselines: global mean, ridge on the title embeddings, the word prior alone (ridge
  on the title words), k-NN label average, LightGBM on the embeddings plus
  neighbour-label features, and the same LightGBM given the word prior too; the k-NN
  average and LightGBM also on the dense neighbours.

Prints mean ± std over the seeds of nMSE, MAE, SRC and 90% interval coverage, the
seconds per training epoch, and the MMRA paper's numbers for reference.

    python benchmarks/bench_predictor.py [--seeds 0 1 2 3 4] [--epochs 12] [--bank PATH]

Seeds can run in separate processes (one per core, `--threads 1 --json part.json`)
and be reported together with `--report part0.json part1.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import CACHE, DataMissing, microlens  # noqa: E402
from mvpp.config import BuildSettings  # noqa: E402
from mvpp.memory_bank.builder import BankBuilder, plan_items  # noqa: E402
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders  # noqa: E402
from mvpp.memory_bank.metadata import ColumnMap, load_metadata  # noqa: E402
from mvpp.memory_bank.store import open_store  # noqa: E402
from mvpp.predictor.config import ModelConfig  # noqa: E402
from mvpp.predictor.metrics import Metrics, regression_metrics  # noqa: E402
from mvpp.predictor.training import PreparedData, TrainConfig, prepare, train  # noqa: E402
from mvpp.retriever.snapshot import read_snapshot  # noqa: E402

console = Console(width=132)

MMRA_PAPER = {
    "MMRA full (paper)": (0.7530, 1.1787, 0.4900),
    "MMRA text+retrieval (paper)": (0.7915, 1.2071, 0.4536),
    "HyFea / CatBoost (paper)": (0.8106, 1.2321, 0.4345),
    "SVR (paper)": (0.8132, 1.2176, 0.4288),
}

ABLATIONS = {
    "mvpp": {},
    "mvpp - retrieval": {"use_retrieval": False},
    "mvpp - PoE": {"use_poe": False},
    "mvpp - label interaction": {"use_label_interaction": False},
    "mvpp - word prior": {"use_word_prior": False},
    "mvpp - neighbour statistics": {"use_neighbour_prior": False, "use_neighbour_summary": False},
}
# Ablations of the data rather than the model: they need their own neighbours.
DENSE = " (dense neighbours)"
DATA_ABLATIONS = {"mvpp - lexical retrieval" + DENSE: {"lexical_retrieval": 0.0}}


def build_bank(path: Path) -> None:
    table = microlens()
    rows = load_metadata(table, ColumnMap(label_cols=["comments"]))
    items, failures = plan_items(None, rows)
    settings = BuildSettings(label_transform="log2")  # MMRA's target: log2(comments)
    with open_store(bank=path) as store:
        if store.manifest is not None:
            return  # built before (delete the folder to rebuild)
        console.print(f"building the bank at {path} ({len(items)} items; a few minutes, once)")
        report = BankBuilder(store, load_encoders(EncoderSpec.from_profile("lite")), settings).build(
            items, failures, path.parent / "microlens.failures.jsonl"
        )
        console.print(f"indexed {report.indexed} ({report.items_per_s:.0f} items/s), failed {report.failed}")


def _metrics(y, pred, lower=None, upper=None):
    return regression_metrics(y, pred, lower, upper, 0.9 if lower is not None else None)


def neighbour_features(data: PreparedData, split: str) -> np.ndarray:
    """Neighbour-label features: weighted and plain means, std, top-1 label, similarities."""
    nb = data.neighbours[split]
    y = data.snapshot.targets[:, 0]
    valid = nb.indices >= 0
    labels = np.where(valid, y[np.maximum(nb.indices, 0)], np.nan)
    sims = np.where(valid, nb.scores, np.nan)
    w = np.where(valid, np.exp(np.nan_to_num(sims, nan=-1e9) / 0.1), 0.0)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    return np.column_stack([
        np.nansum(w * np.nan_to_num(labels), axis=1),
        np.nanmean(labels, axis=1),
        np.nanstd(labels, axis=1),
        labels[:, 0],
        np.nanmax(sims, axis=1),
        np.nanmean(sims, axis=1),
    ])


def baselines(data: PreparedData, threads: int) -> dict[str, object]:
    snap = data.snapshot
    tr, te, va = data.splits["train"], data.splits["test"], data.splits["val"]
    y = snap.targets[:, 0]
    out = {"global mean": _metrics(y[te], np.full(len(te), y[tr].mean()))}

    # Ridge on the title embeddings, penalty chosen on validation.
    x = snap.retrieval
    xt = np.column_stack([x[tr], np.ones(len(tr))])
    best = None
    for lam in (0.1, 1.0, 3.0, 10.0, 30.0, 100.0):
        reg = lam * np.eye(xt.shape[1])
        reg[-1, -1] = 0
        w = np.linalg.solve(xt.T @ xt + reg, xt.T @ y[tr])
        pv = np.column_stack([x[va], np.ones(len(va))]) @ w
        score = np.mean((pv - y[va]) ** 2)
        if best is None or score < best[0]:
            best = (score, w)
    out["ridge (embeddings)"] = _metrics(y[te], np.column_stack([x[te], np.ones(len(te))]) @ best[1])

    # The word prior alone: mvpp's ridge on the title words (penalty by training folds).
    prior = word_prior(data)
    if prior is not None:
        out["ridge (title words: the word prior)"] = _metrics(y[te], prior[te])

    out.update(neighbour_baselines(data, threads, prior))
    return out


def neighbour_baselines(data: PreparedData, threads: int, prior: np.ndarray | None, suffix: str = "") -> dict:
    """k-NN label average and LightGBM over the neighbours of `data` (and its word prior)."""
    snap = data.snapshot
    tr, te, va = data.splits["train"], data.splits["test"], data.splits["val"]
    y = snap.targets[:, 0]
    x = snap.retrieval
    out = {}
    # k-NN label average over the same neighbours mvpp sees.
    feats = neighbour_features(data, "test")
    knn = np.where(np.isnan(feats[:, 1]), y[tr].mean(), feats[:, 1])
    out[f"k-NN label average{suffix}"] = _metrics(y[te], knn)

    if importlib.util.find_spec("lightgbm") is None:
        return out
    f_tr = np.column_stack([x[tr], neighbour_features(data, "train")])
    f_va = np.column_stack([x[va], neighbour_features(data, "val")])
    f_te = np.column_stack([x[te], neighbour_features(data, "test")])
    params = {
        "objective": "regression", "learning_rate": 0.03, "num_leaves": 31, "bagging_fraction": 0.8,
        "bagging_freq": 1, "feature_fraction": 0.5, "min_data_in_leaf": 30, "verbose": -1,
        "num_threads": threads, "seed": 0,
    }
    out[f"LightGBM (embeddings + neighbour labels){suffix}"] = _lightgbm(
        params, (f_tr, y[tr]), (f_va, y[va]), f_te, y[te]
    )
    if prior is not None:
        # The same trees given mvpp's word prior too: shows what the feature is worth
        # without the network (training items get out-of-fold estimates, as in mvpp).
        out["LightGBM + word prior"] = _lightgbm(
            params,
            (np.column_stack([f_tr, prior[tr]]), y[tr]),
            (np.column_stack([f_va, prior[va]]), y[va]),
            np.column_stack([f_te, prior[te]]),
            y[te],
        )
    return out


def word_prior(data: PreparedData) -> np.ndarray | None:
    """Every item's word-prior estimate on the target scale (out-of-fold on training items)."""
    if data.table.word_prior is None:
        return None
    return data.norm.inverse(data.table.word_prior.numpy())[:, 0]


def _lightgbm(params: dict, train: tuple, val: tuple, x_test: np.ndarray, y_test: np.ndarray):
    import lightgbm as lgb

    train_set = lgb.Dataset(*train)
    booster = lgb.train(
        params, train_set, num_boost_round=2000,
        valid_sets=[lgb.Dataset(*val, reference=train_set)],
        callbacks=[lgb.early_stopping(100, verbose=False)],
    )
    return _metrics(y_test, booster.predict(x_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--bank", type=Path, default=CACHE / "microlens-bank")
    parser.add_argument("--only", nargs="*", default=None, help="mvpp variants to run (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--report", type=Path, nargs="+", default=None,
        help="print the table of earlier --json results (e.g. seeds run in parallel) and exit",
    )
    args = parser.parse_args()
    if args.report:
        merged, seeds, epoch_s = load_results(args.report)
        report(merged, epoch_s, len(seeds), None, seeds)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        build_bank(args.bank)
    except DataMissing as exc:
        console.print(f"[yellow]skipped: {exc}")
        return
    with open_store(bank=args.bank) as store:
        snapshot = read_snapshot(store, args.bank / "cache")
    variants = {k: v for k, v in ABLATIONS.items() if args.only is None or k in args.only}
    results: dict[str, list] = {}
    epoch_s: list[float] = []
    for seed in args.seeds:
        cfg = TrainConfig(seed=seed, epochs=args.epochs)
        data = prepare(snapshot, cfg, lexicon="fit", word_prior=True)
        for name, m in baselines(data, args.threads or 2).items():
            results.setdefault(name, []).append(m)
        runs = [(name, switches, cfg, data) for name, switches in variants.items()]
        for name, overrides in DATA_ABLATIONS.items():
            if args.only is not None and name not in args.only:
                continue
            cfg_b = replace(cfg, **overrides)
            data_b = prepare(snapshot, cfg_b, lexicon="fit", word_prior=True)
            # the baselines that read neighbours, on these neighbours too
            for base_name, m in neighbour_baselines(data_b, args.threads or 2, None, DENSE).items():
                results.setdefault(base_name, []).append(m)
            runs.append((name, {}, cfg_b, data_b))
        for name, switches, cfg_v, data_v in runs:
            t0 = time.perf_counter()
            res = train(snapshot, cfg_v, replace(ModelConfig(), **switches), _log_epochs(name), data=data_v)
            m = res.metrics["test"][data.target_names[0]]
            results.setdefault(name, []).append(m)
            epoch_s.append(res.seconds_per_epoch)
            if args.json:  # written as it goes: a stopped run keeps its finished seeds
                save_results(args.json, results, epoch_s, args.seeds[: args.seeds.index(seed) + 1])
            console.print(
                f"seed {seed} {name:28s} nMSE {m.nmse:.4f} SRC {m.src:.4f} cov {m.coverage:.3f} "
                f"(best epoch {res.best_epoch}, {time.perf_counter() - t0:.0f} s)"
            )
        if seed != args.seeds[-1]:
            report(results, epoch_s, len(results["global mean"]), None)  # so far
    report(results, epoch_s, len(args.seeds), args.json, args.seeds)


def save_results(path: Path, results: dict[str, list], epoch_s: list[float], seeds: list[int]) -> None:
    path.write_text(json.dumps({
        "seeds": seeds,
        "seconds_per_epoch": epoch_s,
        "results": {k: [m.to_dict() for m in v] for k, v in results.items()},
    }, indent=1))


def load_results(paths: list[Path]) -> tuple[dict[str, list], list[int], list[float]]:
    """Results of several --json files, merged (each file holds different seeds)."""
    merged: dict[str, list] = {}
    seeds: list[int] = []
    epoch_s: list[float] = []
    for path in paths:
        data = json.loads(path.read_text())
        seeds += data["seeds"]
        epoch_s += data["seconds_per_epoch"]
        for name, rows in data["results"].items():
            merged.setdefault(name, []).extend(Metrics(**r) for r in rows)
    return merged, seeds, epoch_s


def _log_epochs(name: str):
    def on_event(event: str, info: dict) -> None:
        if event == "epoch":
            console.print(
                f"  {name}: epoch {info['epoch']} val nMSE {info['val_nmse']:.4f} "
                f"SRC {info['val_src']:.4f} ({info['seconds']:.0f} s)",
                style="dim",
            )

    return on_event


def report(
    results: dict[str, list],
    epoch_s: list[float],
    n_seeds: int,
    json_path: Path | None,
    seeds: list[int] | None = None,
) -> None:
    which = f" {seeds}" if seeds else ""
    table = Table(title=f"MicroLens-100k test split, log2(comments), mean ± std over {n_seeds} seed(s){which}")
    for col in ("model", "nMSE", "MAE", "SRC", "90% coverage"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def ms(values):
        v = np.array([x for x in values if x is not None], dtype=float)
        if len(v) == 0:
            return ""
        return f"{v.mean():.4f} ± {v.std():.4f}"

    for name, ms_list in results.items():
        table.add_row(
            name,
            ms([m.nmse for m in ms_list]),
            ms([m.mae for m in ms_list]),
            ms([m.src for m in ms_list]),
            ms([m.coverage for m in ms_list]),
        )
    for name, (nmse, mae, src) in MMRA_PAPER.items():
        table.add_row(f"[dim]{name}", f"[dim]{nmse:.4f}", f"[dim]{mae:.4f}", f"[dim]{src:.4f}", "")
    console.print(table)
    if epoch_s:
        console.print(f"training: {np.mean(epoch_s):.1f} s per epoch over ~15.8k items, k=10 (this machine)")
    if json_path and seeds:
        save_results(json_path, results, epoch_s, seeds)


if __name__ == "__main__":
    main()
