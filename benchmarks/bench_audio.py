"""What the sound track costs a lite build: the real clips built with and without audio.

Each variant builds a fresh bank of the clips in `--videos` (default the 7 real clips
in ../shared/data/videos) `--repeats` times after one warm-up build, and reports the
median wall time; the ratio is with audio over without. It also times the logmel-v1
descriptor alone per second of sound.

    python benchmarks/bench_audio.py [--repeats 5] [--videos DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.datasets import SHARED_DATA  # noqa: E402
from mvpp.config import BuildSettings  # noqa: E402
from mvpp.media import AUDIO_RATE  # noqa: E402
from mvpp.memory_bank.builder import BankBuilder, plan_items  # noqa: E402
from mvpp.memory_bank.encoders.audio import LogMelAudioEncoder  # noqa: E402
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders  # noqa: E402
from mvpp.memory_bank.schema import AUDIO  # noqa: E402
from mvpp.memory_bank.store import open_store  # noqa: E402

console = Console()


def build_once(videos: Path, spec: EncoderSpec, encoders, workdir: Path) -> tuple[float, int, int]:
    """Seconds for one fresh build, items indexed, items with sound."""
    bank = workdir / "bank"
    shutil.rmtree(bank, ignore_errors=True)
    items, failures = plan_items(videos, None)
    t0 = time.perf_counter()
    with open_store(bank=bank) as store:
        report = BankBuilder(store, encoders, BuildSettings()).build(items, failures, workdir / "failures.jsonl")
        seconds = time.perf_counter() - t0
        with_audio = sum(1 for p in store.scroll(vectors=(AUDIO,)) if p.audio is not None)
    return seconds, report.indexed, with_audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, default=SHARED_DATA / "videos", help="folder of clips")
    parser.add_argument("--repeats", type=int, default=5, help="timed builds per variant (after one warm-up)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not args.videos.is_dir():
        console.print(f"[yellow]skipped: {args.videos} is not a folder of clips")
        return
    variants = {
        "lite, with audio": EncoderSpec.from_profile("lite"),
        "lite, --audio-model none": EncoderSpec.from_profile("lite", audio_model="none"),
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mvpp-bench-audio-") as tmp:
        for name, spec in variants.items():
            encoders = load_encoders(spec)
            build_once(args.videos, spec, encoders, Path(tmp))  # warm-up: imports, first model calls
            runs = [build_once(args.videos, spec, encoders, Path(tmp)) for _ in range(args.repeats)]
            seconds = [r[0] for r in runs]
            results[name] = {"median_s": statistics.median(seconds), "min_s": min(seconds),
                             "indexed": runs[0][1], "with_audio": runs[0][2]}
    with_s = results["lite, with audio"]["median_s"]
    without_s = results["lite, --audio-model none"]["median_s"]

    enc = LogMelAudioEncoder()
    sound = np.random.default_rng(0).normal(0, 0.1, 60 * AUDIO_RATE).astype(np.float32)
    enc.encode([(sound, AUDIO_RATE)])
    t0 = time.perf_counter()
    enc.encode([(sound, AUDIO_RATE)] * 5)
    per_minute_ms = (time.perf_counter() - t0) / 5 * 1000

    table = Table(title=f"lite build of {args.videos} (median of {args.repeats})")
    for col in ("variant", "indexed", "with audio", "median", "fastest"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for name, r in results.items():
        table.add_row(name, str(r["indexed"]), str(r["with_audio"]), f"{r['median_s']:.2f} s", f"{r['min_s']:.2f} s")
    console.print(table)
    console.print(f"with audio / without: [bold]{with_s / without_s:.2f}x[/]; "
                  f"logmel-v1 alone: {per_minute_ms:.0f} ms per minute of sound")
    if args.json:
        results["ratio"] = with_s / without_s
        results["logmel_ms_per_minute"] = per_minute_ms
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
