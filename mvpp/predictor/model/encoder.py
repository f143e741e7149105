"""Item encoder: projections, bipolar cross-modal attention, attentive pooling.

The same three steps run twice: on the target item's frames and title tokens, and on
the neighbours' aggregated frames and tokens (DESIGN.md, "The predictor", 1 and 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mvpp.predictor.model.batch import masked_softmax


class Projection(nn.Module):
    """X = ReLU(E W): per-position projection of frame or token features to d.

    Only valid positions are projected (padded ones come out as zeros): this skips
    the bulk of the work on padded positions and keeps NaN padding out of the weight
    gradients.
    """

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x (..., d_in), mask (...) -> (..., d)
        dtype = self.linear.weight.dtype  # banks store float16
        d_out = self.linear.out_features
        if mask.numel() == 0 or bool(mask.all()):
            return torch.relu(self.linear(x.to(dtype)))
        idx = mask.reshape(-1).nonzero().squeeze(1)  # (N_valid,)
        rows = x.reshape(-1, x.shape[-1]).index_select(0, idx).to(dtype)  # (N_valid, d_in)
        out = torch.relu(self.linear(rows))
        full = out.new_zeros(mask.numel(), d_out).index_copy(0, idx, out)
        return full.view(*mask.shape, d_out)


class BipolarCrossModalAttention(nn.Module):
    """MMRA bipolar cross-modal attention between a frame sequence and a token sequence.

    Positive: T_P = softmax(alpha S_vt) V_t; negative: T_N = softmax(-(1 - alpha) S_vt) V_t,
    with S_vt = Q_v K_t^T / sqrt(d); V_P, V_N swap the roles. Fusion:
    T~ = ReLU(X_t + [V_P, V_N] W_1) W_2 and V~ = ReLU(X_v + [T_P, T_N] W_1') W_2'.
    """

    def __init__(
        self, d_model: int, alpha: float, use_positive: bool, use_negative: bool, dropout: float
    ) -> None:
        super().__init__()
        self.use_positive = use_positive
        self.use_negative = use_negative
        self.scale = 1.0 / math.sqrt(d_model)
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


def encode_pair(
    attention: BipolarCrossModalAttention | None,
    pools: tuple[AttentivePooling | None, AttentivePooling | None],
    frames: tuple[Tensor, Tensor] | None,
    tokens: tuple[Tensor, Tensor] | None,
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """Cross-modal fusion of a (frames, tokens) pair, then each side pooled to one vector.

    frames / tokens: ((B, L, d), (B, L)) / ((B, n, d), (B, n)), None for a modality that
    is off. Returns ((B, d), availability (B,)) per side. Attention exists only when both
    modalities are on.
    """
    if attention is not None and frames is not None and tokens is not None:
        x_v, x_t = attention(frames[0], frames[1], tokens[0], tokens[1])
        frames, tokens = (x_v, frames[1]), (x_t, tokens[1])
    pool_v, pool_t = pools
    v = pool_v(*frames) if frames is not None and pool_v is not None else None
    t = pool_t(*tokens) if tokens is not None and pool_t is not None else None
    return v, t
