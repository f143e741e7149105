"""float32 products with one operand laid out once for oneDNN: the CPU's fast path for
a matrix that many calls multiply (the text model's weights, the exact search's keys).

PyTorch multiplies float32 matrices on a CPU through the BLAS it was built with, which
reads the row-major matrix on every call. oneDNN, also inside PyTorch, can reorder a
matrix once into the blocked layout its kernels stream; small calls then run much
faster (a text model's title-sized calls 10-15%, the exact search's screen of ten
queries against 19,666 keys 2-3x). It is still float32 arithmetic, and a row's result
depends neither on the other rows of its call nor on the number of threads (the tests
check both), so a text encodes to the same vector in a build's calls of 64 and in a
service's calls of 1.

Where this PyTorch has no oneDNN, where it was told to multiply float32 at a lower
precision, or where a probe product disagrees, callers keep their plain matrices.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


# What `torch.backends.mkldnn.matmul.fp32_precision` says when float32 stays float32.
FULL_PRECISION = ("none", "ieee")


def available() -> bool:
    """Whether this PyTorch can multiply with oneDNN-packed matrices in full float32."""
    ops = getattr(torch.ops, "mkldnn", None)
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    precision = str(getattr(matmul, "fp32_precision", "none")).lower()
    return bool(
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and precision in FULL_PRECISION
    )


def pack(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` (N, K) float32 on the CPU, reordered for `products` (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(matrix.detach().float().contiguous(), None)


def products(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, K) @ matrix.T (+ bias) for a matrix (N, K) given `pack`ed: (R, N) float32."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack_checked(matrix: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> torch.Tensor | None:
    """`pack(matrix)`, or None where oneDNN is unavailable or a probe product of the
    packed matrix differs from the plain one (an old or unusual build)."""
    if not available():
        return None
    try:
        packed = pack(matrix)
        probe = torch.randn(3, matrix.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if not torch.allclose(products(probe, packed), probe @ matrix.float().T, rtol=rtol, atol=atol):
                raise ValueError("packed and plain products differ")
    except Exception as exc:
        logger.info("oneDNN-packed products unavailable (%s); plain products instead", exc)
        return None
    return packed


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
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            return cls(pack(linear.weight), bias, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # (R, K)
        if rows.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        return products(rows, self.packed_weight, self.bias).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Replaces every float32 `nn.Linear` inside `module` (on the CPU) with its
    `PrepackedLinear`; returns the replaced layers as (parent, name, layer), for
    `restore_linears`. Nothing changes where oneDNN is unavailable or refuses the first
    layer (a probe multiplies it both ways)."""
    linears = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    if not linears or pack_checked(linears[0][2].weight) is None:
        return []
    for parent, name, child in linears:
        setattr(parent, name, PrepackedLinear.from_linear(child))
    return linears


def restore_linears(replaced: list[tuple[nn.Module, str, nn.Linear]]) -> None:
    """Puts back the layers `prepack_linears` replaced (for a model whose own code reads
    its layers' weights, which a packed layer does not have)."""
    for parent, name, child in replaced:
        setattr(parent, name, child)
