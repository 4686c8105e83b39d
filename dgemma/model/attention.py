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
from dgemma.model.layers import PackedLinears, RMSNorm, apply_rope, kernels_apply


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec, hidden: int, num_heads: int, eps: float, bias: bool):
        super().__init__()
        self.spec = spec
        self.num_heads = num_heads
        e = spec.head_dim
        self.q_proj = nn.Linear(hidden, num_heads * e, bias=False)
        self.k_proj = nn.Linear(hidden, spec.num_kv_heads * e, bias=False)
        self.v_proj = nn.Linear(hidden, spec.num_kv_heads * e, bias=False) if spec.has_v_proj else None
        self.o_proj = nn.Linear(num_heads * e, hidden, bias=False)
        # With attention_bias, the reference ties the weights of both modes but not the biases: each mode
        # has its own (the release has none).
        self.encoder_bias = self.decoder_bias = None
        if bias:
            sizes = {"q_proj": num_heads * e, "k_proj": spec.num_kv_heads * e, "o_proj": hidden}
            if spec.has_v_proj:
                sizes["v_proj"] = spec.num_kv_heads * e
            self.encoder_bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(n)) for k, n in sizes.items()})
            self.decoder_bias = nn.ParameterDict({k: nn.Parameter(torch.zeros(n)) for k, n in sizes.items()})
        self.q_norm = RMSNorm(e, eps)
        self.k_norm = RMSNorm(e, eps)
        self.v_norm = RMSNorm(e, eps, with_scale=False)
        self.packed: PackedLinears | None = None  # q|k|v as one GEMM (`pack`)

    def pack(self) -> None:
        """q, k and v (a full layer: q and k) as one weight block (`PackedLinears`), for the kernels'
        inference; a model with biases keeps three GEMMs."""
        if self.encoder_bias is None:
            self.packed = PackedLinears([m for m in (self.q_proj, self.k_proj, self.v_proj) if m is not None])

    def linear(self, name: str, x: torch.Tensor, *, denoise: bool, split: int | None = None) -> torch.Tensor:
        """The projection `name` in one mode, or with `split`: tokens before it in encode mode, the rest
        in denoise mode (the modes differ only in their biases, when the model has any)."""
        if split is not None:
            if self.encoder_bias is None:  # one weight, no bias: the modes are the same function
                return self.linear(name, x, denoise=True)
            return torch.cat(
                [
                    self.linear(name, x[:, :split], denoise=False),
                    self.linear(name, x[:, split:], denoise=True),
                ],
                dim=1,
            )
        biases = self.decoder_bias if denoise else self.encoder_bias
        module, bias = getattr(self, name), None if biases is None else biases[name]
        if module._forward_hooks:  # LoRA adapters (dgemma.train.lora) hook the projection
            return module(x) if bias is None else module(x) + bias
        return F.linear(x, module.weight, bias)

    def project_raw(self, x_BTD: torch.Tensor, *, denoise: bool, split: int | None = None):
        """The projections before their norms: q [B, T, H, E], k and v [B, T, K, E]; `split` as in
        `linear`. Packed (kernels' inference), they are views of one GEMM's output: each token's q, k
        and v one after the other."""
        b, t, _ = x_BTD.shape
        e, kv = self.spec.head_dim, self.spec.num_kv_heads
        packed = None
        if self.packed is not None and self.q_norm.use_kernel and kernels_apply(x_BTD):
            packed = self.packed(x_BTD)  # views into one GEMM's output (rows N = q + k + v wide)
        if packed is not None:
            q_raw, k_raw, *v = (z.view(b, t, -1, e) for z in packed)
            # full layers have no v_proj: V is the raw k_proj output (before k_norm and RoPE)
            return q_raw, k_raw, v[0] if v else k_raw
        mode = {"denoise": denoise, "split": split}
        q_raw = self.linear("q_proj", x_BTD, **mode).view(b, t, -1, e)
        k_raw = self.linear("k_proj", x_BTD, **mode).view(b, t, kv, e)
        v_raw = self.linear("v_proj", x_BTD, **mode).view(b, t, kv, e) if self.v_proj is not None else k_raw
        return q_raw, k_raw, v_raw

    def project(self, x_BTD: torch.Tensor, cos, sin, *, denoise: bool, split: int | None = None):
        """q [B, T, H, E], k and v [B, T, K, E], normed; q and k rotated (V never is); `split` as in
        `linear`."""
        q_raw, k_raw, v_raw = self.project_raw(x_BTD, denoise=denoise, split=split)
        if self.q_norm.use_kernel and kernels_apply(q_raw):  # each norm and its rotation in one kernel
            from dgemma.ops.norm import norm_rope

            q, k = (
                norm_rope(z, n.weight, cos, sin, n.eps)
                for z, n in ((q_raw, self.q_norm), (k_raw, self.k_norm))
            )
        else:
            q, k = apply_rope(self.q_norm(q_raw), cos, sin), apply_rope(self.k_norm(k_raw), cos, sin)
        return q, k, self.v_norm(v_raw)

    def attend(self, q_BTHE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, mask=None):
        """Attention of q [B, T, H, E] over k, v [B, K, S, E]; mask (True: visible) [T, S] or
        [B, 1, T or 1, S]. Returns [B, T, H, E].

        The G = H / K query heads that share a K/V head are folded into one query of G * T rows, so K
        and V are read as they are, never copied once per query head (a query row's result does not
        depend on the other rows; the mask is repeated along the folded rows where it varies by query)."""
        b, t, h, e = q_BTHE.shape
        kv = k_BKSE.shape[1]
        groups = h // kv
        q = q_BTHE.reshape(b, t, kv, groups, e).permute(0, 2, 3, 1, 4).reshape(b, kv, groups * t, e)
        if mask is not None and groups > 1 and mask.shape[-2] > 1:
            mask = mask.repeat(*[1] * (mask.dim() - 2), groups, 1)
        # scale 1.0: q_norm / k_norm carry the scale (as in the checkpoint's training)
        out = F.scaled_dot_product_attention(q, k_BKSE, v_BKSE, attn_mask=mask, scale=1.0)
        return out.view(b, kv, groups, t, e).permute(0, 3, 1, 2, 4).reshape(b, t, h, e)

    def causal_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Which keys each query of an encode sees: its past and itself, within the window if sliding."""
        mask = k_pos <= q_pos
        if self.spec.window is not None:
            mask &= k_pos > q_pos - self.spec.window
        return mask

    # With `invariant` (inference), attention runs row by row over exactly that row's keys (no padding
    # to the longest row): the kernel's blocking, and so its rounding, never depends on the other rows.
    # Without it (training), one padded, masked call serves the whole batch.

    def encode(self, x_BTD, cos, sin, cache: KVCache, layer: int, rows: Sequence[int], starts: list[int],
               *, invariant: bool = True, write_index=None, rows_B=None, starts_B=None):  # fmt: skip
        """Causal attention of T new tokens per row; `starts` holds each row's prefix length. With the
        kernels (CUDA inference; rows_B and starts_B: rows and starts as device tensors), as the fused
        commit's first half: the norms write the K/V into the cache, and one causal attention call
        reads them in place, each row over its own keys (so it stays batch-invariant)."""
        b, t, _ = x_BTD.shape
        if rows_B is not None and self._in_place(x_BTD):
            return self._encode_in_place(x_BTD, cos, sin, cache, layer, rows_B, starts_B)
        q, k, v = self.project(x_BTD, cos, sin, denoise=False)
        cache.write(layer, write_index or cache.write_index(rows, t), k, v)
        if not invariant:
            length = max(starts) + t
            k_all, v_all = cache.read_rows(layer, rows, length)
            q_pos = torch.tensor(starts, device=x_BTD.device)[:, None] + torch.arange(t, device=x_BTD.device)
            k_pos = torch.arange(length, device=x_BTD.device)
            out = self.attend(
                q, k_all, v_all, self.causal_mask(q_pos[:, :, None], k_pos[None, None, :])[:, None]
            )
            return self.linear("o_proj", out.reshape(b, t, -1), denoise=False)
        outs = []
        for i, (row, start) in enumerate(zip(rows, starts)):
            lo = 0 if self.spec.window is None else max(0, start + 1 - self.spec.window)
            k_row, v_row = cache.read_row(layer, row, lo, start + t)
            q_pos = start + torch.arange(t, device=x_BTD.device)[:, None]
            k_pos = lo + torch.arange(start + t - lo, device=x_BTD.device)[None, :]
            outs.append(self.attend(q[i : i + 1], k_row, v_row, self.causal_mask(q_pos, k_pos)))
        return self.linear("o_proj", torch.cat(outs).reshape(b, t, -1), denoise=False)

    def denoise(self, x_BCD, cos, sin, cache: KVCache, layer: int, rows: Sequence[int], starts: list[int],
                *, invariant: bool = True):  # fmt: skip
        """Bidirectional attention of the canvas over itself and the cached prefix (read-only)."""
        q, k, v = self.project(x_BCD, cos, sin, denoise=True)
        b, c, _ = x_BCD.shape
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if not invariant:
            # the whole cache, masked per row: one shape for every batch (training pads to fixed sizes)
            length = cache.max_length
            k_pre, v_pre = cache.read_rows(layer, rows, length)
            k_pos = torch.arange(length, device=x_BCD.device)
            start = torch.tensor(starts, device=x_BCD.device)[:, None]
            visible = k_pos[None, :] < start
            if self.spec.window is not None:
                visible &= k_pos[None, :] >= start - (self.spec.window - 1)
            mask = torch.cat([visible, visible.new_ones(b, c)], dim=1)[:, None, None, :]
            k_all = torch.cat([k_pre, k.to(k_pre.dtype)], dim=2)
            v_all = torch.cat([v_pre, v.to(v_pre.dtype)], dim=2)
            out = self.attend(q, k_all, v_all, mask)
            return self.linear("o_proj", out.reshape(b, c, -1), denoise=True)
        outs = []
        for i, (row, start) in enumerate(zip(rows, starts)):
            lo = 0 if self.spec.window is None else max(0, start - (self.spec.window - 1))
            k_pre, v_pre = cache.read_row(layer, row, lo, start)
            k_row = torch.cat([k_pre, k[i : i + 1].to(k_pre.dtype)], dim=2)
            v_row = torch.cat([v_pre, v[i : i + 1].to(v_pre.dtype)], dim=2)
            outs.append(self.attend(q[i : i + 1], k_row, v_row))  # everything visible: no mask
        return self.linear("o_proj", torch.cat(outs).reshape(b, c, -1), denoise=True)

    def prefix_positions(self, starts_B: torch.Tensor, num_new: int, length: int) -> torch.Tensor:
        """Cache positions [B, S] the static paths read for each row: a sliding layer, the `window - 1`
        positions before the row's prefix end plus `num_new` after it (positions before 0 included: the
        caller masks them); a full layer, every position below `length`."""
        device = starts_B.device
        if self.spec.window is None:
            return torch.arange(length, device=device).expand(starts_B.shape[0], -1)
        span = self.spec.window - 1
        return starts_B[:, None] - span + torch.arange(span + num_new, device=device)

    def _in_place(self, x: torch.Tensor) -> bool:
        """Whether the static paths run the kernels that read and write the cache in place (CUDA
        inference, a head dim the attention kernel takes)."""
        return self.q_norm.use_kernel and kernels_apply(x) and _in_place(self.spec.head_dim, x.dtype)

    def _normed_into_cache(self, x_BTD, cos, sin, cache: KVCache, layer: int, rows_B, starts_B, *,
                           denoise: bool = True, split: int | None = None):  # fmt: skip
        """The kernels' projections and norms: returns q, and writes the T tokens' K/V at each row's
        positions starts_B[b] + t (`dgemma.ops.norm.qkv_norms`); `denoise` and `split` as in `linear`."""
        from dgemma.ops.norm import qkv_norms

        return qkv_norms(
            *self.project_raw(x_BTD, denoise=denoise, split=split),
            cos,
            sin,
            weights=(self.q_norm.weight, self.k_norm.weight),
            eps=(self.q_norm.eps, self.k_norm.eps, self.v_norm.eps),
            keys=cache.keys[layer],
            values=cache.values[layer],
            rows_B=rows_B,
            starts_B=starts_B,
        )

    def _encode_in_place(self, x_BTD, cos, sin, cache: KVCache, layer: int, rows_B, starts_B):
        """The kernels' encode (as the fused commit's first half): the norms write the T tokens' K/V
        into the cache at starts_B[b] + t, and one causal attention call reads them in place, each row
        over its own keys (so it stays batch-invariant)."""
        from dgemma.ops.attention import attend_cache

        b, t, _ = x_BTD.shape
        q = self._normed_into_cache(x_BTD, cos, sin, cache, layer, rows_B, starts_B, denoise=False)
        out = attend_cache(
            q, cache.keys[layer], cache.values[layer], rows_B, self._window_start(starts_B), starts_B + t,
            causal_from=starts_B, window=self.spec.window,
        )  # fmt: skip
        return self.linear("o_proj", out.reshape(b, t, -1), denoise=False)

    def _window_start(self, end_B: torch.Tensor) -> torch.Tensor:
        """The first key position a query just past end_B - 1 sees: end_B - (window - 1) in a sliding
        layer (not below 0), 0 in a full one."""
        if self.spec.window is None:
            return torch.zeros_like(end_B)
        return (end_B - (self.spec.window - 1)).clamp(min=0)

    def denoise_static(self, x_BCD, cos, sin, cache: KVCache, layer: int, rows_B: torch.Tensor,
                       starts_B: torch.Tensor, spans: dict | None = None):  # fmt: skip
        """`denoise` with rows and prefix lengths as device tensors and shapes fixed by the cache alone,
        so it can be captured in a CUDA graph: one masked attention call over every row.

        The canvas's K/V go to the row's scratch positions just past its prefix (the commit overwrites
        them), so prefix and canvas are one run of cache positions: a sliding layer gathers the last
        `window - 1` prefix positions and the canvas (positions before 0 are masked); a full layer reads
        the row's whole storage, masked past the canvas. With the kernels (CUDA), the run is read in
        place instead (`dgemma.ops.attention.attend_cache`): no gather, no mask; the norms are one
        kernel that also writes the new K/V straight into the cache (`dgemma.ops.norm.qkv_norms`), and
        each row's run of keys is computed once per forward for the layers of one window and kept in
        `spans` (a dict the caller gives every layer of the forward)."""
        b, c, _ = x_BCD.shape
        if self._in_place(x_BCD):
            from dgemma.ops.attention import attend_cache

            q = self._normed_into_cache(x_BCD, cos, sin, cache, layer, rows_B, starts_B)
            spans = {} if spans is None else spans
            if self.spec.window not in spans:  # each row's run of keys: its prefix in the window, the canvas
                spans[self.spec.window] = (self._window_start(starts_B), starts_B + c)
            out = attend_cache(q, cache.keys[layer], cache.values[layer], rows_B, *spans[self.spec.window])
            return self.linear("o_proj", out.reshape(b, c, -1), denoise=True)
        q, k, v = self.project(x_BCD, cos, sin, denoise=True)
        cache.write(layer, (rows_B[:, None], starts_B[:, None] + torch.arange(c, device=x_BCD.device)), k, v)
        pos_BS = self.prefix_positions(starts_B, c, cache.capacity)
        visible_BS = (pos_BS >= 0) & (pos_BS < starts_B[:, None] + c)
        k_all, v_all = cache.gather(layer, rows_B, pos_BS.clamp(min=0))
        out = self.attend(q, k_all, v_all, visible_BS[:, None, None, :])
        return self.linear("o_proj", out.reshape(b, c, -1), denoise=True)

    def encode_static(self, x_BTD, cos, sin, cache: KVCache, layer: int, rows_B: torch.Tensor,
                      starts_B: torch.Tensor):  # fmt: skip
        """`encode` for CUDA graphs (rows and prefix lengths as device tensors, shapes fixed by the
        cache): writes the new K/V, then one masked causal attention over every row. Positions past
        the cache's end are clamped (only the engine's scratch row, which pads a batch, reaches them).
        With the kernels (CUDA), as `encode` runs them: the K/V written and read in place (each row's
        T positions from its start must then lie within the cache's storage)."""
        if self._in_place(x_BTD):
            return self._encode_in_place(x_BTD, cos, sin, cache, layer, rows_B, starts_B)
        q, k, v = self.project(x_BTD, cos, sin, denoise=False)
        b, t, _ = x_BTD.shape
        last = cache.max_length - 1
        q_pos_BT = starts_B[:, None] + torch.arange(t, device=x_BTD.device)
        cache.write(layer, (rows_B[:, None], q_pos_BT.clamp(max=last)), k, v)
        k_pos_BS = self.prefix_positions(starts_B, t, cache.max_length)
        k_pre, v_pre = cache.gather(layer, rows_B, k_pos_BS.clamp(0, last))
        visible = (k_pos_BS >= 0)[:, None, :] & self.causal_mask(q_pos_BT[:, :, None], k_pos_BS[:, None, :])
        out = self.attend(q, k_pre, v_pre, visible[:, None])
        return self.linear("o_proj", out.reshape(b, t, -1), denoise=False)

    def commit_denoise_static(self, x_BTD, cos, sin, cache: KVCache, layer: int, rows_B: torch.Tensor,
                              starts_B: torch.Tensor):  # fmt: skip
        """`encode_static` of a finished canvas and `denoise_static` of the next one in one call: the
        first half of the T = 2C tokens is the canvas to commit (encode mode, at starts_B), the second
        the next canvas (denoise mode, at starts_B + C). All K/V go to the row's positions from starts_B
        on (the commit's for good, the canvas's into the scratch past the new prefix); the commit sees
        its past causally, the canvas the new prefix (the last `window - 1` positions of it in a
        sliding layer) and the whole canvas, exactly as the two calls one after the other. With the
        kernels (CUDA), as in `denoise_static`: the norms write the K/V straight into the cache, and the
        attention reads them in place, causally for the commit (`dgemma.ops.attention.attend_cache`)."""
        b, t, _ = x_BTD.shape
        c = t // 2
        if self._in_place(x_BTD):
            from dgemma.ops.attention import attend_cache

            q = self._normed_into_cache(x_BTD, cos, sin, cache, layer, rows_B, starts_B, split=c)
            out = torch.empty_like(q)
            keys, values = cache.keys[layer], cache.values[layer]
            # the finished canvas causally over its prefix, then the next canvas over the new prefix
            for half, prefix_end, causal in (
                (slice(None, c), starts_B, True),
                (slice(c, None), starts_B + c, False),
            ):
                attend_cache(
                    q[:, half], keys, values, rows_B, self._window_start(prefix_end), prefix_end + c,
                    causal_from=starts_B if causal else None, window=self.spec.window, out=out[:, half],
                )  # fmt: skip
            return self.linear("o_proj", out.reshape(b, t, -1), denoise=True, split=c)
        q, k, v = self.project(x_BTD, cos, sin, denoise=True, split=c)
        pos_BT = starts_B[:, None] + torch.arange(t, device=x_BTD.device)
        last = cache.capacity - 1  # only the engine's scratch row, which pads a batch, reaches past it
        cache.write(layer, (rows_B[:, None], pos_BT.clamp(max=last)), k, v)
        k_pos_BS = self.prefix_positions(starts_B, t, cache.capacity)
        k_all, v_all = cache.gather(layer, rows_B, k_pos_BS.clamp(0, last))
        k_pos = k_pos_BS[:, None, :]
        commit_sees = self.causal_mask(pos_BT[:, :c, None], k_pos)
        prefix_end = (starts_B + c)[:, None, None]  # the canvas's prefix ends after the commit
        canvas_sees = k_pos < prefix_end + c
        if self.spec.window is not None:
            canvas_sees &= k_pos >= prefix_end - (self.spec.window - 1)
        visible = (k_pos >= 0) & torch.cat([commit_sees, canvas_sees.expand(-1, c, -1)], dim=1)
        out = self.attend(q, k_all, v_all, visible[:, None])
        return self.linear("o_proj", out.reshape(b, t, -1), denoise=True, split=c)


def _in_place(head_dim: int, dtype: torch.dtype) -> bool:
    from dgemma.ops.attention import supports

    return supports(head_dim, dtype)
