"""The decoder (DESIGN.md, "The predictor", 6): an MLP from the latent, the label
interactions and a few numbers (the word prior, the neighbourhood's label average and
statistics) to a mean and a log-variance per target."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mvpp.predictor.word_prior import ridge_estimate


class WordPrior(nn.Module):
    """A fitted ridge on the title's bag of words (see predictor.word_prior), frozen:
    ids (B, W), weights (B, W) -> (B, T). Its coefficients are buffers, so they travel
    with the model's weights."""

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
        return ridge_estimate(ids.long(), weights.to(self.coef.dtype), self.coef, self.bias)


class Decoder(nn.Module):
    """MLP(x) -> mu_y (B, T), logvar_y (B, T) clamped to `logvar_range`."""

    def __init__(
        self,
        d_in: int,
        hidden: int,
        n_layers: int,
        n_targets: int,
        dropout: float,
        logvar_range: tuple[float, float],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 2 * n_targets))
        self.net = nn.Sequential(*layers)
        self.logvar_min, self.logvar_max = logvar_range

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)
