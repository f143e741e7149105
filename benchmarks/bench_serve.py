"""`mvpp serve` under load: text-only scoring against a MicroLens run, on loopback.

Starts `mvpp serve` in its own process, then sends N requests of one title each from
1, 8 and 32 concurrent clients and reports p50 / p99 latency, requests/s and items/s;
and scores the same titles with `mvpp score` for comparison.

    python benchmarks/bench_serve.py --run RUN [--requests 400] [--clients 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import DataMissing, microlens  # noqa: E402

console = Console(width=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, titles: list[str], clients: int) -> tuple[list[float], float]:
    """Latencies (s) of one request per title from `clients` concurrent clients, and the wall time."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, t in enumerate(titles):
        queue.put_nowait((i, t))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, title = queue.get_nowait()
            t0 = time.perf_counter()
            response = await http.post(f"{url}/v1/score", json={"items": [{"id": f"q{i}", "title": title}]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run trained on a MicroLens bank")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    try:
        table = microlens()
    except DataMissing as exc:
        console.print(f"[yellow]skipped: {exc}")
        return
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    titles = [r["title"] for r in rows if r.get("title")][-args.requests :]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mvpp.cli.main", "serve", "--run", str(args.run),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit("the service did not start")
            time.sleep(0.2)
        console.print(f"service ready in {time.perf_counter() - t0:.1f} s")
        asyncio.run(load(url, titles[:20], 1))  # warm up
        table_out = Table(title=f"mvpp serve, {len(titles)} requests of one title each (MicroLens run {args.run})")
        for col in ("clients", "p50 ms", "p99 ms", "items/s (one per request)"):
            table_out.add_column(col, justify="right")
        for clients in args.clients:
            latencies, wall = asyncio.run(load(url, titles, clients))
            ms = np.array(latencies) * 1000
            table_out.add_row(str(clients), f"{np.percentile(ms, 50):.1f}", f"{np.percentile(ms, 99):.1f}",
                              f"{len(latencies) / wall:.1f}")
        console.print(table_out)
    finally:
        server.terminate()
        server.wait(30)
    uploads = Path("/tmp") / f"mvpp-bench-serve-{port}.jsonl"
    uploads.write_text("\n".join(json.dumps({"id": f"q{i}", "title": t}) for i, t in enumerate(titles)))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mvpp.cli.main", "score", "--meta", str(uploads), "--run", str(args.run),
                    "--out", str(uploads.with_suffix(".parquet")), "--quiet"], check=False)
    wall = time.perf_counter() - t0
    console.print(f"`mvpp score` of the same {len(titles)} titles: {wall:.1f} s including start-up "
                  f"({len(titles) / wall:.1f} items/s)")
    uploads.unlink(missing_ok=True)
    uploads.with_suffix(".parquet").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
