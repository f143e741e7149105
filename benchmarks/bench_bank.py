"""Memory-bank speed on MicroLens-100k titles (text-only lite bank).

Prints build throughput, query latency (k=10, vectors precomputed, so encoding is
excluded) and the time of bulk neighbours for every item (k=10, self excluded).

    python benchmarks/bench_bank.py [--limit N] [--bank PATH] [--queries 1000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import DataMissing, microlens  # noqa: E402
from mvpp.config import BuildSettings  # noqa: E402
from mvpp.memory_bank.builder import BankBuilder, plan_items  # noqa: E402
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders  # noqa: E402
from mvpp.memory_bank.metadata import ColumnMap, load_metadata  # noqa: E402
from mvpp.memory_bank.schema import SearchFilter  # noqa: E402
from mvpp.memory_bank.store import open_store  # noqa: E402
from mvpp.retriever.bulk import bulk_topk  # noqa: E402
from mvpp.retriever.snapshot import read_snapshot  # noqa: E402

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="first N items only")
    parser.add_argument("--bank", type=Path, default=None, help="bank folder (default: temporary)")
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed")
    args = parser.parse_args()
    try:
        table_path = microlens(args.limit)
    except DataMissing as exc:
        console.print(f"[yellow]skipped: {exc}")
        return
    tmp = None
    bank = args.bank
    if bank is None:
        tmp = Path(tempfile.mkdtemp(prefix="mvpp-bench-"))
        bank = tmp / "bank"
    rows_out = []
    try:
        rows = load_metadata(table_path, ColumnMap(label_cols=["comments"]))
        items, failures = plan_items(None, rows)
        encoders = load_encoders(EncoderSpec.from_profile("lite"))
        with open_store(bank=bank) as store:
            if store.manifest is None:
                builder = BankBuilder(store, encoders, BuildSettings())
                t0 = time.perf_counter()
                report = builder.build(items, failures, bank.parent / "bench.failures.jsonl")
                build_s = time.perf_counter() - t0
                rows_out.append(("build (lite, text-only)", f"{report.indexed} items", f"{build_s:.1f} s",
                                 f"{report.indexed / build_s:.0f} items/s"))
                rows_out.append(("  failed (no text, no video)", str(report.failed), "", ""))
            else:
                rows_out.append(("build", "skipped: --bank already holds a bank", "", ""))

            t0 = time.perf_counter()
            snap = read_snapshot(store)
            scroll_s = time.perf_counter() - t0
            rows_out.append(("scroll whole bank to arrays", f"{len(snap)} items", f"{scroll_s:.1f} s", ""))

            rng = np.random.default_rng(0)
            pick = rng.choice(len(snap), size=min(args.queries, len(snap)), replace=False)
            for i in pick[:20]:  # warm-up
                store.search(snap.retrieval[i], 10)
            lat = []
            for i in pick:
                t = time.perf_counter()
                store.search(snap.retrieval[i], 10, flt=SearchFilter(exclude_ids=[snap.item_ids[i]]))
                lat.append((time.perf_counter() - t) * 1000)
            lat = np.array(lat)
            rows_out.append(("query k=10 (HNSW, self excluded)", f"{len(lat)} queries",
                             f"p50 {np.percentile(lat, 50):.2f} ms", f"p99 {np.percentile(lat, 99):.2f} ms"))

            t0 = time.perf_counter()
            nb = bulk_topk(snap.retrieval, snap.retrieval, 10, query_key_index=np.arange(len(snap)))
            bulk_s = time.perf_counter() - t0
            assert (nb.indices != np.arange(len(snap))[:, None]).all()
            rows_out.append(("bulk neighbours, all items, k=10", f"{len(snap)} queries", f"{bulk_s:.1f} s", "exact, self excluded"))
            size = store.size_bytes()
            rows_out.append(("bank size on disk", "", f"{size / 1e6:.0f} MB" if size else "n/a", ""))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"memory bank on {table_path.name}")
    for col in ("measure", "size", "time", "rate"):
        table.add_column(col)
    for r in rows_out:
        table.add_row(*r)
    console.print(table)


if __name__ == "__main__":
    main()
