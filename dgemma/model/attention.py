"""Sliding and full attention for both modes, on one set of weights.

Shape legend: B rows, T new tokens (encode) or C canvas tokens (denoise), S keys, H query heads,
K key/value heads, E head dim, D hidden.

- encode: causal over the row's prefix plus the new tokens; writes K/V to the cache.
- denoise: the canvas attends to every canvas token and to the cached prefix, never writes. A sliding
  layer shows the canvas the last `window - 1` prefix tokens: exactly what transformers' dynamic sliding
  cache holds after an encode, which is what its decoder attends to (reference parity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.cache.kv_cache import KVCache
from dgemma.model.config import LayerSpec
from dgemma.model.layers import RMSNorm, apply_rope


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec, hidden: int, num_heads: int, eps: float, bias: bool):
        super().__init__()
        self.spec = spec
        self.num_heads = num_heads
        e = spec.head_dim
        self.q_proj = nn.Linear(hidden, num_heads * e, bias=bias)
        self.k_proj = nn.Linear(hidden, spec.num_kv_heads * e, bias=bias)
        self.v_proj = nn.Linear(hidden, spec.num_kv_heads * e, bias=bias) if spec.has_v_proj else None
        self.o_proj = nn.Linear(num_heads * e, hidden, bias=bias)
        self.q_norm = RMSNorm(e, eps)
        self.k_norm = RMSNorm(e, eps)
        self.v_norm = RMSNorm(e, eps, with_scale=False)

    def project(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, T, H, E], k and v [B, T, K, E], normed; q and k rotated (V never is)."""
        b, t, _ = x_BTD.shape
        e = self.spec.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x_BTD).view(b, t, self.num_heads, e)), cos, sin)
        k_raw = self.k_proj(x_BTD).view(b, t, self.spec.num_kv_heads, e)
        # full layers have no v_proj: V is the raw k_proj output (before k_norm and RoPE)
        v_raw = self.v_proj(x_BTD).view(b, t, self.spec.num_kv_heads, e) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        return q, k, self.v_norm(v_raw)

    def attend(
        self, q_BTHE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, mask_BTS: torch.Tensor
    ):
        groups = self.num_heads // self.spec.num_kv_heads
        if groups > 1:
            k_BKSE = k_BKSE.repeat_interleave(groups, dim=1)
            v_BKSE = v_BKSE.repeat_interleave(groups, dim=1)
        # scale 1.0: q_norm / k_norm carry the scale (as in the checkpoint's training)
        out = F.scaled_dot_product_attention(
            q_BTHE.transpose(1, 2), k_BKSE, v_BKSE, attn_mask=mask_BTS[:, None], scale=1.0
        )
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def encode(self, x_BTD, cos, sin, cache: KVCache, layer: int, rows: Sequence[int], starts: torch.Tensor):
        """Causal attention of T new tokens per row; `starts` [B] holds each row's prefix length."""
        q, k, v = self.project(x_BTD, cos, sin)
        cache.write(layer, rows, k, v)
        t = x_BTD.shape[1]
        length = int(starts.max()) + t
        k_all, v_all = cache.read(layer, rows, length)
        q_pos = starts[:, None] + torch.arange(t, device=starts.device)  # [B, T]
        k_pos = torch.arange(length, device=starts.device)  # [S]
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if self.spec.window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - self.spec.window
        return self.attend(q, k_all, v_all, mask)

    def denoise(self, x_BCD, cos, sin, cache: KVCache, layer: int, rows: Sequence[int], starts: torch.Tensor):
        """Bidirectional attention of the canvas over itself and the cached prefix (read-only)."""
        q, k, v = self.project(x_BCD, cos, sin)
        c = x_BCD.shape[1]
        length = int(starts.max())
        k_pre, v_pre = cache.read(layer, rows, length)
        k_all = torch.cat([k_pre, k.transpose(1, 2).to(k_pre.dtype)], dim=2)
        v_all = torch.cat([v_pre, v.transpose(1, 2).to(v_pre.dtype)], dim=2)
        k_pos = torch.arange(length, device=starts.device)
        visible = k_pos[None, :] < starts[:, None]  # [B, L]: the row's own prefix
        if self.spec.window is not None:
            visible &= k_pos[None, :] >= starts[:, None] - (self.spec.window - 1)
        mask = torch.cat([visible, visible.new_ones(visible.shape[0], c)], dim=1)  # [B, L + C]
        return self.attend(q, k_all, v_all, mask[:, None, :].expand(-1, c, -1))
