"""Several engagement targets at once with creator metadata, on real TikTok posts.

../shared/data/tiktok_vn/raw_data.csv: 10,102 posts (Vietnam, Feb-May 2025). Everything
goes through the CLI a user types, with no dataset-specific code:

1. `mvpp-bank build --meta raw_data.csv --profile lite ...`: text = caption + hashtags;
   targets = log1p of views, likes, comments and shares; metadata = creator followers,
   music uses ("3 videos"), duration ("00:31"), the creator's name as a category; publish
   time vid_postTime; observation time vid_scrapeTime (the post's age when counted).
2. `mvpp train --split-by-time`: one joint model of the four targets, trained on the
   earliest 80% of posts, early-stopped on the next 10%, tested on the latest 10%;
   retrieval is time-safe (only posts published before the query). Once with the
   metadata expert, once without (`--ablate meta`), once without the word prior
   (`--ablate word-prior`), once with dense neighbours only (`--ablate lexical-retrieval`).
   Neighbours from the query's own creator come first (`--neighbour-group user_name`);
   once more without that (`--set train.group_retrieval=0`).
3. LightGBM, one model per target, on the same split and the same inputs: the bank's
   retrieval vectors (the text embeddings) and the metadata features of the mvpp run
   (same columns, same train-only statistics; categories as LightGBM categoricals);
   then the same again with mvpp's word prior as one more feature per target.

Prints per-target nMSE, SRC and the 90% interval coverage of mvpp on the test split.

    python benchmarks/bench_tiktok.py [--epochs 20] [--lr 1e-3] [--d-model 128] [--dropout 0.1]
                                      [--seed 0] [--bank PATH] [--out DIR] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import lightgbm_on_inputs  # noqa: E402
from benchmarks.datasets import CACHE, DataMissing, tiktok  # noqa: E402
from mvpp.memory_bank.store import open_store  # noqa: E402
from mvpp.predictor.metrics import Metrics  # noqa: E402
from mvpp.predictor.run import Run  # noqa: E402
from mvpp.predictor.scoring import prepare_for_run  # noqa: E402
from mvpp.retriever.snapshot import read_snapshot  # noqa: E402

console = Console(width=132)

TARGETS = {"vid_nview": "views", "vid_nlike": "likes", "vid_ncomment": "comments", "vid_nshare": "shares"}

# LightGBM on the same task, as given with the issue (nMSE, SRC): for reference only.
REFERENCE_LGBM = {
    "views": (0.935, 0.289),
    "likes": (0.859, 0.336),
    "comments": (0.902, 0.317),
    "shares": (0.865, 0.365),
}


def build_args(table: Path, bank: Path) -> list[str]:
    args = ["mvpp-bank", "build", "--meta", str(table), "--id-col", "vid_id",
            "--text-col", "vid_caption", "--text-col", "vid_hashtags"]
    for col in TARGETS:
        args += ["--label-col", col]
    args += ["--label-transform", "log1p", "--time-col", "vid_postTime",
             "--observed-col", "vid_scrapeTime"]
    for col in ("user_nfollower", "music_nused", "vid_duration", "user_name"):
        args += ["--meta-col", col]
    return [*args, "--profile", "lite", "--bank", str(bank)]


def cli(args: list[str], ok_codes: tuple[int, ...] = (0,)) -> float:
    """Run an mvpp command as a user would; returns its wall time."""
    console.print(f"[cyan]$ {' '.join(shlex.quote(a) for a in args)}")
    module = {"mvpp-bank": "mvpp.cli.bank", "mvpp": "mvpp.cli.main"}[args[0]]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args[1:]], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode not in ok_codes:
        console.print(proc.stdout[-4000:])
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    return time.perf_counter() - t0


def run_metrics(run_dir: Path) -> tuple[dict[str, Metrics], dict]:
    data = json.loads((run_dir / "metrics.json").read_text())
    test = {t: Metrics(**m) for t, m in data["metrics"]["test"].items()}
    return test, data


def lightgbm_baselines(bank: Path, run_dir: Path, seed: int) -> dict[str, dict[str, Metrics]]:
    """One LightGBM per target on text embeddings + the run's metadata features; and the
    same given mvpp's word prior too (out-of-fold on training items, as mvpp sees it)."""
    run = Run.load(run_dir)
    with open_store(bank=bank) as store:
        snap = read_snapshot(store, bank / "cache")
    splits = run.splits_in(snap)
    fz = run.featurizer
    assert fz is not None, "the run has no metadata features"
    out = {"LightGBM": lightgbm_on_inputs(run, snap, splits, seed, None)}
    if run.lexicon is not None:
        _, data = prepare_for_run(run, snap, word_prior=True)
        if data.table.word_prior is not None:
            prior = run.norm.inverse(data.table.word_prior.numpy())
            out["LightGBM + word prior"] = lightgbm_on_inputs(run, snap, splits, seed, prior)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=Path, default=CACHE / "tiktok" / "bank")
    parser.add_argument("--out", type=Path, default=CACHE / "tiktok" / "runs")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs in --out")
    parser.add_argument("train_flags", nargs="*", help="more `mvpp train` flags (after --)")
    args = parser.parse_args()
    try:
        table = tiktok()
    except DataMissing as exc:
        console.print(f"[yellow]skipped: {exc}")
        return
    args.bank.parent.mkdir(parents=True, exist_ok=True)
    # Posts with neither caption nor hashtags cannot be indexed: reported, exit code 1.
    build_s = cli(build_args(table, args.bank), ok_codes=(0, 1))

    # A creator's earlier posts are retrieved first (--neighbour-group).
    common = ["--bank", str(args.bank), "--split-by-time", "--k", str(args.k),
              "--epochs", str(args.epochs), "--seed", str(args.seed), "--neighbour-group", "user_name"]
    for setting, value in (("train.lr", args.lr), ("model.d_model", args.d_model), ("model.dropout", args.dropout)):
        if value is not None:
            common += ["--set", f"{setting}={value}"]
    common += args.train_flags
    variants = {
        "mvpp": [],
        "mvpp --ablate meta": ["--ablate", "meta"],
        "mvpp --ablate word-prior": ["--ablate", "word-prior"],
        "mvpp --ablate lexical-retrieval": ["--ablate", "lexical-retrieval"],
        "mvpp, no group bonus": ["--set", "train.group_retrieval=0"],
    }
    results: dict[str, dict[str, Metrics]] = {}
    info: dict[str, dict] = {}
    for label, extra in variants.items():
        run_dir = args.out / label.replace(" --ablate ", "-no-").replace(", ", "-").replace(" ", "-")
        if not args.skip_train:
            cli(["mvpp", "train", *common, *extra, "--out", str(run_dir)])
        results[label], info[label] = run_metrics(run_dir)
    t0 = time.perf_counter()
    results.update(lightgbm_baselines(args.bank, args.out / "mvpp", args.seed))
    lgbm_s = time.perf_counter() - t0

    run = Run.load(args.out / "mvpp")
    splits = {s: len(v) for s, v in run.split_ids.items()}
    table_out = Table(title=f"TikTok VN, time split {splits}: test split, nMSE / SRC (log1p counts)")
    table_out.add_column("target")
    for label in (*results, "LightGBM (issue)", "mvpp 90% coverage"):
        table_out.add_column(label, justify="right")
    for name in run.targets:
        short = TARGETS.get(name, name)
        cells = [short]
        for label in results:
            m = results[label][name]
            cells.append(f"{m.nmse:.3f} / {m.src:.3f}")
        ref = REFERENCE_LGBM.get(short)
        cells.append(f"{ref[0]:.3f} / {ref[1]:.3f}" if ref else "")
        cov = results["mvpp"][name].coverage
        cells.append("" if cov is None else f"{cov:.3f}")
        table_out.add_row(*cells)
    console.print(table_out)
    fz = run.featurizer
    console.print(f"metadata features: {', '.join(fz.feature_names) if fz else 'none'}")
    for label in variants:
        console.print(
            f"{label}: best epoch {info[label]['best_epoch']}, "
            f"{info[label]['seconds_per_epoch']:.1f} s per epoch"
        )
    console.print(f"bank build {build_s:.0f} s (0 when already built); LightGBM {lgbm_s:.0f} s")
    console.print(f"train flags: {' '.join(common)}")


if __name__ == "__main__":
    main()
