"""Weight quantization for inference: FP8 (e4m3) expert weights with one float32 scale per output channel.

At one canvas a denoise step reads every weight once, and the experts are 90% of the bytes (45.7 of
50.5 GB in the release model): storing them in 8 bits halves what a step streams. Only the experts are
quantized (attention, the dense MLP, the router and the embedding keep the model's dtype); activations
stay in the model's dtype (weight-only: the kernel widens each FP8 tile in registers, `dgemma.ops.moe`).

Each output channel (a row of a [X, out, in] expert matrix) gets scale = max|w| / 448, the largest e4m3
value, and stores round(w / scale) in e4m3: a relative error of at most 2^-4 per weight (3 mantissa
bits, round to nearest), so results differ from the bf16 model's by about what rounding to 4 bits of
mantissa does; `dgemma bench --quantization fp8` measures the effect on the logits.

Quantization happens at load time, from a checkpoint in the model's dtype: there is no FP8 checkpoint
format to save (a quantized model refuses to be saved), and training needs the full-precision weights.
"""

from __future__ import annotations

import torch

from dgemma.model.presets import QUANTIZATIONS

FP8 = torch.float8_e4m3fn
FP8_DTYPES = (FP8,)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
EXPERTS_PER_CHUNK = 8  # experts converted at a time: bounds the float32 temporaries


def check_quantization(quantization: str | None) -> str | None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def quantize_fp8(w_XOI: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weights [X, O, I], float32 scales [X, O]) of expert matrices w [X, O, I], a few experts at a
    time (into `out`, FP8 storage of the same shape, when given). A row of zeros gets scale 1."""
    q = torch.empty(w_XOI.shape, dtype=FP8, device=w_XOI.device) if out is None else out
    scale = torch.empty(w_XOI.shape[:2], dtype=torch.float32, device=q.device)
    for lo in range(0, w_XOI.shape[0], EXPERTS_PER_CHUNK):
        w = w_XOI[lo : lo + EXPERTS_PER_CHUNK].to(q.device, torch.float32)
        amax = w.abs().amax(dim=-1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q[lo : lo + EXPERTS_PER_CHUNK] = (w / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        scale[lo : lo + EXPERTS_PER_CHUNK] = s
    return q, scale


def dequantize(q_XOI: torch.Tensor, scale_XO: torch.Tensor) -> torch.Tensor:
    """float32 weights [X, O, I] back from e4m3 weights and their scales."""
    return q_XOI.float() * scale_XO[..., None]
