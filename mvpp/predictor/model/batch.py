"""What goes into the model and what comes out of it.

Shapes: B batch, L frames, n tokens, k neighbours, d model width, T targets,
E experts. Masks are bool, True = valid; padded positions may hold any value, even NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class ModelBatch:
    """Model inputs for one batch: the items' own features, their neighbours' projected
    features (`PopularityModel.project_items`, from the feature table) and labels."""

    frames: Tensor  # (B, L, d_frame)
    frame_mask: Tensor  # (B, L)
    tokens: Tensor  # (B, n, d_token)
    token_mask: Tensor  # (B, n)
    nb_frames: Tensor  # (B, k, L, d) projected
    nb_frame_mask: Tensor  # (B, k, L)
    nb_tokens: Tensor  # (B, k, n, d) projected
    nb_token_mask: Tensor  # (B, k, n)
    # The neighbours' retrieval scores: cosine, plus the lexical re-rank and the group
    # bonus when the run's search uses them (retriever.search).
    nb_score: Tensor  # (B, k)
    nb_mask: Tensor  # (B, k)
    nb_labels: Tensor  # (B, k, T) normalised targets, 0 where missing
    nb_label_mask: Tensor  # (B, k, T)
    # Parameter-free statistics of the neighbourhood (neighbours.neighbour_summary).
    nb_summary: Tensor  # (B, 4T + 2)
    # Label statistics of wider neighbourhoods (neighbours.wide_summary); None: not read.
    nb_wide: Tensor | None = None  # (B, len(widths) * (T + 1))
    # The sound's segments, the items' own and the neighbours' projected ones; None: no sound.
    audio: Tensor | None = None  # (B, S, d_audio)
    audio_mask: Tensor | None = None  # (B, S)
    nb_audio: Tensor | None = None  # (B, k, S, d)
    nb_audio_mask: Tensor | None = None  # (B, k, S)
    meta_numeric: Tensor | None = None  # (B, M)
    meta_numeric_mask: Tensor | None = None  # (B, M)
    meta_categorical: Tensor | None = None  # (B, C) long, 0 = unknown
    # Title bag of words (lexicon ids, 0 = padding) with TF-IDF weights.
    words: Tensor | None = None  # (B, W) long
    word_weights: Tensor | None = None  # (B, W)
    # Cross-fitted word-ridge estimates (training items); None: computed from `words`.
    word_prior: Tensor | None = None  # (B, T)

    @property
    def batch_size(self) -> int:
        return int(self.frames.shape[0])

    def to(self, device: torch.device | str) -> ModelBatch:
        """Copy of the batch on `device`."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in fields(self)
        }
        return ModelBatch(**moved)


@dataclass
class ModelOutput:
    """Forward result. Without PoE the posterior is a point mass: z_logvar is -inf, kl is 0."""

    mu_y: Tensor  # (B, T)
    logvar_y: Tensor  # (B, T)
    z_mu: Tensor  # (B, d_z)
    z_logvar: Tensor  # (B, d_z)
    kl: Tensor  # (B,)
    expert_mask: Tensor  # (B, E) bool, experts in `PopularityModel.expert_names` order
    neighbour_weights: Tensor  # (B, k) retrieval softmax a_j (zeros when retrieval is off)


@dataclass
class Prediction:
    """Point prediction with a predictive interval."""

    mean: Tensor  # (B, T) mu_y at z = posterior mean
    std: Tensor  # (B, T) predictive std (aleatoric + spread over z)
    lower: Tensor  # (B, T)
    upper: Tensor  # (B, T)
    quantiles: tuple[float, float]


def masked_softmax(scores: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over valid entries; a slice with no valid entry gives all zeros.

    Filling with the dtype minimum instead of -inf keeps fully masked slices
    finite (uniform before the final multiply), so no NaN reaches gradients.
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=dim) * mask


def zero_invalid(x: Tensor, mask: Tensor) -> Tensor:
    """x (..., d) with rows where mask (...) is False set to 0."""
    # `where` rather than multiply so NaN / inf padding cannot leak through.
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
