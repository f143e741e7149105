"""Dataset assembly: splits, retrieval per the protocol, target normalisation, batches.

Protocol (DESIGN.md, "Evaluation protocol"): a seeded 80/10/10 split of the labelled
items (random by item id, or by publish time); every split retrieves among the
training items only, never the item itself; with time safety on, only among items
published strictly before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from mvpp.predictor.features import MetaFeaturizer
from mvpp.predictor.lexicon import Lexicon
from mvpp.predictor.model import ModelBatch, PopularityModel, neighbour_summary, wide_summary
from mvpp.retriever.bulk import Neighbours
from mvpp.retriever.packed import PackedSequences
from mvpp.retriever.search import (
    ApproximateSearch,
    GroupBoost,
    LexicalRerank,
    NeighbourSearch,
    QueryBatch,
)
from mvpp.retriever.snapshot import BankSnapshot

SPLITS = ("train", "val", "test")
# Queries searched together when a split's neighbours are found: a chunk's vectors,
# candidates and their scores take about 0.3 GB whatever the bank's size; a larger chunk
# only costs memory, as the work per query does not change with it.
SEARCH_CHUNK = 16_384
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class SplitConfig:
    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    by_time: bool = False


def make_splits(snapshot: BankSnapshot, cfg: SplitConfig) -> dict[str, np.ndarray]:
    """Indices (into the snapshot) of the labelled items of each split.

    Random splits order items by a seeded hash of their id, so an item's split does not
    depend on which other items the bank holds. Time splits put the earliest items in
    train and the latest in test; undated items cannot be placed in time and are left out.
    """
    labelled = np.flatnonzero(snapshot.labelled)
    if cfg.by_time:
        ts = snapshot.published_ts[labelled]
        dated = labelled[~np.isnan(ts)]
        order = dated[np.argsort(snapshot.published_ts[dated], kind="stable")]
    else:
        keys = [
            hashlib.blake2b(f"{cfg.seed}:{snapshot.item_ids[i]}".encode(), digest_size=8).digest()
            for i in labelled
        ]
        order = labelled[np.argsort(np.array(keys, dtype="S8"), kind="stable")]
    n = len(order)
    n_train = int(round(cfg.fractions[0] * n))
    n_val = int(round(cfg.fractions[1] * n))
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }


@dataclass
class TargetNorm:
    """Standardisation of targets with training-split statistics."""

    mean: np.ndarray  # (T,)
    std: np.ndarray  # (T,)

    @classmethod
    def fit(cls, targets: np.ndarray) -> TargetNorm:
        mean = np.nanmean(targets, axis=0)
        std = np.nanstd(targets, axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def forward(self, y: np.ndarray) -> np.ndarray:
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return z * self.std + self.mean

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> TargetNorm:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def split_neighbours(
    snapshot: BankSnapshot,
    splits: dict[str, np.ndarray],
    k: int,
    time_safe: bool,
    rerank: LexicalRerank | None = None,
    groups: GroupBoost | None = None,
    wide: int = 0,
    approximate: ApproximateSearch | None = None,
) -> tuple[dict[str, Neighbours], NeighbourSearch]:
    """Neighbours of every split's items among the training items (indices into snapshot),
    with the best `wide` by the dense ranking as their wider neighbourhood; and the
    search that found them."""
    search = NeighbourSearch(snapshot, splits["train"], k, time_safe, rerank, groups, wide, approximate)
    found = {}
    for name, idx in splits.items():
        # a chunk of queries at a time: their vectors and candidates, not the split's,
        # are what a search holds (an item's neighbours do not depend on its chunk)
        chunks = range(0, max(len(idx), 1), SEARCH_CHUNK)  # an empty split: one empty chunk
        found[name] = Neighbours.collect(
            (search.search(QueryBatch.from_snapshot(snapshot, idx[lo : lo + SEARCH_CHUNK], rerank, groups))
             for lo in chunks),
            len(idx),
        )
    return found, search


@dataclass
class ItemFeatures:
    """Inputs of a set of items, padded: tokens (B, n, d_t), frames (B, L, d_v)."""

    tokens: torch.Tensor
    token_len: torch.Tensor
    frames: torch.Tensor
    frame_len: torch.Tensor
    audio: torch.Tensor | None = None  # (B, S, d_a) the sound's segments
    audio_len: torch.Tensor | None = None  # (B,)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    # Metadata expert inputs (see features.MetaFeaturizer); None without metadata features.
    meta_numeric: torch.Tensor | None = None  # (B, M) float
    meta_numeric_mask: torch.Tensor | None = None  # (B, M) bool
    meta_categorical: torch.Tensor | None = None  # (B, C) long, 0 = unknown
    # Title bag of words (see lexicon.Lexicon); None without a lexicon.
    words: torch.Tensor | None = None  # (B, W) long, 0 = padding
    word_weights: torch.Tensor | None = None  # (B, W) float
    # Cross-fitted word-ridge estimates (see word_prior); None: the model computes them.
    word_prior: torch.Tensor | None = None  # (B, T)


@dataclass
class ProjectedSequences:
    """Projected rows of some items' sequences, packed: item j's rows are
    rows[offsets[j] : offsets[j + 1]] (R, d)."""

    rows: torch.Tensor
    offsets: np.ndarray  # (items + 1,)


@dataclass
class ProjectedRows:
    """Projected features (`PopularityModel.project_items`) of some snapshot rows: what
    they bring as neighbours.

    position: (N,) a row's place among the projected items, -1 where it was not projected.
    frames, tokens, audio: their projected sequences; None for a modality the model has
    switched off.
    """

    position: np.ndarray
    frames: ProjectedSequences | None
    tokens: ProjectedSequences | None
    audio: ProjectedSequences | None = None


class FeatureTable:
    """The snapshot's features, gathered by index into padded batches."""

    def __init__(
        self,
        snapshot: BankSnapshot,
        norm: TargetNorm,
        featurizer: MetaFeaturizer | None = None,
        lexicon: Lexicon | None = None,
    ) -> None:
        assert snapshot.audio is not None
        # packed sequences (N, P, d): frames, tokens, the sound's segments
        self.sequences: dict[str, PackedSequences] = {
            "frames": snapshot.frames, "tokens": snapshot.tokens, "audio": snapshot.audio,
        }
        self.lengths = {name: torch.from_numpy(seq.lengths.astype(np.int64)) for name, seq in self.sequences.items()}
        self.targets = torch.from_numpy(norm.forward(snapshot.targets).astype(np.float32))  # (N, T)
        self.n_targets = snapshot.targets.shape[1]
        self._snapshot = snapshot
        self._featurizer = featurizer if featurizer is not None and featurizer.n_features else None
        self._meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.words: torch.Tensor | None = None  # (N, W)
        self.word_weights: torch.Tensor | None = None  # (N, W)
        if lexicon is not None:
            ids, weights = lexicon.encode(snapshot.titles)
            self.words, self.word_weights = torch.from_numpy(ids), torch.from_numpy(weights)
        # Set by training (see word_prior): out-of-fold estimates on training items.
        self.word_prior: torch.Tensor | None = None  # (N, T)
        # Set by `project`: the neighbours' projected features.
        self.projection: ProjectedRows | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def meta(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Metadata expert inputs of every item (numeric, mask, categorical); computed on
        first use, since a table that only serves neighbours never needs them."""
        if self._meta is None and self._featurizer is not None:
            num, mask, cat = self._featurizer.transform_snapshot(self._snapshot)
            self._meta = (torch.from_numpy(num), torch.from_numpy(mask), torch.from_numpy(cat))
        return self._meta

    @torch.no_grad()
    def project(self, model: PopularityModel, rows: np.ndarray | None = None, chunk: int = 4096) -> None:
        """Project the items `rows` (default: all) with the model's current weights.

        Neighbours then come from this table instead of being projected again in every
        batch (each item is a neighbour of about k others per epoch). Evaluation and
        scoring project exactly the rows their neighbours need, and training the rows the
        next few steps need, with the weights of the first of them: there the neighbour
        side lags the weights slightly and passes no gradient. Each row is projected on
        its own, so its features do not depend on which other rows are projected with it.
        """
        n = len(self)
        rows = np.arange(n) if rows is None else np.unique(np.asarray(rows, np.int64))
        position = np.full(n, -1, np.int64)
        position[rows] = np.arange(len(rows))
        parts: dict[str, list[torch.Tensor | None]] = {name: [] for name in self.sequences}
        dev = next(model.parameters()).device
        wanted = model.projected_modalities()  # a switched-off modality's rows are not read
        # an empty chunk still gives the projected shapes (None only for a modality that is off)
        for lo in range(0, max(1, len(rows)), chunk):
            part = rows[lo : lo + chunk]
            inputs = {}
            for name in wanted:
                seq = self.sequences[name]
                values = torch.from_numpy(seq.values(seq.row_index(part))).to(dev)  # (R, d)
                inputs[name] = (values, torch.ones(len(values), dtype=torch.bool, device=dev))
            for name, x in model.project_items(inputs).items():
                parts[name].append(x.cpu() if x is not None else None)
        projected: dict[str, ProjectedSequences | None] = {}
        for name, xs in parts.items():
            if not xs or xs[0] is None:
                projected[name] = None
                continue
            offsets = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(self.sequences[name].lengths[rows], out=offsets[1:])
            projected[name] = ProjectedSequences(torch.cat(xs), offsets)  # type: ignore[arg-type]
        self.projection = ProjectedRows(position, projected["frames"], projected["tokens"], projected["audio"])

    def clear_projection(self) -> None:
        self.projection = None

    def items(self, idx: torch.Tensor) -> ItemFeatures:
        rows = idx.numpy()
        padded = {name: torch.from_numpy(seq.padded(rows)) for name, seq in self.sequences.items()}
        feats = ItemFeatures(
            padded["tokens"], self.lengths["tokens"][idx], padded["frames"], self.lengths["frames"][idx],
            padded["audio"], self.lengths["audio"][idx],
        )
        meta = self.meta
        if meta is not None:
            num, mask, cat = meta
            feats.meta_numeric, feats.meta_numeric_mask, feats.meta_categorical = (
                num[idx], mask[idx], cat[idx]
            )
        if self.words is not None and self.word_weights is not None:
            feats.words, feats.word_weights = self.words[idx], self.word_weights[idx]
        if self.word_prior is not None:
            feats.word_prior = self.word_prior[idx]
        return feats


def _wide_statistics(table: FeatureTable, nb: Neighbours, widths: tuple[int, ...]) -> torch.Tensor:
    """(B, len(widths) * (T + 1)) label statistics of the wider neighbourhoods."""
    if nb.wide_indices is None or nb.wide_scores is None or nb.wide_indices.shape[1] < max(widths):
        raise ValueError(f"the search gave no wider neighbourhood of {max(widths)} items: "
                         "search with wide >= the model's widest neighbourhood")
    idx = torch.from_numpy(nb.wide_indices)
    labels = table.targets[idx.clamp(min=0)]  # (B, W, T)
    mask = (idx >= 0).unsqueeze(-1) & ~torch.isnan(labels)
    scores = torch.from_numpy(np.where(nb.wide_indices >= 0, nb.wide_scores, 0.0).astype(np.float32))
    return wide_summary(torch.nan_to_num(labels, nan=0.0), mask, scores, widths)


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size).expand(*lengths.shape, size) < lengths.unsqueeze(-1)


def make_batch(
    table: FeatureTable,
    query: ItemFeatures,
    nb: Neighbours,
    wide_widths: tuple[int, ...] = (),
) -> ModelBatch:
    """A model batch for queries (features given) and their neighbours (snapshot rows,
    -1 for none, in `table`, whose projection must hold every one of them).

    nb: (B, k) neighbours; with `wide_widths`, also their wider neighbourhood (B, W),
    W >= the largest width, whose labels are summarised (`wide_summary`).
    """
    nb_indices, nb_scores = nb.indices, nb.scores
    proj = table.projection
    if proj is None:
        raise ValueError("the feature table has no projection: project the neighbours' rows first")
    b, k = nb_indices.shape
    idx = torch.from_numpy(nb_indices)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    pos = proj.position[nb_indices.clip(min=0)]
    if (pos[nb_indices >= 0] < 0).any():
        raise ValueError("a neighbour was not projected: project the rows the batch needs first")
    places = np.maximum(pos, 0)

    def sequences(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, k, P, d) and (B, k, P); a modality that is off keeps an empty sequence
        projected = getattr(proj, name)
        if projected is None:
            return torch.zeros(b, k, 0, 1), torch.zeros(b, k, 0, dtype=torch.bool)
        width = table.sequences[name].width
        mask = _length_mask(torch.where(valid, table.lengths[name][safe], 0), width)  # (B, k, P)
        if len(projected.rows) == 0:
            return projected.rows.new_zeros(b, k, width, projected.rows.shape[-1]).float(), mask
        starts = torch.from_numpy(projected.offsets[places])  # (B, k)
        at = torch.where(mask, starts.unsqueeze(-1) + torch.arange(width), 0)  # (B, k, P)
        x = projected.rows[at].float()  # (B, k, P, d)
        return torch.where(mask.unsqueeze(-1), x, 0.0), mask

    nb_frames, nb_frame_mask = sequences("frames")
    nb_audio, nb_audio_mask = sequences("audio")
    nb_tokens, nb_token_mask = sequences("tokens")
    nb_labels = table.targets[safe]  # (B, k, T)
    nb_label_mask = valid.unsqueeze(-1) & ~torch.isnan(nb_labels)
    nb_labels = torch.nan_to_num(nb_labels, nan=0.0)
    scores = torch.from_numpy(np.where(nb_indices >= 0, nb_scores, 0.0).astype(np.float32))
    return ModelBatch(
        frames=query.frames,
        frame_mask=_length_mask(query.frame_len, query.frames.shape[1]),
        tokens=query.tokens,
        token_mask=_length_mask(query.token_len, query.tokens.shape[1]),
        nb_frames=nb_frames,
        nb_frame_mask=nb_frame_mask,
        nb_tokens=nb_tokens,
        nb_token_mask=nb_token_mask,
        nb_score=scores,
        nb_mask=valid,
        nb_labels=nb_labels,
        nb_label_mask=nb_label_mask,
        nb_summary=neighbour_summary(nb_labels, nb_label_mask, scores, valid),
        nb_wide=_wide_statistics(table, nb, wide_widths) if wide_widths else None,
        audio=query.audio,
        audio_mask=_length_mask(query.audio_len, query.audio.shape[1]) if query.audio is not None and query.audio_len is not None else None,
        nb_audio=nb_audio,
        nb_audio_mask=nb_audio_mask,
        meta_numeric=query.meta_numeric,
        meta_numeric_mask=query.meta_numeric_mask,
        meta_categorical=query.meta_categorical,
        words=query.words,
        word_weights=query.word_weights,
        word_prior=query.word_prior,
    )
