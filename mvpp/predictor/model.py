"""Retrieval-augmented popularity predictor (see DESIGN.md, "The predictor").

Shapes: B batch, L frames, n tokens, k neighbours, d model width, T targets,
E experts. Masks are bool, True = valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from mvpp.predictor.config import ModelConfig
from mvpp.retriever.bulk import ranking_scores

__all__ = [
    "AttentivePooling",
    "BipolarCrossModalAttention",
    "Decoder",
    "ExpertHead",
    "LabelInteraction",
    "LexicalToken",
    "MetadataEncoder",
    "ModelBatch",
    "ModelOutput",
    "NeighbourAggregator",
    "PopularityModel",
    "Prediction",
    "ProductOfExperts",
    "Projection",
    "WordPrior",
    "masked_softmax",
    "popularity_loss",
]


# --------------------------------------------------------------------------- data


@dataclass
class ModelBatch:
    """Model inputs for one batch; padded positions may hold any value, even NaN."""

    frames: Tensor  # (B, L, d_frame)
    frame_mask: Tensor  # (B, L) bool
    tokens: Tensor  # (B, n, d_token)
    token_mask: Tensor  # (B, n) bool
    nb_frames: Tensor  # (B, k, L, d_frame)
    nb_frame_mask: Tensor  # (B, k, L) bool
    nb_tokens: Tensor  # (B, k, n, d_token)
    nb_token_mask: Tensor  # (B, k, n) bool
    nb_sim: Tensor  # (B, k) cosine similarity
    nb_mask: Tensor  # (B, k) bool
    nb_labels: Tensor  # (B, k, T)
    nb_label_mask: Tensor  # (B, k, T) bool
    meta_numeric: Tensor | None = None  # (B, M)
    meta_numeric_mask: Tensor | None = None  # (B, M) bool
    meta_categorical: Tensor | None = None  # (B, C) long, 0 = unknown
    # Title bag of words (lexicon ids, 0 = padding) with TF-IDF weights.
    words: Tensor | None = None  # (B, W) long
    word_weights: Tensor | None = None  # (B, W)
    # Cross-fitted word-ridge estimates (training items); None: computed from `words`.
    word_prior: Tensor | None = None  # (B, T)
    nb_words: Tensor | None = None  # (B, k, W) long; unused with projected neighbours
    nb_word_weights: Tensor | None = None  # (B, k, W)
    # True when nb_frames / nb_tokens already hold projected features (B, k, ., d_model),
    # taken from a table made by `PopularityModel.project_items` (tokens then include
    # the bag-of-words position, and nb_token_mask covers it).
    projected_neighbours: bool = False

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


# ------------------------------------------------------------------------ helpers


def masked_softmax(scores: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over valid entries; a slice with no valid entry gives all zeros.

    Filling with the dtype minimum instead of -inf keeps fully masked slices
    finite (uniform before the final multiply), so no NaN reaches gradients.
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=dim) * mask


def _zero_invalid(x: Tensor, mask: Tensor) -> Tensor:
    # `where` rather than multiply so NaN / inf padding cannot leak through.
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


# ------------------------------------------------------------------------ modules


class Projection(nn.Module):
    """X = ReLU(E W): per-position projection of frame or token features to d.

    Only valid positions are projected (padded ones come out as zeros): this
    skips the bulk of the work on padded neighbour tokens and keeps NaN padding
    out of the weight gradients.
    """

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x (..., d_in), mask (...) -> (..., d)
        dtype = self.linear.weight.dtype  # banks may store float16
        d_out = self.linear.out_features
        if mask.numel() == 0 or bool(mask.all()):
            return torch.relu(self.linear(x.to(dtype)))
        idx = mask.reshape(-1).nonzero().squeeze(1)  # (N_valid,)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, idx).to(dtype)  # (N_valid, d_in)
        out = torch.relu(self.linear(rows))
        full = out.new_zeros(mask.numel(), d_out).index_copy(0, idx, out)
        return full.view(*mask.shape, d_out)


class LexicalToken(nn.Module):
    """One more text position from the title's bag of words: ReLU(sum_w tfidf_w e_w + b).

    ids (..., W) long with 0 as padding, weights (..., W) -> (..., d), availability (...).
    """

    def __init__(self, vocab_size: int, d_model: int, word_dropout: float = 0.0) -> None:
        super().__init__()
        self.word_dropout = word_dropout
        self.embed = nn.EmbeddingBag(vocab_size + 1, d_model, mode="sum", padding_idx=0)
        # TF-IDF weights have unit norm, so unit-variance rows / sqrt(d) give outputs of
        # the same scale as the projected token features.
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        lead = ids.shape[:-1]
        flat = ids.reshape(-1, ids.shape[-1]).long()  # (N, W)
        if self.training and self.word_dropout > 0:
            # each word's row is seen by few titles: dropping whole words keeps the
            # model from memorising the titles of single items
            keep = torch.rand(flat.shape, device=flat.device) >= self.word_dropout
            flat = torch.where(keep, flat, torch.zeros_like(flat))
        w = weights.reshape(flat.shape).to(self.bias.dtype)
        w = torch.where(flat > 0, w, torch.zeros((), dtype=w.dtype, device=w.device))
        out = torch.relu(self.embed(flat, per_sample_weights=w) + self.bias)  # (N, d)
        return out.view(*lead, -1), (ids > 0).any(dim=-1)


class WordPrior(nn.Module):
    """A fitted ridge on the title's bag of words (see predictor.word_prior), frozen:
    prior = bias + sum_w tfidf_w coef[w]; ids (B, W), weights (B, W) -> (B, T).

    The coefficients are buffers, so they travel with the model's weights.
    """

    def __init__(self, vocab_size: int, n_targets: int) -> None:
        super().__init__()
        self.register_buffer("coef", torch.zeros(vocab_size + 1, n_targets))
        self.register_buffer("bias", torch.zeros(n_targets))

    @torch.no_grad()
    def load(self, coef: Tensor, bias: Tensor) -> None:
        """Copy a fitted ridge: coef (V + 1, T), bias (T,)."""
        self.coef.copy_(coef)
        self.bias.copy_(bias)

    def forward(self, ids: Tensor | None, weights: Tensor | None, batch_size: int) -> Tensor:
        if ids is None or weights is None:  # no title: the ridge's intercept
            return self.bias.expand(batch_size, -1)
        w = torch.where(ids > 0, weights.to(self.coef.dtype), torch.zeros((), dtype=self.coef.dtype))
        return torch.einsum("bw,bwt->bt", w, self.coef[ids.long()]) + self.bias


class NeighbourAggregator(nn.Module):
    """Similarity-weighted aggregation of neighbour sequences and labels."""

    def __init__(
        self,
        d_model: int,
        n_targets: int,
        tau_init: float,
        tau_learnable: bool,
        use_label_embedding: bool,
        label_similarity: bool = False,
    ) -> None:
        super().__init__()
        log_tau = torch.tensor(math.log(tau_init))
        if tau_learnable:
            # log parametrisation keeps tau > 0 under any update
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        # Labels enter with their mask so a missing label is not read as 0. The neighbour's
        # similarity may enter too: softmax weights are relative, so without it a label
        # from a barely similar neighbour looks as trustworthy as one from a near copy.
        self.label_similarity = label_similarity
        d_in = 2 * n_targets + int(label_similarity)
        self.label_embed = nn.Linear(d_in, d_model) if use_label_embedding else None

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp()

    def weights(self, sim: Tensor, nb_mask: Tensor) -> Tensor:
        """a_j = softmax_j(s_j / tau) over valid neighbours: (B, k) -> (B, k)."""
        return masked_softmax(sim.to(self.log_tau.dtype) / self.tau, nb_mask, dim=-1)

    @staticmethod
    def aggregate(x: Tensor, mask: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Position-wise weighted sum over neighbours.

        x (B, k, P, d), mask (B, k, P), a (B, k) -> (B, P, d), (B, P).
        Weights are re-normalised per position over the neighbours that have
        that position, so padding never shifts the average.
        """
        w = a.unsqueeze(-1) * mask  # (B, k, P)
        total = w.sum(dim=1)  # (B, P)
        valid = total > 0
        w = w / torch.where(valid, total, torch.ones_like(total)).unsqueeze(1)
        return torch.einsum("bkp,bkpd->bpd", w, x), valid

    def label_embedding(
        self, labels: Tensor, label_mask: Tensor, a: Tensor, sim: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """L_r = sum_j a_j ReLU(w_l [y_j, s_j] + b_l): (B, k, T), (B, k, T), (B, k), (B, k)
        -> (B, d), (B,). s_j is used only when the aggregator was built with it."""
        if self.label_embed is None:
            raise RuntimeError("label embedding is switched off")
        y = _zero_invalid(labels.to(a.dtype).unsqueeze(-1), label_mask).squeeze(-1)  # (B, k, T)
        parts = [y, label_mask.to(y.dtype)]
        if self.label_similarity:
            if sim is None:
                raise ValueError("this label embedding needs the neighbour similarities")
            has = label_mask.any(dim=-1, keepdim=True)  # (B, k, 1)
            parts.append(torch.where(has, sim.to(y.dtype).unsqueeze(-1), torch.zeros_like(y[..., :1])))
        e = torch.relu(self.label_embed(torch.cat(parts, dim=-1)))  # (B, k, d)
        has = label_mask.any(dim=-1)  # (B, k)
        out, valid = self.aggregate(e.unsqueeze(2), has.unsqueeze(2), a)  # (B, 1, d), (B, 1)
        return out.squeeze(1), valid.squeeze(1)

    def label_average(self, labels: Tensor, label_mask: Tensor, a: Tensor) -> Tensor:
        """The neighbours' labels averaged with the retrieval weights, per target, and
        whether any neighbour had that label: (B, k, T), (B, k, T), (B, k) -> (B, 2T)."""
        w = a.unsqueeze(-1) * label_mask  # (B, k, T)
        total = w.sum(dim=1)  # (B, T)
        has = total > 0
        y = _zero_invalid(labels.to(a.dtype).unsqueeze(-1), label_mask).squeeze(-1)
        mean = (w * y).sum(dim=1) / torch.where(has, total, torch.ones_like(total))  # (B, T)
        return torch.cat([mean, has.to(mean.dtype)], dim=-1)

    @staticmethod
    def label_summary(labels: Tensor, label_mask: Tensor, sim: Tensor, nb_mask: Tensor) -> Tensor:
        """Unweighted statistics of the neighbourhood, per target: mean label, label std,
        the label of the most similar labelled neighbour and the share of neighbours
        with it among the valid ones; then the largest and the mean similarity over them.
        (B, k, T), (B, k, T), (B, k), (B, k) -> (B, 4T + 2); absent statistics are 0.

        The softmax weights are relative, so the label embedding cannot tell a tight
        cluster of near copies from a loose set of weak matches; these can. Similarities
        equal at the retriever's ranking resolution count as one (copies of an item score
        within float noise of each other): the "most similar" label is their mean, so
        the statistics do not depend on the neighbours' order or on that noise."""
        dtype = sim.dtype if sim.is_floating_point() else torch.float32
        bsz, k, n_targets = labels.shape
        if k == 0:  # an empty bank: nothing to summarise
            return torch.zeros(bsz, 4 * n_targets + 2, dtype=dtype, device=sim.device)
        m = label_mask.to(dtype)  # (B, k, T)
        y = _zero_invalid(labels.to(dtype).unsqueeze(-1), label_mask).squeeze(-1)  # (B, k, T)
        count = m.sum(dim=1)  # (B, T)
        denom = count.clamp_min(1.0)
        mean = (m * y).sum(dim=1) / denom
        var = (m * (y - mean.unsqueeze(1)) ** 2).sum(dim=1) / denom
        s = torch.where(nb_mask, sim.to(dtype), torch.zeros((), dtype=dtype, device=sim.device))
        lowest = torch.finfo(dtype).min
        r = torch.where(label_mask, ranking_scores(s).unsqueeze(-1), torch.full_like(y, lowest))  # (B, k, T)
        best = label_mask & (r == r.amax(dim=1, keepdim=True))  # (B, k, T)
        top1 = (best * y).sum(dim=1) / best.sum(dim=1).clamp_min(1)  # (B, T); 0 without labels
        # over valid neighbours, not k: padded slots must not change any input
        n_valid = nb_mask.to(dtype).sum(dim=1, keepdim=True)  # (B, 1)
        share = count / n_valid.clamp_min(1.0)
        has = n_valid > 0
        max_sim = torch.where(nb_mask, s, torch.full_like(s, lowest)).amax(dim=1, keepdim=True)
        max_sim = torch.where(has, max_sim, torch.zeros_like(max_sim))
        mean_sim = s.sum(dim=1, keepdim=True) / n_valid.clamp_min(1.0)
        return torch.cat([mean, var.sqrt(), top1, share, max_sim, mean_sim], dim=-1)

    def forward(
        self,
        sim: Tensor,
        nb_mask: Tensor,
        seqs: Sequence[tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Weights and aggregated sequences: each (x (B,k,P,d), mask (B,k,P)) -> ((B,P,d), (B,P))."""
        a = self.weights(sim, nb_mask)
        return a, [self.aggregate(x, m, a) for x, m in seqs]


class BipolarCrossModalAttention(nn.Module):
    """MMRA bipolar cross-modal attention between a frame sequence and a token sequence.

    Positive: T_P = softmax(alpha S_vt) V_t; negative: T_N = softmax(-(1 - alpha) S_vt) V_t,
    with S_vt = Q_v K_t^T / sqrt(d); V_P, V_N swap the roles. Fusion:
    T~ = ReLU(X_t + [V_P, V_N] W_1) W_2 and V~ = ReLU(X_v + [T_P, T_N] W_1') W_2'.
    """

    def __init__(
        self,
        d_model: int,
        alpha: float,
        alpha_learnable: bool,
        use_positive: bool,
        use_negative: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.use_positive = use_positive
        self.use_negative = use_negative
        self.scale = 1.0 / math.sqrt(d_model)
        if alpha_learnable:
            # logit parametrisation keeps alpha in (0, 1); the ends are pulled in to stay finite
            a = min(max(alpha, 1e-4), 1.0 - 1e-4)
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(a / (1.0 - a))))
        else:
            self.register_buffer("alpha_fixed", torch.tensor(float(alpha)))
        self.q_v = nn.Linear(d_model, d_model)
        self.k_v = nn.Linear(d_model, d_model)
        self.v_v = nn.Linear(d_model, d_model)
        self.q_t = nn.Linear(d_model, d_model)
        self.k_t = nn.Linear(d_model, d_model)
        self.v_t = nn.Linear(d_model, d_model)
        n_branches = int(use_positive) + int(use_negative)
        # W_1 has zero width (absent) when both branches are off.
        self.w1_v = nn.Linear(n_branches * d_model, d_model) if n_branches else None
        self.w2_v = nn.Linear(d_model, d_model)
        self.w1_t = nn.Linear(n_branches * d_model, d_model) if n_branches else None
        self.w2_t = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    @property
    def alpha(self) -> Tensor:
        if hasattr(self, "alpha_logit"):
            return torch.sigmoid(self.alpha_logit)
        return self.alpha_fixed

    def scores(self, x_v: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """S_vt = Q_v K_t^T / sqrt(d) (B, L, n) and S_tv = Q_t K_v^T / sqrt(d) (B, n, L)."""
        s_vt = self.q_v(x_v) @ self.k_t(x_t).transpose(1, 2) * self.scale
        s_tv = self.q_t(x_t) @ self.k_v(x_v).transpose(1, 2) * self.scale
        return s_vt, s_tv

    def attention_weights(
        self, x_v: Tensor, frame_mask: Tensor, x_t: Tensor, token_mask: Tensor
    ) -> dict[str, Tensor]:
        """All four weight matrices, keys masked.

        "text_pos"/"text_neg" (B, L, n): frames attending to tokens (give T_P, T_N);
        "frame_pos"/"frame_neg" (B, n, L): tokens attending to frames (give V_P, V_N).
        """
        s_vt, s_tv = self.scores(x_v, x_t)
        alpha = self.alpha
        km_t = token_mask.unsqueeze(1)  # (B, 1, n)
        km_v = frame_mask.unsqueeze(1)  # (B, 1, L)
        return {
            "text_pos": masked_softmax(alpha * s_vt, km_t, dim=-1),
            "text_neg": masked_softmax(-(1.0 - alpha) * s_vt, km_t, dim=-1),
            "frame_pos": masked_softmax(alpha * s_tv, km_v, dim=-1),
            "frame_neg": masked_softmax(-(1.0 - alpha) * s_tv, km_v, dim=-1),
        }

    def forward(
        self, x_v: Tensor, frame_mask: Tensor, x_t: Tensor, token_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(B, L, d), (B, L), (B, n, d), (B, n) -> V~ (B, L, d), T~ (B, n, d).

        An item lacking one modality keeps the other's projection unchanged.
        """
        w = self.attention_weights(x_v, frame_mask, x_t, token_mask)
        val_t = self.v_t(x_t)  # (B, n, d)
        val_v = self.v_v(x_v)  # (B, L, d)
        text_parts: list[Tensor] = []  # text gathered at frame positions, (B, L, d) each
        frame_parts: list[Tensor] = []  # frames gathered at token positions, (B, n, d) each
        if self.use_positive:
            text_parts.append(w["text_pos"] @ val_t)
            frame_parts.append(w["frame_pos"] @ val_v)
        if self.use_negative:
            text_parts.append(w["text_neg"] @ val_t)
            frame_parts.append(w["frame_neg"] @ val_v)
        pre_v, pre_t = x_v, x_t
        if self.w1_v is not None and self.w1_t is not None:
            pre_v = x_v + self.w1_v(torch.cat(text_parts, dim=-1))
            pre_t = x_t + self.w1_t(torch.cat(frame_parts, dim=-1))
        v_fused = self.dropout(self.w2_v(torch.relu(pre_v)))  # (B, L, d)
        t_fused = self.dropout(self.w2_t(torch.relu(pre_t)))  # (B, n, d)
        both = (frame_mask.any(dim=1) & token_mask.any(dim=1)).view(-1, 1, 1)  # (B, 1, 1)
        return torch.where(both, v_fused, x_v), torch.where(both, t_fused, x_t)


class AttentivePooling(nn.Module):
    """Masked attentive pooling: (B, n, d) + (B, n) -> (B, d) and availability (B,)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.score = nn.Linear(d_model, 1)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        s = self.score(torch.tanh(self.hidden(x))).squeeze(-1)  # (B, n)
        w = masked_softmax(s, mask, dim=-1)  # (B, n)
        return torch.einsum("bn,bnd->bd", w, x), mask.any(dim=-1)


class ExpertHead(nn.Module):
    """Gaussian expert q_e(z | e): (B, d) -> mu (B, d_z), logvar (B, d_z)."""

    def __init__(
        self, d_model: int, hidden: int, d_z: int, logvar_min: float, logvar_max: float
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, 2 * d_z))
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)


class ProductOfExperts(nn.Module):
    """Precision-weighted product of available Gaussian experts and the N(0, I) prior.

    precision = 1 + sum_e avail_e exp(-logvar_e); mu = sum_e avail_e mu_e exp(-logvar_e) / precision.
    """

    def forward(
        self, experts: Sequence[tuple[Tensor, Tensor]], available: Tensor
    ) -> tuple[Tensor, Tensor]:
        """experts: E pairs of (B, d_z); available (B, E) -> mu, logvar (B, d_z)."""
        if len(experts) == 0:
            raise ValueError("ProductOfExperts needs at least one expert (the prior is implicit)")
        mu = torch.stack([m for m, _ in experts], dim=1)  # (B, E, d_z)
        logvar = torch.stack([lv for _, lv in experts], dim=1)  # (B, E, d_z)
        # where, not multiply: a dropped expert's values (even inf) must not matter
        prec_e = torch.where(available.unsqueeze(-1), torch.exp(-logvar), torch.zeros_like(logvar))
        mu_e = torch.where(available.unsqueeze(-1), mu, torch.zeros_like(mu))
        precision = 1.0 + prec_e.sum(dim=1)  # (B, d_z); the prior contributes precision 1, mean 0
        fused_mu = (mu_e * prec_e).sum(dim=1) / precision
        return fused_mu, -torch.log(precision)


class PeriodicEmbedding(nn.Module):
    """Each of M numeric features -> its own embedding of [sin(2 pi c x), cos(2 pi c x)]
    at K learnt frequencies c (initialised from N(0, sigma^2)), then a per-feature linear
    layer and ReLU: (B, M) -> (B, M, e). Lets an MLP draw thresholds on one number."""

    def __init__(self, n_features: int, n_frequencies: int, sigma: float, embed_dim: int) -> None:
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(n_features, n_frequencies) * sigma)  # (M, K)
        bound = 1.0 / math.sqrt(2 * n_frequencies)
        self.weight = nn.Parameter(torch.empty(n_features, 2 * n_frequencies, embed_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(n_features, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        angle = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # (B, M, K)
        feats = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (B, M, 2K)
        return torch.relu(torch.einsum("bmf,mfe->bme", feats, self.weight) + self.bias)


class MetadataEncoder(nn.Module):
    """Numeric features (with missing mask) and categorical embeddings -> (B, d)."""

    def __init__(
        self,
        n_numeric: int,
        cardinalities: Sequence[int],
        embed_dim: int,
        d_model: int,
        periodic: PeriodicEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        # Numbers enter as themselves (B, M) or, with `periodic`, as (B, M, e) embeddings.
        self.periodic = periodic
        numeric_width = embed_dim if periodic is not None else 1
        self.n_categorical = len(cardinalities)
        self.embedding: nn.Embedding | None = None
        if cardinalities:
            sizes = torch.tensor([c + 1 for c in cardinalities])  # +1: bucket 0 is unknown
            offsets = torch.cumsum(sizes, 0) - sizes
            self.register_buffer("cardinality", sizes - 1, persistent=False)
            self.register_buffer("offsets", offsets, persistent=False)
            # one table for all columns keeps the lookup a single vectorised gather
            self.embedding = nn.Embedding(int(sizes.sum()), embed_dim)
        in_dim = n_numeric * (numeric_width + 1) + self.n_categorical * embed_dim
        self.net = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU())

    def forward(
        self,
        numeric: Tensor | None,
        numeric_mask: Tensor | None,
        categorical: Tensor | None,
        batch_size: int,
    ) -> tuple[Tensor, Tensor]:
        """(B, M), (B, M), (B, C) -> (B, d), availability (B,)."""
        device = self.net[0].weight.device
        dtype = self.net[0].weight.dtype
        parts: list[Tensor] = []
        avail = torch.zeros(batch_size, dtype=torch.bool, device=device)
        if self.n_numeric:
            if numeric is None:
                x = torch.zeros(batch_size, self.n_numeric, dtype=dtype, device=device)
                m = torch.zeros(batch_size, self.n_numeric, dtype=torch.bool, device=device)
            else:
                m = (
                    torch.isfinite(numeric)
                    if numeric_mask is None
                    else numeric_mask.bool() & torch.isfinite(numeric)
                )
                x = torch.where(m, numeric.to(dtype), torch.zeros((), dtype=dtype, device=device))
            if self.periodic is not None:
                # a missing number's embedding is zeroed: only its mask flag speaks for it
                x = (self.periodic(x) * m.unsqueeze(-1).to(dtype)).flatten(1)  # (B, M * e)
            parts += [x, m.to(dtype)]
            avail = avail | m.any(dim=-1)
        if self.embedding is not None:
            if categorical is None:
                c = torch.zeros(batch_size, self.n_categorical, dtype=torch.long, device=device)
            else:
                c = categorical.long()
                c = torch.where((c < 0) | (c > self.cardinality), torch.zeros_like(c), c)
            parts.append(self.embedding(c + self.offsets).flatten(1))  # (B, C * e)
            avail = avail | (c > 0).any(dim=-1)
        return self.net(torch.cat(parts, dim=-1)), avail


class LabelInteraction(nn.Module):
    """Element-wise products of target and retrieved representations, zeroed where either is missing."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = list(pairs)

    def forward(self, reps: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
        """reps: name -> ((B, d), (B,)) -> (B, len(pairs) * d)."""
        out = []
        for a, b in self.pairs:
            (xa, ma), (xb, mb) = reps[a], reps[b]
            prod = xa * xb
            out.append(torch.where((ma & mb).unsqueeze(-1), prod, torch.zeros_like(prod)))
        return torch.cat(out, dim=-1)


class Decoder(nn.Module):
    """MLP([z, interactions, scalars]) -> mu_y (B, T), logvar_y (B, T) clamped to the config range."""

    def __init__(
        self,
        d_in: int,
        hidden: int,
        n_layers: int,
        n_targets: int,
        dropout: float,
        logvar_min: float,
        logvar_max: float,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 2 * n_targets))
        self.net = nn.Sequential(*layers)
        self.logvar_min = logvar_min
        self.logvar_max = logvar_max

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)


# -------------------------------------------------------------------------- model


@dataclass
class _Encoding:
    z_mu: Tensor  # (B, d_z)
    z_logvar: Tensor  # (B, d_z)
    interactions: Tensor  # (B, P * d), plus (B, d) of metadata with meta_to_decoder
    expert_mask: Tensor  # (B, E)
    neighbour_weights: Tensor  # (B, k)
    # decoder inputs beside z and the interactions: word prior (B, T), neighbour label
    # average (B, 2T), neighbour summary (B, 4T + 2), each when switched on; or (B, 0)
    scalars: Tensor


def popularity_loss(
    output: ModelOutput,
    target: Tensor,
    target_mask: Tensor,
    kl_weight: float,
    kind: str = "gaussian_nll",
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Masked reconstruction loss + kl_weight * batch-mean KL.

    target, target_mask (B, T); masked targets (even NaN) contribute nothing.
    With kind "gaussian_nll", beta > 0 weights each item's NLL by its predicted
    variance^beta, detached (beta-NLL, Seitzer et al. 2022): the plain NLL (beta = 0)
    lets the mean give up on items it calls noisy, which costs MSE; beta = 1 gives the
    mean the gradient of a squared error while the variance is still fitted.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    mask = target_mask.bool() & torch.isfinite(target)
    y = torch.where(mask, target, torch.zeros((), dtype=target.dtype, device=target.device))
    sq = (y - output.mu_y) ** 2  # (B, T)
    if kind == "gaussian_nll":
        per = 0.5 * (math.log(2.0 * math.pi) + output.logvar_y + sq * torch.exp(-output.logvar_y))
        if beta > 0:
            per = per * torch.exp(beta * output.logvar_y).detach()
    elif kind == "mse":
        per = sq
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected 'gaussian_nll' or 'mse'")
    per = torch.where(mask, per, torch.zeros_like(per))
    recon = per.sum() / mask.sum().clamp_min(1)
    kl = output.kl.mean() if output.kl.numel() else output.kl.sum()
    total = recon + kl_weight * kl
    parts = {
        "total": float(total.detach()),
        "recon": float(recon.detach()),
        "kl": float(kl.detach()),
    }
    return total, parts


class PopularityModel(nn.Module):
    """Retrieval-augmented multimodal popularity predictor with a PoE latent."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        d = c.d_model
        self.expert_names: list[str] = c.expert_names
        both = c.use_frames and c.use_text

        def attention() -> BipolarCrossModalAttention:
            return BipolarCrossModalAttention(
                d,
                c.alpha,
                c.alpha_learnable,
                c.use_positive_attention,
                c.use_negative_attention,
                c.dropout,
            )

        # Neighbours share the target's projections: retrieved and target features live in one space.
        self.frame_proj = Projection(c.d_frame, d) if c.use_frames else None
        self.token_proj = Projection(c.d_token, d) if c.use_text else None
        self.lexical = LexicalToken(c.lexicon_size, d, c.word_dropout) if c.has_lexicon else None
        # dropout on per-item sequences, after aggregation: (B, k, n, d) tensors are too big for it
        self.seq_dropout = nn.Dropout(c.dropout)
        self.target_attention = attention() if both else None
        self.pool = nn.ModuleDict()
        for name in ("V", "T", "V_r", "T_r"):
            if name in self.expert_names:
                self.pool[name] = AttentivePooling(d)
        self.aggregator: NeighbourAggregator | None = None
        self.retrieved_attention: BipolarCrossModalAttention | None = None
        if c.use_retrieval:
            self.aggregator = NeighbourAggregator(
                d,
                c.n_targets,
                c.tau_init,
                c.tau_learnable,
                c.use_label_embedding,
                c.label_similarity,
            )
            self.retrieved_attention = attention() if both else None
        self.meta: MetadataEncoder | None = None
        if c.has_meta:
            periodic = (
                PeriodicEmbedding(
                    c.n_meta_numeric, c.meta_periodic_frequencies, c.meta_periodic_sigma, c.meta_embed_dim
                )
                if c.meta_numeric_embedding == "periodic" and c.n_meta_numeric > 0
                else None
            )
            self.meta = MetadataEncoder(
                c.n_meta_numeric, c.meta_cardinalities, c.meta_embed_dim, d, periodic
            )
        self.experts = nn.ModuleDict()
        self.poe: ProductOfExperts | None = None
        self.concat_fusion: nn.Linear | None = None
        if c.use_poe:
            for name in self.expert_names:
                self.experts[name] = ExpertHead(
                    d, c.expert_hidden, c.d_z, c.expert_logvar_min, c.expert_logvar_max
                )
            self.poe = ProductOfExperts()
        else:
            # availability flags ride along so a missing representation differs from a zero one
            n_exp = len(self.expert_names)
            self.concat_fusion = nn.Linear(n_exp * d + n_exp, c.d_z)
        pairs = c.interaction_pairs
        self.interaction = LabelInteraction(pairs)
        self.word_prior = WordPrior(c.lexicon_size, c.n_targets) if c.has_word_prior else None
        self.neighbour_prior = c.use_neighbour_prior and c.use_retrieval
        self.neighbour_summary = c.use_neighbour_summary and c.use_retrieval
        prior_in = (
            (c.n_targets if c.has_word_prior else 0)
            + (2 * c.n_targets if self.neighbour_prior else 0)
            + (4 * c.n_targets + 2 if self.neighbour_summary else 0)
        )
        self.meta_skip = c.meta_to_decoder and c.has_meta
        self.decoder = Decoder(
            c.d_z + len(pairs) * d + prior_in + (d if self.meta_skip else 0),
            c.decoder_hidden,
            c.decoder_layers,
            c.n_targets,
            c.dropout,
            c.logvar_min,
            c.logvar_max,
        )

    # ----------------------------------------------------------------- encoder

    def _append_words(
        self, x_t: Tensor, m_t: Tensor, words: Tensor | None, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Token sequence plus the bag-of-words position (last): (..., n, d), (..., n)
        -> (..., n + 1, d), (..., n + 1). Without words the position is masked out."""
        assert self.lexical is not None
        if words is None or weights is None:
            lex = x_t.new_zeros(*x_t.shape[:-2], 1, x_t.shape[-1])
            has = torch.zeros(*m_t.shape[:-1], 1, dtype=torch.bool, device=m_t.device)
        else:
            lex, has = self.lexical(words, weights)
            lex, has = lex.unsqueeze(-2), has.unsqueeze(-1)
        return torch.cat([x_t, lex], dim=-2), torch.cat([m_t, has], dim=-1)

    def _pair(
        self,
        attn: BipolarCrossModalAttention | None,
        x_v: Tensor | None,
        m_v: Tensor | None,
        x_t: Tensor | None,
        m_t: Tensor | None,
        names: tuple[str, str],
        reps: dict[str, tuple[Tensor, Tensor]],
    ) -> None:
        # cross-modal fusion, then pooling of each side into one vector;
        # attention exists only when both modalities are switched on
        if attn is not None and x_v is not None and x_t is not None:
            assert m_v is not None and m_t is not None
            x_v, x_t = attn(x_v, m_v, x_t, m_t)
        if x_v is not None and m_v is not None:
            reps[names[0]] = self.pool[names[0]](x_v, m_v)
        if x_t is not None and m_t is not None:
            reps[names[1]] = self.pool[names[1]](x_t, m_t)

    def encode(self, batch: ModelBatch) -> _Encoding:
        """Everything up to (and including) the posterior over z."""
        c = self.config
        bsz = batch.batch_size
        ref = self.decoder.net[-1].weight  # dtype / device of the model
        reps: dict[str, tuple[Tensor, Tensor]] = {}

        # target pair
        x_v = m_v = x_t = m_t = None
        if self.frame_proj is not None:
            m_v = batch.frame_mask.bool()
            x_v = self.seq_dropout(self.frame_proj(batch.frames, m_v))  # (B, L, d)
        if self.token_proj is not None:
            m_t = batch.token_mask.bool()
            x_t = self.token_proj(batch.tokens, m_t)  # (B, n, d)
            if self.lexical is not None:
                x_t, m_t = self._append_words(x_t, m_t, batch.words, batch.word_weights)
            x_t = self.seq_dropout(x_t)  # (B, n [+ 1], d)
        self._pair(self.target_attention, x_v, m_v, x_t, m_t, ("V", "T"), reps)

        # retrieved pair
        k = int(batch.nb_sim.shape[1])
        a = torch.zeros(bsz, k, dtype=ref.dtype, device=ref.device)
        lm = batch.nb_label_mask.bool() & batch.nb_mask.bool().unsqueeze(-1)  # (B, k, T)
        if self.aggregator is not None:
            nb_mask = batch.nb_mask.bool()
            a = self.aggregator.weights(batch.nb_sim, nb_mask)  # (B, k)
            r_v = mr_v = r_t = mr_t = None
            if self.frame_proj is not None:
                nm = batch.nb_frame_mask.bool() & nb_mask.unsqueeze(-1)  # (B, k, L)
                x = (
                    _zero_invalid(batch.nb_frames, nm)
                    if batch.projected_neighbours
                    else self.frame_proj(batch.nb_frames, nm)
                )  # (B, k, L, d)
                r_v, mr_v = self.aggregator.aggregate(x, nm, a)  # (B, L, d), (B, L)
                r_v = self.seq_dropout(r_v)
            if self.token_proj is not None:
                nm = batch.nb_token_mask.bool() & nb_mask.unsqueeze(-1)  # (B, k, n [+ 1])
                if batch.projected_neighbours:
                    x = _zero_invalid(batch.nb_tokens, nm)  # (B, k, n [+ 1], d)
                else:
                    x = self.token_proj(batch.nb_tokens, nm)  # (B, k, n, d)
                    if self.lexical is not None:
                        x, nm = self._append_words(x, nm, batch.nb_words, batch.nb_word_weights)
                        nm = nm & nb_mask.unsqueeze(-1)
                r_t, mr_t = self.aggregator.aggregate(x, nm, a)  # (B, n, d), (B, n)
                r_t = self.seq_dropout(r_t)
            self._pair(self.retrieved_attention, r_v, mr_v, r_t, mr_t, ("V_r", "T_r"), reps)
            if c.use_label_embedding:
                reps["L_r"] = self.aggregator.label_embedding(batch.nb_labels, lm, a, batch.nb_sim)

        if self.meta is not None:
            reps["M"] = self.meta(
                batch.meta_numeric, batch.meta_numeric_mask, batch.meta_categorical, bsz
            )

        expert_mask = torch.stack([reps[n][1] for n in self.expert_names], dim=1)  # (B, E)
        if self.poe is not None:
            heads = [self.experts[n](reps[n][0]) for n in self.expert_names]
            z_mu, z_logvar = self.poe(heads, expert_mask)
        else:
            assert self.concat_fusion is not None
            flat = [
                torch.where(reps[n][1].unsqueeze(-1), reps[n][0], torch.zeros_like(reps[n][0]))
                for n in self.expert_names
            ]
            z_mu = self.concat_fusion(torch.cat([*flat, expert_mask.to(ref.dtype)], dim=-1))
            z_logvar = torch.full_like(z_mu, float("-inf"))
        interactions = (
            self.interaction(reps)
            if self.interaction.pairs
            else torch.zeros(bsz, 0, dtype=z_mu.dtype, device=z_mu.device)
        )
        if self.meta_skip:
            # the metadata representation rides with the interactions: decoder inputs that
            # bypass z (zero when an item has no metadata)
            x_m, has_m = reps["M"]
            x_m = torch.where(has_m.unsqueeze(-1), x_m, torch.zeros_like(x_m))
            interactions = torch.cat([interactions, x_m], dim=-1)  # (B, P * d + d)
        scalars = [z_mu.new_zeros(bsz, 0)]
        if self.word_prior is not None:
            prior = (
                batch.word_prior.to(z_mu.dtype)
                if batch.word_prior is not None
                else self.word_prior(batch.words, batch.word_weights, bsz)
            )
            scalars.append(prior)  # (B, T)
        if self.neighbour_prior:
            # the k-NN estimate itself, with the retrieval weights' learnt temperature
            assert self.aggregator is not None
            scalars.append(self.aggregator.label_average(batch.nb_labels, lm, a).to(z_mu.dtype))  # (B, 2T)
        if self.neighbour_summary:
            scalars.append(
                NeighbourAggregator.label_summary(
                    batch.nb_labels, lm, batch.nb_sim.to(z_mu.dtype), batch.nb_mask.bool()
                )
            )  # (B, 4T + 2)
        return _Encoding(z_mu, z_logvar, interactions, expert_mask, a, torch.cat(scalars, dim=-1))

    @torch.no_grad()
    def project_items(
        self,
        frames: Tensor,
        frame_mask: Tensor,
        tokens: Tensor,
        token_mask: Tensor,
        words: Tensor | None = None,
        word_weights: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Projected frames (N, L, d) and tokens (N, n, d) of bank items, for use as
        neighbours with `ModelBatch.projected_neighbours`; None for a switched-off modality.
        With the lexicon on, tokens get the bag-of-words position last: (N, n + 1, d)."""
        x_v = self.frame_proj(frames, frame_mask.bool()) if self.frame_proj is not None else None
        x_t = None
        if self.token_proj is not None:
            x_t = self.token_proj(tokens, token_mask.bool())
            if self.lexical is not None:
                x_t, _ = self._append_words(x_t, token_mask.bool(), words, word_weights)
        return x_v, x_t

    # ----------------------------------------------------------------- forward

    def kl(self, z_mu: Tensor, z_logvar: Tensor) -> Tensor:
        """KL(q(z|x) || N(0, I)) per item: (B, d_z) -> (B,); zero without PoE."""
        if self.poe is None:
            return torch.zeros(z_mu.shape[0], dtype=z_mu.dtype, device=z_mu.device)
        return 0.5 * (torch.exp(z_logvar) + z_mu**2 - 1.0 - z_logvar).sum(dim=-1)

    def decode(self, z: Tensor, interactions: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor]:
        """(..., d_z), (..., P * d), scalar inputs (..., S) -> mu_y, logvar_y (..., T)."""
        return self.decoder(torch.cat([z, interactions, scalars], dim=-1))

    def forward(self, batch: ModelBatch) -> ModelOutput:
        enc = self.encode(batch)
        z = enc.z_mu
        if self.training and self.poe is not None:
            z = z + torch.exp(0.5 * enc.z_logvar) * torch.randn_like(z)
        mu_y, logvar_y = self.decode(z, enc.interactions, enc.scalars)
        return ModelOutput(
            mu_y=mu_y,
            logvar_y=logvar_y,
            z_mu=enc.z_mu,
            z_logvar=enc.z_logvar,
            kl=self.kl(enc.z_mu, enc.z_logvar),
            expert_mask=enc.expert_mask,
            neighbour_weights=enc.neighbour_weights,
        )

    def loss(
        self,
        output: ModelOutput,
        target: Tensor,
        target_mask: Tensor,
        kl_weight: float,
        kind: str = "gaussian_nll",
        beta: float = 0.0,
    ) -> tuple[Tensor, dict[str, float]]:
        """See `popularity_loss`."""
        return popularity_loss(output, target, target_mask, kl_weight, kind, beta)

    @torch.no_grad()
    def predict(
        self,
        batch: ModelBatch,
        n_samples: int = 100,
        quantiles: tuple[float, float] = (0.05, 0.95),
        seed: int = 0,
    ) -> Prediction:
        """Mean and interval, in eval mode.

        Draws z from the posterior, then y ~ N(mu_y(z), sigma_y(z)^2), and takes
        empirical quantiles; with n_samples = 0 the interval is Gaussian in sigma_y at z = mu.
        Every item gets the same standard-normal draws (common random numbers, fixed by
        `seed`), so an item's interval does not depend on the batch it is predicted in,
        nor on its position there: evaluation and scoring give it the same one.
        """
        lo_q, hi_q = quantiles
        if not 0.0 < lo_q < hi_q < 1.0:
            raise ValueError(f"quantiles must satisfy 0 < lo < hi < 1, got {quantiles}")
        was_training = self.training
        self.eval()
        try:
            enc = self.encode(batch)
            mean, logvar = self.decode(enc.z_mu, enc.interactions, enc.scalars)  # (B, T)
            if n_samples <= 0:
                std = torch.exp(0.5 * logvar)
                normal = torch.distributions.Normal(0.0, 1.0)
                q = normal.icdf(torch.tensor([lo_q, hi_q], dtype=mean.dtype, device=mean.device))
                return Prediction(mean, std, mean + q[0] * std, mean + q[1] * std, quantiles)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            s, bsz = n_samples, mean.shape[0]
            z_mu = enc.z_mu.expand(s, *enc.z_mu.shape)  # (S, B, d_z)
            z_std = torch.exp(0.5 * enc.z_logvar)  # zero for the point-mass posterior
            eps = torch.randn(s, 1, z_mu.shape[-1], generator=gen).to(z_mu)  # (S, 1, d_z)
            eps_y = torch.randn(s, 1, mean.shape[-1], generator=gen).to(mean)  # (S, 1, T)
            z = z_mu + z_std * eps
            inter = enc.interactions.expand(s, *enc.interactions.shape)  # (S, B, P * d)
            scalars = enc.scalars.expand(s, *enc.scalars.shape)  # (S, B, S_in)
            mu_s, logvar_s = self.decode(
                z.reshape(s * bsz, -1), inter.reshape(s * bsz, -1), scalars.reshape(s * bsz, -1)
            )
            mu_s = mu_s.view(s, bsz, -1)  # (S, B, T)
            var_s = torch.exp(logvar_s).view(s, bsz, -1)
            y = mu_s + var_s.sqrt() * eps_y  # (S, B, T)
            qs = torch.quantile(
                y, torch.tensor([lo_q, hi_q], dtype=y.dtype, device=y.device), dim=0
            )
            # law of total variance: aleatoric part + spread of mu_y over z
            std = (var_s.mean(dim=0) + mu_s.var(dim=0, unbiased=False)).sqrt()
            return Prediction(mean, std, qs[0], qs[1], quantiles)
        finally:
            self.train(was_training)
