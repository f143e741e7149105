"""Build a bank: plan items from a video folder and/or a metadata table, skip what is
already indexed, decode in parallel, encode in batches, upsert, report failures.

A failure never stops the batch: it is appended to the failures file (JSONL, one
object per item with its reason) and counted. Points are upserted batch by batch, so
an interrupted build keeps everything upserted so far and a rerun resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvpp.config import BuildSettings
from mvpp.media import Clip, MediaError, list_videos
from mvpp.memory_bank.decoding import BatchDecoder, DecodeFn, decode_item
from mvpp.memory_bank.encoders.base import l2_normalize
from mvpp.memory_bank.encoders.profiles import Encoders
from mvpp.memory_bank.metadata import ColumnMap, MetaRow, transform_label
from mvpp.memory_bank.schema import BankPoint, Manifest, content_hash
from mvpp.memory_bank.store.base import BankStore
from mvpp.memory_bank.token_storage import DEFAULT_TOKEN_STORAGE, stored_tokens

logger = logging.getLogger(__name__)

# Below this many points a full scan answers a query in about a millisecond, so the
# search index is not worth its build time.
INDEX_MIN_POINTS = 5000

NO_CONTENT = "no text, no video and no metadata"

# Bytes read from each end of a video for its fingerprint: cheap, and catches truncation
# and re-encodes without reading whole files on every rebuild.
FINGERPRINT_BYTES = 1 << 20


@dataclass
class BuildItem:
    """One item to index: metadata (may be None) and a video file (may be None)."""

    item_id: str
    meta: MetaRow | None = None
    video: Path | None = None
    # Place in the input: the metadata row's, then video-only files in path order.
    position: int = -1

    @property
    def title(self) -> str:
        return self.meta.title if self.meta else ""


@dataclass
class Failure:
    item_id: str
    reason: str
    video: str | None = None
    position: int = -1  # as BuildItem.position, for items that failed before being planned
    # True for an item indexed all the same, without part of its inputs (its sound)
    indexed: bool = False

    def to_json(self) -> str:
        record = {"item_id": self.item_id, "reason": self.reason, "video": self.video}
        if self.indexed:
            record["indexed"] = True
        return json.dumps(record, ensure_ascii=False)


@dataclass
class BuildReport:
    planned: int = 0
    indexed: int = 0
    unchanged: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    failures_file: Path | None = None
    # items indexed without part of their inputs (a sound track that cannot be decoded)
    warnings: list[Failure] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.indexed / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressFn = Callable[[int, str], None]


def content_problem(item: BuildItem, clip: Clip | None) -> str | None:
    """Why an item cannot be indexed or scored, or None when it can.

    Text, a video, a publish time or any metadata value is enough: a post known only by its
    creator, time and counts is predicted by those (and found through its neighbour group).
    """
    meta = item.meta
    if item.title or clip is not None:
        return None
    if meta is not None and (
        meta.published_ts is not None or any(v is not None for v in meta.metadata.values())
    ):
        return None
    return NO_CONTENT


def stored_form(point: BankPoint, token_storage: str) -> BankPoint:
    """The point as the bank gives it back: retrieval vector and every multivector row
    L2-normalised (the bank's vectors are cosine vectors), frames and sound rounded to
    float16 (their storage type), tokens as the bank's `token_storage` keeps them. Every
    point is made through this, so an item encoded by `build`, `query` or `score` has
    the same features as its stored copy."""
    if point.retrieval is not None:
        point.retrieval = l2_normalize(point.retrieval)
    for name in ("frames", "audio"):
        value = getattr(point, name)
        if value is not None:
            stored = l2_normalize(np.asarray(value, np.float32)).astype(np.float16).astype(np.float32)
            setattr(point, name, stored)
    if point.tokens is not None:
        point.tokens = stored_tokens(l2_normalize(point.tokens), token_storage)
    return point


def make_point(
    item: BuildItem,
    retrieval: np.ndarray | None,
    frames: np.ndarray | None,
    tokens: np.ndarray | None,
    captions: list[str],
    duration_s: float | None,
    audio: np.ndarray | None = None,
) -> BankPoint:
    """An item's point: its vectors and what its metadata row says."""
    meta = item.meta
    return BankPoint(
        item_id=item.item_id,
        retrieval=retrieval,
        frames=frames,
        tokens=tokens,
        audio=audio,
        title=item.title,
        captions=list(captions),
        labels=dict(meta.labels) if meta else {},
        published_at=meta.published_at if meta else None,
        published_ts=meta.published_ts if meta else None,
        metadata=dict(meta.metadata) if meta else {},
        duration_s=duration_s,
        video=str(item.video) if item.video else None,
        observed_at=meta.observed_at if meta else None,
        observed_ts=meta.observed_ts if meta else None,
    )


def with_stored_vectors(item: BuildItem, stored: BankPoint) -> BankPoint:
    """The point of an item whose encoder inputs the bank holds already (equal
    `encoding_key`): the stored vectors, captions and duration, the item's own metadata.
    Encoders give a text a slightly different vector in each batch (float noise in the
    last bits); reusing the stored one keeps every prediction of the item the same,
    trees' included, whose thresholds can fall between two such vectors."""
    return make_point(item, stored.retrieval, stored.frames, stored.tokens, stored.captions, stored.duration_s,
                  stored.audio)


def video_fingerprint(path: Path) -> str:
    """Size plus a hash of the first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(FINGERPRINT_BYTES))
        if size > 2 * FINGERPRINT_BYTES:
            fh.seek(-FINGERPRINT_BYTES, 2)
            digest.update(fh.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:24]


def plan_items(
    videos_dir: Path | None,
    meta_rows: list[MetaRow] | None,
) -> tuple[list[BuildItem], list[Failure]]:
    """Pair metadata rows with video files.

    A row names its video through its video column (relative to `videos_dir`),
    otherwise the file whose stem equals the id. Rows without a video are text-only;
    videos without a row are unlabelled. Files no video column names are ids by their
    stem: when several share a stem, the first (in path order) is that id's video and
    each other one is a duplicate-id failure.
    """
    rows = meta_rows or []
    named = {_resolved(_row_video(row.video, videos_dir)) for row in rows if row.video}
    by_stem: dict[str, list[Path]] = {}
    for path in list_videos(videos_dir) if videos_dir is not None else []:
        if _resolved(path) not in named:
            by_stem.setdefault(path.stem, []).append(path)
    failures: list[Failure] = []
    items: list[BuildItem] = []
    for pos, row in enumerate(rows):
        if row.problems:
            failures.append(Failure(row.item_id, "; ".join(row.problems), position=pos))
            continue
        video: Path | None = None
        if row.video:
            video = _row_video(row.video, videos_dir)
            problem = _video_problem(video)
            if problem:
                failures.append(Failure(row.item_id, problem, str(video), pos))
                continue
        elif row.item_id in by_stem:
            video = by_stem[row.item_id][0]
        items.append(BuildItem(row.item_id, row, video, pos))
    meta_ids = {row.item_id for row in rows}
    pos = len(rows)
    for stem, paths in by_stem.items():
        if stem not in meta_ids:
            items.append(BuildItem(stem, None, paths[0], pos))
            pos += 1
        first = _relative(paths[0], videos_dir)
        for path in paths[1:]:
            failures.append(
                Failure(stem, f"duplicate id: {first} has the same file name stem", str(path), pos)
            )
            pos += 1
    return items, failures


def _resolved(path: Path) -> Path:
    """The path with links resolved; as given when it cannot be (a link loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _video_problem(path: Path) -> str | None:
    """Why a row's video file cannot be used, or None."""
    try:
        path.stat()
    except FileNotFoundError:
        return f"video file not found: {path}"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"video path is a loop of symbolic links: {path}"
        return f"cannot read video: {exc.strerror or exc}: {path}"
    return None


def _row_video(video: str, videos_dir: Path | None) -> Path:
    return (videos_dir / video) if videos_dir is not None else Path(video)


def _relative(path: Path, folder: Path | None) -> str:
    try:
        return str(path.relative_to(folder)) if folder is not None else str(path)
    except ValueError:
        return str(path)


class BankBuilder:
    """Turns BuildItems into bank points with one set of encoders."""

    def __init__(
        self,
        store: BankStore,
        encoders: Encoders,
        settings: BuildSettings | None = None,
        decode: DecodeFn = decode_item,
    ) -> None:
        self.store = store
        self.encoders = encoders
        self.settings = settings or BuildSettings()
        # path, n_frames, max_side -> Clip or MediaError; module-level (worker processes
        # import it by name).
        self.decode = decode
        # Set per build: the label columns it reads, and the items already in the bank.
        self._label_cols: set[str] = set()
        self._existing: set[str] = set()

    # -- manifest -------------------------------------------------------------------

    def manifest(self, label_names: Iterable[str] = (), columns: ColumnMap | None = None) -> Manifest:
        desc = self.encoders.describe()
        return Manifest(
            profile=desc["profile"],
            text_model=desc["text_model"],
            captioner_model=desc["captioner_model"],
            frame_model=desc["frame_model"],
            retrieval_dim=int(desc["text_dim"]),
            token_dim=int(desc["token_dim"]),
            frame_dim=int(desc["frame_dim"]),
            n_frames=self.settings.n_frames,
            max_tokens=self.settings.max_tokens,
            label_names=list(label_names),
            label_transform=self.settings.label_transform,
            columns=columns.to_dict() if columns is not None else {},
            audio_model=desc["audio_model"],
            audio_dim=int(desc["audio_dim"]),
            encoder_spec=desc["spec"],
            token_storage=self.settings.token_storage or DEFAULT_TOKEN_STORAGE,
        )

    def token_storage(self) -> str:
        """How the bank keeps token features: an existing bank's setting, else the
        settings' for the bank this build creates."""
        stored = self.store.manifest
        if stored is not None:
            return stored.token_storage
        return self.settings.token_storage or DEFAULT_TOKEN_STORAGE

    # -- hashing --------------------------------------------------------------------

    def item_hash(self, item: BuildItem, manifest: Manifest) -> str:
        meta = item.meta
        parts = {
            "id": item.item_id,
            "title": meta.title if meta else "",
            "labels": meta.labels if meta else {},
            "time": meta.published_at if meta else None,
            "metadata": meta.metadata if meta else {},
            "video": video_fingerprint(item.video) if item.video else None,
            "encoders": [manifest.text_model, manifest.captioner_model, manifest.frame_model],
            "n_frames": manifest.n_frames,
            "max_tokens": manifest.max_tokens,
            "transform": manifest.label_transform,
        }
        if meta and meta.observed_at:  # only when given, so older banks keep their hashes
            parts["observed"] = meta.observed_at
        if manifest.audio_model:  # likewise: banks without sound keep their hashes
            parts["audio"] = manifest.audio_model
        return content_hash(parts)

    def encoding_key(self, item: BuildItem, manifest: Manifest) -> str:
        """Hash of what the encoders read of an item: its title and video, and the encoders.
        Items with equal keys get equal vectors, so a stored item's vectors serve a later
        encoding of the same inputs (`with_stored_vectors`)."""
        return content_hash({
            "title": item.title,
            "video": video_fingerprint(item.video) if item.video else None,
            "encoders": [manifest.text_model, manifest.captioner_model, manifest.frame_model, manifest.audio_model],
            "n_frames": manifest.n_frames,
            "max_tokens": manifest.max_tokens,
        })

    # -- the build ------------------------------------------------------------------

    def build(
        self,
        items: list[BuildItem],
        failures: list[Failure] | None = None,
        failures_file: Path | None = None,
        progress: ProgressFn | None = None,
        columns: ColumnMap | None = None,
    ) -> BuildReport:
        """Index `items`; `failures` are planning failures to report alongside; `columns`:
        the metadata table's columns, recorded in the manifest for scoring to reuse."""
        start = time.perf_counter()
        progress = progress or (lambda n, status: None)
        report = BuildReport(planned=len(items) + len(failures or []), failures_file=failures_file)
        label_names = sorted({name for it in items if it.meta for name in it.meta.labels})
        manifest = self.begin(label_names, columns)
        sink = FailureSink(failures_file)
        try:
            for failure in failures or []:
                sink.add(failure, report)
                progress(1, "failed")
            self.index(items, manifest, sink, report, progress)
            self.finish(report, progress)
        finally:
            sink.close()
        report.elapsed_s = time.perf_counter() - start
        return report

    def begin(self, label_names: list[str], columns: ColumnMap | None) -> Manifest:
        """Open the bank for writing with this build's labels and columns; the manifest
        that holds from now on."""
        self.store.init(self.manifest(label_names, columns))
        # labels of columns this build does not read are kept when an item is re-indexed
        self._label_cols = set(columns.label_cols) if columns is not None else set(label_names)
        manifest = self.store.manifest
        assert manifest is not None
        return manifest

    def index(
        self,
        items: list[BuildItem],
        manifest: Manifest,
        sink: FailureSink,
        report: BuildReport,
        progress: ProgressFn,
    ) -> None:
        """Index items not already in the bank with the same content (after `begin`)."""
        todo: list[tuple[BuildItem, str]] = []
        for chunk in _chunks(items, 1024):
            hashes = []
            for item in chunk:
                try:
                    hashes.append(self.item_hash(item, manifest))
                except OSError as exc:
                    hashes.append("")
                    sink.add(Failure(item.item_id, f"cannot read video: {exc}", str(item.video)), report)
                    progress(1, "failed")
            stored = self.store.hashes([it.item_id for it in chunk])
            self._existing.update(stored)
            for item, h in zip(chunk, hashes, strict=True):
                if not h:
                    continue
                if stored.get(item.item_id) == h:
                    report.unchanged += 1
                    progress(1, "unchanged")
                else:
                    todo.append((item, h))

        # Videos are slow and text-only items fast: batch them separately.
        with_video = [(it, h) for it, h in todo if it.video is not None]
        text_only = [(it, h) for it, h in todo if it.video is None]
        for batch in _chunks(text_only, self.settings.text_batch_size):
            self._index_batch([(it, h, None) for it, h in batch], sink, report, progress)
        if not with_video:
            return
        video_batches = list(_chunks(with_video, self.settings.batch_size))
        with BatchDecoder(self.settings, self.decode) as decoder:
            decoded_batches = decoder.batches([[it.video for it, _ in batch] for batch in video_batches])
            for batch, decoded in zip(video_batches, decoded_batches, strict=True):
                ready = []
                for (item, h), result in zip(batch, decoded, strict=True):
                    if isinstance(result, MediaError):
                        sink.add(Failure(item.item_id, result.reason, str(item.video)), report)
                        progress(1, "failed")
                    else:
                        ready.append((item, h, result))
                self._index_batch(ready, sink, report, progress)

    def finish(self, report: BuildReport, progress: ProgressFn) -> None:
        """Make what was indexed durable, and build the search index once the bank is
        large enough for it to pay."""
        self.store.flush()
        if report.indexed and self.store.count() >= INDEX_MIN_POINTS:
            progress(0, "building the search index")
            self.store.optimize()

    def content_problem(self, item: BuildItem, clip: Clip | None) -> str | None:
        """Why an item cannot be indexed (`content_problem`), or None."""
        return content_problem(item, clip)

    def encode(self, items: list[tuple[BuildItem, Clip | None]]) -> list[BankPoint]:
        """Encode items (with their decoded clips) into points; no store access."""
        enc = self.encoders
        clips = [clip for _, clip in items if clip is not None]
        frame_feats = iter(enc.frames.encode([c.frames for c in clips]) if clips else [])
        caption_lists = iter(self._captions(clips))
        titles = [item.title for item, _ in items]
        per_item_frames: list[np.ndarray | None] = []
        prompts: list[str] = []
        captions_out: list[list[str]] = []
        for (_item, clip), title in zip(items, titles, strict=True):
            caps = next(caption_lists) if clip is not None else []
            per_item_frames.append(next(frame_feats) if clip is not None else None)
            captions_out.append(caps)
            prompts.append(enc.build_prompt(caps, title))
        vectors, tokens = self._text_features(prompts, titles)
        sounds = self._sound_features([clip for _, clip in items])
        storage = self.token_storage()
        return [
            stored_form(make_point(
                item,
                retrieval=vectors[i],
                frames=per_item_frames[i],
                tokens=tokens[i] if tokens[i] is not None and len(tokens[i]) else None,
                audio=sounds[i],
                captions=captions_out[i],
                duration_s=clip.duration_s if clip is not None else None,
            ), storage)
            for i, (item, clip) in enumerate(items)
        ]

    def _sound_features(self, clips: list[Clip | None]) -> list[np.ndarray | None]:
        """Per item its sound's segment vectors; None without an audio encoder or a
        sound (a silent track included)."""
        encoder = self.encoders.audio
        out: list[np.ndarray | None] = [None] * len(clips)
        if encoder is None:
            return out
        with_sound = [i for i, c in enumerate(clips) if c is not None and c.has_sound]
        if with_sound:
            feats = encoder.encode([(clips[i].audio, clips[i].audio_rate) for i in with_sound])  # type: ignore[union-attr]
            for i, f in zip(with_sound, feats, strict=True):
                out[i] = f if len(f) else None
        return out

    def _captions(self, clips: list[Clip]) -> list[list[str]]:
        if self.encoders.captioner is None or not clips:
            return [[] for _ in clips]
        flat = [frame for clip in clips for frame in clip.frames]
        caps = self.encoders.captioner.caption(flat)
        out, pos = [], 0
        for clip in clips:
            out.append(caps[pos : pos + clip.n_frames])
            pos += clip.n_frames
        return out

    def _text_features(
        self, prompts: list[str], titles: list[str]
    ) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        """Retrieval vectors of the prompts and token features of the titles.

        When prompt == title (no captioner) one transformer pass gives both.
        """
        text = self.encoders.text
        n = len(prompts)
        vectors: list[np.ndarray | None] = [None] * n
        tokens: list[np.ndarray | None] = [None] * n
        max_tokens = self.settings.max_tokens
        same = [i for i in range(n) if prompts[i] and prompts[i] == titles[i]]
        if same:
            vecs, toks = text.encode_both([prompts[i] for i in same], max_tokens)
            for j, i in enumerate(same):
                vectors[i], tokens[i] = vecs[j], toks[j]
        rest_p = [i for i in range(n) if prompts[i] and prompts[i] != titles[i]]
        if rest_p:
            vecs = text.encode([prompts[i] for i in rest_p])
            for j, i in enumerate(rest_p):
                vectors[i] = vecs[j]
        rest_t = [i for i in range(n) if titles[i] and prompts[i] != titles[i]]
        if rest_t:
            toks = text.encode_tokens([titles[i] for i in rest_t], max_tokens)
            for j, i in enumerate(rest_t):
                tokens[i] = toks[j]
        return vectors, tokens

    def _index_batch(
        self,
        batch: list[tuple[BuildItem, str, Clip | None]],
        sink: FailureSink,
        report: BuildReport,
        progress: ProgressFn,
    ) -> None:
        if not batch:
            return
        keep: list[tuple[BuildItem, str, Clip | None]] = []
        transform = self.settings.label_transform
        targets: list[dict[str, float]] = []
        for item, h, clip in batch:
            if clip is not None and clip.audio_error:
                sink.warn(Failure(item.item_id, f"indexed without its sound: {clip.audio_error}",
                                  str(item.video), indexed=True), report)
            problem = self.content_problem(item, clip)
            if problem:
                sink.add(Failure(item.item_id, problem), report)
                progress(1, "failed")
                continue
            try:
                tg = {k: transform_label(v, transform) for k, v in (item.meta.labels if item.meta else {}).items()}
            except ValueError as exc:
                sink.add(Failure(item.item_id, f"label: {exc}", str(item.video) if item.video else None), report)
                progress(1, "failed")
                continue
            keep.append((item, h, clip))
            targets.append(tg)
        if not keep:
            return
        points = self._encode_isolated(keep, sink, report, progress)
        for point, (_, h, _), tg in zip(points, keep, targets, strict=True):
            if point is not None:
                point.content_hash = h
                point.targets = tg
        manifest = self.store.manifest
        assert manifest is not None
        for point, (item, _, _) in zip(points, keep, strict=True):
            if point is not None:
                point.encoding_key = self.encoding_key(item, manifest)
        done = [(p, item) for p, (item, _, _) in zip(points, keep, strict=True) if p is not None]
        self._keep_other_labels([p for p, _ in done])
        stored = self._upsert_isolated(done, sink, report, progress)
        report.indexed += stored
        progress(stored, "indexed")

    def _encode_isolated(
        self,
        batch: list[tuple[BuildItem, str, Clip | None]],
        sink: FailureSink,
        report: BuildReport,
        progress: ProgressFn,
    ) -> list[BankPoint | None]:
        """Points of a batch; when the batch fails to encode, each item alone, so one item
        the encoders cannot take fails with its reason and the others go on."""
        try:
            return list(self.encode([(item, clip) for item, _, clip in batch]))
        except Exception as exc:
            if len(batch) == 1:
                item = batch[0][0]
                logger.debug("encoding %s failed", item.item_id, exc_info=True)
                sink.add(Failure(item.item_id, f"encoding failed: {type(exc).__name__}: {exc}",
                                 str(item.video) if item.video else None), report)
                progress(1, "failed")
                return [None]
        out: list[BankPoint | None] = []
        for one in batch:
            out += self._encode_isolated([one], sink, report, progress)
        return out

    def _upsert_isolated(
        self,
        done: list[tuple[BankPoint, BuildItem]],
        sink: FailureSink,
        report: BuildReport,
        progress: ProgressFn,
    ) -> int:
        """Store points; when the batch is refused, each point alone. Returns how many were stored."""
        if not done:
            return 0
        try:
            self.store.upsert([p for p, _ in done])
            return len(done)
        except Exception as exc:
            if len(done) == 1:
                point, item = done[0]
                logger.debug("storing %s failed", point.item_id, exc_info=True)
                sink.add(Failure(point.item_id, f"cannot store the item: {exc}",
                                 str(item.video) if item.video else None), report)
                progress(1, "failed")
                return 0
        return sum(self._upsert_isolated([one], sink, report, progress) for one in done)

    def _keep_other_labels(self, points: list[BankPoint]) -> None:
        """Give re-indexed items back their stored labels of columns this build does not
        read: rebuilding with another --label-col adds labels, it never drops them."""
        again = [p for p in points if p.item_id in self._existing]
        if not again:
            return
        for point, old in zip(again, self.store.get([p.item_id for p in again], vectors=()), strict=True):
            if old is None:
                continue
            for name, value in old.labels.items():
                if name not in self._label_cols and name not in point.labels:
                    point.labels[name] = value
                    if name in old.targets:
                        point.targets[name] = old.targets[name]


class FailureSink:
    """Appends failures to a JSONL file as they happen, so a killed run keeps them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = path.open("w", encoding="utf-8")

    def add(self, failure: Failure, report: BuildReport) -> None:
        report.failures.append(failure)
        report.failed += 1
        logger.info("failed %s: %s", failure.item_id, failure.reason)
        if self._fh is not None:
            self._fh.write(failure.to_json() + "\n")
            self._fh.flush()

    def warn(self, note: Failure, report: BuildReport) -> None:
        """An item indexed without part of its inputs: noted beside the failures."""
        report.warnings.append(note)
        logger.info("%s: %s", note.item_id, note.reason)
        if self._fh is not None:
            self._fh.write(note.to_json() + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _chunks(seq: list, size: int) -> Iterator[list]:
    for i in range(0, len(seq), max(1, size)):
        yield seq[i : i + size]
