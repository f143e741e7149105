"""Pieces shared by the `mvpp-bank` and `mvpp` apps: options, store opening, errors."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mvpp.config import DEFAULT_PROFILE, BankLocation, ClusterSettings
from mvpp.media import MediaError
from mvpp.memory_bank.encoders.base import EncoderUnavailableError
from mvpp.memory_bank.encoders.profiles import EncoderSpec
from mvpp.memory_bank.metadata import ColumnMap, MetadataError, table_columns
from mvpp.memory_bank.schema import BankMismatchError, Manifest
from mvpp.memory_bank.store import (
    BankBusyError,
    BankDamagedError,
    BankNotInitialisedError,
    BankStore,
    NotABankError,
    open_store,
)
from mvpp.memory_bank.token_storage import check_token_storage

console = Console(stderr=True)
out = Console()

EXIT_ITEMS_FAILED = 1
EXIT_ERROR = 2

BankOpt = Annotated[
    Path | None,
    typer.Option("--bank", help="Embedded bank folder [env MVPP_BANK; default ./mvpp-bank]."),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--qdrant-url",
        help="Qdrant server URL, or local:PATH for qdrant-client's local mode (no server); "
        "overrides --bank [env MVPP_QDRANT_URL].",
    ),
]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", help="Qdrant API key [env QDRANT_API_KEY].")
]
CollectionOpt = Annotated[
    str, typer.Option("--collection", help="Collection name on a Qdrant server.")
]
ShardsOpt = Annotated[
    int | None,
    typer.Option("--shards", min=1, help="Shards of a collection created on a Qdrant cluster [default: the server's]."),
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option("--replicas", min=1, help="Copies of each shard of a collection created on a cluster."),
]
WriteConsistencyOpt = Annotated[
    int | None,
    typer.Option("--write-consistency", min=1,
                 help="Copies of a shard that must acknowledge each write (at most --replicas)."),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Encoder profile: 'full' (BLIP + UAE-Large-V1 + open_clip ViT-B-32) or "
        "'lite' (offline MiniLM + frame statistics) [env MVPP_PROFILE; default: the "
        "bank's own profile, else 'full'].",
    ),
]
TextModelOpt = Annotated[
    str | None, typer.Option("--text-model", help="Sentence model id or local path.")
]
CaptionerOpt = Annotated[
    str | None,
    typer.Option("--captioner-model", help="BLIP captioner id or local path ('none' disables)."),
]
AudioModelOpt = Annotated[
    str | None,
    typer.Option(
        "--audio-model",
        help="Audio encoder: 'logmel-v1' (model-free, the lite profile's), a transformers audio "
        "model's id or local path (the full profile: an Audio Spectrogram Transformer), or "
        "'none' [default: the bank's, else the profile's].",
    ),
]
TextPrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--text-precision",
        help="The text model's arithmetic: 'float32', 'bfloat16' (1.1-1.6x faster on CPUs with "
        "bfloat16 instructions; vectors within a cosine of 0.9999 of float32's) or 'int8' (the "
        "linear layers in 8-bit integers: about 2x faster on a CPU; vectors within a cosine of "
        "about 0.997, the neighbours a little different). A BERT text model encodes a text alike "
        "in any batch in all three, so scoring a new upload repeats evaluation; other text models "
        "do so in float32 and int8 (in bfloat16 their predictions of new uploads move by about "
        "0.003). "
        "Recorded in the bank: every later encoding for it uses the same "
        "[default: the bank's, else float32].",
    ),
]
TokenStorageOpt = Annotated[
    str | None,
    typer.Option(
        "--token-storage",
        help="How a new bank stores its token features: 'int8' (one byte per value, "
        "each row's direction kept within a cosine of 0.9996; half float16's size) or "
        "'float16'. Fixed when the bank is created [default: the bank's, else int8].",
    ),
]
FrameModelOpt = Annotated[
    str | None, typer.Option("--frame-model", help="open_clip model name or 'frame-stats'.")
]
FramePretrainedOpt = Annotated[
    str | None,
    typer.Option("--frame-pretrained", help="open_clip pretrained tag or local checkpoint path."),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="Torch device (default: cuda if available, else cpu).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    # Model libraries are chatty at INFO; keep them quiet unless something is wrong.
    for name in ("httpx", "transformers", "sentence_transformers", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def location(
    bank: Path | None,
    url: str | None,
    api_key: str | None,
    collection: str,
    shards: int | None = None,
    replicas: int | None = None,
    write_consistency: int | None = None,
) -> BankLocation:
    try:
        cluster = ClusterSettings(shards, replicas, write_consistency)
    except ValueError as exc:
        fail(str(exc))
    return BankLocation.from_env(bank, url, api_key, collection, cluster)


def store_for(loc: BankLocation) -> BankStore:
    return open_store(
        bank=None if loc.is_server else loc.path,
        qdrant_url=loc.qdrant_url,
        api_key=loc.api_key,
        collection=loc.collection,
        cluster=loc.cluster,
    )


def encoder_spec(
    profile: str | None,
    bank: Manifest | None = None,
    text_model: str | None = None,
    captioner: str | None = None,
    frame_model: str | None = None,
    frame_pretrained: str | None = None,
    audio_model: str | None = None,
    text_precision: str | None = None,
) -> EncoderSpec:
    """The encoders to use: a bank's own when nothing says otherwise (its recorded spec,
    model paths included), else the profile with the given overrides. The text precision
    is the bank's unless given."""
    given = profile or os.environ.get("MVPP_PROFILE")
    if bank is not None and not (given or text_model or captioner or frame_model or frame_pretrained or audio_model
                                 or text_precision):
        return EncoderSpec.for_bank(bank)
    name = given or (bank.profile if bank is not None else None) or DEFAULT_PROFILE
    overrides: dict[str, str | None] = {}
    if text_precision:
        overrides["text_precision"] = text_precision
    elif bank is not None:
        overrides["text_precision"] = EncoderSpec.for_bank(bank).text_precision
    if audio_model:
        overrides["audio_model"] = None if audio_model.lower() == "none" else audio_model
    elif bank is not None:  # sound features as the bank has them, unless asked otherwise
        overrides["audio_model"] = bank.audio_model
    if text_model:
        overrides["text_model"] = text_model
    if captioner:
        overrides["captioner_model"] = None if captioner.lower() == "none" else captioner
    if frame_model:
        overrides["frame_model"] = frame_model
    if frame_pretrained:
        overrides["frame_pretrained"] = frame_pretrained
    try:
        return EncoderSpec.from_profile(name, **overrides)
    except ValueError as exc:
        hint = "--text-precision" if "text precision" in str(exc) else "--profile"
        raise typer.BadParameter(str(exc), param_hint=hint) from exc


def quiet_model_loading() -> None:
    """Hide the per-model "Loading weights" bars of transformers unless logging is verbose.

    Call before encoders load. Download bars of the Hugging Face hub stay.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:  # transformers 5; older versions only have a global switch
        set_hook(_silent_tqdm)


def _silent_tqdm(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "disable": True})


def check_spec(manifest: Manifest, spec: EncoderSpec, n_frames: int) -> None:
    """Refuse, before any weights load, to open a bank with other encoders than it was
    built with (so a lite bank opened with --profile full says that, not that the full
    profile's weights are missing offline)."""
    ids = spec.expected_ids()
    wanted = {**ids, "n_frames": n_frames, "max_tokens": spec.max_tokens}
    diffs = [
        f"{name}: the bank has {getattr(manifest, name)!r}, requested {value!r}"
        for name, value in wanted.items()
        if getattr(manifest, name) != value
    ]
    recorded = EncoderSpec.for_bank(manifest).text_precision
    if recorded != spec.text_precision:
        diffs.append(f"text_precision: the bank has {recorded!r}, requested {spec.text_precision!r}")
    if diffs:
        raise BankMismatchError(
            f"encoders or dimensions differ ({'; '.join(diffs)}). Leave out --profile and the "
            f"model flags to use the bank's own (profile {manifest.profile!r}), or build a new bank."
        )


def token_storage_for(manifest: Manifest | None, requested: str | None) -> str | None:
    """The --token-storage a build into a bank uses: the request (checked), which must
    be the bank's own when the bank exists; None leaves it to the bank or the default."""
    if requested is None:
        return None
    name = check_token_storage(requested)
    if manifest is not None and manifest.token_storage != name:
        raise BankMismatchError(
            f"the bank stores its token features as {manifest.token_storage!r}, requested {name!r}: "
            "the storage is fixed when a bank is created; leave out --token-storage, or build a new bank"
        )
    return name


def check_text_columns(raw: list[dict[str, Any]], columns: ColumnMap, has_videos: bool, source: str) -> None:
    """The default text column absent from a table: an error when the rows would then have
    nothing at all to index, else a warning (the rows are indexed without text)."""
    present = sorted(table_columns(raw))
    missing = [c for c in columns.text_cols if c not in present]
    if columns.require_text or not missing:
        return
    found = ", ".join(map(repr, present))
    if not (has_videos or columns.meta_cols or columns.time_col):
        raise MetadataError(
            f"{source}: no text column {missing[0]!r}; name it with --text-col (the table has {found})"
        )
    console.print(
        f"[yellow]warning:[/] {escape(source)} has no {escape(repr(missing[0]))} column: items are "
        f"indexed without text; name the text column with --text-col (the table has {escape(found)})",
        soft_wrap=True,
    )


def fail(message: str, code: int = EXIT_ERROR) -> None:
    # one logical line (the terminal wraps it), whatever the console's width
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Known error kinds become one red line and exit code 2, not a traceback."""
    try:
        yield
    except (
        EncoderUnavailableError,
        BankMismatchError,
        BankBusyError,
        BankDamagedError,
        NotABankError,
        BankNotInitialisedError,
        MetadataError,
        MediaError,
        OSError,  # file not found, permission denied, connection refused, ...
        ValueError,
    ) as exc:
        fail(str(exc))


class LineProgress:
    """What `progress_bar` gives when stderr is not a terminal (a log file, CI): a plain
    line every `interval` seconds and one at the end, with items done, rate and time
    left, instead of a bar nobody sees. The subset of rich's Progress the CLI uses."""

    @dataclass
    class _Task:
        description: str
        total: float | None
        fields: dict[str, Any]
        completed: float = 0.0
        start: float = field(default_factory=time.monotonic)

        @property
        def elapsed(self) -> float:
            return time.monotonic() - self.start

    def __init__(self, target: Console, interval: float = 10.0) -> None:
        self.console = target
        self.interval = interval
        self.tasks: list[LineProgress._Task] = []
        self._last = time.monotonic()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id in range(len(self.tasks)):
            self._line(task_id)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append(self._Task(description, total, dict(fields)))
        return len(self.tasks) - 1

    def update(self, task_id: int, advance: float = 0, total: float | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        if total is not None:
            task.total = total
        task.fields.update(fields)
        if time.monotonic() - self._last >= self.interval:
            self._line(task_id)

    def _line(self, task_id: int) -> None:
        self._last = time.monotonic()
        task = self.tasks[task_id]
        done, total, elapsed = task.completed, task.total, task.elapsed
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{task.description}: {done:,.0f}" + (f"/{total:,.0f}" if total else "")]
        if total:
            parts.append(f"{100 * done / total:.1f}%")
        parts.append(f"{rate:,.1f}/s")
        if total and rate > 0 and done < total:
            parts.append(f"about {(total - done) / rate:,.0f} s left")
        status = task.fields.get("status")
        if status:
            parts.append(str(status))
        self.console.print(escape(", ".join(parts)), soft_wrap=True, highlight=False)


def progress_bar(disable: bool = False) -> Progress | LineProgress:
    """A live bar on a terminal; periodic plain lines otherwise."""
    if not disable and not console.is_terminal:
        return LineProgress(console)
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
        disable=disable,
    )
