"""Quantization for inference: FP8 (e4m3) expert weights with one float32 scale per output channel
("fp8"), and optionally the experts' gate-up input in FP8 too, with a scale per token ("fp8-w8a8").

At one canvas a denoise step reads every weight once, and the experts are 90% of the bytes (45.7 of
50.5 GB in the release model): storing them in 8 bits halves what a step streams. Only the experts are
quantized (attention, the dense MLP, the router and the embedding keep the model's dtype). With "fp8"
the activations stay in the model's dtype (weight-only: the kernel widens each FP8 tile in registers,
`dgemma.ops.moe`).

Each output channel (a row of a [X, out, in] expert matrix) gets scale = max|w| / 448, the largest e4m3
value, and stores round(w / scale) in e4m3: a relative error of at most 2^-4 per weight (3 mantissa
bits, round to nearest), so results differ from the bf16 model's by about what rounding to 4 bits of
mantissa does; `dgemma bench --quantization fp8` measures the effect on the logits.

"fp8-w8a8" also rounds each token's input to the gate-up projection to e4m3 (scale max|x| / 448,
computed as it comes: "dynamic"), so that projection multiplies FP8 by FP8 on the tensor cores: twice
the multiply rate where a step is compute-bound (several canvases), for a little more error. The down
projection keeps its input in the model's dtype (a per-token scale of it would need the whole row of
the gate-up output, which its kernel computes in tiles).

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


def _to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales) of x along its last dim: scale = max|x| / 448 per row (1 for a row
    of zeros), values round(x / scale)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8(w_XOI: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weights [X, O, I], float32 scales [X, O]) of expert matrices w [X, O, I], a few experts at a
    time (into `out`, FP8 storage of the same shape, when given). A row of zeros gets scale 1."""
    q = torch.empty(w_XOI.shape, dtype=FP8, device=w_XOI.device) if out is None else out
    scale = torch.empty(w_XOI.shape[:2], dtype=torch.float32, device=q.device)
    for lo in range(0, w_XOI.shape[0], EXPERTS_PER_CHUNK):
        chunk = slice(lo, lo + EXPERTS_PER_CHUNK)
        q[chunk], scale[chunk] = _to_e4m3(w_XOI[chunk].to(q.device))
    return q, scale


def quantize_rows(x_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows [N, K], float32 scales [N]) of activations x: a scale per row (token), computed as they
    come (dynamic), by the weights' rule."""
    return _to_e4m3(x_NK)


def dequantize(q_XOI: torch.Tensor, scale_XO: torch.Tensor) -> torch.Tensor:
    """float32 weights [X, O, I] back from e4m3 weights and their scales."""
    return q_XOI.float() * scale_XO[..., None]
