"""RMSNorm as one Triton kernel (the spec is `RMSNorm.forward` in model/layers.py).

The pure-torch norm is six small kernels (cast, square, mean, add, power, multiply) at ~330 norms per
denoise step: latency, not bandwidth. One program normalises one row in registers. Below it, a layer's
glue fused: the norms and adds around the feed-forward blocks, the query and key norms with their
rotation, and (in the graph-captured denoise step) those with the new keys and values normed straight
into the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgemma.ops.moe import activate

GATED_BLOCK = 1024  # elements per program of `gated`


@triton.jit
def _normed(x, D, eps):
    """x * (mean(x^2) + eps)^-0.5 in float32 (masked lanes of x are 0)."""
    return x / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    y = _normed(x, D, eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _row_launch(d: int) -> dict:
    """One program per row of d values, held in registers: the block and the warps for it."""
    return {"BLOCK": triton.next_power_of_2(d), "num_warps": 4 if d <= 1024 else 8}


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
        **_row_launch(d),
    )
    return out.view(x.shape)


# -- a layer's glue, fused: each of these replaces several norms, adds and multiplies -----------------
# Every intermediate is rounded to the activations' dtype where the torch composition rounds it (each
# torch op returns a tensor of that dtype), so the fused kernels compute the same function.


@triton.jit
def _residual_norms_kernel(
    x_ptr, a_ptr, w_attn_ptr, w_ff1_ptr, w_ff2_ptr, router_scale_ptr,
    r_ptr, n1_ptr, n2_ptr, router_ptr, D, eps, root, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = r_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    w_attn = tl.load(w_attn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    attn = (_normed(a, D, eps) * w_attn).to(dtype).to(tl.float32)
    r = (x + attn).to(dtype).to(tl.float32)
    tl.store(r_ptr + row * D + offs, r.to(dtype), mask=mask)
    y = _normed(r, D, eps)
    w1 = tl.load(w_ff1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ff2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(router_scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(n1_ptr + row * D + offs, (y * w1).to(dtype), mask=mask)
    tl.store(n2_ptr + row * D + offs, (y * w2).to(dtype), mask=mask)
    h = (y.to(dtype).to(tl.float32) * scale).to(dtype).to(tl.float32) * root
    tl.store(router_ptr + row * D + offs, h.to(dtype), mask=mask)


def residual_norms(
    x: torch.Tensor,
    attn: torch.Tensor,
    w_attn: torch.Tensor,
    w_ff1: torch.Tensor,
    w_ff2: torch.Tensor,
    router_scale: torch.Tensor,
    root: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual after attention and the three norms of it that the feed-forward blocks read:
    r = x + norm(attn) * w_attn; (r, norm(r) * w_ff1, norm(r) * w_ff2, norm(r) * router_scale * root)."""
    d = x.shape[-1]
    x2, a2 = x.contiguous().view(-1, d), attn.contiguous().view(-1, d)
    r, n1, n2, h = (torch.empty_like(x2) for _ in range(4))
    _residual_norms_kernel[(x2.shape[0],)](
        x2, a2, w_attn, w_ff1, w_ff2, router_scale, r, n1, n2, h, d, eps, root,
        **_row_launch(d),
    )  # fmt: skip
    return tuple(t.view(x.shape) for t in (r, n1, n2, h))


@triton.jit
def _ff_combine_kernel(
    r_ptr, m_ptr, e_ptr, w_m_ptr, w_e_ptr, w_ptr, scalar_ptr, out_ptr, w_next_ptr, next_ptr,
    D, T, scalar_stride, eps, next_eps, K: tl.constexpr, NEXT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = out_ptr.dtype.element_ty
    m = tl.load(m_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.zeros((BLOCK,), dtype=tl.float32)
    # the experts' terms, summed in float32 and rounded once (as torch's sum); unrolled, so that all K
    # rows' loads are in flight together (a loop waited for each in turn)
    for k in tl.static_range(K):
        e += tl.load(e_ptr + (row * K + k) * D + offs, mask=mask, other=0.0).to(tl.float32)
    e = e.to(dtype).to(tl.float32)
    w_m = tl.load(w_m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w_e = tl.load(w_e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mixed = (_normed(m, D, eps) * w_m).to(dtype).to(tl.float32) + (_normed(e, D, eps) * w_e).to(dtype).to(
        tl.float32
    )
    mixed = mixed.to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    out = (r + (_normed(mixed, D, eps) * w).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    scalar = tl.load(scalar_ptr + (row % T) * scalar_stride).to(tl.float32)
    out = (out * scalar).to(dtype)
    tl.store(out_ptr + row * D + offs, out, mask=mask)
    if NEXT:  # the next norm of the output (the next layer's input norm), as _rms_norm_kernel computes it
        w_next = tl.load(w_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _normed(out.to(tl.float32), D, next_eps) * w_next
        tl.store(next_ptr + row * D + offs, y.to(dtype), mask=mask)


def ff_combine(
    r: torch.Tensor,
    mlp_out: torch.Tensor,
    experts_out: torch.Tensor,
    w_mlp: torch.Tensor,
    w_experts: torch.Tensor,
    w: torch.Tensor,
    scalar: torch.Tensor,
    eps: float,
    *,
    next_norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(r + norm(norm(mlp_out) * w_mlp + norm(experts) * w_experts) * w) * scalar, for r [B, T, D];
    experts_out is [B, T, D], or [B, T, K, D]: each token's K expert terms, summed here first. scalar
    holds one value, or one per position [T, 1] (a layer whose tokens mix the two modes). With
    next_norm = (weight, eps), also the RMSNorm of the result (what the next layer's input norm, or the
    final norm, computes from it), returned second: one kernel fewer a layer."""
    b, t, d = r.shape
    k = experts_out.shape[2] if experts_out.dim() == 4 else 1
    outs = [z.contiguous().view(-1, d) for z in (r, mlp_out, experts_out)]
    out = torch.empty_like(outs[0])
    flat = scalar.reshape(-1)
    if flat.numel() not in (1, t):
        raise ValueError(f"the layer scalar needs 1 or {t} values, got {flat.numel()}")
    w_next, next_eps = next_norm if next_norm is not None else (w, eps)
    normed = torch.empty_like(out) if next_norm is not None else out
    _ff_combine_kernel[(b * t,)](
        *outs, w_mlp, w_experts, w, flat, out, w_next, normed, d, t,
        0 if flat.numel() == 1 else flat.stride(0), eps, next_eps, K=k, NEXT=next_norm is not None,
        **_row_launch(d),
    )  # fmt: skip
    if next_norm is None:
        return out.view(r.shape)
    return out.view(r.shape), normed.view(r.shape)


@triton.jit
def _normed_rotated(
    x_ptr, x_rows, row_ok, w_ptr, cos_ptr, sin_ptr, token, E, eps, dtype: tl.constexpr, HALF: tl.constexpr
):  # fmt: skip
    """The rows of E values at offsets x_rows [R] of x (those with row_ok) normed, times w, rotated by
    the tables' row `token`, each step rounded to `dtype` where the torch composition rounds: float32
    (first half, second half), each [R, HALF], masked lanes 0. rotate_half pairs value i with i + E/2,
    so each half is read as one contiguous run (no gather of partners). The rows are heads of one
    token: they share the weight and the tables."""
    half = E // 2
    offs = tl.arange(0, HALF)
    lane_ok = offs < half
    mask = row_ok[:, None] & lane_ok[None, :]
    x_lo = tl.load(x_ptr + x_rows[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(x_ptr + x_rows[:, None] + half + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    inv = (1.0 / tl.sqrt((tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / E + eps))[:, None]
    # the weight's and the tables' rows loaded once per head, in the heads' own layout (loaded as one
    # row, the compiled kernel moved each through shared memory to broadcast it)
    same = (x_rows * 0)[:, None] + offs[None, :]
    w_lo = tl.load(w_ptr + same, mask=mask, other=0.0).to(tl.float32)
    w_hi = tl.load(w_ptr + half + same, mask=mask, other=0.0).to(tl.float32)
    y_lo = (x_lo * inv * w_lo).to(dtype).to(tl.float32)
    y_hi = (x_hi * inv * w_hi).to(dtype).to(tl.float32)
    table = token * E + same
    cos_lo = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + table + half, mask=mask, other=0.0).to(tl.float32)
    # y * cos + rotate_half(y) * sin, rotate_half(y) = (-y_hi, y_lo)
    lo = (y_lo * cos_lo).to(dtype).to(tl.float32) + (-y_hi * sin_lo).to(dtype).to(tl.float32)
    hi = (y_hi * cos_hi).to(dtype).to(tl.float32) + (y_lo * sin_hi).to(dtype).to(tl.float32)
    return lo, hi


def _token_rows(x_BTHE: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x laid out as the kernels read it, and its token stride: each (token, head) row of E values
    contiguous, heads E apart, tokens evenly apart over the batch (a view of one projection's output
    among others, as `PackedLinears` gives, qualifies as it is; anything else is copied)."""
    *_, h, e = x_BTHE.shape
    rows = _as_rows(x_BTHE, h * e)  # [B * T, H * E]: merges only where heads are E apart
    return rows, rows.stride(0)


def _head_launch(e: int, *head_counts: int) -> dict:
    """A program takes HEADS heads of one token (about 1024 values; at most the fewest heads given, so
    no block is mostly masked), each half row in one run of HALF lanes, eight values a thread: one
    program per (token, head) row made the norms' launches cost more than their bytes at thousands of
    tokens."""
    if e % 2:
        raise ValueError(f"rotary heads need an even head dim, got {e}")
    half = triton.next_power_of_2(e // 2)
    heads = min(max(1, 512 // half), triton.next_power_of_2(min(head_counts)))
    return {"HEADS": heads, "HALF": half, "num_warps": max(1, min(8, heads * half // 256))}


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, E, H, stride_t, eps, HEADS: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    blocks = tl.cdiv(H, HEADS)
    token = tl.program_id(0).to(tl.int64) // blocks  # one token's HEADS heads
    heads = tl.program_id(0) % blocks * HEADS + tl.arange(0, HEADS)
    ok = heads < H
    dtype = out_ptr.dtype.element_ty
    x_rows = token * stride_t + heads * E
    lo, hi = _normed_rotated(x_ptr, x_rows, ok, w_ptr, cos_ptr, sin_ptr, token, E, eps, dtype, HALF)
    _store_halves(out_ptr + (token * H + heads) * E, ok, lo, hi, E, HALF)


@triton.jit
def _store_halves(row_ptrs, row_ok, lo, hi, E, HALF: tl.constexpr):
    """Rows [R, E] from their halves [R, HALF], each row at its pointer (row_ptrs [R])."""
    offs = tl.arange(0, HALF)
    mask = row_ok[:, None] & (offs < E // 2)[None, :]
    ptrs = row_ptrs[:, None] + offs[None, :]
    tl.store(ptrs, lo.to(row_ptrs.dtype.element_ty), mask=mask)
    tl.store(ptrs + E // 2, hi.to(row_ptrs.dtype.element_ty), mask=mask)


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """apply_rope(norm(x) * weight, cos, sin) for x [B, T, H, E] and tables cos, sin [B, T, E]."""
    b, t, h, e = x.shape
    x2, stride_t = _token_rows(x)
    out = torch.empty(b, t, h, e, dtype=x.dtype, device=x.device)
    launch = _head_launch(e, h)
    _norm_rope_kernel[(b * t * triton.cdiv(h, launch["HEADS"]),)](
        x2, weight, cos.contiguous(), sin.contiguous(), out, e, h, stride_t, eps, **launch,
    )  # fmt: skip
    return out


@triton.jit
def _qkv_norms_kernel(
    q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, q_out_ptr, keys_ptr, values_ptr,
    rows_ptr, starts_ptr, T, H, K, E, q_stride_t, k_stride_t, v_stride_t, stride_r, stride_h, stride_s,
    q_eps, k_eps, v_eps, HEADS: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    q_blocks, kv_blocks = tl.cdiv(H, HEADS), tl.cdiv(K, HEADS)
    # B * T * q_blocks programs of query heads first, then B * T * kv_blocks of K/V heads
    q_programs = tl.num_programs(0) // (q_blocks + kv_blocks) * q_blocks
    dtype = q_ptr.dtype.element_ty  # the activations' (the cache may store another dtype)
    if pid < q_programs:  # HEADS query heads of one token, as _norm_rope_kernel
        token = pid // q_blocks
        heads = pid % q_blocks * HEADS + tl.arange(0, HEADS)
        ok = heads < H
        q_rows = token * q_stride_t + heads * E
        lo, hi = _normed_rotated(q_ptr, q_rows, ok, q_w_ptr, cos_ptr, sin_ptr, token, E, q_eps, dtype, HALF)
        _store_halves(q_out_ptr + (token * H + heads) * E, ok, lo.to(dtype), hi.to(dtype), E, HALF)
    else:  # HEADS K/V heads of one token, written at its row's cache position
        src = pid - q_programs
        token = src // kv_blocks  # b * T + t
        heads = src % kv_blocks * HEADS + tl.arange(0, HEADS)
        ok = heads < K
        b = token // T
        dst = (
            tl.load(rows_ptr + b).to(tl.int64) * stride_r
            + heads * stride_h
            + (tl.load(starts_ptr + b).to(tl.int64) + token % T) * stride_s
        )
        k_rows = token * k_stride_t + heads * E
        lo, hi = _normed_rotated(k_ptr, k_rows, ok, k_w_ptr, cos_ptr, sin_ptr, token, E, k_eps, dtype, HALF)
        _store_halves(keys_ptr + dst, ok, lo.to(dtype), hi.to(dtype), E, HALF)
        # the value norm (no scale), per head over both halves, as _normed
        offs = tl.arange(0, HALF)
        mask = ok[:, None] & (offs < E // 2)[None, :]
        v_ptrs = v_ptr + (token * v_stride_t + heads * E)[:, None] + offs[None, :]
        v_lo = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
        v_hi = tl.load(v_ptrs + E // 2, mask=mask, other=0.0).to(tl.float32)
        root = tl.sqrt((tl.sum(v_lo * v_lo, axis=1) + tl.sum(v_hi * v_hi, axis=1)) / E + v_eps)[:, None]
        _store_halves(values_ptr + dst, ok, (v_lo / root).to(dtype), (v_hi / root).to(dtype), E, HALF)


def qkv_norms(
    q_raw: torch.Tensor,
    k_raw: torch.Tensor,
    v_raw: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    weights: tuple[torch.Tensor, torch.Tensor],
    eps: tuple[float, float, float],
    keys: torch.Tensor,
    values: torch.Tensor,
    rows_B: torch.Tensor,
    starts_B: torch.Tensor,
) -> torch.Tensor:
    """The attention's norms in one kernel, with the new keys and values written straight into the
    cache. For q_raw [B, T, H, E], k_raw and v_raw [B, T, K, E] (v_raw may be k_raw itself; all may be
    views of one projection's output, `PackedLinears`), tables cos, sin [B, T, E], the query and key
    norms' `weights` and the three norms' `eps` (query, key, value): returns apply_rope(norm(q_raw) *
    wq, cos, sin) [B, T, H, E] and sets, at each row's positions starts_B[b] + t of cache row
    rows_B[b] in the layer's storage keys, values [rows, K, S, E], apply_rope(norm(k_raw) * wk, cos,
    sin) and norm(v_raw) (the value norm has no scale). Replaces two norm-and-rotate kernels, a norm
    and two indexed writes; rows and starts are device tensors (CUDA-graph safe)."""
    b, t, h, e = q_raw.shape
    kv = k_raw.shape[2]
    if (
        keys.stride(-1) != 1
        or keys.stride() != values.stride()
        or keys.shape[1] != kv
        or k_raw.shape[-1] != e
    ):
        raise ValueError(
            f"qkv_norms takes K/V storage [rows, {kv}, S, {e}] with the same strides, got "
            f"{tuple(keys.shape)} and {tuple(values.shape)}"
        )
    (q_raw, q_st), (k_raw, k_st), (v_raw, v_st) = (_token_rows(z) for z in (q_raw, k_raw, v_raw))
    q = torch.empty(b, t, h, e, dtype=q_raw.dtype, device=q_raw.device)
    launch = _head_launch(e, h, kv)
    blocks = triton.cdiv(h, launch["HEADS"]) + triton.cdiv(kv, launch["HEADS"])
    _qkv_norms_kernel[(b * t * blocks,)](
        q_raw, k_raw, v_raw, *weights, cos.contiguous(), sin.contiguous(), q, keys, values, rows_B,
        starts_B, t, h, kv, e, q_st, k_st, v_st, keys.stride(0), keys.stride(1), keys.stride(2), *eps,
        **launch,
    )  # fmt: skip
    return q


@triton.jit
def _gated_kernel(
    gate_ptr, up_ptr, out_ptr, n, I, stride_g, stride_u, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // I, offs % I  # gate and up rows may lie further apart than I (one GEMM's halves)
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    act = activate(gate, ACT).to(dtype).to(tl.float32)  # torch rounds the activation, then the product
    tl.store(out_ptr + offs, (act * up).to(dtype), mask=mask)


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up in one pass (the dense MLP's glue: two elementwise kernels in torch), for
    activation "gelu_pytorch_tanh" or "silu", each rounded to the inputs' dtype as torch rounds it.
    gate and up may be views with rows further apart than their width (`PackedLinears`)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gated takes gate and up of one shape and dtype, got {gate.shape} and {up.shape}")
    width = gate.shape[-1]
    gate_rows, up_rows = _as_rows(gate, width), _as_rows(up, width)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    _gated_kernel[(triton.cdiv(n, GATED_BLOCK),)](
        gate_rows, up_rows, out, n, width, gate_rows.stride(0), up_rows.stride(0), ACT=activation,
        BLOCK=GATED_BLOCK,
    )  # fmt: skip
    return out


def _as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as [rows, width] rows of contiguous values, evenly apart: a view where one exists, else a copy."""
    try:
        rows = x.view(-1, width)
    except RuntimeError:  # leading dims that do not merge
        rows = None
    return rows if rows is not None and rows.stride(1) == 1 else x.contiguous().view(-1, width)
