"""The training loss and the predictive distribution (DESIGN.md, "The predictor": loss
and prediction)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mvpp.predictor.model.batch import ModelOutput, Prediction

LOSSES = ("gaussian_nll", "mse", "mse_nll")


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
    "mse_nll": a squared error for the mean, plus the Gaussian NLL of the variance given
    the mean held fixed: the mean minimises squared error exactly, the variance still
    learns which items are uncertain. "mse": the squared error alone (no variance).
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
    elif kind == "mse_nll":
        sq_fixed = (y - output.mu_y.detach()) ** 2
        per = sq + 0.5 * (math.log(2.0 * math.pi) + output.logvar_y + sq_fixed * torch.exp(-output.logvar_y))
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSSES}")
    per = torch.where(mask, per, torch.zeros_like(per))
    recon = per.sum() / mask.sum().clamp_min(1)
    kl = output.kl.mean() if output.kl.numel() else output.kl.sum()
    total = recon + kl_weight * kl
    parts = {"total": float(total.detach()), "recon": float(recon.detach()), "kl": float(kl.detach())}
    return total, parts


Decode = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def predictive(
    decode: Decode,
    z_mu: Tensor,
    z_logvar: Tensor,
    interactions: Tensor,
    scalars: Tensor,
    n_samples: int,
    quantiles: tuple[float, float],
    seed: int,
) -> Prediction:
    """Mean and interval of y: the decoder's mean at z = mu; the interval from draws of z
    from the posterior and of y ~ N(mu_y(z), sigma_y(z)^2) (S = n_samples), or with
    n_samples = 0 Gaussian in sigma_y at z = mu.

    Every item gets the same standard-normal draws (common random numbers, fixed by
    `seed`), so an item's interval does not depend on the batch it is predicted in, nor
    on its position there: evaluation and scoring give it the same one.
    """
    lo_q, hi_q = quantiles
    if not 0.0 < lo_q < hi_q < 1.0:
        raise ValueError(f"quantiles must satisfy 0 < lo < hi < 1, got {quantiles}")
    mean, logvar = decode(z_mu, interactions, scalars)  # (B, T)
    if n_samples <= 0:
        std = torch.exp(0.5 * logvar)
        normal = torch.distributions.Normal(0.0, 1.0)
        q = normal.icdf(torch.tensor([lo_q, hi_q], dtype=mean.dtype, device=mean.device))
        return Prediction(mean, std, mean + q[0] * std, mean + q[1] * std, quantiles)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    s, bsz = n_samples, mean.shape[0]
    eps = torch.randn(s, 1, z_mu.shape[-1], generator=gen).to(z_mu)  # (S, 1, d_z)
    eps_y = torch.randn(s, 1, mean.shape[-1], generator=gen).to(mean)  # (S, 1, T)
    z = z_mu + torch.exp(0.5 * z_logvar) * eps  # (S, B, d_z); the point-mass posterior has std 0
    inter = interactions.expand(s, *interactions.shape)  # (S, B, P * d)
    extra = scalars.expand(s, *scalars.shape)  # (S, B, S_in)
    mu_s, logvar_s = decode(z.reshape(s * bsz, -1), inter.reshape(s * bsz, -1), extra.reshape(s * bsz, -1))
    mu_s = mu_s.view(s, bsz, -1)  # (S, B, T)
    var_s = torch.exp(logvar_s).view(s, bsz, -1)
    y = mu_s + var_s.sqrt() * eps_y  # (S, B, T)
    qs = torch.quantile(y, torch.tensor([lo_q, hi_q], dtype=y.dtype, device=y.device), dim=0)
    # law of total variance: aleatoric part + spread of mu_y over z
    std = (var_s.mean(dim=0) + mu_s.var(dim=0, unbiased=False)).sqrt()
    return Prediction(mean, std, qs[0], qs[1], quantiles)
