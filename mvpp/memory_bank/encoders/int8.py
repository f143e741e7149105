"""Linear layers in 8-bit integers: the "int8" text precision.

A text model's time on a CPU is its linear layers' matrix products, and float32 already
runs them at the cores' peak; 8-bit integer products (x86 VNNI, Arm dot-product
instructions) do about four times the work per cycle. Each weight row (an output
channel) is stored as 8-bit codes with its own scale; each input row (a token) is
coded with its own scale when it arrives; the products are summed in 32-bit integers,
exactly, and scaled back. Nothing in a row's result depends on the other rows of the
call: the same token gives the same output, to the bit, alone or among a thousand.
"""

from __future__ import annotations

import torch
from torch import nn

# Codes run over [-CODE_MAX, CODE_MAX]: symmetric, so zero is coded exactly and a
# product of two codes never overflows a 32-bit sum below 2^17 terms.
CODE_MAX = 127


def code_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of each row of x (R, K) and the scale of each row (R, 1): x ~ codes * scale."""
    peak = x.abs().amax(dim=1, keepdim=True)  # (R, 1)
    scale = torch.where(peak > 0, peak / CODE_MAX, torch.ones_like(peak))
    codes = torch.round(x / scale).clamp_(-CODE_MAX, CODE_MAX).to(torch.int8)
    return codes, scale


def integer_products(codes: torch.Tensor, weight_codes: torch.Tensor) -> torch.Tensor:
    """codes (R, K) int8 @ weight_codes (K, N) int8, summed exactly: (R, N) float32."""
    if codes.device.type == "cpu":
        return torch._int_mm(codes, weight_codes).to(torch.float32)
    # elsewhere float64 sums the same integers exactly (every partial sum stays below 2^53),
    # so every device gives the CPU's numbers
    return (codes.to(torch.float64) @ weight_codes.to(torch.float64)).to(torch.float32)


class Int8Linear(nn.Module):
    """`nn.Linear` with 8-bit weights and inputs, made from a float one by `from_linear`."""

    def __init__(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(weight_codes.shape[0]), int(weight_codes.shape[1])
        self.register_buffer("weight_codes", weight_codes)  # (K, N) int8, contiguous for the product
        self.register_buffer("weight_scale", weight_scale)  # (N,) float32
        self.register_buffer("bias", bias)  # (N,) float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        with torch.no_grad():
            codes, scale = code_rows(linear.weight.detach().float())  # (N, K), (N, 1)
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(codes.t().contiguous(), scale.squeeze(1).contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()  # (R, K)
        codes, scale = code_rows(rows)
        out = integer_products(codes, self.weight_codes)  # (R, N)
        out.mul_(self.weight_scale.float()).mul_(scale)
        if self.bias is not None:
            out.add_(self.bias.float())
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: nn.Module) -> int:
    """Replaces every `nn.Linear` inside `module` with its `Int8Linear`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count
