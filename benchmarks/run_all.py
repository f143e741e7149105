"""Run every benchmark in turn; each prints its own table.

    python benchmarks/run_all.py [--quick]

--quick runs one seed of the accuracy benchmarks instead of five.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed instead of five")
    args = parser.parse_args()
    seeds = ["--seeds", "0"] if args.quick else []
    runs = [
        [str(HERE / "bench_bank.py")],
        [str(HERE / "bench_predictor.py"), *seeds],
    ]
    if (HERE / "bench_tiktok.py").exists():
        runs.append([str(HERE / "bench_tiktok.py")])
    failed = 0
    for cmd in runs:
        print(f"\n$ python {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd)}", flush=True)
        failed += subprocess.run([sys.executable, *cmd]).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
