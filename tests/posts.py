"""Made-up posts for end-to-end tests: captions whose topic drives two counts, creators
with followers, publish times, copies of one caption, clips, metadata-only posts."""

from __future__ import annotations

import csv
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from conftest import write_clip

TOPICS = {"cat": 3.0, "dog": 2.5, "recipe": 1.0, "football": 2.0, "news": 0.0, "dance": 2.8}
START = datetime(2025, 3, 1, tzinfo=timezone.utc)
N_POSTS = 200
N_VIDEOS = 10
N_META_ONLY = 8
COLUMNS = ["vid", "caption", "views", "likes", "posted", "followers", "creator", "clip"]


def write_posts(root: Path, videos: bool, seed: int = 0) -> Path:
    """Made-up posts: captions whose topic drives two counts, creators with followers,
    publish times, some copies of one caption (equal retrieval scores), some posts with a
    clip, and some with nothing but metadata."""
    rng = np.random.default_rng(seed)
    creators = [f"c{i}" for i in range(10)]
    clips = root / "clips"
    clips.mkdir(exist_ok=True)
    path = root / "posts.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for i in range(N_POSTS):
            topic = list(TOPICS)[i % len(TOPICS)]
            creator = creators[i % len(creators)]
            followers = float(rng.lognormal(7, 1.5))
            views = math.exp(4 + TOPICS[topic] + 0.2 * math.log(followers) + rng.normal(0, 0.4))
            likes = views * rng.uniform(0.02, 0.1)
            caption = f"{topic} clip {rng.choice(['fun', 'wow', 'new', 'top'])} day {i % 9}"
            if i % 25 == 0:
                caption = "the same caption on many posts"  # copies tie in retrieval
            clip = ""
            if videos and i < N_VIDEOS:
                clip = write_clip(clips / f"{i}.mp4", seed=i, sound="tone" if i % 2 else None).name  # some with sound
            if i >= N_POSTS - N_META_ONLY:
                caption = ""  # a post known by its creator, time and counts only
            posted = START + timedelta(hours=float(rng.uniform(0, 40 * 24)))
            w.writerow([
                f"p{i:03d}", caption, f"{views:.0f}", f"{likes:.0f}",
                posted.strftime("%Y-%m-%d %H:%M:%S"), f"{followers:.0f}" if i % 7 else "", creator, clip,
            ])
    return path


def build_args(table: Path, location: list[str]) -> list[str]:
    clips = table.parent / "clips"
    return [
        "build", *([str(clips)] if clips.is_dir() else []), "--meta", str(table), "--id-col", "vid",
        "--text-col", "caption", "--label-col", "views", "--label-col", "likes",
        "--time-col", "posted", "--meta-col", "followers", "--meta-col", "creator",
        "--video-col", "clip", "--frames", "4", "--profile", "lite", *location,
    ]
