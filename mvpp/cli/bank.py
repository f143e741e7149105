"""`mvpp-bank`: build, query and inspect a memory bank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mvpp.cli.common import (
    EXIT_ITEMS_FAILED,
    ApiKeyOpt,
    AudioModelOpt,
    BankOpt,
    CaptionerOpt,
    CollectionOpt,
    DeviceOpt,
    FrameModelOpt,
    FramePretrainedOpt,
    ProfileOpt,
    ReplicasOpt,
    ShardsOpt,
    TextModelOpt,
    TextPrecisionOpt,
    TokenStorageOpt,
    UrlOpt,
    VerboseOpt,
    WriteConsistencyOpt,
    check_spec,
    check_text_columns,
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
    token_storage_for,
)
from mvpp.config import BuildSettings, decode_ahead_default, default_failures_file, video_batch_size
from mvpp.memory_bank.builder import BankBuilder, plan_items
from mvpp.memory_bank.encoders.base import resolve_device
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders
from mvpp.memory_bank.metadata import LABEL_TRANSFORMS, ColumnMap, parse_rows, read_table
from mvpp.retriever.retriever import MATCHES, Query, Retriever

app = typer.Typer(
    help="Build, query and inspect an mvpp memory bank (Qdrant).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


@app.command()
def build(
    videos_dir: Annotated[
        Path | None,
        typer.Argument(help="Folder of videos (mp4, webm, mov, mkv); ids are file stems."),
    ] = None,
    meta: Annotated[
        Path | None, typer.Option("--meta", help="Metadata table: .csv, .tsv, .parquet or .jsonl.")
    ] = None,
    id_col: Annotated[str, typer.Option("--id-col", help="Id column of the metadata.")] = "id",
    text_col: Annotated[
        list[str] | None,
        typer.Option("--text-col", help="Text column(s), joined in order [default: title]."),
    ] = None,
    label_col: Annotated[
        list[str] | None,
        typer.Option("--label-col", help="Label column; repeat for several targets."),
    ] = None,
    label_transform: Annotated[
        str,
        typer.Option(
            "--label-transform",
            help=f"Label -> target: {', '.join(LABEL_TRANSFORMS)} (log2p1 = log2(1+x)).",
        ),
    ] = "log2p1",
    time_col: Annotated[
        str | None, typer.Option("--time-col", help="Publish time column (ISO or unix).")
    ] = None,
    observed_col: Annotated[
        str | None,
        typer.Option(
            "--observed-col",
            help="When the labels were observed (e.g. scrape time): gives the post's age.",
        ),
    ] = None,
    meta_col: Annotated[
        list[str] | None,
        typer.Option(
            "--meta-col",
            help="Metadata column (numeric or categorical, e.g. followers, creator id) kept in "
            "the payload and used by the predictor's metadata expert; repeatable.",
        ),
    ] = None,
    video_col: Annotated[
        str | None,
        typer.Option("--video-col", help="Column with a video path relative to VIDEOS_DIR."),
    ] = None,
    failures: Annotated[
        Path | None,
        typer.Option("--failures", help="Failures file (JSONL) [default: beside the bank]."),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option("--frames", help="Frames decoded per video [default: the bank's, else 10].", min=1),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Videos encoded together [default: 64 on a GPU, 16 on the CPU].", min=1
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", help="Parallel video decoders (threads, or processes with --decode-ahead).", min=1
        ),
    ] = BuildSettings().decode_workers,
    decode_ahead: Annotated[
        bool | None,
        typer.Option(
            "--decode-ahead/--no-decode-ahead",
            help="Decode the next batch in worker processes while the current one is encoded "
            "[default: on with a GPU, off on the CPU, where the encoders use every core].",
        ),
    ] = None,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    shards: ShardsOpt = None,
    replicas: ReplicasOpt = None,
    write_consistency: WriteConsistencyOpt = None,
    profile: ProfileOpt = None,
    text_model: TextModelOpt = None,
    captioner_model: CaptionerOpt = None,
    frame_model: FrameModelOpt = None,
    frame_pretrained: FramePretrainedOpt = None,
    audio_model: AudioModelOpt = None,
    text_precision: TextPrecisionOpt = None,
    token_storage: TokenStorageOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Index videos and/or a metadata table into the bank.

    Items already indexed with the same content are skipped, so a rerun (or a run after
    an interruption) only does what is left. Exit code 1 if any item failed; each
    failure is written with its reason to the failures file.
    """
    setup_logging(verbose)
    if videos_dir is None and meta is None:
        fail("give a VIDEOS_DIR, a --meta table, or both")
    if videos_dir is not None and not videos_dir.is_dir():
        fail(f"not a folder: {videos_dir}")
    if label_transform not in LABEL_TRANSFORMS:
        fail(f"--label-transform must be one of {', '.join(LABEL_TRANSFORMS)}")
    loc = location(bank, qdrant_url, api_key, collection, shards, replicas, write_consistency)
    resolved_device = resolve_device(device)
    settings = BuildSettings(
        n_frames=frames or BuildSettings().n_frames,
        batch_size=batch_size or video_batch_size(resolved_device),
        decode_workers=workers,
        decode_ahead=decode_ahead_default(resolved_device) if decode_ahead is None else decode_ahead,
        label_transform=label_transform,
    )
    failures_file = failures or default_failures_file(loc)
    with friendly_errors():
        rows = None
        columns = None
        if meta is not None:
            columns = ColumnMap(
                id_col=id_col,
                text_cols=text_col or ["title"],
                label_cols=label_col or [],
                time_col=time_col,
                observed_col=observed_col,
                meta_cols=meta_col or [],
                video_col=video_col,
                require_text=bool(text_col),
            )
            raw = read_table(meta)
            if not raw:
                fail(f"{meta} has no rows: nothing to index")
            check_text_columns(raw, columns, has_videos=videos_dir is not None, source=str(meta))
            rows = parse_rows(raw, columns, source=str(meta))
        items, plan_failures = plan_items(videos_dir, rows)
        if not items and not plan_failures:
            fail(f"no videos in {videos_dir}: nothing to index")
        with store_for(loc) as store:
            spec = encoder_spec(
                profile, store.manifest, text_model, captioner_model, frame_model, frame_pretrained, audio_model,
                text_precision,
            )
            if frames is None and store.manifest is not None:
                settings.n_frames = store.manifest.n_frames
            if store.manifest is not None:
                check_spec(store.manifest, spec, settings.n_frames)
            settings.token_storage = token_storage_for(store.manifest, token_storage)
            quiet_model_loading()
            encoders = load_encoders(spec, device=device)
            builder = BankBuilder(store, encoders, settings)
            with progress_bar() as bar:
                on_progress = _indexing_progress(bar, len(items) + len(plan_failures))
                report = builder.build(items, plan_failures, failures_file, on_progress, columns)
    _report(report, loc, failures_file)


def _indexing_progress(bar, total: int):
    """A progress callback of the builder that counts items by outcome on `bar`."""
    task = bar.add_task("indexing", total=total, rate="", status="")
    counts = {"indexed": 0, "unchanged": 0, "failed": 0}

    def on_progress(n: int, status: str) -> None:
        if status not in counts:  # a phase, not an item count
            bar.update(task, status=status)
            return
        counts[status] += n
        elapsed = bar.tasks[task].elapsed or 0.0
        rate = counts["indexed"] / elapsed if elapsed > 0 else 0.0
        bar.update(
            task,
            advance=n,
            rate=f"{rate:.1f} items/s",
            status=f"{counts['indexed']} new, {counts['unchanged']} unchanged, {counts['failed']} failed",
        )

    return on_progress


def _report(report, loc, failures_file: Path) -> None:
    """The summary table of a build or an import; exit code 1 when an item failed."""
    table = Table(title=Text(f"bank {loc.describe()}"))
    table.add_column("indexed", justify="right")
    table.add_column("unchanged", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("items/s", justify="right")
    table.add_column("time", justify="right")
    table.add_row(
        str(report.indexed),
        str(report.unchanged),
        str(report.failed),
        f"{report.items_per_s:.1f}",
        f"{report.elapsed_s:.1f} s",
    )
    console.print(table)
    if report.failed:
        shown = report.failures[:10]
        for f in shown:
            console.print(f"  [red]failed[/] {escape(f.item_id)}: {escape(f.reason)}")
        if report.failed > len(shown):
            console.print(f"  ... and {report.failed - len(shown)} more")
        console.print(f"failures written to {escape(str(failures_file))}")
        raise typer.Exit(EXIT_ITEMS_FAILED)


@app.command("export")
def export_(
    out_file: Annotated[Path, typer.Option("--out", help="The Parquet table to write.")],
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    verbose: VerboseOpt = False,
) -> None:
    """Write every item of a bank to one Parquet table: its metadata columns, labels,
    times, vectors and manifest. `mvpp-bank import` reads it into another bank (embedded
    or on a server) with no other flags."""
    from mvpp.memory_bank.transfer import export_bank

    setup_logging(verbose)
    loc = location(bank, qdrant_url, api_key, collection)
    if out_file.suffix.lower() not in {".parquet", ".pq"}:
        fail(f"--out must name a .parquet file, not {out_file}")
    with friendly_errors(), store_for(loc) as store:
        if store.manifest is None:
            fail(f"no bank at {loc.describe()}: nothing to export")
        with progress_bar() as bar:
            task = bar.add_task("exporting", total=store.count(), rate="", status="")
            written = export_bank(store, out_file, lambda n: bar.update(task, advance=n))
    size = out_file.stat().st_size
    console.print(f"{written} items written to {escape(str(out_file))} ({size / 1e6:.1f} MB)")


@app.command("import")
def import_(
    table: Annotated[Path, typer.Argument(help="Parquet table with vector columns (see --help).")],
    id_col: Annotated[str | None, typer.Option("--id-col", help="Id column [default: id].")] = None,
    text_col: Annotated[
        list[str] | None, typer.Option("--text-col", help="Text column(s), joined in order [default: title].")
    ] = None,
    label_col: Annotated[list[str] | None, typer.Option("--label-col", help="Label column; repeatable.")] = None,
    label_transform: Annotated[
        str | None,
        typer.Option("--label-transform", help=f"Label -> target: {', '.join(LABEL_TRANSFORMS)} "
                     "[default: the table's, else log2p1]."),
    ] = None,
    time_col: Annotated[str | None, typer.Option("--time-col", help="Publish time column.")] = None,
    observed_col: Annotated[str | None, typer.Option("--observed-col", help="Label observation time column.")] = None,
    meta_col: Annotated[list[str] | None, typer.Option("--meta-col", help="Metadata column; repeatable.")] = None,
    failures: Annotated[
        Path | None, typer.Option("--failures", help="Failures file (JSONL) [default: beside the bank].")
    ] = None,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    shards: ShardsOpt = None,
    replicas: ReplicasOpt = None,
    write_consistency: WriteConsistencyOpt = None,
    profile: ProfileOpt = None,
    text_model: TextModelOpt = None,
    captioner_model: CaptionerOpt = None,
    frame_model: FrameModelOpt = None,
    frame_pretrained: FramePretrainedOpt = None,
    audio_model: AudioModelOpt = None,
    text_precision: TextPrecisionOpt = None,
    token_storage: TokenStorageOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Index a Parquet table whose rows carry their own vectors.

    A table written by `mvpp-bank export` needs no other flags. A table of your own
    holds `vector.retrieval` (a list of floats per row) and optionally `vector.text`,
    `vector.frames`, `vector.audio` (lists of rows), made by the encoders the bank will
    use for new items: name them with --profile / --text-model / ... (the bank records
    them), and the columns as for `build`. Rows are checked one by one (id, labels,
    times, vector sizes, finite values); a bad row fails alone, and a rerun skips rows
    already imported.
    """
    from mvpp.memory_bank.transfer import import_table, read_header

    setup_logging(verbose)
    loc = location(bank, qdrant_url, api_key, collection, shards, replicas, write_consistency)
    failures_file = failures or default_failures_file(loc)
    with friendly_errors():
        header = read_header(table)
        exported = header.manifest is not None and header.columns is not None
        flags = any(v for v in (id_col, text_col, label_col, time_col, observed_col, meta_col))
        if exported and flags:
            fail(f"{table} was written by `mvpp-bank export` and names its own columns: drop the column flags")
        if exported and any(v for v in (profile, text_model, captioner_model, frame_model, frame_pretrained,
                                         audio_model, text_precision)):
            fail(f"{table} holds vectors of the encoders it was exported with: drop the encoder flags")
        transform = label_transform or (header.manifest.label_transform if header.manifest else "log2p1")
        if transform not in LABEL_TRANSFORMS:
            fail(f"--label-transform must be one of {', '.join(LABEL_TRANSFORMS)}")
        with store_for(loc) as store:
            if exported:
                assert header.manifest is not None and header.columns is not None
                manifest, columns = header.manifest, header.columns
                if label_transform:
                    manifest.label_transform = label_transform
            else:
                columns = ColumnMap(
                    id_col=id_col or "id", text_cols=text_col or ["title"], label_cols=label_col or [],
                    time_col=time_col, observed_col=observed_col, meta_cols=meta_col or [],
                    require_text=bool(text_col),
                )
                spec = encoder_spec(
                    profile, store.manifest, text_model, captioner_model, frame_model, frame_pretrained, audio_model,
                    text_precision,
                )
                quiet_model_loading()
                # the encoders' names and widths: the bank encodes new items with them
                encoders = load_encoders(spec, device=device)
                manifest = BankBuilder(store, encoders, BuildSettings(label_transform=transform)).manifest(
                    columns.label_cols, columns
                )
            storage = token_storage_for(store.manifest, token_storage)
            if storage is not None:
                manifest.token_storage = storage
            settings = BuildSettings(label_transform=manifest.label_transform, n_frames=manifest.n_frames,
                                     max_tokens=manifest.max_tokens, token_storage=manifest.token_storage)
            with progress_bar() as bar:
                on_progress = _indexing_progress(bar, header.rows)
                report = import_table(table, store, manifest, columns, failures_file, on_progress, settings,
                                      record_columns=not exported)
    _report(report, loc, failures_file)


@app.command()
def query(
    clip: Annotated[Path | None, typer.Argument(help="Video clip to find neighbours for.")] = None,
    title: Annotated[str | None, typer.Option("--title", help="Title / caption text.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of neighbours.", min=1)] = 10,
    labelled_only: Annotated[
        bool, typer.Option("--labelled-only", help="Only return labelled items.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="Match by: auto (the text's retrieval vector when there is a title, else the "
            "clip's frames and sound together, their MaxSim scores averaged), retrieval, "
            "frames or audio.",
        ),
    ] = "auto",
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="Rank as this run's predictor does: its lexical re-rank of the title terms "
            "(scores up to 1.5), among the bank's labelled items. Needs a title.",
        ),
    ] = None,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
    profile: ProfileOpt = None,
    text_model: TextModelOpt = None,
    captioner_model: CaptionerOpt = None,
    frame_model: FrameModelOpt = None,
    frame_pretrained: FramePretrainedOpt = None,
    audio_model: AudioModelOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The k most similar items of the bank to a clip and/or a title."""
    from mvpp.memory_bank.schema import SearchFilter

    setup_logging(verbose)
    if clip is None and not title:
        fail("give a CLIP, a --title, or both")
    loc = location(bank, qdrant_url, api_key, collection)
    with friendly_errors(), store_for(loc) as store:
        if store.manifest is None:
            fail(f"no bank at {loc.describe()}: build one with `mvpp-bank build`")
        spec = encoder_spec(
            profile, store.manifest, text_model, captioner_model, frame_model, frame_pretrained, audio_model
        )
        quiet_model_loading()
        retriever = Retriever(store, load_encoders(spec, device=device))
        if by not in MATCHES:
            fail(f"--by must be one of {', '.join(MATCHES)}")
        if run is None:
            flt = SearchFilter(labelled_only=True) if labelled_only else None
            hits = retriever.query(Query(clip=clip, title=title or "", by=by), k=k, flt=flt)
        else:
            hits = _run_hits(run, store, loc, retriever, Query(clip=clip, title=title or ""), k)
    if as_json:
        rows = [
            {
                "item_id": h.item_id,
                "score": round(float(h.score), 6),
                "title": h.payload.get("title"),
                "captions": h.payload.get("captions") or [],
                "labels": h.payload.get("labels"),
                "targets": h.payload.get("targets"),
                "published_at": h.payload.get("published_at"),
            }
            for h in hits
        ]
        out.print_json(json.dumps(rows, ensure_ascii=False))
        return
    table = Table(title=Text(f"{len(hits)} nearest in {loc.describe()}"))
    table.add_column("#", justify="right")
    table.add_column("item id", overflow="fold")
    table.add_column("similarity", justify="right")
    table.add_column("title", overflow="fold", max_width=50)
    table.add_column("first caption", overflow="fold", max_width=40)
    table.add_column("labels", overflow="fold")
    for rank, h in enumerate(hits, 1):
        caps = h.payload.get("captions") or []
        labels = h.payload.get("labels") or {}
        table.add_row(  # Text: titles and ids are shown as written, never read as markup
            str(rank),
            Text(h.item_id),
            f"{h.score:.4f}",
            Text(h.payload.get("title") or ""),
            Text(caps[0] if caps else ""),
            Text(", ".join(f"{k_}={v:g}" for k_, v in labels.items())),
        )
    out.print(table)


def _run_hits(run_dir: Path, store, loc, retriever: Retriever, query: Query, k: int) -> list:
    """Neighbours of a query as a run ranks them (the search its predictor uses)."""
    from mvpp.memory_bank.schema import Hit
    from mvpp.predictor.run import Run
    from mvpp.predictor.scoring import RunPredictor
    from mvpp.retriever.snapshot import read_snapshot

    if not query.title:
        fail("--run ranks by the title's retrieval vector and terms: give a --title")
    run = Run.load(run_dir)
    store.manifest.check_compatible(
        run.manifest, mine="the bank has", theirs="the run was trained with",
        advice="Use the bank the run was trained on, or a run trained on this bank.",
    )
    snapshot = read_snapshot(store, None if loc.is_server else loc.path / "cache")
    (encoded,) = retriever.encode([query])
    (found,) = RunPredictor(run, snapshot, "all").neighbours([encoded.point], k)
    payloads = {p.item_id: p.payload() for p in store.get([i for i, _ in found], vectors=()) if p is not None}
    return [Hit(item_id, score, payloads.get(item_id, {})) for item_id, score in found]


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "mvpp",
) -> None:
    """Item counts, encoders, dimensions, backend and size of a bank."""
    from mvpp.memory_bank.schema import SearchFilter

    setup_logging(False)
    loc = location(bank, qdrant_url, api_key, collection)
    with friendly_errors(), store_for(loc) as store:
        manifest = store.manifest
        if manifest is None:
            fail(f"no bank at {loc.describe()}: build one with `mvpp-bank build`")
        data = {
            "location": loc.describe(),
            "backend": store.backend,
            "items": store.count(),
            "labelled": store.count(SearchFilter(labelled_only=True)),
            "with_video": store.count(SearchFilter(has_video=True)),
            "with_audio": store.count(SearchFilter(has_audio=True)) if manifest.audio_dim else 0,
            "size_bytes": store.size_bytes(),
            **manifest.to_dict(),
            "text_precision": EncoderSpec.for_bank(manifest).text_precision,
        }
    data["unlabelled"] = data["items"] - data["labelled"]
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table(title=Text(f"bank {data['location']}"), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in (
        "backend", "items", "labelled", "unlabelled", "with_video", "with_audio", "profile", "text_model",
        "text_precision", "captioner_model", "frame_model", "audio_model", "retrieval_dim", "token_dim", "frame_dim", "audio_dim",
        "n_frames", "max_tokens", "token_storage", "label_names", "label_transform", "schema_version",
    ):
        value = data[key]
        table.add_row(key, Text(", ".join(value) if isinstance(value, list) else str(value)))
    columns = data["columns"]
    if columns:
        shown = {k: v for k, v in columns.items() if v}
        table.add_row("columns", Text("; ".join(f"{k}={', '.join(v) if isinstance(v, list) else v}" for k, v in shown.items())))
    size = data["size_bytes"]
    if size is None:
        table.add_row("size on disk", "n/a (server)")
    else:
        per_item = f" ({size / data['items'] / 1e3:.1f} KB per item)" if data["items"] else ""
        table.add_row("size on disk", f"{size / 1e6:.1f} MB{per_item}")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
