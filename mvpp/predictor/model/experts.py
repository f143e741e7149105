"""The product-of-experts latent (DESIGN.md, "The predictor", 4): one Gaussian expert
per available representation, fused with the N(0, I) prior; and the metadata
representation M that feeds one of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ExpertHead(nn.Module):
    """Gaussian expert q_e(z | e): (B, d) -> mu (B, d_z), logvar (B, d_z)."""

    def __init__(self, d_model: int, hidden: int, d_z: int, logvar_range: tuple[float, float]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, 2 * d_z))
        self.logvar_min, self.logvar_max = logvar_range

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


class ConcatFusion(nn.Linear):
    """The no-PoE ablation: a linear map of the concatenated representations (missing
    ones zeroed) and their availability flags, so a missing representation differs from
    a zero one: E x ((B, d), (B,)) -> (B, d_z)."""

    def __init__(self, n_experts: int, d_model: int, d_z: int) -> None:
        super().__init__(n_experts * d_model + n_experts, d_z)

    def fuse(self, reps: Sequence[tuple[Tensor, Tensor]], available: Tensor) -> Tensor:
        flat = [torch.where(m.unsqueeze(-1), x, torch.zeros_like(x)) for x, m in reps]
        return self(torch.cat([*flat, available.to(flat[0].dtype)], dim=-1))


class MetadataEncoder(nn.Module):
    """Numeric features (with missing mask) and categorical embeddings -> (B, d)."""

    def __init__(self, n_numeric: int, cardinalities: Sequence[int], embed_dim: int, d_model: int) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        self.n_categorical = len(cardinalities)
        self.embedding: nn.Embedding | None = None
        if cardinalities:
            sizes = torch.tensor([c + 1 for c in cardinalities])  # +1: bucket 0 is unknown
            offsets = torch.cumsum(sizes, 0) - sizes
            self.register_buffer("cardinality", sizes - 1, persistent=False)
            self.register_buffer("offsets", offsets, persistent=False)
            # one table for all columns keeps the lookup a single vectorised gather
            self.embedding = nn.Embedding(int(sizes.sum()), embed_dim)
        # each number enters with its mask flag, so a missing value is not a zero
        in_dim = 2 * n_numeric + self.n_categorical * embed_dim
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
