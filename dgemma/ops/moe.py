"""The experts as two grouped Triton matmuls (the pure-torch spec is `Experts.forward` in model/layers.py).

Shape legend: N tokens, K top-k, P = N * K (token, expert) pairs, X experts, D hidden, I expert
intermediate, S pair slots (each expert's pairs padded to a multiple of BLOCK_M).

  1. `align` (two small Triton kernels, no host synchronisation, so it can be captured in a CUDA graph):
     group the pairs by expert and pad each expert's run to whole BLOCK_M blocks; every block belongs
     to one expert.
  2. gate-up kernel: per (block, I tile), x[tokens] @ gate_e^T and @ up_e^T, then act(gate) * up -> h [S, I].
  3. down kernel: per (block, D tile), h @ down_e^T times the routing weight -> y [P, D], one row per pair.
  4. out = y.view(N, K, D).sum(1): a fixed order, no atomics, so the result is deterministic (or the
     caller sums the terms in a kernel of its own: the layer's `ff_combine`).

At one 256-token canvas every expert sees ~16 tokens, so the kernels are weight-streaming: each block
reads its expert's weight tiles once and the grid keeps an expert's blocks adjacent (they share the
tiles in L2). Intermediate values are rounded to the weight dtype where the reference rounds them.

FP8 (e4m3) weights (`dgemma.model.quant`) are read as they are stored, half the bytes, converted to
the activations' dtype in registers (exactly: e4m3 values are bf16 values), and each projection's fp32
accumulator is multiplied by its output channel's scale before the first rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("gelu_pytorch_tanh", "silu")
# as dgemma.model.quant stores them (ops sit below the model: tests/test_boundaries.py)
FP8_DTYPES = (torch.float8_e4m3fn,)


@dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """Tile sizes and pipelining of both kernels (benchmarks sweep these). Both share block_m (the
    alignment of the pairs); the down kernel's other settings default to the gate-up kernel's."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False  # weights as the left operand (see _tile_dot)
    group_m: int = 0  # the order programs start in (see _tile_of); 0: a tile column of all blocks at once
    down_block_k: int = 64
    down_block_n: int | None = None
    down_num_warps: int | None = None
    down_num_stages: int | None = None
    down_swap_ab: bool | None = None
    down_group_m: int | None = None
    # FP8 weights with bf16 activations on CUDA: widened by integer ops (_e4m3_to_bf16); False: Triton's cast
    fast_widen: bool = True

    def down(self) -> dict:
        """The down kernel's block_n, num_warps, num_stages, swap_ab and group_m."""
        return {
            "block_n": self.down_block_n or self.block_n,
            "num_warps": self.down_num_warps or self.num_warps,
            "num_stages": self.down_num_stages or self.num_stages,
            "swap_ab": self.swap_ab if self.down_swap_ab is None else self.down_swap_ab,
            "group_m": self.group_m if self.down_group_m is None else self.down_group_m,
        }


def default_config(
    num_pairs: int,
    num_experts: int,
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    fp8_activations: bool = False,
) -> MoeConfig:
    """Tiles for about the tokens each expert sees, from the H100 sweep of `dgemma bench --sections
    moe` (bench/results/2026-11-22_h100_fused_commit_moe_sweep.json): 16 at one 256-token canvas
    (weight streaming); 32, 64 and 128 at 2, 4 and 8 canvases (closer to compute-bound: taller blocks,
    a wider down tile). float32 tiles are twice the bytes: shallower ones fit in shared memory. FP8
    weights (`weight_dtype`) have tiles of their own: the widening in registers moves the optimum; and
    with FP8 activations as well (FP8 x FP8 gate-up), many tokens take other tiles again.

    The orders (`group_m`, `down_group_m`) come from `bench/moe_order_sweep.py`
    (bench/results/2026-11-23_h100_moe_order_sweep.json, and ..._fp8.json for FP8 at 8 canvases):
    starting every tile of a few blocks together reads each block's input once, which the down kernel
    feels most (its input h is otherwise read again for each output column): one bf16 layer at 2048
    tokens 0.91 -> 0.77 ms. At one canvas the FP8 kernels keep the old order: the sweep's faster down
    order did not show in the engine's step."""
    if dtype == torch.float32:
        return MoeConfig(block_m=16, block_n=64, block_k=64, num_stages=3)
    per_expert = num_pairs / num_experts
    if weight_dtype in FP8_DTYPES:  # their own sweep (bench/results/2026-11-22_h100_fp8_sweep.json)
        if fp8_activations and per_expert > 96:  # FP8 x FP8 gate-up (2026-11-22_h100_fp8_w8a8.json)
            return MoeConfig(
                block_m=64,
                block_n=64,
                block_k=128,
                num_stages=3,
                down_block_n=256,
                down_num_warps=8,
                down_num_stages=3,
            )
        if per_expert <= 24:
            return MoeConfig(block_m=32, block_n=64, block_k=128, down_block_k=128)
        if per_expert <= 48:
            return MoeConfig(block_m=32, block_n=64, block_k=128, down_block_k=64)
        if per_expert <= 96:
            return MoeConfig(block_m=64, block_n=64, block_k=64, down_block_n=128, down_num_warps=8)
        return MoeConfig(
            block_m=128, block_n=64, block_k=64, group_m=16, down_block_n=256, down_num_warps=8,
            down_num_stages=3, down_group_m=1,
        )  # fmt: skip
    if per_expert <= 24:
        return MoeConfig(block_m=16, group_m=1, down_group_m=4)
    if per_expert <= 48:
        return MoeConfig(block_m=32, num_stages=5, swap_ab=True, group_m=1, down_num_stages=4, down_group_m=4)
    if per_expert <= 96:
        return MoeConfig(block_m=64, block_k=64, group_m=1, down_group_m=4)
    return MoeConfig(
        block_m=128, block_n=128, block_k=64, num_warps=8, group_m=2, down_block_n=256, down_num_stages=3,
        down_group_m=1,
    )  # fmt: skip


ALIGN_BLOCK = 128  # pairs (and blocks) an align program handles


@triton.jit
def _route_kernel(
    logits_ptr, scale_ptr, weights_ptr, index_ptr, num_experts, stride_ln,
    K: tl.constexpr, KB: tl.constexpr, XB: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)  # one token
    ex = tl.arange(0, XB)
    real = ex < num_experts
    logits = tl.load(logits_ptr + n.to(tl.int64) * stride_ln + ex, mask=real, other=float("-inf"))
    logits = logits.to(tl.float32)
    e = tl.where(real, tl.exp(logits - tl.max(logits, 0)), 0.0)
    probs = tl.where(real, e / tl.sum(e, 0), -1.0)
    ks = tl.arange(0, KB)
    top = tl.zeros((KB,), dtype=tl.float32)
    top_index = tl.zeros((KB,), dtype=tl.int32)
    for k in tl.static_range(K):  # the K largest, largest first (as torch.topk returns them)
        best = tl.max(probs, 0)
        at = tl.min(tl.where(probs == best, ex, XB), 0)  # the lowest index among equals
        top = tl.where(ks == k, best, top)
        top_index = tl.where(ks == k, at, top_index)
        probs = tl.where(ex == at, -1.0, probs)
    chosen = ks < K
    total = tl.sum(tl.where(chosen, top, 0.0), 0)
    scale = tl.load(scale_ptr + top_index, mask=chosen, other=0.0).to(tl.float32)
    tl.store(weights_ptr + n.to(tl.int64) * K + ks, top / total * scale, mask=chosen)
    tl.store(index_ptr + n.to(tl.int64) * K + ks, top_index.to(tl.int64), mask=chosen)


def route(
    logits_NX: torch.Tensor, per_expert_scale_X: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its projection, in one kernel (`Router.route` is the spec): float32 softmax
    over the experts, the top_k largest (largest first), renormalised to sum to 1, times each chosen
    expert's scale. Returns (weights [N, K] float32, index [N, K] int64)."""
    num_tokens, num_experts = logits_NX.shape
    logits_NX = logits_NX.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits_NX.device)
    index = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits_NX.device)
    _route_kernel[(num_tokens,)](
        logits_NX, per_expert_scale_X, weights, index, num_experts, logits_NX.stride(0),
        K=top_k, KB=triton.next_power_of_2(top_k), XB=triton.next_power_of_2(num_experts), num_warps=1,
    )  # fmt: skip
    return weights, index


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
def activate(x, ACT: tl.constexpr):
    """The activation ACT ("gelu_pytorch_tanh" or "silu") of x, in x's float dtype (also used by the
    dense MLP's glue, dgemma.ops.norm.gated)."""
    if ACT == "gelu_pytorch_tanh":
        # gelu(x, tanh) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)), the same function as
        # 0.5 x (1 + tanh(...)) without a tanh instruction
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(block, output tile) of program `pid` of a 1-D grid of num_m * num_n. The GPU starts programs
    in pid order, so this sets which tiles are in flight together. GROUP_M = 0: one tile column of
    every block, then the next (neighbouring blocks share their expert's weight tile in L2, while
    the blocks' inputs are read once per column); GROUP_M = g: every tile of g blocks, then the next
    g (a block's input is read once while hot; its expert's weight tiles stream past)."""
    if GROUP_M == 0:
        return pid % num_m, pid // num_m
    per_group = GROUP_M * num_n
    first = pid // per_group * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    return first + pid % per_group % size, pid % per_group // size


@triton.jit
def _e4m3_to_bf16(w):
    """e4m3 -> bf16 exactly, four values per instance in integer ops and one packed multiply.

    Triton's own conversion goes e4m3 -> f16 -> bf16, three conversion instructions per two values:
    the conversion units then bound the FP8 kernels below the memory's rate. Here each e4m3 byte
    (s eeee mmm) moves to the top byte of a bf16 half, its exponent and mantissa shift right by 4 into
    bf16's fields (exponent bias 127 instead of 7), and a bf16 multiply by 2^120 restores the value;
    subnormal e4m3 values become subnormal bf16 values that the multiply scales exactly too."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, k;
        mov.b32 k, 0x7B807B80;
        prmt.b32 $0, $2, 0, 0x1404;
        shr.b32 t, $0, 4;
        and.b32 t, t, 0x07F007F0;
        lop3.b32 $0, t, $0, 0x80008000, 0xF8;
        mul.rn.bf16x2 $0, $0, k;
        prmt.b32 $1, $2, 0, 0x3424;
        shr.b32 t, $1, 4;
        and.b32 t, t, 0x07F007F0;
        lop3.b32 $1, t, $1, 0x80008000, 0xF8;
        mul.rn.bf16x2 $1, $1, k;
        }""",
        constraints="=r,=r,r",
        args=[w.to(tl.uint8, bitcast=True)],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _tile_dot(
    a_ptrs, b_ptrs, a_mask, b_mask, acc, SWAP_AB: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr
):
    """acc += a @ b, or with SWAP_AB (acc transposed) acc += b^T @ a^T: the weight tile becomes the
    left operand, whose 64+ rows let Hopper use its warpgroup MMA when tokens are few. WIDEN: the FP8
    weights widened by `_e4m3_to_bf16` (bf16 activations, compiled kernels) instead of Triton's cast."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if WIDEN:  # noqa: SIM108 (a constexpr branch: the interpreter must not see the assembly)
        b = _e4m3_to_bf16(b)
    else:
        b = b.to(a.dtype)  # FP8 weights: exact in bf16 and fp32
    if SWAP_AB:
        return tl.dot(b, a, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gate_up_kernel(
    x_ptr, x_scale_ptr, w_ptr, scale_ptr, h_ptr, pair_ptr, block_expert_ptr,
    num_pairs, top_k, D, I, num_experts,
    stride_xn, stride_we, stride_wq, stride_hs,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr, X_SCALED: tl.constexpr,
    GROUP_M: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.num_programs(0) // num_n, num_n, GROUP_M)
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
        acc_g = _tile_dot(x_ptrs, g_ptrs, x_mask, w_mask, acc_g, SWAP_AB, PRECISION, WIDEN)
        acc_u = _tile_dot(x_ptrs, u_ptrs, x_mask, w_mask, acc_u, SWAP_AB, PRECISION, WIDEN)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if SCALED:  # FP8 weights: one scale per output channel, [X, 2I] (gate rows, then up rows)
        s_g = tl.load(scale_ptr + expert * 2 * I + offs_n, mask=n_ok, other=0.0)
        s_u = tl.load(scale_ptr + expert * 2 * I + I + offs_n, mask=n_ok, other=0.0)
        if SWAP_AB:
            acc_g *= s_g[:, None]
            acc_u *= s_u[:, None]
        else:
            acc_g *= s_g[None, :]
            acc_u *= s_u[None, :]
    if X_SCALED:  # FP8 activations: one scale per token
        s_x = tl.load(x_scale_ptr + token, mask=valid, other=0.0)
        if SWAP_AB:
            acc_g *= s_x[None, :]
            acc_u *= s_x[None, :]
        else:
            acc_g *= s_x[:, None]
            acc_u *= s_x[:, None]
    dtype = h_ptr.dtype.element_ty
    # the reference rounds the projection, the activation and the product to the weight dtype
    gate = acc_g.to(dtype).to(tl.float32)
    up = acc_u.to(dtype).to(tl.float32)
    h = (activate(gate, ACT).to(dtype).to(tl.float32) * up).to(dtype)
    if SWAP_AB:
        tl.store(h_ptr + offs_m[None, :].to(tl.int64) * stride_hs + offs_n[:, None], h, mask=n_ok[:, None])
    else:
        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_hs + offs_n[None, :], h, mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, scale_ptr, y_ptr, pair_ptr, block_expert_ptr, route_ptr,
    num_pairs, D, I, num_experts,
    stride_hs, stride_we, stride_wd, stride_yp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr, GROUP_M: tl.constexpr,
    WIDEN: tl.constexpr,
):  # fmt: skip
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.num_programs(0) // num_n, num_n, GROUP_M)
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
                h_ptrs, w_ptrs, k_ok[:, None], n_ok[:, None] & k_ok[None, :], acc, SWAP_AB, PRECISION, WIDEN
            )
        else:
            acc = _tile_dot(
                h_ptrs, w_ptrs, k_ok[None, :], k_ok[:, None] & n_ok[None, :], acc, SWAP_AB, PRECISION, WIDEN
            )
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALED:  # FP8 weights: one scale per output channel, [X, D]
        s_d = tl.load(scale_ptr + expert * D + offs_n, mask=n_ok, other=0.0)
        if SWAP_AB:
            acc *= s_d[:, None]
        else:
            acc *= s_d[None, :]
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
    summed: bool = True,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sum_k weights[n, k] * down_e(act(gate_e x_n) * up_e x_n) over each token's experts e = index[n, k]
    [N, D]; with summed=False the terms themselves [N, K, D] (a caller that sums them in a later
    kernel saves a pass). FP8 weights come with their per-output-channel scales, gate_up_scale [X, 2I]
    and down_scale [X, D] (`dgemma.model.quant`). x itself may be FP8 too, with x_scale [N] (a scale
    per token, `dgemma.model.quant.quantize_rows`): the gate-up projection then multiplies on the FP8
    tensor cores and its output, like everything after it, is in `out_dtype`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"the MoE kernel supports activations {ACTIVATIONS}, not {activation!r}")
    num_tokens, top_k = index_NK.shape
    cfg = config or default_config(
        num_tokens * top_k, gate_up_XQD.shape[0], out_dtype or x_ND.dtype, gate_up_XQD.dtype,
        fp8_activations=x_scale is not None,
    )  # fmt: skip
    slots = align(index_NK, gate_up_XQD.shape[0], cfg.block_m)
    h_SI = gate_up(
        x_ND, gate_up_XQD, slots, top_k, activation=activation, config=cfg, scale=gate_up_scale,
        x_scale=x_scale, out_dtype=out_dtype,
    )  # fmt: skip
    y_NKD = down(h_SI, down_XDI, slots, weights_NK, config=cfg, scale=down_scale).view(num_tokens, top_k, -1)
    return y_NKD.sum(1) if summed else y_NKD


def _check_slots(slots: tuple[torch.Tensor, torch.Tensor], config: MoeConfig) -> None:
    pair_of_slot, block_expert = slots
    if pair_of_slot.numel() != block_expert.numel() * config.block_m:
        raise ValueError(
            f"the pair slots were aligned to blocks of {pair_of_slot.numel() // block_expert.numel()}, "
            f"the config's block_m is {config.block_m}"
        )


def _launch(
    dtype: torch.dtype, *, widen: bool, num_warps: int, num_stages: int, swap_ab: bool, group_m: int
) -> dict:
    # float32 models multiply in full float32 (Triton's default for float32 is TF32)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return {
        "num_warps": num_warps, "num_stages": num_stages, "SWAP_AB": swap_ab, "PRECISION": precision,
        "GROUP_M": group_m, "WIDEN": widen,
    }  # fmt: skip


def _widens(config: MoeConfig, weight: torch.Tensor, inputs: torch.Tensor) -> bool:
    """Whether the kernel widens FP8 weights with `_e4m3_to_bf16`: bf16 inputs, and a compiled kernel
    (inline assembly does not run under TRITON_INTERPRET on the CPU)."""
    return (
        config.fast_widen and weight.dtype in FP8_DTYPES and inputs.dtype == torch.bfloat16 and inputs.is_cuda
    )


def _scale_arg(weight: torch.Tensor, scale: torch.Tensor | None, channels: int) -> torch.Tensor:
    """The kernel's scale operand: FP8 weights need their [X, channels] float32 scales; others none
    (the weight itself is passed in its place, never read)."""
    if weight.dtype in FP8_DTYPES:
        if scale is None or tuple(scale.shape) != (weight.shape[0], channels) or scale.dtype != torch.float32:
            raise ValueError(
                f"FP8 expert weights need float32 scales [{weight.shape[0]}, {channels}], got "
                f"{None if scale is None else (list(scale.shape), scale.dtype)}"
            )
        return scale.contiguous()
    if scale is not None:
        raise ValueError(f"scales go with FP8 weights, not {weight.dtype}")
    return weight


def gate_up(
    x_ND: torch.Tensor,
    gate_up_XQD: torch.Tensor,
    slots: tuple[torch.Tensor, torch.Tensor],
    top_k: int,
    *,
    activation: str,
    config: MoeConfig,
    scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """h [S, I] = act(x @ gate_e^T) * (x @ up_e^T) per pair slot of `align`'s (pair_of_slot, block_expert);
    FP8 weights with their scales [X, 2I]; FP8 x with its scales [N] (then h is in `out_dtype`)."""
    _check_slots(slots, config)
    pair_of_slot, block_expert = slots
    x_ND, gate_up_XQD = x_ND.contiguous(), gate_up_XQD.contiguous()
    num_experts, twice_i, hidden = gate_up_XQD.shape
    inter, cfg = twice_i // 2, config
    scale_arg = _scale_arg(gate_up_XQD, scale, twice_i)
    out_dtype = out_dtype or x_ND.dtype
    if (x_ND.dtype in FP8_DTYPES) != (x_scale is not None) or (x_scale is not None and scale is None):
        raise ValueError("FP8 activations need their per-token x_scale, and go with FP8 weights")
    h_SI = torch.empty(pair_of_slot.numel(), inter, device=x_ND.device, dtype=out_dtype)
    _gate_up_kernel[(block_expert.numel() * triton.cdiv(inter, cfg.block_n),)](
        x_ND, x_ND if x_scale is None else x_scale.contiguous(), gate_up_XQD, scale_arg, h_SI,
        pair_of_slot, block_expert,
        x_ND.shape[0] * top_k, top_k, hidden, inter, num_experts,
        x_ND.stride(0), gate_up_XQD.stride(0), gate_up_XQD.stride(1), h_SI.stride(0),
        ACT=activation, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SCALED=scale is not None, X_SCALED=x_scale is not None,
        **_launch(
            out_dtype, widen=_widens(cfg, gate_up_XQD, x_ND), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, swap_ab=cfg.swap_ab, group_m=cfg.group_m,
        ),
    )  # fmt: skip
    return h_SI


def down(
    h_SI: torch.Tensor,
    down_XDI: torch.Tensor,
    slots: tuple[torch.Tensor, torch.Tensor],
    weights_NK: torch.Tensor,
    *,
    config: MoeConfig,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [P, D] = weight of the pair * (h @ down_e^T), one row per (token, expert) pair; FP8 weights
    with their scales [X, D]."""
    _check_slots(slots, config)
    pair_of_slot, block_expert = slots
    down_XDI = down_XDI.contiguous()
    num_experts, hidden, inter = down_XDI.shape
    num_pairs = weights_NK.numel()
    tiles = config.down()
    scale_arg = _scale_arg(down_XDI, scale, hidden)
    y_PD = torch.empty(num_pairs, hidden, device=h_SI.device, dtype=h_SI.dtype)
    route_P = weights_NK.reshape(-1).float().contiguous()
    _down_kernel[(block_expert.numel() * triton.cdiv(hidden, tiles["block_n"]),)](
        h_SI, down_XDI, scale_arg, y_PD, pair_of_slot, block_expert, route_P,
        num_pairs, hidden, inter, num_experts,
        h_SI.stride(0), down_XDI.stride(0), down_XDI.stride(1), y_PD.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=tiles["block_n"], BLOCK_K=config.down_block_k,
        SCALED=scale is not None,
        **_launch(
            h_SI.dtype, widen=_widens(config, down_XDI, h_SI),
            **{k: tiles[k] for k in ("num_warps", "num_stages", "swap_ab", "group_m")},
        ),
    )  # fmt: skip
    return y_PD
