"""Per-item prediction tables of `mvpp score` and `mvpp evaluate --predictions`: writing
them, and the summary a batch of thousands of rows prints instead of every row."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

TABLE_SUFFIXES = (".parquet", ".csv")
SHOWN_ROWS = 20


def write_table(rows: list[dict[str, Any]], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Rows as a Parquet or CSV file, columns in first-seen order; `metadata` goes into
    the Parquet schema (CSV has no place for it). Written beside and renamed into place,
    so a reader never sees half a file."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, tmp)
    else:
        import pyarrow.parquet as pq

        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        pq.write_table(table, tmp)
    tmp.replace(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def status_counts(rows: list[dict[str, Any]]) -> Counter:
    """Rows per status; failures grouped by their reason."""
    return Counter(str(r["status"]) for r in rows)


def print_summary(
    console: Console, rows: list[dict[str, Any]], targets: list[str], header: str, footer: str
) -> None:
    """Counts by status and the distribution of each target's predictions."""
    console.print(header)
    counts = status_counts(rows)
    table = Table(title=f"{len(rows)} rows by status")
    table.add_column("status")
    table.add_column("rows", justify="right")
    for status, n in sorted(counts.items(), key=lambda kv: (not kv[0].startswith("ok"), -kv[1])):
        table.add_row(Text(status), str(n))
    console.print(table)
    dist = Table(title="predictions (target scale; count in brackets)")
    for col in ("target", "n", "mean", "5%", "median", "95%", "mean interval width"):
        dist.add_column(col, justify="left" if col == "target" else "right")
    for t in targets:
        pred = np.array([r[f"{t}_pred"] for r in rows if _finite(r.get(f"{t}_pred"))])
        if not len(pred):
            dist.add_row(t, "0", "", "", "", "", "")
            continue
        width = np.array([
            r[f"{t}_upper"] - r[f"{t}_lower"] for r in rows if _finite(r.get(f"{t}_pred"))
        ])
        counts_ = np.array([r[f"{t}_count"] for r in rows if _finite(r.get(f"{t}_pred"))])
        q = np.quantile(pred, [0.05, 0.5, 0.95])
        qc = np.quantile(counts_, [0.05, 0.5, 0.95])
        dist.add_row(
            t, str(len(pred)), f"{pred.mean():.3f}",
            *(f"{a:.2f} ({b:,.0f})" for a, b in zip(q, qc, strict=True)),
            f"{width.mean():.3f}",
        )
    console.print(dist)
    console.print(footer)


def print_rows(console: Console, rows: list[dict[str, Any]], targets: list[str], limit: int = SHOWN_ROWS) -> None:
    """The first `limit` rows as a table."""
    table = Table(title=f"first {min(limit, len(rows))} of {len(rows)} rows")
    table.add_column("item id", overflow="fold")
    for t in targets:
        table.add_column(f"{t} (5%-95%)", justify="right")
        table.add_column(f"{t} count", justify="right")
    table.add_column("top neighbours", overflow="fold")
    table.add_column("status", overflow="fold")
    for r in rows[:limit]:
        cells: list[Any] = [Text(str(r["item_id"]))]
        for t in targets:
            p = r.get(f"{t}_pred")
            if not _finite(p):
                cells += ["", ""]
            else:
                cells += [f"{p:.2f} ({r[f'{t}_lower']:.2f}-{r[f'{t}_upper']:.2f})", f"{r[f'{t}_count']:,.0f}"]
        nbs = [
            f"{r.get(f'neighbour_{j}')} ({r.get(f'neighbour_{j}_sim'):.2f})"
            for j in (1, 2, 3)
            if r.get(f"neighbour_{j}")
        ]
        cells += [Text(", ".join(nbs)), Text(str(r["status"]))]
        table.add_row(*cells)
    console.print(table)
