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

from mvpp.predictor.features import MetaFeaturizer, category_key
from mvpp.predictor.lexicon import Lexicon
from mvpp.predictor.model import ModelBatch, PopularityModel
from mvpp.retriever.bulk import Neighbours, bulk_topk
from mvpp.retriever.rerank import rerank_lexical
from mvpp.retriever.snapshot import BankSnapshot

SPLITS = ("train", "val", "test")
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


@dataclass
class LexicalRerank:
    """Hybrid neighbours (see retriever.rerank): the dense search returns `candidates`
    per query, re-scored as cosine + `weight` * TF-IDF cosine of the title bags.

    key_ids / key_weights: (M, W) bags of the snapshot's items, the whole snapshot.
    """

    key_ids: np.ndarray
    key_weights: np.ndarray
    vocab_size: int
    weight: float
    candidates: int


@dataclass
class GroupBoost:
    """Neighbours from the query's own group score `weight` more (see retriever.bulk).

    A group is the value of one metadata column, such as the creator: a creator's earlier
    posts say more about a new post's reception than any stranger's similar caption.
    key_group: (N,) codes of the snapshot's items, -1 where the column has no value.
    """

    column: str
    weight: float
    codes: dict[str, int]
    key_group: np.ndarray

    @classmethod
    def fit(cls, snapshot: BankSnapshot, column: str, weight: float) -> GroupBoost:
        """Codes for every value of `column` among the snapshot's items."""
        if not snapshot.metadata:
            raise ValueError(f"neighbour group column {column!r}: the bank has no metadata")
        if not any(column in m for m in snapshot.metadata):
            known = sorted({name for m in snapshot.metadata for name in m})
            raise ValueError(f"neighbour group column {column!r} is not in the bank's metadata; it has {known}")
        codes: dict[str, int] = {}
        for m in snapshot.metadata:
            key = category_key(m.get(column))
            if key is not None:
                codes.setdefault(key, len(codes))
        boost = cls(column, weight, codes, np.zeros(0, np.int64))
        boost.key_group = boost.encode(snapshot.metadata)
        return boost

    def encode(self, metadata: list[dict]) -> np.ndarray:
        """(B,) codes of items' metadata; -1 for a missing value or one the bank lacks
        (no key can share it)."""
        out = np.full(len(metadata), -1, np.int64)
        for j, m in enumerate(metadata):
            key = category_key(m.get(self.column)) if m else None
            if key is not None:
                out[j] = self.codes.get(key, -1)
        return out


def find_neighbours(
    queries: np.ndarray,
    snapshot: BankSnapshot,
    keys_idx: np.ndarray,
    k: int,
    *,
    query_key_index: np.ndarray | None = None,
    query_time: np.ndarray | None = None,
    query_bags: tuple[np.ndarray, np.ndarray] | None = None,
    rerank: LexicalRerank | None = None,
    query_group: np.ndarray | None = None,
    groups: GroupBoost | None = None,
) -> Neighbours:
    """Top-k neighbours of `queries` among the snapshot items `keys_idx`, as snapshot
    indices (-1 = none). Dense search (plus the group bonus when `groups` is given along
    with the queries' group codes), then the lexical re-rank when one is given along
    with the queries' bags. `query_time` switches on the time filter."""
    hybrid = rerank is not None and query_bags is not None and rerank.weight != 0.0
    nb = bulk_topk(
        queries,
        snapshot.retrieval[keys_idx],
        max(k, rerank.candidates) if hybrid else k,
        key_mask=snapshot.has_retrieval[keys_idx],
        query_key_index=query_key_index,
        query_time=query_time,
        key_time=snapshot.published_ts[keys_idx] if query_time is not None else None,
        query_group=query_group,
        key_group=groups.key_group[keys_idx] if groups is not None else None,
        group_weight=groups.weight if groups is not None else 0.0,
    )
    if hybrid:
        assert rerank is not None and query_bags is not None
        nb = rerank_lexical(
            nb, query_bags[0], query_bags[1], rerank.key_ids[keys_idx], rerank.key_weights[keys_idx],
            rerank.vocab_size, k, rerank.weight,
        )
    return Neighbours(np.where(nb.indices >= 0, keys_idx[np.maximum(nb.indices, 0)], -1), nb.scores)


def split_neighbours(
    snapshot: BankSnapshot,
    splits: dict[str, np.ndarray],
    k: int,
    time_safe: bool,
    rerank: LexicalRerank | None = None,
    groups: GroupBoost | None = None,
) -> dict[str, Neighbours]:
    """Neighbours of every split's items among the training items (indices into snapshot)."""
    train = splits["train"]
    pos_in_train = np.full(len(snapshot), -1, dtype=np.int64)
    pos_in_train[train] = np.arange(len(train))
    out: dict[str, Neighbours] = {}
    for name, idx in splits.items():
        nb = find_neighbours(
            snapshot.retrieval[idx],
            snapshot,
            train,
            k,
            query_key_index=pos_in_train[idx],
            query_time=snapshot.published_ts[idx] if time_safe else None,
            query_bags=(rerank.key_ids[idx], rerank.key_weights[idx]) if rerank is not None else None,
            rerank=rerank,
            query_group=groups.key_group[idx] if groups is not None else None,
            groups=groups,
        )
        # Queries without a retrieval vector have no meaningful neighbours.
        nb.indices[~snapshot.has_retrieval[idx]] = -1
        nb.scores[~snapshot.has_retrieval[idx]] = -np.inf
        out[name] = nb
    return out


@dataclass
class ItemFeatures:
    """Inputs of a set of items, padded: tokens (B, n, d_t), frames (B, L, d_v)."""

    tokens: torch.Tensor
    token_len: torch.Tensor
    frames: torch.Tensor
    frame_len: torch.Tensor
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


class FeatureTable:
    """The snapshot's features as tensors, for fast gathering by index."""

    def __init__(
        self,
        snapshot: BankSnapshot,
        norm: TargetNorm,
        featurizer: MetaFeaturizer | None = None,
        lexicon: Lexicon | None = None,
    ) -> None:
        self.tokens = torch.from_numpy(snapshot.tokens)  # (N, n, d_t) float16
        self.token_len = torch.from_numpy(snapshot.token_len.astype(np.int64))
        self.frames = torch.from_numpy(snapshot.frames)  # (N, L, d_v) float16
        self.frame_len = torch.from_numpy(snapshot.frame_len.astype(np.int64))
        self.targets = torch.from_numpy(norm.forward(snapshot.targets).astype(np.float32))  # (N, T)
        self.n_targets = snapshot.targets.shape[1]
        self.meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if featurizer is not None and featurizer.n_features:
            num, mask, cat = featurizer.transform_snapshot(snapshot)
            self.meta = (torch.from_numpy(num), torch.from_numpy(mask), torch.from_numpy(cat))
        self.words: torch.Tensor | None = None  # (N, W)
        self.word_weights: torch.Tensor | None = None  # (N, W)
        if lexicon is not None:
            ids, weights = lexicon.encode(snapshot.titles)
            self.words, self.word_weights = torch.from_numpy(ids), torch.from_numpy(weights)
        # Set by training (see word_prior): out-of-fold estimates on training items.
        self.word_prior: torch.Tensor | None = None  # (N, T)

    # Set by `refresh_projection`: every item's projected frames / tokens.
    proj_frames: torch.Tensor | None = None  # (N, L, d)
    proj_tokens: torch.Tensor | None = None  # (N, n, d)

    @torch.no_grad()
    def refresh_projection(self, model: PopularityModel, chunk: int = 4096) -> None:
        """Project every item once with the model's current weights.

        Neighbours then come from this table instead of being projected again in every
        batch (each item is a neighbour of about k others per epoch). Used as is for
        evaluation (exact) and, refreshed every few steps, for training, where the
        neighbour side then lags the weights slightly and passes no gradient.
        """
        n = self.tokens.shape[0]
        frames, tokens = [], []
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            f_mask = _length_mask(self.frame_len[sl], self.frames.shape[1])
            t_mask = _length_mask(self.token_len[sl], self.tokens.shape[1])
            words = self.words[sl] if self.words is not None else None
            weights = self.word_weights[sl] if self.word_weights is not None else None
            x_v, x_t = model.project_items(
                self.frames[sl], f_mask, self.tokens[sl], t_mask, words, weights
            )
            frames.append(x_v)
            tokens.append(x_t)
        self.proj_frames = torch.cat(frames) if frames and frames[0] is not None else None
        self.proj_tokens = torch.cat(tokens) if tokens and tokens[0] is not None else None

    def clear_projection(self) -> None:
        self.proj_frames = self.proj_tokens = None

    def items(self, idx: torch.Tensor) -> ItemFeatures:
        feats = ItemFeatures(
            self.tokens[idx].float(), self.token_len[idx], self.frames[idx].float(), self.frame_len[idx]
        )
        if self.meta is not None:
            num, mask, cat = self.meta
            feats.meta_numeric, feats.meta_numeric_mask, feats.meta_categorical = (
                num[idx], mask[idx], cat[idx]
            )
        if self.words is not None and self.word_weights is not None:
            feats.words, feats.word_weights = self.words[idx], self.word_weights[idx]
        if self.word_prior is not None:
            feats.word_prior = self.word_prior[idx]
        return feats


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size).expand(*lengths.shape, size) < lengths.unsqueeze(-1)


def make_batch(
    table: FeatureTable,
    query: ItemFeatures,
    nb_indices: np.ndarray,
    nb_scores: np.ndarray,
) -> ModelBatch:
    """A model batch for queries (features given) and their neighbours (snapshot rows).

    nb_indices: (B, k) rows of the snapshot, -1 for no neighbour.
    """
    b, k = nb_indices.shape
    idx = torch.from_numpy(nb_indices)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    n_tok, n_frm = table.tokens.shape[1], table.frames.shape[1]
    projected = table.proj_tokens is not None or table.proj_frames is not None
    tok_src = table.proj_tokens if table.proj_tokens is not None else table.tokens
    frm_src = table.proj_frames if table.proj_frames is not None else table.frames
    if projected:
        # A switched-off modality keeps its raw table only for shapes: never read.
        tok_src = tok_src if table.proj_tokens is not None else tok_src[:, :0]
        frm_src = frm_src if table.proj_frames is not None else frm_src[:, :0]
        n_tok, n_frm = tok_src.shape[1], frm_src.shape[1]
    nb_tokens = tok_src[safe].float()  # (B, k, n [+ 1], d_t or d)
    nb_token_len = torch.where(valid, table.token_len[safe], 0)
    nb_token_mask = _length_mask(nb_token_len, min(n_tok, table.tokens.shape[1]))
    nb_words = nb_word_weights = None
    if table.words is not None and table.word_weights is not None:
        nb_words = torch.where(valid.unsqueeze(-1), table.words[safe], 0)  # (B, k, W)
        nb_word_weights = table.word_weights[safe]
        if n_tok == table.tokens.shape[1] + 1:  # projected tokens end with the words' position
            has_words = (nb_words > 0).any(dim=-1, keepdim=True)  # (B, k, 1)
            nb_token_mask = torch.cat([nb_token_mask, has_words], dim=-1)
    nb_frames = frm_src[safe].float()  # (B, k, L, d_v or d)
    nb_frame_len = torch.where(valid, table.frame_len[safe], 0)
    nb_labels = table.targets[safe]  # (B, k, T)
    nb_label_mask = valid.unsqueeze(-1) & ~torch.isnan(nb_labels)
    sims = torch.from_numpy(np.where(nb_indices >= 0, nb_scores, 0.0).astype(np.float32))
    return ModelBatch(
        frames=query.frames,
        frame_mask=_length_mask(query.frame_len, query.frames.shape[1]),
        tokens=query.tokens,
        token_mask=_length_mask(query.token_len, query.tokens.shape[1]),
        nb_frames=nb_frames,
        nb_frame_mask=_length_mask(nb_frame_len, n_frm),
        nb_tokens=nb_tokens,
        nb_token_mask=nb_token_mask,
        nb_sim=sims,
        nb_mask=valid,
        nb_labels=torch.nan_to_num(nb_labels, nan=0.0),
        nb_label_mask=nb_label_mask,
        meta_numeric=query.meta_numeric,
        meta_numeric_mask=query.meta_numeric_mask,
        meta_categorical=query.meta_categorical,
        words=query.words,
        word_weights=query.word_weights,
        word_prior=query.word_prior,
        nb_words=nb_words,
        nb_word_weights=nb_word_weights,
        projected_neighbours=projected,
    )
