"""The retrieved neighbours: similarity-weighted aggregation of their features and
labels, the statistics of the neighbourhood, and the label interaction
(DESIGN.md, "The predictor", 2 and 5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mvpp.predictor.model.batch import masked_softmax, zero_invalid
from mvpp.retriever.bulk import ranking_scores


class NeighbourAggregator(nn.Module):
    """a_j = softmax_j(s_j / tau) over valid neighbours; neighbour sequences and labels
    averaged with those weights."""

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
        # score may enter too: softmax weights are relative, so without it a label from a
        # barely similar neighbour looks as trustworthy as one from a near copy.
        self.label_similarity = label_similarity
        d_in = 2 * n_targets + int(label_similarity)
        self.label_embed = nn.Linear(d_in, d_model) if use_label_embedding else None

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp()

    def weights(self, score: Tensor, nb_mask: Tensor) -> Tensor:
        """a_j = softmax_j(s_j / tau) over valid neighbours: (B, k) -> (B, k)."""
        return masked_softmax(score.to(self.log_tau.dtype) / self.tau, nb_mask, dim=-1)

    @staticmethod
    def aggregate(x: Tensor, mask: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Position-wise weighted sum over neighbours.

        x (B, k, P, d), mask (B, k, P), a (B, k) -> (B, P, d), (B, P). Weights are
        re-normalised per position over the neighbours that have that position, so
        padding never shifts the average.
        """
        w = a.unsqueeze(-1) * mask  # (B, k, P)
        total = w.sum(dim=1)  # (B, P)
        valid = total > 0
        w = w / torch.where(valid, total, torch.ones_like(total)).unsqueeze(1)
        return torch.einsum("bkp,bkpd->bpd", w, x), valid

    def label_embedding(
        self, labels: Tensor, label_mask: Tensor, a: Tensor, score: Tensor
    ) -> tuple[Tensor, Tensor]:
        """L_r = sum_j a_j ReLU(w_l [y_j, m_j, s_j] + b_l): (B, k, T), (B, k, T), (B, k),
        (B, k) -> (B, d), (B,). s_j enters only when the aggregator was built with it."""
        if self.label_embed is None:
            raise RuntimeError("label embedding is switched off")
        y = zero_invalid(labels.to(a.dtype).unsqueeze(-1), label_mask).squeeze(-1)  # (B, k, T)
        parts = [y, label_mask.to(y.dtype)]
        has = label_mask.any(dim=-1)  # (B, k)
        if self.label_similarity:
            parts.append(torch.where(has, score.to(y.dtype), torch.zeros_like(score, dtype=y.dtype)).unsqueeze(-1))
        e = torch.relu(self.label_embed(torch.cat(parts, dim=-1)))  # (B, k, d)
        out, valid = self.aggregate(e.unsqueeze(2), has.unsqueeze(2), a)  # (B, 1, d), (B, 1)
        return out.squeeze(1), valid.squeeze(1)

    @staticmethod
    def label_average(labels: Tensor, label_mask: Tensor, a: Tensor) -> Tensor:
        """The neighbours' labels averaged with the retrieval weights, per target, and
        whether any neighbour had that label: (B, k, T), (B, k, T), (B, k) -> (B, 2T)."""
        w = a.unsqueeze(-1) * label_mask  # (B, k, T)
        total = w.sum(dim=1)  # (B, T)
        has = total > 0
        y = zero_invalid(labels.to(a.dtype).unsqueeze(-1), label_mask).squeeze(-1)
        mean = (w * y).sum(dim=1) / torch.where(has, total, torch.ones_like(total))  # (B, T)
        return torch.cat([mean, has.to(mean.dtype)], dim=-1)


def neighbour_summary(labels: Tensor, label_mask: Tensor, score: Tensor, nb_mask: Tensor) -> Tensor:
    """Unweighted statistics of a neighbourhood, per target: mean label, label std, the
    label of the most similar labelled neighbour and the share of neighbours with it
    among the valid ones; then the largest and the mean score over them.
    (B, k, T), (B, k, T), (B, k), (B, k) -> (B, 4T + 2); absent statistics are 0.

    The softmax weights are relative, so the label embedding cannot tell a tight cluster
    of near copies from a loose set of weak matches; these can. Scores equal at the
    retriever's ranking resolution count as one (copies of an item score within float
    noise of each other): the "most similar" label is their mean, so the statistics do
    not depend on the neighbours' order or on that noise.
    """
    dtype = torch.float32
    bsz, k, n_targets = labels.shape
    nb_mask = nb_mask.bool()
    label_mask = label_mask.bool() & nb_mask.unsqueeze(-1)  # an invalid neighbour's label never counts
    if k == 0:  # an empty bank: nothing to summarise
        return torch.zeros(bsz, 4 * n_targets + 2, dtype=dtype, device=score.device)
    m = label_mask.to(dtype)  # (B, k, T)
    y = zero_invalid(labels.to(dtype).unsqueeze(-1), label_mask).squeeze(-1)  # (B, k, T)
    count = m.sum(dim=1)  # (B, T)
    denom = count.clamp_min(1.0)
    mean = (m * y).sum(dim=1) / denom
    var = (m * (y - mean.unsqueeze(1)) ** 2).sum(dim=1) / denom
    s = torch.where(nb_mask, score.to(dtype), torch.zeros((), dtype=dtype, device=score.device))
    lowest = torch.finfo(dtype).min
    r = torch.where(label_mask, ranking_scores(s).unsqueeze(-1), torch.full_like(y, lowest))  # (B, k, T)
    best = label_mask & (r == r.amax(dim=1, keepdim=True))  # (B, k, T)
    top1 = (best * y).sum(dim=1) / best.sum(dim=1).clamp_min(1)  # (B, T); 0 without labels
    # over valid neighbours, not k: padded slots must not change any input
    n_valid = nb_mask.to(dtype).sum(dim=1, keepdim=True)  # (B, 1)
    share = count / n_valid.clamp_min(1.0)
    has = n_valid > 0
    max_s = torch.where(nb_mask, s, torch.full_like(s, lowest)).amax(dim=1, keepdim=True)
    max_s = torch.where(has, max_s, torch.zeros_like(max_s))
    mean_s = s.sum(dim=1, keepdim=True) / n_valid.clamp_min(1.0)
    return torch.cat([mean, var.sqrt(), top1, share, max_s, mean_s], dim=-1)


def wide_summary(labels: Tensor, label_mask: Tensor, score: Tensor, widths: tuple[int, ...]) -> Tensor:
    """Per width n (in ranking order), the mean label of the best n neighbours per target
    and their mean score: (B, W, T), (B, W, T), (B, W) -> (B, len(widths) * (T + 1)).

    label_mask is False for neighbours that are absent or lack the label; an absent
    neighbour's score is ignored; statistics with nothing to average are 0.
    """
    dtype = torch.float32
    bsz, _, n_targets = labels.shape
    present = label_mask.any(dim=-1)  # (B, W)
    parts = []
    for n in widths:
        m = label_mask[:, :n].to(dtype)  # (B, n, T)
        y = zero_invalid(labels[:, :n].to(dtype).unsqueeze(-1), label_mask[:, :n]).squeeze(-1)
        parts.append((m * y).sum(dim=1) / m.sum(dim=1).clamp_min(1.0))  # (B, T)
        p = present[:, :n].to(dtype)
        s = torch.where(present[:, :n], score[:, :n].to(dtype), torch.zeros((), dtype=dtype))
        parts.append((s.sum(dim=1) / p.sum(dim=1).clamp_min(1.0)).unsqueeze(-1))  # (B, 1)
    if not parts:
        return torch.zeros(bsz, 0, dtype=dtype)
    return torch.cat(parts, dim=-1)


class LabelInteraction(nn.Module):
    """Element-wise products of target and retrieved representations, zeroed where either
    is missing: V*V_r, V*T_r, T*V_r, T*T_r, V*L_r, T*L_r (those whose sides exist)."""

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
