"""Norms, rotary embeddings, the gated dense MLP, the router and the experts (pure torch).

Shape legend: N tokens (flattened batch x sequence), D hidden, I intermediate, X experts, K top-k.
The experts' `forward` is the seam where a fast grouped kernel plugs in (GPU issue); this version is the
executable spec and runs on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.config import RopeSpec
from dgemma.ops import triton_available


def activation(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation {name!r}")  # config.py validates first


# the activations the kernels compute (dgemma.ops.moe.activate; ops sit below the model, so named here)
KERNEL_ACTIVATIONS = ("gelu_pytorch_tanh", "silu")


def kernels_apply(x: torch.Tensor) -> bool:
    """Inference on CUDA with Triton installed: the fused kernels of dgemma.ops replace the torch ops."""
    return x.is_cuda and not torch.is_grad_enabled() and triton_available()


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: fp32 math, `x * (mean(x^2) + eps)^-0.5 * weight` (weight used as is, not 1 + w)."""

    def __init__(self, dim: int, eps: float, *, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.use_kernel = True  # on CUDA, inference runs dgemma.ops.norm (False: the torch ops below)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and kernels_apply(x):
            from dgemma.ops.norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        # pow(-0.5) rather than rsqrt: the reference does the same, for parity across compilers.
        out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, head_dim / 2 of them; 'proportional' rotates a leading share and pads with 0."""
    if spec.rope_type == "default":  # (the reference's default RoPE ignores `factor`)
        return 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    # proportional: the exponent's denominator is the whole head_dim, unrotated pairs get frequency 0
    angles = int(spec.partial_rotary_factor * head_dim // 2)
    rotated = 1.0 / (spec.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float) / head_dim))
    return torch.cat([rotated, torch.zeros(head_dim // 2 - angles)]) / spec.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, T, E] for integer positions [B, T]."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, E]; cos/sin [B, T, E]. Rotates pairs (i, i + E/2)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class PackedLinears:
    """Bias-free projections of one input (q|k|v, gate|up) as row blocks of one weight, so inference
    runs one GEMM instead of several (at one canvas each small GEMM reads its weights well below the
    memory's rate). The modules' weights become views of the block: loading, training and adapters
    still see their own parameters, and the values are unchanged. A weight re-pointed since (`.to()`,
    a new Parameter) or hooked (LoRA) makes `weight()` None, and the caller falls back to the separate
    GEMMs (the block is then dropped)."""

    def __init__(self, modules: Sequence[nn.Linear]):
        self.modules = list(modules)
        self.sizes = [m.weight.shape[0] for m in self.modules]
        self.block: torch.Tensor | None = torch.cat([m.weight.detach() for m in self.modules])
        start = 0
        for m, n in zip(self.modules, self.sizes):
            m.weight.data = self.block[start : start + n]
            start += n

    def weight(self) -> torch.Tensor | None:
        """The block, while every module's weight is still its view and none is hooked."""
        if self.block is None:
            return None
        at, row = self.block.data_ptr(), self.block.shape[1] * self.block.element_size()
        for m, n in zip(self.modules, self.sizes):
            if m._forward_hooks or m.weight.data_ptr() != at or m.weight.dtype != self.block.dtype:
                if not m._forward_hooks:
                    self.block = None  # re-pointed for good: free the old storage
                return None
            at += n * row
        return self.block

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each module's output, from one GEMM (views into its output), or None (see `weight`)."""
        weight = self.weight()
        return None if weight is None else list(F.linear(x, weight).split(self.sizes, dim=-1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the dense branch of every layer and the self-conditioning block."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)
        self.act_name = act
        self.use_kernel = True  # on CUDA, inference takes act(gate) * up in one kernel (dgemma.ops.norm)
        self.packed: PackedLinears | None = None  # gate|up as one GEMM (`pack`)

    def pack(self) -> None:
        """gate and up as one weight block (`PackedLinears`), for the kernels' inference."""
        self.packed = PackedLinears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.use_kernel and self.act_name in KERNEL_ACTIVATIONS and kernels_apply(x)
        both = self.packed(x) if fused and self.packed is not None else None
        gate, up = both if both is not None else (self.gate_proj(x), self.up_proj(x))
        if fused:
            from dgemma.ops.norm import gated

            return self.down_proj(gated(gate, up, self.act_name))
        return self.down_proj(self.act(gate) * up)


class Router(nn.Module):
    """Top-k routing on the raw residual: scale-free RMSNorm * scale * D^-0.5, fp32 softmax, renormalised
    top-k weights times `per_expert_scale[idx]`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))
        self.top_k = top_k
        self.root = hidden**-0.5
        self.use_kernel = True  # on CUDA, inference routes in one kernel (dgemma.ops.moe.route)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(self.norm(x_ND) * self.scale * self.root)

    def route(self, h_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, index) [N, K] from the router's input already normed and scaled."""
        if self.use_kernel and kernels_apply(h_ND):
            from dgemma.ops.moe import route

            return route(self.proj(h_ND), self.per_expert_scale, self.top_k)
        probs_NX = F.softmax(self.proj(h_ND), dim=-1, dtype=torch.float32)
        weights_NK, index_NK = torch.topk(probs_NX, k=self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return weights_NK * self.per_expert_scale[index_NK], index_NK


class Experts(nn.Module):
    """Fused expert weights: gate_up_proj [X, 2I, D], down_proj [X, D, I] (the checkpoint's layout).

    `quantize_()` stores them in FP8 with float32 scales per output channel, gate_up_scale [X, 2I] and
    down_scale [X, D] (dgemma.model.quant; inference only)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        # set by quantize_ (not in the checkpoint: quantization happens at load time)
        self.register_buffer("gate_up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)
        # with FP8 weights: the gate-up projection's input in FP8 too, a scale per token
        self.fp8_activations = False
        self.act = activation(act)
        self.act_name = act
        # LoRA on the experts (dgemma.train.lora) sets this: () -> (gate_up delta, down delta) or None
        self.weight_delta = None
        # on CUDA, inference runs the grouped Triton kernels (dgemma.ops.moe); False forces this file's
        # loop (the spec the kernels are checked against)
        self.use_kernel = True

    @property
    def quantized(self) -> bool:
        return self.gate_up_scale is not None

    def quantize_(self) -> None:
        """Store both weights in FP8 with per-output-channel scales, in place (on the meta device: the
        storage only, for a checkpoint to fill through `load_weight`)."""
        from dgemma.model.quant import FP8, quantize_fp8

        if self.quantized:
            return
        if self.weight_delta is not None:
            raise ValueError("the experts carry LoRA adapters: merge them before quantizing")
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            if w.is_meta:
                q = torch.empty_like(w, dtype=FP8)
                scale = torch.empty(w.shape[:2], dtype=torch.float32, device="meta")
            else:
                q, scale = quantize_fp8(w.detach())
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, name.replace("_proj", "_scale"), scale)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Set `gate_up_proj` or `down_proj` from a checkpoint tensor (quantized here if the experts are)."""
        param = getattr(self, name)
        if not self.quantized:
            param.data.copy_(tensor)
            return
        from dgemma.model.quant import quantize_fp8

        _, scale = quantize_fp8(tensor, out=param.data)
        getattr(self, name.replace("_proj", "_scale")).copy_(scale)

    def terms(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, index_NK: torch.Tensor) -> torch.Tensor:
        """The kernels' weight * expert output of each (token, expert) pair [N, K, D], before the sum
        over K (where `kernel_applies`)."""
        from dgemma.model.quant import quantize_rows
        from dgemma.ops.moe import moe

        x_scale, out_dtype = None, x_ND.dtype
        if self.fp8_activations:
            x_ND, x_scale = quantize_rows(x_ND)
        return moe(
            x_ND,
            self.gate_up_proj,
            self.down_proj,
            weights_NK,
            index_NK,
            activation=self.act_name,
            summed=False,
            gate_up_scale=self.gate_up_scale,
            down_scale=self.down_scale,
            x_scale=x_scale,
            out_dtype=out_dtype,
        )

    def kernel_applies(self, x_ND: torch.Tensor) -> bool:
        return (
            self.use_kernel
            and self.weight_delta is None
            and self.act_name in KERNEL_ACTIVATIONS
            and kernels_apply(x_ND)
        )

    def forward(
        self, x_ND: torch.Tensor, weights_NK: torch.Tensor, index_NK: torch.Tensor, *, num_rows: int = 1
    ) -> torch.Tensor:
        """Sum over each token's top-k experts of weight * down(act(gate) * up).

        Tokens are grouped by (expert, row): a row's matmuls then have the same shapes whatever else is
        in the batch. BLAS takes other code paths for tiny matrices, so grouping tokens of several rows
        into one matmul would make a seeded request's numbers depend on its neighbours."""
        if self.kernel_applies(x_ND):
            return self.terms(x_ND, weights_NK, index_NK).sum(1)
        if self.quantized and (torch.is_grad_enabled() or self.weight_delta is not None):
            raise RuntimeError(
                "FP8 experts are for inference: train (or apply LoRA to) the unquantized model"
            )
        out_ND = torch.zeros_like(x_ND)
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        delta = self.weight_delta() if self.weight_delta is not None else None
        if delta is not None:
            gate_up_proj = gate_up_proj + delta[0].to(gate_up_proj.dtype)
            down_proj = down_proj + delta[1].to(down_proj.dtype)
        x_q = x_scale = None
        if self.fp8_activations:
            from dgemma.model.quant import quantize_rows

            x_q, x_scale = quantize_rows(x_ND)
        num_tokens, top_k = index_NK.shape
        row_of_token = torch.arange(num_tokens, device=x_ND.device) // (num_tokens // num_rows)
        group = (index_NK * num_rows + row_of_token[:, None]).reshape(-1)
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=gate_up_proj.shape[0] * num_rows).tolist()
        token_of = order // top_k
        flat_weights = weights_NK.reshape(-1)
        start = 0
        for key, count in enumerate(counts):
            if count == 0:
                continue
            expert = key // num_rows
            sel = order[start : start + count]
            tokens = token_of[start : start + count]
            start += count
            if x_q is None:
                gate_up = self._project(x_ND[tokens], gate_up_proj, self.gate_up_scale, expert)
            else:
                gate_up = self._project(
                    x_q[tokens], gate_up_proj, self.gate_up_scale, expert, x_scale[tokens], x_ND.dtype
                )
            gate, up = gate_up.chunk(2, dim=-1)
            y = self._project(self.act(gate) * up, down_proj, self.down_scale, expert)
            # weights are fp32 (router softmax); multiply there, then cast, as the reference does
            out_ND.index_add_(0, tokens, (y * flat_weights[sel, None]).to(out_ND.dtype))
        return out_ND

    @staticmethod
    def _project(x, w_XOI, scale_XO, expert: int, x_scale_N=None, dtype=None) -> torch.Tensor:
        """x @ w[expert]^T in x's dtype (or `dtype`); FP8 weights: in float32 times the output channels'
        scales, and FP8 x (x_scale_N) times each token's scale, then rounded once (where the kernel
        rounds)."""
        if scale_XO is None:
            return F.linear(x, w_XOI[expert])
        y = F.linear(x.float(), w_XOI[expert].float()) * scale_XO[expert]
        if x_scale_N is not None:
            y = y * x_scale_N[:, None]
        return y.to(dtype or x.dtype)
