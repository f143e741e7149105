"""Benchmark data: the public sets in ../shared/data, converted into a cache folder
(./.bench-data, ignored by git) and never copied into the repository."""

from __future__ import annotations

from pathlib import Path

from mvpp.cli.demo_data import SHARED_DATA, DataMissing, microlens_table, require

CACHE = Path(__file__).resolve().parents[1] / ".bench-data"


def microlens(limit: int | None = None) -> Path:
    name = f"microlens_{limit}.jsonl" if limit else "microlens.jsonl"
    return microlens_table(CACHE / name, limit)


def tiktok() -> Path:
    return require(SHARED_DATA / "tiktok_vn" / "raw_data.csv")


__all__ = ["CACHE", "DataMissing", "microlens", "tiktok"]
