"""Settings shared by the library and the CLI.

Every default lives here; CLI flags and the environment (MVPP_BANK, MVPP_QDRANT_URL,
QDRANT_API_KEY, MVPP_PROFILE) override it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BANK = Path("mvpp-bank")
DEFAULT_COLLECTION = "mvpp"
DEFAULT_PROFILE = "full"
PROFILES = ("full", "lite")

# `--qdrant-url local:PATH`: the server backend on qdrant-client's local mode, no server.
LOCAL_PREFIX = "local:"


@dataclass(frozen=True)
class ClusterSettings:
    """How a new collection is spread over a Qdrant cluster: shards, copies of each shard,
    and how many copies must acknowledge a write. Read when a bank is created on a
    server; an existing collection keeps its own. None: the server's default."""

    shard_number: int | None = None
    replication_factor: int | None = None
    write_consistency_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("shard_number", "replication_factor", "write_consistency_factor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if (
            self.write_consistency_factor is not None
            and self.write_consistency_factor > (self.replication_factor or 1)
        ):
            raise ValueError(
                f"write consistency {self.write_consistency_factor} needs as many copies of each shard; "
                f"replication is {self.replication_factor or 1}"
            )

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.shard_number, self.replication_factor, self.write_consistency_factor))

    def collection_params(self) -> dict[str, int]:
        """The keyword arguments of a collection's creation that are set."""
        return {k: v for k, v in (
            ("shard_number", self.shard_number),
            ("replication_factor", self.replication_factor),
            ("write_consistency_factor", self.write_consistency_factor),
        ) if v is not None}


@dataclass
class BankLocation:
    """Where a bank lives: an embedded folder, or a Qdrant server collection."""

    path: Path = DEFAULT_BANK
    qdrant_url: str | None = None
    api_key: str | None = None
    collection: str = DEFAULT_COLLECTION
    # For a bank created on a server by this command.
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @classmethod
    def from_env(
        cls,
        path: Path | None = None,
        qdrant_url: str | None = None,
        api_key: str | None = None,
        collection: str | None = None,
        cluster: ClusterSettings | None = None,
    ) -> BankLocation:
        return cls(
            path=Path(path or os.environ.get("MVPP_BANK") or DEFAULT_BANK),
            qdrant_url=qdrant_url or os.environ.get("MVPP_QDRANT_URL") or None,
            api_key=api_key or os.environ.get("QDRANT_API_KEY") or None,
            collection=collection or DEFAULT_COLLECTION,
            cluster=cluster or ClusterSettings(),
        )

    @property
    def is_server(self) -> bool:
        return self.qdrant_url is not None

    def describe(self) -> str:
        if self.is_server:
            return f"{self.qdrant_url} (collection {self.collection})"
        return str(self.path)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class BuildSettings:
    """How items are turned into bank points."""

    n_frames: int = 10
    max_tokens: int = 32
    frame_max_side: int = 384
    batch_size: int = 16  # videos encoded together (see video_batch_size)
    text_batch_size: int = 256  # text-only items encoded together
    decode_workers: int = max(1, min(4, (os.cpu_count() or 2)))
    # Decode the next batch in `decode_workers` processes while the current one encodes
    # (memory_bank.decoding); off: threads decode each batch just before it is encoded.
    decode_ahead: bool = False
    # Scheduling priority (nice) of those worker processes: decoding runs beside the
    # thread that feeds the GPU and must not slow it down (at nice 0 an H200 build was
    # slower than with no overlap; benchmarks/README.md).
    decode_niceness: int = 10
    label_transform: str = "log2p1"
    # How a new bank stores token features (memory_bank.token_storage); None: 8-bit
    # codes. An existing bank keeps what it was created with.
    token_storage: str | None = None
    failures_file: Path | None = None  # default: <bank>.failures.jsonl beside the bank
    extra: dict[str, str] = field(default_factory=dict)


# Videos encoded together. On a GPU bigger batches keep the captioner busy: a full-size
# build on an H200 indexed 6.8 clips/s at 16 and 8.6 at 64 (benchmarks/bench_encoders.py).
CPU_VIDEO_BATCH = 16
CUDA_VIDEO_BATCH = 64


def video_batch_size(device: str) -> int:
    """Default number of videos encoded together on `device`."""
    return CUDA_VIDEO_BATCH if device.startswith("cuda") else CPU_VIDEO_BATCH


def decode_ahead_default(device: str) -> bool:
    """Whether videos decode ahead in processes by default on `device`.

    On a GPU the encoders leave the CPU cores idle, so decoding can run beside them. On
    the CPU the encoders already use every core: decoding beside them only competes.
    """
    return device.startswith("cuda")


def default_failures_file(location: BankLocation) -> Path:
    """Beside the bank's folder; for a Qdrant server, in the working directory."""
    if location.is_server:
        assert location.qdrant_url is not None
        if location.qdrant_url.startswith(LOCAL_PREFIX):
            folder = Path(location.qdrant_url[len(LOCAL_PREFIX) :])
            return folder.parent / f"{folder.name}.failures.jsonl"
        return Path(f"{location.collection}.failures.jsonl")
    return location.path.parent / f"{location.path.name}.failures.jsonl"
