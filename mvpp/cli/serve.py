"""`mvpp serve`: the scoring service (mvpp.serve) on uvicorn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mvpp.cli.common import (
    BankOpt,
    CollectionOpt,
    DeviceOpt,
    UrlOpt,
    VerboseOpt,
    console,
    fail,
    location,
    setup_logging,
)
from mvpp.serve import DEFAULT_HOST, DEFAULT_MAX_UPLOAD_MB, DEFAULT_PORT

# The service's own defaults, repeated here so that `mvpp --help` stays fast: the modules
# that hold them import the web stack and the model. tests/test_serve.py checks they agree.
DEFAULT_WINDOW_MS = 5.0
DEFAULT_DECODE_SECONDS = 60.0
DEFAULT_MEMORY = "all"


def serve_cmd(
    run_dir: Annotated[Path, typer.Option("--run", help="Run directory written by `mvpp train`.")] = Path("runs/latest"),
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (0.0.0.0: every interface).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="Key the API asks for ('Authorization: Bearer KEY' or 'X-API-Key: KEY'); /healthz "
            "and the page stay open [env MVPP_API_KEY; default: no key].",
        ),
    ] = None,
    memory: Annotated[
        str, typer.Option("--memory", help="Neighbours from 'all' labelled items of the bank or the run's 'train' items.")
    ] = DEFAULT_MEMORY,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest clip accepted.", min=1)] = DEFAULT_MAX_UPLOAD_MB,
    decode_seconds: Annotated[
        float, typer.Option("--decode-seconds", help="Longest a clip may take to decode before it fails.", min=1)
    ] = DEFAULT_DECODE_SECONDS,
    batch_window_ms: Annotated[
        float,
        typer.Option("--batch-window-ms", help="How long a request waits for others to be scored with it.", min=0),
    ] = DEFAULT_WINDOW_MS,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Scoring calls run at once, the cores shared among them [default: 2 on a CPU, 1 on a GPU].",
            min=1,
        ),
    ] = None,
    bank: BankOpt = None,
    qdrant_url: UrlOpt = None,
    qdrant_api_key: Annotated[
        str | None, typer.Option("--qdrant-api-key", help="Qdrant API key [env QDRANT_API_KEY].")
    ] = None,
    collection: CollectionOpt = "mvpp",
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a run over HTTP: POST /v1/score, /v1/neighbours, /v1/info, /healthz, the page
    at / and the API's documentation at /docs."""
    import uvicorn

    from mvpp.predictor.scoring import MEMORIES, cores_shared_by, default_workers
    from mvpp.serve.app import AppSettings, create_app
    from mvpp.serve.service import ScoringService, ServiceSettings

    setup_logging(verbose)
    if memory not in MEMORIES:
        fail(f"--memory must be one of {', '.join(MEMORIES)}")
    if not (run_dir / "config.json").exists():
        fail(f"{run_dir} is not a run directory: config.json is missing")
    given = bank or qdrant_url or os.environ.get("MVPP_BANK") or os.environ.get("MVPP_QDRANT_URL")
    loc = location(bank, qdrant_url, qdrant_api_key, collection) if given else None
    workers = workers or default_workers(device)
    settings = ServiceSettings(
        run=run_dir, bank=loc, memory=memory, device=device, decode_seconds=decode_seconds, workers=workers
    )
    app = create_app(
        lambda: ScoringService(settings),
        AppSettings(
            api_key=api_key or os.environ.get("MVPP_API_KEY") or None,
            max_upload_bytes=max_upload_mb * 1024 * 1024,
            batch_window_s=batch_window_ms / 1000,
        ),
    )
    console.print(f"serving {run_dir} on http://{host}:{port} (the page at /, the API's documentation at /docs)")
    with cores_shared_by(workers):
        uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
