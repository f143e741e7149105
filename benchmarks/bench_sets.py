"""One default, every set: mvpp through its CLI on each real set, against LightGBM on the
same inputs, with the run's members apart.

Sets (all from ../shared/data, converted into .bench-data/):
- microlens: MicroLens-100k titles, log2(comments) (the MMRA paper's task), 80/10/10;
- tiktok: TikTok-VN posts, four targets (log1p of views, likes, comments, shares),
  creator metadata, time split, `--neighbour-group user_name`;
- tiktok4k: 4,000 TikTok-VN posts drawn with a fixed seed, one log-popularity label
  (log1p views, given as is: `--label-transform none`), random split, the creator as
  the neighbour group: a set shaped like the ones users bring.

Each seed runs `mvpp train` with the defaults (plus the set's data flags and any given
after --), then reads the run's test metrics: the blend (what `mvpp evaluate` reports),
the network alone and the trees alone; and fits LightGBM on the text embeddings and the
run's metadata features (benchmarks.baselines). Prints mean ± std over the seeds.

    python benchmarks/bench_sets.py [--sets microlens tiktok tiktok4k] [--seeds 0 1 2]
                                    [--label NAME] [--text-precision bfloat16|int8]
                                    [--json out.json] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import lightgbm_on_inputs  # noqa: E402
from benchmarks.bench_tiktok import build_args as tiktok_build_args  # noqa: E402
from benchmarks.bench_tiktok import cli  # noqa: E402
from benchmarks.datasets import CACHE, DataMissing, microlens, tiktok  # noqa: E402
from mvpp.memory_bank.encoders.text import TEXT_PRECISIONS  # noqa: E402
from mvpp.memory_bank.store import open_store  # noqa: E402
from mvpp.predictor.run import Run  # noqa: E402
from mvpp.retriever.snapshot import read_snapshot  # noqa: E402

console = Console(width=160)
TIKTOK4K_SIZE = 4000
COLUMNS = ("nmse", "mae", "src", "coverage")


def tiktok4k_table(path: Path) -> Path:
    """4,000 posts drawn with seed 0, with a `log_views` column (log1p of the count)."""
    if path.exists():
        return path
    from mvpp.memory_bank.metadata import parse_count

    with tiktok().open(encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows, header = list(reader), list(reader.fieldnames or [])
    pick = np.sort(np.random.default_rng(0).choice(len(rows), TIKTOK4K_SIZE, replace=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, [*header, "log_views"])
        w.writeheader()
        for i in pick:
            views = parse_count(rows[i]["vid_nview"])
            w.writerow({**rows[i], "log_views": "" if views is None else f"{math.log1p(views):.6f}"})
    return path


def set_specs() -> dict[str, dict]:
    """Per set: how to build its bank and the data flags of its `mvpp train`."""
    return {
        "microlens": {
            "build": lambda bank: ["mvpp-bank", "build", "--meta", str(microlens()), "--label-col", "comments",
                                   "--label-transform", "log2", "--profile", "lite", "--bank", str(bank)],
            "train": [],
        },
        "tiktok": {
            "build": lambda bank: tiktok_build_args(tiktok(), bank),
            "train": ["--split-by-time", "--neighbour-group", "user_name"],
        },
        "tiktok4k": {
            "build": lambda bank: [
                "mvpp-bank", "build", "--meta", str(tiktok4k_table(CACHE / "sets" / "tiktok4k.csv")),
                "--id-col", "vid_id", "--text-col", "vid_caption", "--text-col", "vid_hashtags",
                "--label-col", "log_views", "--label-transform", "none", "--time-col", "vid_postTime",
                "--meta-col", "user_nfollower", "--meta-col", "user_name", "--profile", "lite",
                "--bank", str(bank),
            ],
            "train": ["--neighbour-group", "user_name"],
        },
    }


def run_seed(name: str, spec: dict, bank: Path, out: Path, seed: int, extra: list[str]) -> dict:
    """Train one seed; its test metrics per model and target, and the run's timings."""
    cli(["mvpp", "train", "--bank", str(bank), "--seed", str(seed), *spec["train"], *extra, "--out", str(out)])
    data = json.loads((out / "metrics.json").read_text())
    result = {"mvpp": data["metrics"]["test"]}
    for member, per in data.get("members", {}).items():
        result[f"{member} alone"] = per["test"]
    run = Run.load(out)
    with open_store(bank=bank) as store:
        snap = read_snapshot(store, bank / "cache")
    t0 = time.perf_counter()
    result["LightGBM (same inputs)"] = {
        t: m.to_dict() for t, m in lightgbm_on_inputs(run, snap, run.splits_in(snap), seed).items()
    }
    return {
        "metrics": result,
        "best_epoch": data["best_epoch"],
        "seconds_per_epoch": data["seconds_per_epoch"],
        "gbdt_seconds": data.get("gbdt_seconds"),
        "lightgbm_s": time.perf_counter() - t0,
    }


def markdown(results: dict[str, dict[int, dict]], label: str) -> str:
    """The results as one GitHub table (3-seed means ± std), for benchmarks/README.md."""
    lines = [f"| set ({label}) | target | model | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for name, seeds in results.items():
        first = next(iter(seeds.values()))["metrics"]
        for t in first["mvpp"]:
            for model in first:
                cells = []
                for col in COLUMNS:
                    vals = [v for s in seeds.values() if (v := s["metrics"][model][t].get(col)) is not None]
                    cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "")
                lines.append(f"| {name} | {t} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict[str, dict[int, dict]], label: str) -> None:
    for name, seeds in results.items():
        first = next(iter(seeds.values()))["metrics"]
        models = list(first)
        targets = list(first["mvpp"])
        table = Table(title=f"{name} ({label}): test, mean ± std over seeds {sorted(seeds)}")
        table.add_column("target")
        table.add_column("model")
        for col in COLUMNS:
            table.add_column(col, justify="right")
        for t in targets:
            for model in models:
                cells = []
                for col in COLUMNS:
                    vals = [s["metrics"][model][t].get(col) for s in seeds.values()]
                    vals = [v for v in vals if v is not None]
                    cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "")
                table.add_row(t, model, *cells)
        console.print(table)
        epochs = [s["best_epoch"] for s in seeds.values()]
        spe = np.mean([s["seconds_per_epoch"] for s in seeds.values()])
        trees = [s.get("gbdt_seconds") for s in seeds.values()]
        trees_text = f", trees fitted in {np.mean(trees):.0f} s" if all(t is not None for t in trees) else ""
        console.print(f"{name}: best epochs {epochs}, {spe:.1f} s per epoch{trees_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["microlens", "tiktok", "tiktok4k"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label", default="defaults", help="name of this variant (runs go under it)")
    parser.add_argument("--text-model", default=None,
                        help="build the banks with this text encoder (hub id or folder; its banks are kept apart)")
    parser.add_argument("--text-precision", default=None, choices=list(TEXT_PRECISIONS),
                        help="build the banks with this text precision (its banks are kept apart)")
    parser.add_argument("--token-storage", default=None, choices=["int8", "float16"],
                        help="build the banks with this token storage (float16 banks are kept apart)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--report", type=Path, nargs="*", default=None, help="only print saved results")
    parser.add_argument("--markdown", action="store_true", help="with --report: one Markdown table")
    parser.add_argument("train_flags", nargs="*", help="more `mvpp train` flags (after --)")
    args = parser.parse_args()
    if args.report:
        for path in args.report:
            saved = json.loads(path.read_text())
            results = {n: {int(k): v for k, v in s.items()} for n, s in saved["results"].items()}
            if args.markdown:
                print(markdown(results, saved["label"]))
            else:
                report(results, saved["label"])
        return
    specs = set_specs()
    results: dict[str, dict[int, dict]] = {}
    for name in args.sets:
        spec = specs[name]
        suffix = f"-{Path(args.text_model).name}" if args.text_model else ""
        if args.text_precision and args.text_precision != "float32":
            suffix += f"-{args.text_precision}"
        if args.token_storage == "float16":
            suffix += "-float16"
        bank = CACHE / "sets" / f"{name}-bank{suffix}"
        try:
            if not (bank / "manifest.json").exists():
                bank.parent.mkdir(parents=True, exist_ok=True)
                text_model = ["--text-model", args.text_model] if args.text_model else []
                if args.text_precision:
                    text_model += ["--text-precision", args.text_precision]
                if args.token_storage:
                    text_model += ["--token-storage", args.token_storage]
                build_s = cli([*spec["build"](bank), *text_model], ok_codes=(0, 1))
                console.print(f"{name}: bank built in {build_s:.0f} s")
        except DataMissing as exc:
            console.print(f"[yellow]{name} skipped: {exc}")
            continue
        results[name] = {}
        for seed in args.seeds:
            out = CACHE / "sets" / "runs" / args.label / f"{name}-{seed}"
            results[name][seed] = run_seed(name, spec, bank, out, seed, args.train_flags)
            if args.json:
                args.json.write_text(json.dumps({"label": args.label, "flags": args.train_flags, "results": results}))
    report(results, args.label)


if __name__ == "__main__":
    main()
