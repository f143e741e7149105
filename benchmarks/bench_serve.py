"""`mvpp serve` under load: text-only scoring against a MicroLens run, on loopback.

Starts `mvpp serve` in its own process, then sends N requests of one title each from
1, 8 and 32 concurrent clients and reports p50 / p99 latency, items/s and the CPU cores
the service and the load generator used (they share the machine: the generator writes
HTTP/1.1 itself to take little of it; `--generator httpx` sends through httpx); then requests of
`--items-per-request` titles each, as a pipeline that batches its own uploads sends them.
It also times the bank's text encoder alone on the same titles (batches of 32, torch's
threads): on a CPU that pass is most of a text item's cost, and this machine's speed
moves from hour to hour, so the service's rates are best read against it. Last,
`mvpp score` of the same titles for comparison.

    python benchmarks/bench_serve.py --run RUN [--requests 400] [--clients 1 8 32] [--generator raw|httpx]
        [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _score_body(i: int, part: list[str]) -> bytes:
    return json.dumps({"items": [{"id": f"q{i + j}", "title": title} for j, title in enumerate(part)]}).encode()


async def load(url: str, titles: list[str], clients: int, per_request: int = 1,
               generator: str = "raw") -> tuple[list[float], float]:
    """Latencies (s) of requests of `per_request` titles each from `clients` concurrent
    clients, each on its own keep-alive connection, and the wall time. `generator`:
    "raw" writes HTTP/1.1 on asyncio streams (a few tens of microseconds of CPU per
    request, so the load generator takes little of the cores it shares with the
    service), "httpx" sends the same requests through httpx."""
    queue: asyncio.Queue[tuple[int, list[str]]] = asyncio.Queue()
    for i in range(0, len(titles), per_request):
        queue.put_nowait((i, titles[i : i + per_request]))
    latencies: list[float] = []

    def check(status: int, body: bytes, part: list[str]) -> None:
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        items = json.loads(body)["items"]
        if len(items) != len(part) or not all(item["status"].startswith("ok") for item in items):
            raise RuntimeError(f"unexpected answer: {body[:200]!r}")

    async def raw_client() -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not queue.empty():
                i, part = queue.get_nowait()
                body = _score_body(i, part)
                head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                t0 = time.perf_counter()
                writer.write(head + body)
                headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in headers[1:] if ":" in h)}
                length = fields.get("content-length")
                if length is None:
                    raise RuntimeError(f"an answer without Content-Length: {headers[0]}")
                answer = await reader.readexactly(int(length))
                latencies.append(time.perf_counter() - t0)
                check(int(headers[0].split()[1]), answer, part)
        finally:
            writer.close()

    async def httpx_client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, part = queue.get_nowait()
            t0 = time.perf_counter()
            response = await http.post(f"{url}/v1/score", content=_score_body(i, part),
                                       headers={"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - t0)
            check(response.status_code, response.content, part)

    t0 = time.perf_counter()
    if generator == "raw":
        await asyncio.gather(*(raw_client() for _ in range(clients)))
    else:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            await asyncio.gather(*(httpx_client(http) for _ in range(clients)))
    return latencies, time.perf_counter() - t0


def encoder_rate(run: Path, titles: list[str]) -> float:
    """Items/s of the run's bank text encoder (one pass gives the retrieval vector and the
    token features) on `titles`, 32 at a time."""
    from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders
    from mvpp.predictor.run import Run

    text = load_encoders(EncoderSpec.for_bank(Run.load(run).manifest)).text
    text.encode_both(titles[:32])
    t0 = time.perf_counter()
    for lo in range(0, len(titles), 32):
        text.encode_both(titles[lo : lo + 32])
    return len(titles) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run trained on a MicroLens bank")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--items-per-request", type=int, default=16,
                        help="titles per request in the client-batched rows")
    parser.add_argument("--generator", choices=["raw", "httpx"], default="raw",
                        help="the load generator: HTTP/1.1 written on asyncio streams (light), or httpx")
    parser.add_argument("--workers", type=int, default=None,
                        help="the service's scoring calls at once (default: the service's own)")
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
    workers = ["--workers", str(args.workers)] if args.workers else []
    server = subprocess.Popen([sys.executable, "-m", "mvpp.cli.main", "serve", "--run", str(args.run),
                               "--port", str(port), *workers], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        asyncio.run(load(url, titles[:20], 1, generator=args.generator))  # warm up
        table_out = Table(title=f"mvpp serve, {len(titles)} titles (MicroLens run {args.run.name}, "
                                f"{args.generator} load generator, workers: {args.workers or 'default'})")
        for col in ("clients", "items per request", "p50 ms", "p99 ms", "items/s", "service cores", "client cores"):
            table_out.add_column(col, justify="right")
        cases = [(c, 1) for c in args.clients] + [(c, args.items_per_request) for c in args.clients if c > 1]
        for clients, per_request in cases:
            server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
            latencies, wall = asyncio.run(load(url, titles, clients, per_request, args.generator))
            ms = np.array(latencies) * 1000
            table_out.add_row(str(clients), str(per_request), f"{np.percentile(ms, 50):.1f}",
                              f"{np.percentile(ms, 99):.1f}", f"{len(titles) / wall:.1f}",
                              f"{(cpu_seconds(server.pid) - server_cpu) / wall:.2f}",
                              f"{(time.process_time() - client_cpu) / wall:.2f}")
        console.print(table_out)
    finally:
        server.terminate()
        server.wait(30)
    console.print(f"the bank's text encoder alone, batches of 32: {encoder_rate(args.run, titles):.1f} items/s")
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
