"""The canvas's attention over the cache, read in place (the spec is `Attention.denoise_static`'s
gather and masked SDPA call in model/attention.py), and the causal attention of an encode over its
prefix: the finished canvas in the fused commit (`Attention.commit_denoise_static`), a prompt
(`Attention.encode`).

Shape legend: B rows, C canvas tokens, H query heads, K key/value heads, G = H / K query heads per K/V
head, E head dim, S cache positions a row stores.

A row's visible keys are one run of its cache positions, [lo, hi): the prefix the layer shows the canvas
(a sliding layer its last `window - 1` positions) and the canvas's own K/V just past it. So the kernel
reads K and V where the cache keeps them (no gather, no mask tensor, no padded keys), and the G query
heads that share a K/V head are one block of G * C query rows. The run of keys can be split over several
programs (`Tiles.splits`), each with its own running max and sum, merged by a second kernel; with one
split (the shipped tiles: see `choose_tiles`) the first kernel writes the output itself. An encode's
queries (causal) narrow each program's run to the keys its rows may see and mask the rest per query: its
past and itself, within the window if sliding. Softmax scale 1.0 (q_norm and k_norm carry the scale),
float32 accumulation, the probabilities rounded to V's dtype for the second matmul (as flash attention
does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Tiles(NamedTuple):
    """How `attend_cache` cuts the work: folded query rows per program, keys per iteration, pipeline
    stages, warps, and the programs a row's run of keys is split over (1: no merge kernel)."""

    block_m: int
    block_n: int
    stages: int
    warps: int
    splits: int


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel's tiles fit in shared memory: up to 512 in 2-byte dtypes (the release's full
    layers), 256 in float32 (wider float32 heads keep the gather + SDPA path)."""
    return head_dim & (head_dim - 1) == 0 and head_dim * torch.finfo(dtype).bits // 8 <= 1024


def choose_tiles(head_dim: int, dtype: torch.dtype, blocks: int, folded_rows: int) -> Tiles:
    """The tiles for `blocks` (row, K/V head) pairs of `folded_rows` query rows each, from the H100
    sweep of bench/attention_sweep.py (bench/results/2026-11-23_h100_attention_sweep.json, release
    shapes, 768 visible keys, 1 to 8 canvases): each program walks all of its rows' keys, 32 at a time
    (splitting the keys over more programs, with the merge kernel after, was slower at every shape
    measured; `Tiles.splits` stays for sweeps); 64 folded rows, 4 warps, 2 stages, except the 1 KB rows
    of the full layers: 32 rows, 64 keys and 8 warps while they make few programs, 64 rows and 8 warps
    from 8 canvases on."""
    if head_dim * torch.finfo(dtype).bits // 8 >= 1024:
        if triton.cdiv(folded_rows, 64) * blocks >= 512:
            return Tiles(64, 32, 2, 8, 1)
        return Tiles(32, 64, 2, 8, 1)
    return Tiles(64, 32, 2, 4, 1)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, acc_ptr, ml_ptr, rows_ptr, lo_ptr, hi_ptr, qpos_ptr,
    C, H, G, KV, GC, num_splits, stride_qb, stride_kr, stride_kh, stride_ks, window,
    E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bk // KV
    kv = pid_bk % KV
    row = tl.load(rows_ptr + b).to(tl.int64)
    lo = tl.load(lo_ptr + b).to(tl.int32)
    hi = tl.load(hi_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + pid_s * per_split
    end = tl.minimum(hi, start + per_split)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded rows f = g * C + t
    m_ok = offs_m < GC
    g = offs_m // C
    t = offs_m % C
    head = kv * G + g
    offs_e = tl.arange(0, E)
    # q and out are [B, C, H, E], each row's [C, H, E] contiguous, rows stride_qb apart
    q_offs = b.to(tl.int64) * stride_qb + (t.to(tl.int64) * H + head) * E
    q = tl.load(q_ptr + q_offs[:, None] + offs_e[None, :], mask=m_ok[:, None], other=0.0)
    kv_base = row * stride_kr + kv * stride_kh
    if CAUSAL:  # query t sits at position qpos + t: keys up to it and past it - window
        pos = tl.load(qpos_ptr + b).to(tl.int32) + t
        end = tl.minimum(end, tl.max(tl.where(m_ok, pos, 0)) + 1)
        start = tl.maximum(start, tl.min(tl.where(m_ok, pos, 2**30)) - window + 1)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, E), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv_offs = kv_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_e[None, :]
        k = tl.load(k_ptr + kv_offs, mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if CAUSAL:  # (no branch on the window here: one was miscompiled with some tiles, H100, Triton 3.6)
            seen = (
                n_ok[None, :] & (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] > pos[:, None] - window)
            )
            s = tl.where(seen, s, float("-inf"))
            # a row that has seen no key yet keeps m = -inf: exponents against 0, not -inf - -inf
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_offs, mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if DIRECT:  # one split: the output itself
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_offs[:, None] + offs_e[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None])  # fmt: skip
    else:  # this split's share: [splits, B * K * G * C] running max and sum, [.., E] weighted values
        part = (pid_s * (tl.num_programs(1) * GC) + pid_bk * GC + offs_m).to(tl.int64)
        tl.store(acc_ptr + part[:, None] * E + offs_e[None, :], acc, mask=m_ok[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=m_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=m_ok)


@triton.jit
def _merge_kernel(
    acc_ptr, ml_ptr, out_ptr, C, H, G, KV, GC, num_splits, stride_qb, E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # one folded row of one (row, K/V head)
    rows_total = tl.num_programs(0)
    f = pid % GC
    bk = pid // GC
    b = bk // KV
    kv = bk % KV
    offs_e = tl.arange(0, E)
    m_max = tl.load(ml_ptr + pid.to(tl.int64) * 2)
    for s in range(1, num_splits):
        m_max = tl.maximum(m_max, tl.load(ml_ptr + (s * rows_total + pid).to(tl.int64) * 2))
    w = tl.exp(tl.load(ml_ptr + pid.to(tl.int64) * 2) - m_max)  # 0 for a split that saw no key
    den = w * tl.load(ml_ptr + pid.to(tl.int64) * 2 + 1)
    num = w * tl.load(acc_ptr + pid.to(tl.int64) * E + offs_e)
    for s in range(1, num_splits):
        part = (s * rows_total + pid).to(tl.int64)
        w = tl.exp(tl.load(ml_ptr + part * 2) - m_max)
        den += w * tl.load(ml_ptr + part * 2 + 1)
        num += w * tl.load(acc_ptr + part * E + offs_e)
    head = kv * G + f // C
    out_offs = b.to(tl.int64) * stride_qb + ((f % C).to(tl.int64) * H + head) * E
    tl.store(out_ptr + out_offs + offs_e, (num / den).to(out_ptr.dtype.element_ty))


def attend_cache(
    q_BCHE: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows_B: torch.Tensor,
    lo_B: torch.Tensor,
    hi_B: torch.Tensor,
    *,
    causal_from: torch.Tensor | None = None,
    window: int | None = None,
    out: torch.Tensor | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """softmax(q k^T) v for each row's queries q [B, C, H, E] over the keys at cache positions
    lo_B[b] <= p < hi_B[b] of cache row rows_B[b] (k_cache, v_cache [rows, K, S, E]); [B, C, H, E].
    With `causal_from` [B] (an encode's queries), query t of row b sits at position causal_from[b] + t
    and sees only the keys up to it, and with `window` only the last `window` of those. q (and `out`,
    written in place when given) may be a view whose rows are further apart than C * H * E, each
    row's [C, H, E] contiguous (one half of a longer run of tokens). No host synchronisation: rows,
    key ranges and positions are device tensors (CUDA-graph safe). `tiles` overrides `choose_tiles`
    (sweeps)."""
    b, c, h, e = q_BCHE.shape
    kv = k_cache.shape[1]
    if not supports(e, q_BCHE.dtype) or h % kv:
        raise ValueError(
            f"attend_cache takes power-of-two head dims of at most 1 KB a row and K dividing H, got head "
            f"dim {e} in {q_BCHE.dtype}, H {h}, K {kv}"
        )
    q = q_BCHE if _rows_contiguous(q_BCHE) else q_BCHE.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride() != q.stride() or out.dtype != q.dtype:
        raise ValueError(
            f"attend_cache writes `out` laid out as q: {tuple(q.shape)} {q.stride()} {q.dtype}, got "
            f"{tuple(out.shape)} {out.stride()} {out.dtype}"
        )
    gc = h // kv * c
    t = tiles or choose_tiles(e, q.dtype, b * kv, gc)
    m_blocks = triton.cdiv(gc, t.block_m)
    acc = ml = out  # unused with one split
    if t.splits > 1:
        acc = torch.empty(t.splits, b * kv * gc, e, device=q.device, dtype=torch.float32)
        ml = torch.empty(t.splits, b * kv * gc, 2, device=q.device, dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    causal = causal_from is not None
    _split_kernel[(m_blocks, b * kv, t.splits)](
        q, k_cache, v_cache, out, acc, ml, rows_B, lo_B, hi_B, causal_from if causal else lo_B,
        c, h, h // kv, kv, gc, t.splits, q.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), window or 2**30,  # no window: one wider than any cache
        E=e, BLOCK_M=t.block_m, BLOCK_N=t.block_n, DIRECT=t.splits == 1, PRECISION=precision,
        CAUSAL=causal, num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    if t.splits > 1:
        _merge_kernel[(b * kv * gc,)](
            acc, ml, out, c, h, h // kv, kv, gc, t.splits, q.stride(0), E=e, num_warps=4
        )
    return out


def _rows_contiguous(x_BCHE: torch.Tensor) -> bool:
    """Each row's [C, H, E] contiguous (rows may lie further apart)."""
    *_, h, e = x_BCHE.shape
    return x_BCHE.stride()[1:] == (h * e, e, 1)
