"""The vocabulary-wide work of a denoise step as two Triton passes over the head's logits (the pure-torch
spec is `sample_steps` in denoise/sampler.py with `DiffusionGemma.logits` and `soft_embedding`).

Shape legend: R rows (canvas positions of a group of canvases), V vocabulary, S splits of a row.

The spec turns the head's output into fp32 soft-capped logits, tempered logits, a softmax for sampling,
a logsumexp, a second softmax and products for the entropy, a division by the sampling noise, an argmax
and a third softmax for the self-conditioning signal: some twenty passes over [R, V] fp32 tensors
(268 MB a canvas at the release's 262,144 entries). Here:

  1. `vocab_stats` reads the head's logits once (in the model's dtype) and computes, per row, the
     soft-cap, the temperature, an online logsumexp, the entropy, the argmax and the logsumexp of the
     tempered logits rounded to the model's dtype (the reference casts the self-conditioning logits to
     the embedding dtype before its softmax);
  2. `vocab_sample` reads them again with the sampling noise q ~ Exp(1) [R, V] that the caller drew
     from the canvas's generator exactly as `torch.multinomial` draws it, and returns argmax(p / q) (the
     token `torch.multinomial(p, 1)` returns; they differ only where rounding breaks a near-tie), and
     writes softmax(tempered) in the model's dtype: the self-conditioning signal, which the soft
     embedding multiplies by the embedding matrix.

Each row is cut into S splits (one program each, so a group of canvases fills the GPU); within a split
each group of LANES neighbouring entries keeps an online maximum m, sum s = sum(exp(x - m)) and
a = sum(exp(x - m) * (x - m)), which combine exactly (the groups' at the end of the program, the splits'
after the kernel): logsumexp = m + log s and entropy = log s - a / s (no cancellation when the row is
peaked).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

# read at each call (tests shrink them): entries a program loads at once, and entries per program (a
# multiple of BLOCK; the release's 262,144 make 8 programs a row)
BLOCK = 2048
SPLIT = 16 * BLOCK
# a block is read as [BLOCK / LANES, LANES]: each group of LANES neighbours (one thread's 16-byte load
# in the compiled kernel) keeps its own running sums, so a block costs no reduction across threads; the
# groups' sums combine once, at the end of the program
LANES = 8

_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _tempered(x, cap, temp, HAS_CAP: tl.constexpr):
    """fp32 soft-cap tanh(x / cap) * cap, then / temperature (divisions rounded as torch's are)."""
    if HAS_CAP:
        y = tl.math.div_rn(x, cap)
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        x = tl.where(y < 0, -t, t) * cap
    return tl.math.div_rn(x, temp)


@triton.jit
def _rounded(x, ROUND: tl.constexpr):
    """x rounded to the model's dtype (to nearest even, as torch's .to() does), kept in fp32."""
    if ROUND == 1:  # on the bits: Triton's interpreter truncates a plain fp32 -> bf16 cast
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    if ROUND == 2:
        return x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _fold(m, s, a, x, WEIGHTED: tl.constexpr):
    """Fold a block x [G, LANES] (masked entries -inf) into each group's running max, sum of
    exp(x - max) and weighted sum of exp(x - max) * (x - max), all [G]; the weighted sum only if
    WEIGHTED (a is returned as it came otherwise). A group that has seen only masked entries keeps
    (-inf, 0, 0)."""
    new_m = tl.maximum(m, tl.max(x, axis=1))
    base = tl.where(new_m == float("-inf"), 0.0, new_m)  # no NaN from -inf - -inf
    scale = tl.exp(m - base)
    e = tl.exp(x - base[:, None])
    if WEIGHTED:
        d = tl.where(e > 0, x - base[:, None], 0.0)
        a = scale * (a + tl.where(s > 0, m - base, 0.0) * s) + tl.sum(e * d, axis=1)
    s = scale * s + tl.sum(e, axis=1)
    return new_m, s, a


@triton.jit
def _combine(m, s):
    """The groups' running maxima and sums [G] as one (max, sum), and each group's factor exp(m - max)
    (some group holds a finite max)."""
    top = tl.max(m, axis=0)
    scale = tl.exp(m - top)
    return top, tl.sum(s * scale, axis=0), scale


@triton.jit
def _first_at(value, index, top):
    """The smallest index among the groups whose value is top: argmax's first occurrence."""
    return tl.min(tl.where(value == top, index, 2147483647), axis=0)


@triton.jit
def _stats_kernel(
    logits_ptr, temp_ptr, part_ptr, V, S, cap,
    HAS_CAP: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    LANES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    lo = split * SPLIT
    GROUPS: tl.constexpr = BLOCK // LANES
    group = tl.arange(0, GROUPS)[:, None] * LANES
    m = tl.full([GROUPS], float("-inf"), tl.float32)
    s = tl.zeros([GROUPS], tl.float32)
    a = tl.zeros([GROUPS], tl.float32)
    mr = tl.full([GROUPS], float("-inf"), tl.float32)
    sr = tl.zeros([GROUPS], tl.float32)
    best = tl.zeros([GROUPS], tl.int32)
    for start in range(lo, lo + SPLIT, BLOCK):
        offs = start + group + tl.arange(0, LANES)[None, :]
        mask = offs < V
        raw = tl.load(logits_ptr + row * V + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, _tempered(raw, cap, temp, HAS_CAP), float("-inf"))
        at = start + tl.arange(0, GROUPS) * LANES + tl.argmax(x, axis=1)
        best = tl.where(tl.max(x, axis=1) > m, at, best)  # strictly: a group keeps its first maximum
        m, s, a = _fold(m, s, a, x, WEIGHTED=True)
        if ROUND != 0:  # float32 models: the rounded logits are the logits, their sums are (m, s)
            mr, sr, _ = _fold(mr, sr, a, _rounded(x, ROUND), WEIGHTED=False)  # -inf stays -inf
    out = part_ptr + (row * S + split) * 6
    top, total, scale = _combine(m, s)
    tl.store(out, top)
    tl.store(out + 1, total)
    # each group's weighted sum, moved from its own maximum to the program's
    tl.store(out + 2, tl.sum(scale * (a + tl.where(s > 0, m - top, 0.0) * s), axis=0))
    tl.store(out + 5, _first_at(m, best, top).to(tl.float32))
    if ROUND != 0:
        top, total, _ = _combine(mr, sr)
    tl.store(out + 3, top)
    tl.store(out + 4, total)


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, lse_ptr, lse_rounded_ptr, noise_ptr, probs_ptr, part_ptr, V, S, cap,
    HAS_CAP: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    LANES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    lse = tl.load(lse_ptr + row)
    lse_rounded = tl.load(lse_rounded_ptr + row)
    lo = split * SPLIT
    GROUPS: tl.constexpr = BLOCK // LANES
    group = tl.arange(0, GROUPS)[:, None] * LANES
    top = tl.full([GROUPS], -1.0, tl.float32)
    best = tl.zeros([GROUPS], tl.int32)
    for start in range(lo, lo + SPLIT, BLOCK):
        offs = start + group + tl.arange(0, LANES)[None, :]
        mask = offs < V
        raw = tl.load(logits_ptr + row * V + offs, mask=mask, other=0.0).to(tl.float32)
        x = _tempered(raw, cap, temp, HAS_CAP)
        q = tl.load(noise_ptr + row * V + offs, mask=mask, other=1.0)
        score = tl.where(mask, tl.exp(x - lse) / q, -1.0)
        block_top = tl.max(score, axis=1)
        at = start + tl.arange(0, GROUPS) * LANES + tl.argmax(score, axis=1)
        best = tl.where(block_top > top, at, best)
        top = tl.maximum(top, block_top)
        p = _rounded(tl.exp(_rounded(x, ROUND) - lse_rounded), ROUND)  # exact in the store's dtype
        tl.store(probs_ptr + row * V + offs, p.to(probs_ptr.dtype.element_ty), mask=mask)
    out = part_ptr + (row * S + split) * 2
    split_top = tl.max(top, axis=0)
    tl.store(out, split_top)
    tl.store(out + 1, _first_at(top, best, split_top).to(tl.float32))


@dataclass(frozen=True)
class VocabStats:
    """Per row of tempered logits: logsumexp, entropy, argmax, top probability, and the logsumexp of
    the logits rounded to the model's dtype (for the self-conditioning softmax)."""

    lse: torch.Tensor  # [R] fp32
    entropy: torch.Tensor  # [R] fp32
    argmax: torch.Tensor  # [R] int64
    top_prob: torch.Tensor  # [R] fp32
    lse_rounded: torch.Tensor  # [R] fp32

    def rows(self, lo: int, hi: int) -> VocabStats:
        return VocabStats(*(getattr(self, f.name)[lo:hi] for f in fields(self)))


def _grid(rows: int, vocab: int) -> tuple[int, int]:
    return rows, triton.cdiv(vocab, SPLIT)


def vocab_stats(
    logits_RV: torch.Tensor,
    temp_R: torch.Tensor,
    cap: float | None,
    rounding: torch.dtype,
) -> VocabStats:
    """Pass 1 over the head's logits [R, V] (any float dtype, contiguous): see the module docstring.
    temp_R: the temperature per row (fp32); rounding: the dtype the self-conditioning logits take."""
    rows, vocab = logits_RV.shape
    grid = _grid(rows, vocab)
    part = torch.empty(rows, grid[1], 6, dtype=torch.float32, device=logits_RV.device)
    _stats_kernel[grid](
        logits_RV, temp_R, part, vocab, grid[1], cap or 1.0,
        HAS_CAP=cap is not None, ROUND=_ROUNDING[rounding], BLOCK=BLOCK, SPLIT=SPLIT, LANES=LANES,
        num_warps=8,
    )  # fmt: skip
    m, s, a, mr, sr, best = part.unbind(-1)
    top = m.amax(dim=-1, keepdim=True)
    scale = torch.exp(m - top)
    total = (s * scale).sum(-1)
    # each split's weighted sum, moved from its own maximum to the row's
    weighted = (scale * (a + torch.where(s > 0, (m - top) * s, 0.0))).sum(-1)
    top_r = mr.amax(dim=-1, keepdim=True)
    total_r = (sr * torch.exp(mr - top_r)).sum(-1)
    lse = top[:, 0] + torch.log(total)
    return VocabStats(
        lse=lse,
        entropy=torch.log(total) - weighted / total,
        # the first split holding the row's maximum: argmax's first occurrence
        argmax=best.gather(1, m.argmax(dim=-1, keepdim=True))[:, 0].long(),
        top_prob=torch.exp(top[:, 0] - lse),
        lse_rounded=top_r[:, 0] + torch.log(total_r),
    )


def vocab_sample(
    logits_RV: torch.Tensor,
    temp_R: torch.Tensor,
    cap: float | None,
    stats: VocabStats,
    noise_RV: torch.Tensor,
    probs_RV: torch.Tensor,
) -> torch.Tensor:
    """Pass 2: the sampled token per row [R] (argmax of softmax / noise, noise ~ Exp(1) fp32 [R, V]);
    writes softmax of the rounded tempered logits into probs_RV (its dtype is the rounding's)."""
    rows, vocab = logits_RV.shape
    grid = _grid(rows, vocab)
    part = torch.empty(rows, grid[1], 2, dtype=torch.float32, device=logits_RV.device)
    _sample_kernel[grid](
        logits_RV, temp_R, stats.lse, stats.lse_rounded, noise_RV, probs_RV, part, vocab, grid[1],
        cap or 1.0, HAS_CAP=cap is not None, ROUND=_ROUNDING[probs_RV.dtype], BLOCK=BLOCK, SPLIT=SPLIT,
        LANES=LANES, num_warps=8,
    )  # fmt: skip
    top, best = part.unbind(-1)
    return best.gather(1, top.argmax(dim=-1, keepdim=True))[:, 0].long()
