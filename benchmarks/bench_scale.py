"""How the bank's costs grow with its size: synthetic banks of 10^5 (and 10^6) items.

Items are realistic but made up: the MiniLM retrieval vectors of the MicroLens-100k
titles (encoded once, cached in .bench-data/), replicated with small Gaussian noise
(renormalised) under fresh ids, each copy keeping its original's title and label, with a
made-up publish time (uniform over a year) and creator (one per 50 items). Text-only
rows with the retrieval vector alone: the table a user who has embeddings already
brings to `mvpp-bank import`; with `--tokens`, each copy also carries its original
title's token features (the lite profile's MiniLM token rows, encoded once), what the
predictor's text expert reads.

For each size it measures, each in its own process where memory matters:
- `mvpp-bank import` of the table: items/s and peak RSS (the HNSW index is built as
  part of it);
- the bank's size on disk;
- filtered queries (k = 10, labelled items published before a random time, the query's
  own id excluded) on the HNSW index: p50 / p99 latency and recall@10 against the same
  search done exactly, for times that keep a quarter of the bank or more and for
  selective ones that keep 0.5-10% of it;
- reading the bank into the arrays training uses (`read_snapshot`): seconds and peak RSS;
- with `--train`, `mvpp train --epochs 1` on the bank with the defaults: wall time,
  seconds of the epoch, and peak RSS of the command and the processes it starts;
- exact bulk neighbours (`bulk_topk`, time-filtered, k = 10) for `--bulk-sample` items,
  timed and extrapolated linearly to every item of the bank (the search is exact and
  quadratic in the bank's size);
- the same bulk neighbours through an HNSW index (`retriever.ann`, what `mvpp train`
  uses from `ANN_THRESHOLD` items on): the index's build, ms per item for the 200
  candidates a default run asks, all items extrapolated, recall@10 against exact on a
  sample, and the process's peak RSS.

Then how each cost grows from the smallest size to the largest (the exponent b of
cost ~ size^b).

    python benchmarks/bench_scale.py [--sizes 100000 1000000] [--queries 300]

10^6 items need about 14 GB of memory (the import's peak, most of it the engine's
memory-mapped segments) and, on 2 cores, 10 to 15 minutes for the import alone; 10^5
items take about 3 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import CACHE, DataMissing, microlens  # noqa: E402

console = Console(width=130)

# Spread of the noise added to each copy of a vector, per dimension, before renormalising:
# about 0.94 cosine between a copy and its original (384-d), so copies are near
# neighbours of each other without being duplicates.
NOISE = 0.0125
ITEMS_PER_CREATOR = 50
YEAR_S = 365 * 24 * 3600
START_TS = 1_700_000_000
ROWS_PER_GROUP = 50_000
BULK_BLOCK_VALUES = 200_000_000
# Share of the bank a selective time filter keeps (drawn log-uniformly between these).
SELECTIVE_KEEP = (0.005, 0.1)


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc (gone ones are skipped)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_of(cmd: list[str]) -> tuple[float, float, int]:
    """Runs `cmd`; returns its wall seconds, its peak resident memory (GB, sampled every
    0.1 s from /proc, summed over the process and its children: pages they share count
    once per process, so it is an upper bound) and its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            if proc.poll() is not None:
                return
            peak = max(peak, sum(_rss_kb(pid) for pid in _process_tree(proc.pid)))
            stop.wait(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    watcher.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    if proc.returncode not in (0, 1):
        console.print(f"[red]{' '.join(cmd[:4])} ... failed:\n{err[-2000:]}")
    return wall, peak / 1024**2, proc.returncode


def source_vectors() -> tuple[np.ndarray, list[str], np.ndarray]:
    """MiniLM retrieval vectors, titles and comment counts of the MicroLens titles."""
    rows = [json.loads(line) for line in microlens().read_text().splitlines()]
    rows = [r for r in rows if r.get("title")]
    cache = CACHE / "microlens-minilm-retrieval.npy"
    if cache.exists() and len(np.load(cache, mmap_mode="r")) == len(rows):
        vectors = np.load(cache)
    else:
        from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders

        console.print(f"encoding {len(rows):,} MicroLens titles with the lite profile's text encoder (once)")
        vectors = load_encoders(EncoderSpec.from_profile("lite")).text.encode([r["title"] for r in rows])
        np.save(cache, vectors.astype(np.float32))
    return vectors.astype(np.float32), [r["title"] for r in rows], np.array([r["comments"] for r in rows], float)


def source_tokens(titles: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The lite profile's token features of `titles` (what a build stores, at most 32 rows
    per title): float16 rows back to back and each title's count."""
    cache = CACHE / "microlens-minilm-tokens.npz"
    if cache.exists():
        with np.load(cache) as data:
            if len(data["lengths"]) == len(titles):
                return data["rows"], data["lengths"]
    from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders

    console.print(f"encoding the token features of {len(titles):,} MicroLens titles (once)")
    per_title = load_encoders(EncoderSpec.from_profile("lite")).text.encode_tokens(titles, max_tokens=32)
    rows = np.concatenate(per_title).astype(np.float16)
    lengths = np.array([len(t) for t in per_title], np.int64)
    np.savez(cache, rows=rows, lengths=lengths)
    return rows, lengths


def _token_column(rows: np.ndarray, lengths: np.ndarray, src: np.ndarray):
    """A `vector.text` column: the token rows of titles `src`, one list of rows per item."""
    import pyarrow as pa

    from mvpp.retriever.packed import PackedSequences

    packed = PackedSequences(rows, lengths, int(lengths.max()))
    picked = packed.rows[packed.row_index(src)]
    offsets = np.concatenate([[0], np.cumsum(lengths[src])]).astype(np.int32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(picked.ravel()), rows.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def synthetic_table(path: Path, n: int, seed: int = 0, tokens: bool = False) -> np.ndarray:
    """Writes the n-item table; returns its vectors (for the exact searches). With
    `tokens`, each copy also carries its original title's token features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, titles, comments = source_vectors()
    token_rows, token_lengths = source_tokens(titles) if tokens else (None, None)
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    writer = None
    try:
        for lo in range(0, n, ROWS_PER_GROUP):
            hi = min(n, lo + ROWS_PER_GROUP)
            src = rng.integers(0, len(base), hi - lo)
            vec = base[src] + rng.normal(0.0, NOISE, (hi - lo, base.shape[1])).astype(np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            out[lo:hi] = vec
            ids = np.arange(lo, hi)
            batch = pa.table({
                "id": [f"s{i}" for i in ids],
                "title": [titles[j] for j in src],
                "comments": comments[src],
                "published": rng.uniform(START_TS, START_TS + YEAR_S, hi - lo).round(),
                "creator": [f"c{i // ITEMS_PER_CREATOR}" for i in ids],
                "vector.retrieval": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), base.shape[1]),
            })
            if token_rows is not None and token_lengths is not None:
                batch = batch.append_column("vector.text", _token_column(token_rows, token_lengths, src))
            writer = writer or pq.ParquetWriter(path, batch.schema)
            writer.write_table(batch)
    finally:
        if writer is not None:
            writer.close()
    return out


def query_latency(bank: Path, vectors: np.ndarray, published: np.ndarray, n_queries: int,
                  seed: int = 1) -> dict[str, float]:
    """p50 / p99 ms of filtered HNSW queries (k = 10) and their recall@10 against the same
    filtered search done exactly: time filters that keep a quarter of the bank or more,
    and selective ones that keep 0.5-10% of it (log-uniform), where a graph walk is most
    likely to lose its way."""
    from mvpp.memory_bank.schema import SearchFilter
    from mvpp.memory_bank.store import open_store

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(vectors), n_queries, replace=False)
    ordered = np.sort(published)
    broad = rng.uniform(START_TS + YEAR_S / 4, START_TS + YEAR_S, n_queries)
    kept = np.exp(rng.uniform(np.log(SELECTIVE_KEEP[0]), np.log(SELECTIVE_KEEP[1]), n_queries))
    selective = ordered[(kept * len(ordered)).astype(int)]
    out: dict[str, float] = {}
    with open_store(bank=bank) as store:
        for i in picks[:20]:  # warm the caches
            store.search(vectors[i], 10)
        for name, cuts in (("", broad), ("selective_", selective)):
            latencies, recalls = [], []
            for i, cut in zip(picks, cuts, strict=True):
                flt = SearchFilter(exclude_ids=[f"s{i}"], labelled_only=True, published_before=float(cut))
                t0 = time.perf_counter()
                hits = store.search(vectors[i], 10, flt=flt)
                latencies.append(time.perf_counter() - t0)
                exact = store.search(vectors[i], 10, flt=flt, exact=True)
                truth = {h.item_id for h in exact}
                recalls.append(len(truth & {h.item_id for h in hits}) / max(1, len(truth)))
            ms = np.array(latencies) * 1000
            out.update({f"{name}query_p50_ms": float(np.percentile(ms, 50)),
                        f"{name}query_p99_ms": float(np.percentile(ms, 99)),
                        f"{name}recall_at_10": float(np.mean(recalls))})
    return out


SNAPSHOT_SCRIPT = """
import sys
from pathlib import Path
from mvpp.memory_bank.store import open_store
from mvpp.retriever.snapshot import read_snapshot
with open_store(bank=Path(sys.argv[1])) as store:
    read_snapshot(store, None)
"""


def bulk_seconds(vectors: np.ndarray, sample: int, seed: int = 2) -> float:
    """Seconds for exact time-filtered top-10 neighbours of every item, extrapolated from
    `sample` queries against the whole bank."""
    from mvpp.retriever.bulk import DEFAULT_BLOCK, bulk_topk

    rng = np.random.default_rng(seed)
    times = rng.uniform(START_TS, START_TS + YEAR_S, len(vectors))
    picks = rng.choice(len(vectors), min(sample, len(vectors)), replace=False)
    # queries per block so that one (block, items) float64 score matrix stays near 1.6 GB
    block = int(max(64, min(DEFAULT_BLOCK, BULK_BLOCK_VALUES // len(vectors))))
    bulk_topk(vectors[:8], vectors[:64], 10)  # loads torch: not part of the search's cost
    t0 = time.perf_counter()
    bulk_topk(vectors[picks], vectors, 10, query_key_index=picks, query_time=times[picks], key_time=times,
              block=block)
    return (time.perf_counter() - t0) * len(vectors) / len(picks)


ANN_SCRIPT = """
import json, sys
import numpy as np
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_scale import ann_bulk
vectors = np.load(sys.argv[2], mmap_mode="r")
out = ann_bulk(np.asarray(vectors), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
Path(sys.argv[6]).write_text(json.dumps(out))
"""


def ann_bulk(vectors: np.ndarray, root: Path, sample: int, recall_sample: int, seed: int = 2) -> dict[str, float]:
    """The dense stage of training's neighbour search through an HNSW index (what
    `mvpp train` does from `ANN_THRESHOLD` items on): the index's build, the time of the
    candidates for every item (extrapolated from `sample` queries, as many as the
    default run asks: its re-rank's 200), and recall@10 against the exact search."""
    from mvpp.predictor.training import TrainConfig
    from mvpp.retriever.packed import PackedSequences
    from mvpp.retriever.search import ApproximateSearch, NeighbourSearch, QueryBatch
    from mvpp.retriever.snapshot import BankSnapshot

    n = len(vectors)
    rng = np.random.default_rng(seed)
    times = rng.uniform(START_TS, START_TS + YEAR_S, n)
    snap = BankSnapshot(
        item_ids=[f"s{i}" for i in range(n)], retrieval=vectors, has_retrieval=np.ones(n, bool),
        targets=np.zeros((n, 1), np.float32), label_names=["comments"], published_ts=times,
        frames=PackedSequences.empty(n), tokens=PackedSequences.empty(n),
    )
    cfg = TrainConfig()
    limit = max(cfg.k, cfg.rerank_candidates)
    t0 = time.perf_counter()
    search = NeighbourSearch(snap, np.arange(n), cfg.k, True, approximate=ApproximateSearch(root, cfg.ann))
    build = time.perf_counter() - t0
    picks = np.sort(rng.choice(n, min(sample, n), replace=False))
    queries = QueryBatch.from_snapshot(snap, picks)
    t0 = time.perf_counter()
    search.dense(queries, picks, limit, exact=False)
    per_query = (time.perf_counter() - t0) / len(picks)
    recall = search.recall(queries.subset(slice(0, recall_sample)), 10)
    return {"ann_build_s": build, "ann_query_ms": per_query * 1000, "ann_bulk_s": build + per_query * n,
            "ann_recall_at_10": recall}


def measure(n: int, work: Path, args: argparse.Namespace) -> dict[str, float]:
    table, bank = work / f"scale-{n}.parquet", work / f"bank-{n}"
    t0 = time.perf_counter()
    vectors = synthetic_table(table, n, tokens=args.tokens)
    console.print(f"{n:,} items: table written in {time.perf_counter() - t0:.0f} s")
    row: dict[str, float] = {"items": n, "tokens": float(args.tokens)}
    if not args.bulk_only:
        row.update(bank_costs(n, table, bank, vectors, args))
    if not args.skip_bulk:
        row.update(bulk_costs(n, work, vectors, args))
    console.print(row)
    if not args.keep:
        shutil.rmtree(bank, ignore_errors=True)
        table.unlink(missing_ok=True)
    return row


def bulk_costs(n: int, work: Path, vectors: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Neighbours of every item: exact (extrapolated) and through the index."""
    row = {"bulk_exact_s": bulk_seconds(vectors, args.bulk_sample)}
    np.save(work / "vectors.npy", vectors)
    del vectors  # the index's process holds its own copy
    result = work / "ann.json"
    wall, rss, code = peak_rss_of([
        sys.executable, "-c", ANN_SCRIPT, str(Path(__file__).resolve().parent.parent), str(work / "vectors.npy"),
        str(work / f"index-{n}"), str(args.ann_sample), str(args.recall_sample), str(result),
    ])
    if code == 0:
        row.update(json.loads(result.read_text()))
        row["ann_peak_gb"] = rss
    else:
        console.print(f"the approximate bulk search failed (exit {code})")
    shutil.rmtree(work / f"index-{n}", ignore_errors=True)
    (work / "vectors.npy").unlink(missing_ok=True)
    return row


def bank_costs(n: int, table: Path, bank: Path, vectors: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Import, disk, filtered queries and reading the arrays of an n-item bank."""
    wall, rss, code = peak_rss_of([
        sys.executable, "-m", "mvpp.cli.bank", "import", str(table),
        "--bank", str(bank), "--profile", "lite", "--label-col", "comments", "--time-col", "published",
        "--meta-col", "creator",
    ])
    row = {"import_s": wall, "import_items_per_s": n / wall, "import_peak_gb": rss}
    # blocks in use: the engine preallocates files larger than what they hold
    row["disk_gb"] = sum(f.stat().st_blocks * 512 for f in bank.rglob("*") if f.is_file()) / 1024**3
    console.print(f"{n:,} items: imported in {wall:.0f} s (exit {code}), {row['disk_gb']:.2f} GB on disk")
    import pyarrow.parquet as pq

    published = pq.read_table(table, columns=["published"]).column("published").to_numpy()
    row.update(query_latency(bank, vectors, published, args.queries))
    wall, rss, _ = peak_rss_of([sys.executable, "-c", SNAPSHOT_SCRIPT, str(bank)])
    row.update({"snapshot_s": wall, "snapshot_peak_gb": rss})
    if args.train:
        run = bank.parent / f"run-{n}"
        wall, rss, code = peak_rss_of([
            sys.executable, "-m", "mvpp.cli.main", "train", "--bank", str(bank), "--epochs", "1",
            "--out", str(run),
        ])
        metrics = json.loads((run / "metrics.json").read_text()) if code == 0 else {}
        row.update({"train_s": wall, "train_peak_gb": rss,
                    "epoch_s": metrics.get("seconds_per_epoch", float("nan"))})
        console.print(f"{n:,} items: `mvpp train --epochs 1` took {wall:.0f} s (exit {code}), peak {rss:.2f} GB")
        shutil.rmtree(run, ignore_errors=True)
    return row


COLUMNS = [
    ("import_items_per_s", "import items/s", "{:,.0f}"),
    ("import_peak_gb", "import peak GB", "{:.2f}"),
    ("disk_gb", "disk GB", "{:.2f}"),
    ("query_p50_ms", "query p50 ms", "{:.2f}"),
    ("query_p99_ms", "query p99 ms", "{:.2f}"),
    ("recall_at_10", "recall@10", "{:.3f}"),
    ("selective_query_p50_ms", "selective p50 ms", "{:.2f}"),
    ("selective_recall_at_10", "selective recall@10", "{:.3f}"),
    ("snapshot_s", "read arrays s", "{:.1f}"),
    ("snapshot_peak_gb", "read arrays peak GB", "{:.2f}"),
    ("train_s", "train, 1 epoch s", "{:,.0f}"),
    ("epoch_s", "epoch s", "{:,.0f}"),
    ("train_peak_gb", "train peak GB", "{:.2f}"),
    ("bulk_exact_s", "bulk exact, all items s", "{:,.0f}"),
    ("ann_build_s", "index build s", "{:,.0f}"),
    ("ann_query_ms", "index ms/query", "{:.2f}"),
    ("ann_bulk_s", "bulk index, all items s", "{:,.0f}"),
    ("ann_recall_at_10", "bulk index recall@10", "{:.4f}"),
    ("ann_peak_gb", "bulk index peak GB", "{:.2f}"),
]
# costs whose growth is reported (import time, not its rate)
GROWTH = {"import_s": "import time", "disk_gb": "disk", "query_p50_ms": "query p50",
          "snapshot_peak_gb": "read arrays RAM", "bulk_exact_s": "bulk exact", "ann_bulk_s": "bulk index"}


def report(rows: list[dict[str, float]]) -> None:
    table = Table(title="bank costs by size (text-only lite rows, 384-d retrieval vectors)")
    table.add_column("items", justify="right")
    measured = [col for col in COLUMNS if any(col[0] in row for row in rows)]  # skipped parts leave no column
    for _, name, _ in measured:
        table.add_column(name, justify="right")
    for row in rows:
        items = f"{int(row['items']):,}" + (" + tokens" if row.get("tokens") else "")
        table.add_row(items, *(fmt.format(row[key]) if key in row else "-" for key, _, fmt in measured))
    console.print(table)
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        scale = math.log(hi["items"] / lo["items"])
        growth = ", ".join(f"{name} {math.log(hi[key] / lo[key]) / scale:.2f}"
                           for key, name in GROWTH.items() if lo.get(key, 0) > 0 and hi.get(key, 0) > 0)
        console.print(f"exponent b of cost ~ items^b from {int(lo['items']):,} to {int(hi['items']):,}: {growth}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=300, help="filtered queries timed per size")
    parser.add_argument("--bulk-sample", type=int, default=2048, help="items whose exact neighbours are timed")
    parser.add_argument("--ann-sample", type=int, default=20_000,
                        help="items whose index neighbours are timed (enough to share them among processes)")
    parser.add_argument("--recall-sample", type=int, default=500, help="of those, items compared with exact search")
    parser.add_argument("--train", action="store_true",
                        help="also time `mvpp train --epochs 1` on the bank, with its peak RSS (children included)")
    parser.add_argument("--tokens", action="store_true",
                        help="rows also carry their title's token features (the lite profile's, 8-bit in the bank)")
    parser.add_argument("--skip-bulk", action="store_true", help="leave out the bulk searches")
    parser.add_argument("--bulk-only", action="store_true", help="only the bulk searches (no bank is built)")
    parser.add_argument("--work", type=Path, default=None, help="folder for tables and banks (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the tables and banks")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--report", type=Path, nargs="*", default=None, help="only print saved rows")
    args = parser.parse_args()
    if args.report is not None:
        report(sorted((r for p in args.report for r in json.loads(p.read_text())), key=lambda r: r["items"]))
        return
    try:
        source_vectors()
    except DataMissing as exc:
        console.print(f"[yellow]skipped: {exc}")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mvpp-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sorted(args.sizes):
            rows.append(measure(n, work, args))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(rows)


if __name__ == "__main__":
    main()
