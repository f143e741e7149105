"""Storage backends of the memory bank: embedded (Qdrant Edge, default) and Qdrant server.

The server backend is imported on first use: qdrant-client takes seconds to import, which
an embedded-only run (the default) should not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import BankBusyError, BankNotInitialisedError, BankStore, NotABankError
from .edge import EdgeBankStore

if TYPE_CHECKING:
    from .server import ServerBankStore

DEFAULT_BANK = Path("mvpp-bank")

__all__ = [
    "DEFAULT_BANK",
    "BankBusyError",
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
) -> BankStore:
    """Open a bank: on the Qdrant server at `qdrant_url` when given, else embedded at `bank`
    (default ./mvpp-bank)."""
    if qdrant_url:
        from .server import ServerBankStore

        return ServerBankStore(url=qdrant_url, api_key=api_key, collection=collection)
    return EdgeBankStore(Path(bank) if bank is not None else DEFAULT_BANK)
