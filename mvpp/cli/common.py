"""Pieces shared by the `mvpp-bank` and `mvpp` apps: options, store opening, errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
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

from mvpp.config import DEFAULT_PROFILE, BankLocation
from mvpp.media import MediaError
from mvpp.memory_bank.encoders.base import EncoderUnavailableError
from mvpp.memory_bank.encoders.profiles import EncoderSpec
from mvpp.memory_bank.metadata import MetadataError
from mvpp.memory_bank.schema import BankMismatchError
from mvpp.memory_bank.store import (
    BankBusyError,
    BankNotInitialisedError,
    BankStore,
    NotABankError,
    open_store,
)

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


def location(bank: Path | None, url: str | None, api_key: str | None, collection: str) -> BankLocation:
    return BankLocation.from_env(bank, url, api_key, collection)


def store_for(loc: BankLocation) -> BankStore:
    return open_store(
        bank=None if loc.is_server else loc.path,
        qdrant_url=loc.qdrant_url,
        api_key=loc.api_key,
        collection=loc.collection,
    )


def encoder_spec(
    profile: str | None,
    bank_profile: str | None = None,
    text_model: str | None = None,
    captioner: str | None = None,
    frame_model: str | None = None,
    frame_pretrained: str | None = None,
) -> EncoderSpec:
    name = profile or os.environ.get("MVPP_PROFILE") or bank_profile or DEFAULT_PROFILE
    overrides: dict[str, str | None] = {}
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
        raise typer.BadParameter(str(exc), param_hint="--profile") from exc


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
        NotABankError,
        BankNotInitialisedError,
        MetadataError,
        MediaError,
        OSError,  # file not found, permission denied, connection refused, ...
        ValueError,
    ) as exc:
        fail(str(exc))


def progress_bar(disable: bool = False) -> Progress:
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
