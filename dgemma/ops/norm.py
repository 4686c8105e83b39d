"""RMSNorm as one Triton kernel (the spec is `RMSNorm.forward` in model/layers.py).

The pure-torch norm is six small kernels (cast, square, mean, add, power, multiply) at ~330 norms per
denoise step: latency, not bandwidth. One program normalises one row in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    y = x / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * (mean(x^2) + eps)^-0.5 * weight over the last dim, in float32, returned in x's dtype."""
    d = x.shape[-1]
    x2 = x.contiguous().view(-1, d)
    out = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        weight if weight is not None else x2,
        out,
        d,
        eps,
        HAS_WEIGHT=weight is not None,
        BLOCK=triton.next_power_of_2(d),
        num_warps=4 if d <= 1024 else 8,
    )
    return out.view(x.shape)
