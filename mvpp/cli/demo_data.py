"""Data for the demo and the benchmarks: converters for the public data sets in
../shared/data, and synthetic stand-ins when that folder is absent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class DataMissing(RuntimeError):
    """A public data set the caller needs is not beside the project."""


def require(path: Path) -> Path:
    if not path.exists():
        raise DataMissing(f"{path} not found: it needs ../shared/data (see its README)")
    return path


def microlens_table(out: Path, limit: int | None = None) -> Path:
    """MicroLens-100k titles + comment counts -> JSONL rows {id, title, comments}.

    The titles file has no header and titles contain commas: split on the first only.
    """
    root = SHARED_DATA / "microlens100k"
    titles_path = require(root / "MicroLens-100k_title_en.csv")
    labels_path = require(root / "video_label.csv")
    if out.exists():
        return out
    titles: dict[str, str] = {}
    with titles_path.open(encoding="utf-8-sig") as fh:
        for line in fh:
            item_id, _, title = line.rstrip("\n").partition(",")
            if item_id.strip():
                titles[item_id.strip()] = title.strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with labels_path.open(encoding="utf-8-sig", newline="") as fh, tmp.open("w", encoding="utf-8") as dst:
        for n, row in enumerate(csv.DictReader(fh)):
            if limit is not None and n >= limit:
                break
            item_id = row["video_id"].strip()
            rec = {"id": item_id, "title": titles.get(item_id, ""), "comments": int(row["comment_count"])}
            dst.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


def write_synthetic_titles(out: Path, n: int = 3000, seed: int = 0) -> Path:
    """Titles built from topic words whose popularity differs by topic, plus noise."""
    rng = np.random.default_rng(seed)
    topics = {
        "cat": 6.0, "kitten": 6.0, "dog": 5.5, "recipe": 4.0, "cooking": 4.0, "football": 5.0,
        "goal": 5.0, "makeup": 3.5, "tutorial": 3.0, "travel": 4.5, "beach": 4.5, "dance": 5.5,
        "news": 2.5, "car": 3.5, "guitar": 3.0, "prank": 6.5,
    }
    words = list(topics)
    fillers = ["amazing", "today", "my", "new", "best", "watch", "this", "so", "funny", "wow"]
    with out.open("w", encoding="utf-8") as fh:
        for i in range(n):
            main = words[rng.integers(len(words))]
            title = " ".join([main, *rng.choice(fillers, 3), words[rng.integers(len(words))]])
            comments = int(max(0, 2 ** rng.normal(topics[main], 1.0) - 1))
            fh.write(json.dumps({"id": f"s{i}", "title": title, "comments": comments}) + "\n")
    return out


def write_demo_clips(folder: Path, n: int = 6) -> Path:
    """Short synthetic clips (moving squares over different backgrounds)."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for c in range(n):
        bg = rng.integers(0, 255, 3)
        with av.open(str(folder / f"clip_{c}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=12)
            stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
            for i in range(36):
                img = np.empty((64, 96, 3), np.uint8)
                img[:] = bg
                x = (i * (c + 2)) % 80
                img[20:36, x : x + 16] = 255 - bg
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return folder
