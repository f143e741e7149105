"""`mvpp`: train the predictor on a bank, evaluate a run, score new uploads."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mvpp.cli.common import (
    EXIT_ITEMS_FAILED,
    ApiKeyOpt,
    BankOpt,
    CollectionOpt,
    DeviceOpt,
    UrlOpt,
    VerboseOpt,
    console,
    encoder_spec,
    fail,
    friendly_errors,
    location,
    out,
    progress_bar,
    quiet_model_loading,
    setup_logging,
    store_for,
)
from mvpp.cli.scores import TABLE_SUFFIXES, print_rows, print_summary, write_table
from mvpp.cli.serve import serve_cmd
from mvpp.config import BankLocation, BuildSettings, decode_ahead_default
from mvpp.memory_bank.builder import BankBuilder, plan_items
from mvpp.memory_bank.encoders.base import resolve_device
from mvpp.memory_bank.encoders.profiles import load_encoders
from mvpp.memory_bank.metadata import parse_rows, read_table, table_columns
from mvpp.memory_bank.store import BankStore
from mvpp.predictor.config import ABLATIONS, ModelConfig
from mvpp.predictor.config_file import build_configs
from mvpp.predictor.metrics import Metrics
from mvpp.predictor.run import Run, save_run
from mvpp.predictor.scoring import (
    DEFAULT_MEMORY,
    MEMORIES,
    RunPredictor,
    Scorer,
    cores_shared_by,
    default_workers,
    upload_columns,
)
from mvpp.predictor.training import (
    ANN_THRESHOLD,
    MAX_EPOCHS,
    MIN_EPOCHS,
    RECALL_AT,
    RECALL_SAMPLE,
    STEPS_TARGET,
    TRAIN_ABLATIONS,
    TrainConfig,
    train,
)
from mvpp.retriever.snapshot import BankSnapshot, read_snapshot

app = typer.Typer(
    help="Train, evaluate and apply the mvpp popularity predictor.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)

# Bank arrays for training are cached inside the embedded bank's folder.
CACHE_DIRNAME = "cache"


def _cache_dir(bank_path: Path) -> Path:
    return bank_path / CACHE_DIRNAME


def metrics_table(title: str, metrics: dict[str, Metrics]) -> Table:
    table = Table(title=title)
    for col in ("target", "n", "nMSE", "MAE", "SRC", "R²", "coverage"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, m in metrics.items():
        cov = "" if m.coverage is None or m.interval is None else f"{m.coverage:.3f} ({m.interval:.0%})"
        table.add_row(name, str(m.n), f"{m.nmse:.4f}", f"{m.mae:.4f}", f"{m.src:.4f}", f"{m.r2:.4f}", cov)
    return table


def _default(value: object) -> str:
    """A dataclass default as it reads in --help (rich markup's bracket escaped)."""
    return f"[default: {value}]"


@app.command("train")
def train_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/latest"),
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Settings file (.toml or .json) with sections [train] and [model]: any field of "
            "TrainConfig and ModelConfig. A run's config.json is one: it trains that run again.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override one setting: SECTION.KEY=VALUE, e.g. model.dropout=0.1 or train.lr=2e-3 "
            "(repeatable; after --config).",
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("--k", help=f"Neighbours retrieved per item; 0: no retrieval. {_default(TrainConfig().k)}", min=0),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Most epochs (early stopping may end sooner) [default: fitted to the data: enough "
            f"for {STEPS_TARGET} optimiser steps, {MIN_EPOCHS} to {MAX_EPOCHS} epochs].",
            min=1,
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help=f"Seed of the split and the training. {_default(TrainConfig().seed)}")
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option("--target", help="Label(s) to predict [default: every label of the bank].")
    ] = None,
    split_by_time: Annotated[
        bool | None,
        typer.Option("--split-by-time", help="Train on the earliest 80%, validate on the next 10%, test on the latest 10%."),
    ] = None,
    time_safe: Annotated[
        bool | None,
        typer.Option(
            "--time-safe/--no-time-safe",
            help="Retrieve only items published before the query [default: on when the bank has times].",
        ),
    ] = None,
    neighbour_group: Annotated[
        str | None,
        typer.Option(
            "--neighbour-group",
            help="Metadata column (e.g. a creator id) whose equal values put a neighbour first: "
            "a creator's earlier posts are retrieved before any other's.",
        ),
    ] = None,
    neighbour_index: Annotated[
        str | None,
        typer.Option(
            "--neighbour-index",
            help="Dense neighbour search: exact (every key), ann (candidates from an HNSW index kept "
            f"in the run), auto (ann from {ANN_THRESHOLD:,} training items on). "
            f"{_default(TrainConfig().neighbour_index)}",
        ),
    ] = None,
    meta_col: Annotated[
        list[str] | None,
        typer.Option("--meta-col", help="Metadata column(s) of the bank to use [default: all]."),
    ] = None,
    meta_categorical: Annotated[
        list[str] | None,
        typer.Option("--meta-categorical", help="Metadata column to treat as categories even if numeric (e.g. a creator id)."),
    ] = None,
    members: Annotated[
        str | None,
        typer.Option(
            "--members",
            help="The run's members, comma-separated: net (the network), gbdt (boosted trees on "
            "the numbers the network sees); both are blended with weights fitted on validation. "
            f"{_default(','.join(TrainConfig().members))}",
        ),
    ] = None,
    ablate: Annotated[
        list[str] | None,
        typer.Option(
            "--ablate",
            help=f"Switch parts off, comma-separated or repeated: {', '.join([*ABLATIONS, *TRAIN_ABLATIONS])}.",
        ),
    ] = None,
    device: DeviceOpt = None,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    verbose: VerboseOpt = False,
) -> None:
    """Train the predictor on the bank's labelled items, with retrieval.

    Every setting has a default in TrainConfig / ModelConfig; --config and --set change
    any of them, the flags the common ones.
    """
    setup_logging(verbose)
    with friendly_errors():
        cfg, mcfg = build_configs(config, set_)
        flags = {
            "k": k, "epochs": epochs, "seed": seed, "split_by_time": split_by_time, "time_safe": time_safe,
            "targets": target, "neighbour_group": neighbour_group, "meta_cols": meta_col,
            "meta_categorical": meta_categorical, "device": device, "neighbour_index": neighbour_index,
            "members": [m.strip() for m in members.split(",") if m.strip()] if members is not None else None,
        }
        cfg = replace(cfg, **{name: value for name, value in flags.items() if value is not None})
        for name in (n.strip() for part in ablate or [] for n in part.split(",") if n.strip()):
            if name in ABLATIONS:
                setattr(mcfg, ABLATIONS[name], False)
            elif name in TRAIN_ABLATIONS:
                field_name, off = TRAIN_ABLATIONS[name]
                cfg = replace(cfg, **{field_name: off})
            else:
                fail(f"--ablate {name!r}: choose from {', '.join([*ABLATIONS, *TRAIN_ABLATIONS])}")
        mcfg.use_retrieval = mcfg.use_retrieval and cfg.k > 0
        ModelConfig.from_dict(mcfg.to_dict())  # the switches must leave something to encode
    loc = location(bank, qdrant_url, api_key, collection)
    with friendly_errors():
        # The bank is read once and closed: training never holds it open.
        with store_for(loc) as store:
            if store.manifest is None:
                fail(f"no bank at {loc.describe()}: build one with `mvpp-bank build`")
            manifest = store.manifest
            with console.status("reading the bank"):
                snapshot = read_snapshot(store, None if loc.is_server else _cache_dir(loc.path))
        with progress_bar() as bar:
            task = bar.add_task("training", total=None, rate="", status="")
            state = {"epoch": 0}

            def on_event(event: str, info: dict) -> None:
                if event == "start":
                    bar.update(task, total=info["epochs"] * info["batches"])
                    console.print(f"items per split: {info['splits']}")
                elif event == "step":
                    bar.update(task, advance=1, status=f"epoch {state['epoch'] + 1} loss {info['loss']:.4f}")
                elif event == "epoch":
                    state["epoch"] = info["epoch"]
                    console.print(
                        f"epoch {info['epoch']:3d}  loss {info['train_loss']:.4f}  "
                        f"val nMSE {info['val_nmse']:.4f}  val SRC {info['val_src']:.4f}  "
                        f"({info['seconds']:.1f} s)"
                    )

            result = train(snapshot, cfg, mcfg, on_event)
        save_run(result, cfg, out_dir, manifest, loc)
    console.print(f"best epoch {result.best_epoch}; {result.seconds_per_epoch:.1f} s per epoch")
    index = result.data.neighbour_index
    if index is not None:
        console.print(
            f"neighbours from an HNSW index of {index.meta['vectors']:,} vectors (built in "
            f"{index.built_seconds:.0f} s): recall@{RECALL_AT} {result.data.neighbour_recall:.4f} "
            f"against exact search on a sample of {RECALL_SAMPLE:,} items"
        )
    if result.member_metrics:
        for name, per in result.member_metrics.items():
            out.print(metrics_table(f"{name} alone, val ({out_dir})", per["val"]))
        weights = ", ".join(f"{t} {w:.2f}" for t, w in zip(result.data.target_names, result.blend_weights, strict=True))
        console.print(f"blend: the network's weight per target (the trees get the rest): {weights}; "
                      f"trees fitted in {result.gbdt_seconds:.0f} s")
    elif "gbdt" not in cfg.members:
        console.print("members: the network alone (--members net)")
    for split in ("val", "test"):
        out.print(metrics_table(f"{split} ({out_dir})", result.metrics[split]))
    console.print(f"run saved to {out_dir}")


MemoryOpt = Annotated[
    str,
    typer.Option(
        "--memory",
        help="Neighbours come from 'all' labelled items of the bank (items added after "
        "training too) or only the run's 'train' items, as in training.",
    ),
]


def _run_location(
    run: Run,
    bank: Path | None,
    qdrant_url: str | None,
    api_key: str | None,
    collection: str,
    announce: bool = True,
) -> BankLocation:
    """The bank given by flag or environment, else the one the run was trained on (said
    in one line when `announce`)."""
    if bank or qdrant_url or os.environ.get("MVPP_BANK") or os.environ.get("MVPP_QDRANT_URL"):
        return location(bank, qdrant_url, api_key, collection)
    if run.bank is None:
        return location(None, None, api_key, collection)
    loc = run.bank
    if loc.is_server:
        loc.api_key = api_key or os.environ.get("QDRANT_API_KEY") or None
    if announce:
        console.print(
            f"bank: {escape(loc.describe())} (the run's; --bank or --qdrant-url to use another)", soft_wrap=True
        )
    return loc


def _open_run_bank(run: Run, store: BankStore, loc: BankLocation) -> None:
    """Fail unless `store` is a bank built with the run's encoders."""
    if store.manifest is None:
        fail(f"no bank at {loc.describe()}: give the bank the run was trained on with --bank or --qdrant-url")
    store.manifest.check_compatible(
        run.manifest,
        mine="the bank has",
        theirs="the run was trained with",
        advice="Use the bank the run was trained on (--bank / --qdrant-url), or train a run on this bank.",
    )


StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Refuse a bank that lacks some of the run's items, instead of a warning."),
]


def _check_bank_content(run: Run, snapshot: BankSnapshot, strict: bool, announce: bool = True) -> None:
    """Say when the bank is not the one the run was trained on: items of the run missing
    (a warning, or an error with --strict), or items added or changed since (a note)."""
    missing, total = run.missing_from(snapshot)
    if missing:
        message = (
            f"{missing} of the run's {total} items are not in this bank (it holds part of the "
            "bank the run was trained on, or items were removed): the memory and any metrics "
            "cover the rest"
        )
        if strict:
            fail(message)
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
    elif announce and run.bank_fingerprint and snapshot.fingerprint != run.bank_fingerprint:
        added = len(snapshot) - total
        console.print(
            f"note: the bank changed since training ({added} more items than the run's splits, "
            "or items re-indexed)", soft_wrap=True,
        )


def _check_memory(memory: str) -> None:
    if memory not in MEMORIES:
        fail(f"--memory must be one of {', '.join(MEMORIES)}")


def _check_table_path(path: Path, flag: str) -> None:
    if path.suffix.lower() not in TABLE_SUFFIXES:
        fail(f"{flag} must end in .parquet or .csv")


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Option("--run", help="Run directory written by `mvpp train`.")],
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Also write each item's prediction (.parquet or .csv; the columns of "
            "`mvpp score`, plus the true target).",
        ),
    ] = None,
    memory: MemoryOpt = "train",
    strict: StrictOpt = False,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    verbose: VerboseOpt = False,
) -> None:
    """nMSE, MAE, Spearman SRC, R² and interval coverage of a run on a whole split.

    The bank is the run's own unless --bank or --qdrant-url names another.
    """
    setup_logging(verbose)
    _check_memory(memory)
    if predictions is not None:
        _check_table_path(predictions, "--predictions")
    with friendly_errors():
        run = Run.load(run_dir)  # a RunError is a ValueError: one red line, exit 2
        loc = _run_location(run, bank, qdrant_url, api_key, collection)
        with store_for(loc) as store:
            _open_run_bank(run, store, loc)
            snapshot = read_snapshot(store, None if loc.is_server else _cache_dir(loc.path))
        _check_bank_content(run, snapshot, strict)
        predictor = RunPredictor(run, snapshot, memory)
        result = predictor.evaluate(split)
    if predictions is not None:
        truth = predictor.bank.with_targets(run.targets)
        rows = []
        for r, i in zip(result.rows, predictor.splits[split], strict=True):
            flat = r.flat(run.targets, run.manifest.label_transform)
            for j, t in enumerate(run.targets):
                flat[f"{t}_true"] = float(truth.targets[i, j])
            rows.append(flat)
        write_table(rows, predictions, {"mvpp.memory": memory, "mvpp.memory_items": str(predictor.memory_size)})
        console.print(f"{len(rows)} predictions written to {escape(str(predictions))}")
    if as_json:
        out.print_json(json.dumps({name: m.to_dict() for name, m in result.metrics.items()}))
    else:
        out.print(metrics_table(f"{split} ({run_dir})", result.metrics))


@app.command("score")
def score_cmd(
    videos_dir: Annotated[Path | None, typer.Argument(help="Folder of new videos (ids = file stems).")] = None,
    run_dir: Annotated[Path, typer.Option("--run", help="Run directory written by `mvpp train`.")] = Path("runs/latest"),
    out_file: Annotated[Path, typer.Option("--out", help="Output table: .parquet or .csv.")] = Path("scores.parquet"),
    meta: Annotated[Path | None, typer.Option("--meta", help="Metadata of the new items (.csv/.parquet/.jsonl).")] = None,
    id_col: Annotated[
        str | None, typer.Option("--id-col", help="Id column of the metadata [default: the bank's, else id].")
    ] = None,
    text_col: Annotated[
        list[str] | None, typer.Option("--text-col", help="Text column(s) [default: the bank's, else title].")
    ] = None,
    time_col: Annotated[
        str | None, typer.Option("--time-col", help="Publish time column [default: the bank's, when present].")
    ] = None,
    observed_col: Annotated[
        str | None,
        typer.Option("--observed-col", help="Time the counts are predicted for [default: the bank's, when present]."),
    ] = None,
    meta_col: Annotated[
        list[str] | None,
        typer.Option("--meta-col", help="Metadata column(s) [default: those the run was trained on]."),
    ] = None,
    video_col: Annotated[
        str | None, typer.Option("--video-col", help="Video path column [default: the bank's, when present].")
    ] = None,
    memory: MemoryOpt = DEFAULT_MEMORY,
    strict: StrictOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items scored together.", min=1)] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Batches scored at once, the cores shared among them [default: 2 on a CPU, 1 on a GPU].",
            min=1,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Predict popularity of new uploads: mean, 5-95% interval, top-3 neighbours.

    Every input row gets one output row, in input order; a row that cannot be scored
    carries the reason in `status`. The table's columns default to those the bank was
    built from, and the bank to the run's own. Exit code 1 if any row failed.
    """
    setup_logging(verbose)
    _check_memory(memory)
    _check_table_path(out_file, "--out")
    if videos_dir is None and meta is None:
        fail("give a VIDEOS_DIR, a --meta table, or both")
    with friendly_errors():
        run = Run.load(run_dir)  # a RunError is a ValueError: one red line, exit 2
        loc = _run_location(run, bank, qdrant_url, api_key, collection, announce=not quiet)
        with store_for(loc) as store:
            _open_run_bank(run, store, loc)
            assert store.manifest is not None
            rows = None
            if meta is not None:
                raw = read_table(meta)
                columns = upload_columns(
                    run, store.manifest.columns or run.manifest.columns, table_columns(raw),
                    id_col, text_col, time_col, observed_col, meta_col, video_col,
                )
                rows = parse_rows(raw, columns, source=str(meta))
            items, plan_failures = plan_items(videos_dir, rows)
            snapshot = read_snapshot(store, None if loc.is_server else _cache_dir(loc.path))
            _check_bank_content(run, snapshot, strict, announce=not quiet)
            spec = encoder_spec(None, store.manifest)
            settings = BuildSettings(
                n_frames=store.manifest.n_frames,
                max_tokens=store.manifest.max_tokens,
                decode_ahead=decode_ahead_default(resolve_device(device)),
            )
            quiet_model_loading()
            builder = BankBuilder(store, load_encoders(spec, device=device), settings)
            scorer = Scorer(run, snapshot, builder, memory)
            workers = workers or default_workers(device)
            with cores_shared_by(workers), progress_bar(disable=quiet) as bar:
                task = bar.add_task("scoring", total=len(items), rate="", status="")
                scored = scorer.score(items, batch_size, lambda n: bar.update(task, advance=n), workers)
    transform = run.manifest.label_transform
    placed = [(it.position, r.flat(run.targets, transform)) for it, r in zip(items, scored, strict=True)]
    placed += [(f.position, {"item_id": f.item_id, "status": f"failed: {f.reason}"}) for f in plan_failures]
    flat = [row for _, row in sorted(placed, key=lambda pr: pr[0])]
    mem = scorer.predictor
    write_table(flat, out_file, {"mvpp.memory": memory, "mvpp.memory_items": str(mem.memory_size)})
    n_failed = sum(1 for r in flat if str(r["status"]).startswith("failed"))
    if not quiet:
        print_rows(out, flat, run.targets)
        print_summary(
            console, flat, run.targets,
            header=f"memory: {memory} ({mem.memory_size} labelled items)",
            footer=f"{len(flat)} rows written to {escape(str(out_file))} ({n_failed} failed)",
        )
    if n_failed:
        raise typer.Exit(EXIT_ITEMS_FAILED)


app.command("serve")(serve_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
