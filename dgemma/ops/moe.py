"""The experts as two grouped Triton matmuls (the pure-torch spec is `Experts.forward` in model/layers.py).

Shape legend: N tokens, K top-k, P = N * K (token, expert) pairs, X experts, D hidden, I expert
intermediate, S pair slots (each expert's pairs padded to a multiple of BLOCK_M).

  1. `align` (two small Triton kernels, no host synchronisation, so it can be captured in a CUDA graph):
     group the pairs by expert and pad each expert's run to whole BLOCK_M blocks; every block belongs
     to one expert.
  2. gate-up kernel: per (block, I tile), x[tokens] @ gate_e^T and @ up_e^T, then act(gate) * up -> h [S, I].
  3. down kernel: per (block, D tile), h @ down_e^T times the routing weight -> y [P, D], one row per pair.
  4. out = y.view(N, K, D).sum(1): a fixed order, no atomics, so the result is deterministic.

At one 256-token canvas every expert sees ~16 tokens, so the kernels are weight-streaming: each block
reads its expert's weight tiles once and the grid keeps an expert's blocks adjacent (they share the
tiles in L2). Intermediate values are rounded to the weight dtype where the reference rounds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("gelu_pytorch_tanh", "silu")


@dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """Tile sizes and pipelining for both kernels (benchmarks sweep these)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False  # weights as the left operand (see _tile_dot)
    down_block_k: int = 64


def default_config(num_pairs: int, num_experts: int, dtype: torch.dtype = torch.bfloat16) -> MoeConfig:
    """Blocks of ~the tokens each expert sees: 16 at one canvas, up to 64 with several (measured on the
    H100: bench/results/). float32 tiles are twice the bytes: shallower ones fit in shared memory."""
    if dtype == torch.float32:
        return MoeConfig(block_m=16, block_n=64, block_k=64, num_stages=3)
    per_expert = num_pairs / num_experts
    if per_expert <= 24:
        return MoeConfig(block_m=16)
    return MoeConfig(block_m=64, block_n=128, block_k=64, num_warps=8)


ALIGN_BLOCK = 128  # pairs (and blocks) an align program handles


@triton.jit
def _count_kernel(index_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    expert = tl.load(index_ptr + offs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + expert, 1, mask=mask)


@triton.jit
def _place_kernel(
    index_ptr, counts_ptr, cursor_ptr, pair_of_slot_ptr, block_expert_ptr,
    num_pairs, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, XB: tl.constexpr,
):  # fmt: skip
    # every program derives the padded layout from the counts (a few hundred experts at most)
    ex = tl.arange(0, XB)
    real = ex < num_experts
    counts = tl.load(counts_ptr + ex, mask=real, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    expert = tl.load(index_ptr + offs, mask=mask, other=0)
    rank = tl.atomic_add(cursor_ptr + expert, 1, mask=mask)  # place within the expert's run
    start = tl.sum(tl.where(expert[:, None] == ex[None, :], padded_start[None, :], 0), axis=1)
    tl.store(pair_of_slot_ptr + start + rank, offs.to(tl.int32), mask=mask)
    # the expert of each block: how many runs end at or before its first slot (X past the last run)
    blocks = offs
    ends_before = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & real[None, :]
    tl.store(block_expert_ptr + blocks, tl.sum(ends_before.to(tl.int32), axis=1), mask=blocks < num_blocks)


def align(index_NK: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair_of_slot [S], block_expert [S / block_m]): slots hold pair ids grouped by expert, each
    expert's run padded to whole blocks with the sentinel P; blocks past the last expert's run get
    expert X. Two Triton kernels (count, then place with an atomic cursor per expert) instead of a sort:
    the order of pairs within an expert's run may vary, which changes no result (each pair's row is
    computed on its own and written to its own place)."""
    flat = index_NK.reshape(-1)
    num_pairs, device = flat.numel(), flat.device
    num_slots = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    num_blocks = num_slots // block_m
    counters = torch.zeros(2, num_experts, dtype=torch.int32, device=device)  # counts, cursors
    pair_of_slot = torch.full((num_slots,), num_pairs, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    _count_kernel[(triton.cdiv(num_pairs, ALIGN_BLOCK),)](flat, counters[0], num_pairs, BLOCK=ALIGN_BLOCK)
    grid = (triton.cdiv(max(num_pairs, num_blocks), ALIGN_BLOCK),)
    _place_kernel[grid](
        flat, counters[0], counters[1], pair_of_slot, block_expert, num_pairs, num_experts, num_blocks,
        BLOCK_M=block_m, BLOCK=ALIGN_BLOCK, XB=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return pair_of_slot, block_expert


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == "gelu_pytorch_tanh":
        # gelu(x, tanh) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)), the same function as
        # 0.5 x (1 + tanh(...)) without a tanh instruction
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _tile_dot(a_ptrs, b_ptrs, a_mask, b_mask, acc, SWAP_AB: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b, or with SWAP_AB (acc transposed) acc += b^T @ a^T: the weight tile becomes the
    left operand, whose 64+ rows let Hopper use its warpgroup MMA when tokens are few."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if SWAP_AB:
        return tl.dot(b, a, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, pair_ptr, block_expert_ptr,
    num_pairs, top_k, D, I, num_experts,
    stride_xn, stride_we, stride_wq, stride_hs,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)
    valid = pair < num_pairs
    token = tl.where(valid, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:  # x^T tiles [K, M], weight tiles [N, K] (rows of the weight: contiguous K)
        x_ptrs = x_ptr + token[None, :] * stride_xn + offs_k[:, None]
        g_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wq + offs_k[None, :]
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # x tiles [M, K], weight tiles [K, N]
        x_ptrs = x_ptr + token[:, None] * stride_xn + offs_k[None, :]
        g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wq + offs_k[:, None]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_ptrs = g_ptrs + I * stride_wq
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k + k0 < D
        if SWAP_AB:
            x_mask = k_ok[:, None] & valid[None, :]
            w_mask = n_ok[:, None] & k_ok[None, :]
        else:
            x_mask = valid[:, None] & k_ok[None, :]
            w_mask = k_ok[:, None] & n_ok[None, :]
        acc_g = _tile_dot(x_ptrs, g_ptrs, x_mask, w_mask, acc_g, SWAP_AB, PRECISION)
        acc_u = _tile_dot(x_ptrs, u_ptrs, x_mask, w_mask, acc_u, SWAP_AB, PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dtype = h_ptr.dtype.element_ty
    # the reference rounds the projection, the activation and the product to the weight dtype
    gate = acc_g.to(dtype).to(tl.float32)
    up = acc_u.to(dtype).to(tl.float32)
    h = (_activation(gate, ACT).to(dtype).to(tl.float32) * up).to(dtype)
    if SWAP_AB:
        tl.store(h_ptr + offs_m[None, :].to(tl.int64) * stride_hs + offs_n[:, None], h, mask=n_ok[:, None])
    else:
        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_hs + offs_n[None, :], h, mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, pair_ptr, block_expert_ptr, route_ptr,
    num_pairs, D, I, num_experts,
    stride_hs, stride_we, stride_wd, stride_yp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + offs_m)
    valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        h_ptrs = h_ptr + offs_m[None, :].to(tl.int64) * stride_hs + offs_k[:, None]
        w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wd + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hs + offs_k[None, :]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wd + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k + k0 < I
        if SWAP_AB:
            acc = _tile_dot(
                h_ptrs, w_ptrs, k_ok[:, None], n_ok[:, None] & k_ok[None, :], acc, SWAP_AB, PRECISION
            )
        else:
            acc = _tile_dot(
                h_ptrs, w_ptrs, k_ok[None, :], k_ok[:, None] & n_ok[None, :], acc, SWAP_AB, PRECISION
            )
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = y_ptr.dtype.element_ty
    # routing weights are fp32 (router softmax): multiply there, then round, as the reference does
    route = tl.load(route_ptr + pair, mask=valid, other=0.0)
    safe_pair = tl.where(valid, pair, 0).to(tl.int64)
    if SWAP_AB:
        y = acc.to(dtype).to(tl.float32) * route[None, :]
        y_ptrs = y_ptr + safe_pair[None, :] * stride_yp + offs_n[:, None]
        tl.store(y_ptrs, y.to(dtype), mask=valid[None, :] & n_ok[:, None])
    else:
        y = acc.to(dtype).to(tl.float32) * route[:, None]
        y_ptrs = y_ptr + safe_pair[:, None] * stride_yp + offs_n[None, :]
        tl.store(y_ptrs, y.to(dtype), mask=valid[:, None] & n_ok[None, :])


def moe(
    x_ND: torch.Tensor,
    gate_up_XQD: torch.Tensor,
    down_XDI: torch.Tensor,
    weights_NK: torch.Tensor,
    index_NK: torch.Tensor,
    *,
    activation: str = "gelu_pytorch_tanh",
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """sum_k weights[n, k] * down_e(act(gate_e x_n) * up_e x_n) over each token's experts e = index[n, k]."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"the MoE kernel supports activations {ACTIVATIONS}, not {activation!r}")
    num_tokens, hidden = x_ND.shape
    num_experts, twice_i, _ = gate_up_XQD.shape
    inter, top_k = twice_i // 2, index_NK.shape[1]
    num_pairs = num_tokens * top_k
    cfg = config or default_config(num_pairs, num_experts, x_ND.dtype)
    x_ND = x_ND.contiguous()
    gate_up_XQD, down_XDI = gate_up_XQD.contiguous(), down_XDI.contiguous()
    pair_of_slot, block_expert = align(index_NK, num_experts, cfg.block_m)
    num_blocks = block_expert.numel()
    h_SI = torch.empty(pair_of_slot.numel(), inter, device=x_ND.device, dtype=x_ND.dtype)
    y_PD = torch.empty(num_pairs, hidden, device=x_ND.device, dtype=x_ND.dtype)
    # float32 models multiply in full float32 (Triton's default for float32 is TF32)
    precision = "ieee" if x_ND.dtype == torch.float32 else "tf32"
    launch = {
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "SWAP_AB": cfg.swap_ab,
        "PRECISION": precision,
    }
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, cfg.block_n))](
        x_ND, gate_up_XQD, h_SI, pair_of_slot, block_expert,
        num_pairs, top_k, hidden, inter, num_experts,
        x_ND.stride(0), gate_up_XQD.stride(0), gate_up_XQD.stride(1), h_SI.stride(0),
        ACT=activation, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch,
    )  # fmt: skip
    route_P = weights_NK.reshape(-1).float().contiguous()
    _down_kernel[(num_blocks, triton.cdiv(hidden, cfg.block_n))](
        h_SI, down_XDI, y_PD, pair_of_slot, block_expert, route_P,
        num_pairs, hidden, inter, num_experts,
        h_SI.stride(0), down_XDI.stride(0), down_XDI.stride(1), y_PD.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.down_block_k, **launch,
    )  # fmt: skip
    return y_PD.view(num_tokens, top_k, hidden).sum(1)


def moe_grouped_mm(
    x_ND: torch.Tensor,
    gate_up_XQD: torch.Tensor,
    down_XDI: torch.Tensor,
    weights_NK: torch.Tensor,
    index_NK: torch.Tensor,
    *,
    activation: str = "gelu_pytorch_tanh",
) -> torch.Tensor:
    """The same function through torch's grouped GEMM (`torch._grouped_mm`, CUTLASS on Hopper): pairs
    sorted by expert, one grouped matmul per projection. No host synchronisation (graph-safe)."""
    num_tokens, hidden = x_ND.shape
    num_experts, top_k = gate_up_XQD.shape[0], index_NK.shape[1]
    flat = index_NK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x_ND.device)
    counts.scatter_add_(0, flat.to(torch.int32), torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x_sorted = x_ND[order // top_k]
    gate_up = torch._grouped_mm(x_sorted, gate_up_XQD.transpose(-2, -1), offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_pytorch_tanh" else F.silu(gate)
    y_sorted = torch._grouped_mm(act * up, down_XDI.transpose(-2, -1), offs=offsets)
    y_P = torch.empty_like(y_sorted)
    y_P[order] = (y_sorted * weights_NK.reshape(-1)[order, None]).to(y_sorted.dtype)
    return y_P.view(num_tokens, top_k, hidden).sum(1)
