"""Linear layers with weights laid out once for oneDNN: the float32 text model on a CPU.

`nn.Linear` on a CPU multiplies through the BLAS PyTorch was built with, which reads the
weight in its row-major layout on every call; oneDNN (also inside PyTorch) can reorder a
weight once into the blocked layout its kernels stream, and then multiplies the title
sized calls of a text model 10-15% faster. It is still float32 arithmetic, and a row's
result does not depend on the other rows of its call nor on the number of threads (the
tests check both), so a text encodes to the same vector in a build's calls of 64 and in
a service's calls of 1.

Where this PyTorch has no oneDNN, or the layout is refused, the layers stay as they were.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def available() -> bool:
    """Whether this PyTorch can multiply with oneDNN-packed weights."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PrepackedLinear(nn.Module):
    """A float32 `nn.Linear` on the CPU whose weight oneDNN reordered once (`from_linear`).

    For inference only: the packed weight is an opaque oneDNN tensor, not a parameter.
    """

    def __init__(self, packed_weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed_weight = packed_weight  # opaque oneDNN layout of the (N, K) weight
        self.register_buffer("bias", bias)  # (N,) float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PrepackedLinear:
        with torch.no_grad():
            weight = linear.weight.detach().float().contiguous()  # (N, K)
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        return cls(packed, bias, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # (R, K)
        if rows.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(module: nn.Module) -> int:
    """Replaces every float32 `nn.Linear` inside `module` (on the CPU) with its
    `PrepackedLinear`; returns how many. Nothing changes where oneDNN is unavailable or
    refuses the first layer (a probe multiplies it both ways)."""
    if not available():
        return 0
    linears = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    if not linears:
        return 0
    try:
        probe = linears[0][2]
        x = torch.randn(3, probe.in_features)
        with torch.no_grad():
            if not torch.allclose(PrepackedLinear.from_linear(probe)(x), probe(x), rtol=1e-4, atol=1e-5):
                raise ValueError("packed and plain products differ")
    except Exception as exc:  # an old or unusual build: keep the plain layers
        logger.info("oneDNN-packed linear layers unavailable (%s); the text model keeps its own", exc)
        return 0
    for parent, name, child in linears:
        setattr(parent, name, PrepackedLinear.from_linear(child))
    return len(linears)
