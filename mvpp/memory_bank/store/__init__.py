"""Storage backends of the memory bank: embedded (Qdrant Edge, default) and Qdrant server.

The server backend is imported on first use: qdrant-client takes seconds to import, which
an embedded-only run (the default) should not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvpp.config import LOCAL_PREFIX, ClusterSettings

from .base import BankBusyError, BankDamagedError, BankNotInitialisedError, BankStore, NotABankError
from .edge import EdgeBankStore

if TYPE_CHECKING:
    from .server import ServerBankStore

DEFAULT_BANK = Path("mvpp-bank")

__all__ = [
    "DEFAULT_BANK",
    "LOCAL_PREFIX",
    "BankBusyError",
    "BankDamagedError",
    "BankNotInitialisedError",
    "BankStore",
    "EdgeBankStore",
    "NotABankError",
    "ServerBankStore",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "ServerBankStore":
        from .server import ServerBankStore

        return ServerBankStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(
    bank: Path | None = None,
    qdrant_url: str | None = None,
    api_key: str | None = None,
    collection: str = "mvpp",
    cluster: ClusterSettings | None = None,
) -> BankStore:
    """Open a bank: on the Qdrant server at `qdrant_url` when given, else embedded at `bank`
    (default ./mvpp-bank).

    `qdrant_url="local:PATH"` runs the server backend on qdrant-client's local mode with
    its data in the folder PATH (one process at a time), without a server. `cluster`:
    how a collection this store creates on a server is sharded and replicated.
    """
    if cluster is not None and cluster.given and (not qdrant_url or qdrant_url.startswith(LOCAL_PREFIX)):
        raise ValueError("shards, replicas and write consistency apply to a Qdrant server: give --qdrant-url")
    if qdrant_url:
        from .server import ServerBankStore

        if qdrant_url.startswith(LOCAL_PREFIX):
            path = qdrant_url[len(LOCAL_PREFIX) :]
            if not path:
                raise ValueError("give a folder after 'local:', e.g. local:./qdrant-data")
            return ServerBankStore(path=path, collection=collection)
        return ServerBankStore(url=qdrant_url, api_key=api_key, collection=collection, cluster=cluster)
    return EdgeBankStore(Path(bank) if bank is not None else DEFAULT_BANK)
