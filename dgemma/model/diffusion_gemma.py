"""The DiffusionGemma text backbone: one set of weights, two entry points.

- `encode(token_ids, cache)`: causal, appends K/V to the cache, returns final-normed hidden states.
- `denoise(canvas_ids, cache, self_conditioning_logits)`: bidirectional over the canvas plus the cached
  prefix, never writes; returns fp32 soft-capped logits [B, C, V].

Shape legend: B rows, T new tokens, C canvas tokens, D hidden, V vocabulary.
Only two things differ between modes: the self-conditioning block (denoise only) and the per-layer
`layer_scalar`, which the checkpoint stores once per mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dgemma.cache.kv_cache import KVCache
from dgemma.errors import CapacityError, RequestError
from dgemma.model.attention import Attention
from dgemma.model.config import LayerSpec, ModelConfig, parameter_counts
from dgemma.model.layers import (
    Experts,
    GatedMLP,
    RMSNorm,
    Router,
    kernels_apply,
    rope_cos_sin,
    rope_inv_freq,
)


class Layer(nn.Module):
    """r = x + post_attn(attn(in(x))); out = (r + post_ff(post_ff_1(mlp(pre_ff(r))) + post_ff_2(experts(
    pre_ff_2(r)))) * layer_scalar, with the router reading the raw residual r."""

    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(spec, d, config.num_heads, eps, config.attention_bias)
        self.mlp = GatedMLP(d, config.intermediate_size, config.hidden_activation)
        self.router = Router(d, config.num_experts, config.top_k_experts, eps)
        self.experts = Experts(config.num_experts, d, config.moe_intermediate_size, config.hidden_activation)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(d, eps))
        self.encoder_layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self.decoder_layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        # training with gradient checkpointing: the feed-forward blocks (dense MLP, router, experts), which
        # hold most of the activations, are recomputed in backward instead of kept
        self.checkpoint_feed_forward = False

    def feed_forward(self, r_BTD: torch.Tensor, *, invariant: bool = True) -> torch.Tensor:
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r_BTD)))
        flat = r_BTD.reshape(-1, r_BTD.shape[-1])
        weights, index = self.router(flat)
        h2 = self.experts(
            self.pre_feedforward_layernorm_2(flat),
            weights,
            index,
            num_rows=r_BTD.shape[0] if invariant else 1,
        )
        h2 = h2.reshape(r_BTD.shape)
        return r_BTD + self.post_feedforward_layernorm(h1 + self.post_feedforward_layernorm_2(h2))

    def _scalar(self, x, denoise: bool, split: int | None) -> torch.Tensor:
        if split is None:
            return self.decoder_layer_scalar if denoise else self.encoder_layer_scalar
        encoder_T1 = torch.arange(x.shape[1], device=x.device)[:, None] < split
        return torch.where(encoder_T1, self.encoder_layer_scalar, self.decoder_layer_scalar)

    def forward(self, x, attend, *, denoise: bool, invariant: bool = True, split: int | None = None):
        """`attend(normed_x) -> h` is the attention call of the mode (the model binds cache and rows);
        with `split`, tokens before it are in encode mode and the rest in denoise mode."""
        scalar = self._scalar(x, denoise, split)
        if self.input_layernorm.use_kernel and kernels_apply(x):
            return self._fused_forward(x, attend(self.input_layernorm(x)), scalar, invariant=invariant)
        r = x + self.post_attention_layernorm(attend(self.input_layernorm(x)))
        if self.checkpoint_feed_forward and torch.is_grad_enabled():
            out = checkpoint(self.feed_forward, r, invariant=invariant, use_reentrant=False)
        else:
            out = self.feed_forward(r, invariant=invariant)
        return out * scalar

    def forward_chained(self, x, normed_x, attend, next_norm: RMSNorm, *, denoise: bool, invariant: bool,
                        split: int | None = None):  # fmt: skip
        """`forward` through the fused kernels for a chain of layers: this layer's input norm comes
        computed by the layer before (None: computed here), and the norm that follows this layer (the
        next layer's input norm, or the model's final norm) is computed in the kernel that writes the
        output. Returns (output, next_norm(output))."""
        if normed_x is None:
            normed_x = self.input_layernorm(x)
        scalar = self._scalar(x, denoise, split)
        return self._fused_forward(x, attend(normed_x), scalar, invariant=invariant, next_norm=next_norm)

    def _fused_forward(self, x_BTD, attn_BTD, scalar, *, invariant: bool, next_norm: RMSNorm | None = None):
        """`forward` after attention with the norms, residual adds, the experts' sum and the layer
        scalar fused into two kernels (dgemma.ops.norm): the same function, far fewer launches. With
        `next_norm`, (output, next_norm(output)) from the same kernel."""
        from dgemma.ops.norm import ff_combine, residual_norms

        d, eps = x_BTD.shape[-1], self.input_layernorm.eps
        r, normed_1, normed_2, router_in = residual_norms(
            x_BTD,
            attn_BTD,
            self.post_attention_layernorm.weight,
            self.pre_feedforward_layernorm.weight,
            self.pre_feedforward_layernorm_2.weight,
            self.router.scale,
            self.router.root,
            eps,
        )
        weights, index = self.router.route(router_in.view(-1, d))
        if self.experts.kernel_applies(normed_2):  # ff_combine sums each token's expert terms
            experts = self.experts.terms(normed_2.view(-1, d), weights, index)
        else:
            num_rows = x_BTD.shape[0] if invariant else 1  # as in feed_forward
            experts = self.experts(normed_2.view(-1, d), weights, index, num_rows=num_rows)
        return ff_combine(
            r,
            self.mlp(normed_1),
            experts.view(*r.shape[:2], -1, d),
            self.post_feedforward_layernorm_1.weight,
            self.post_feedforward_layernorm_2.weight,
            self.post_feedforward_layernorm.weight,
            scalar,
            eps,
            next_norm=None if next_norm is None else (next_norm.weight, next_norm.eps),
        )


class SelfConditioning(nn.Module):
    """post_norm(canvas_embeds + mlp(pre_norm(soft_embeds))), post_norm without scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.pre_norm = RMSNorm(d, config.rms_norm_eps)
        self.post_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)
        self.mlp = GatedMLP(d, config.intermediate_size, config.hidden_activation)

    def forward(self, embeds_BCD: torch.Tensor, soft_BCD: torch.Tensor | None) -> torch.Tensor:
        if soft_BCD is None:  # first step: the signal is zeros, and the MLP maps zeros to exactly zero
            return self.post_norm(embeds_BCD)
        return self.post_norm(embeds_BCD + self.mlp(self.pre_norm(soft_BCD)))


class DiffusionGemma(nn.Module):
    """The text model. Build with `from_pretrained`, or directly from a `ModelConfig` (random init)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(Layer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self._inv_freq: dict[tuple, torch.Tensor] = {}
        # Inference keeps every row's arithmetic independent of the rest of the batch (a seeded answer
        # must not depend on its neighbours); training turns this off for batched, padded kernels.
        self.batch_invariant = True

    @property
    def gradient_checkpointing(self) -> bool:
        return self.layers[0].checkpoint_feed_forward

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        for layer in self.layers:
            layer.checkpoint_feed_forward = bool(on)

    def pack_projections(self) -> None:
        """q|k|v and gate|up as one weight block each (`PackedLinears`): one GEMM instead of two or
        three in the kernels' inference on CUDA (the engine calls this; the values do not change).
        Modules already packed are left as they are."""
        if self.device.type != "cuda":
            return
        for module in self.modules():
            if isinstance(module, (Attention, GatedMLP)) and (
                module.packed is None or module.packed.block is None
            ):
                module.pack()

    def _apply(self, fn, recurse=True):
        # .to(), .cpu(), .half() ... give the parameters new storage: drop the packed blocks first, so
        # that the old ones are freed with the old weights (the engine packs the new weights again)
        for module in self.modules():
            if isinstance(module, (Attention, GatedMLP)):
                module.packed = None
        return super()._apply(fn, recurse)

    @property
    def use_kernels(self) -> bool:
        """Whether inference on CUDA runs the Triton kernels (experts, norms; the default) or the
        pure-torch spec."""
        return self.layers[0].experts.use_kernel

    @use_kernels.setter
    def use_kernels(self, on: bool) -> None:
        for module in self.modules():
            if hasattr(module, "use_kernel"):
                module.use_kernel = bool(on)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        quantization: str | None = None,
    ) -> DiffusionGemma:
        """Load a Hugging Face-layout checkpoint (local directory or Hub repo id) onto `device`.

        Defaults: CUDA + bfloat16 when a GPU is present (float32 below 1B parameters), else CPU +
        float32. Weights stream into place one tensor at a time (peak memory about one copy of the
        weights). `quantization` ("fp8" or "fp8-w8a8", see `quantize`) stores the experts in FP8 as
        they load: peak memory is the quantized model plus one tensor."""
        from dgemma.model.weights import load_model, resolve_checkpoint

        return load_model(
            resolve_checkpoint(path_or_repo_id),
            device=device,
            dtype=dtype,
            progress=progress,
            quantization=quantization,
        )

    @classmethod
    def empty(
        cls, config: ModelConfig, *, device=None, dtype=None, quantization: str | None = None
    ) -> DiffusionGemma:
        """The model with uninitialised storage, allocated once on `device` (built on the meta device, so
        there is no init pass and no second copy); `quantization`: the experts' storage in FP8."""
        from dgemma.model.quant import check_quantization
        from dgemma.model.weights import default_device_and_dtype

        check_quantization(quantization)
        device, dtype = default_device_and_dtype(device, dtype, parameter_counts(config)["total"])
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype)
        if quantization is not None:
            model.quantize(quantization)
        model = model.to_empty(device=device)
        model.requires_grad_(False)
        return model.eval()

    def quantize(self, quantization: str) -> DiffusionGemma:
        """Store the experts' weights in FP8, in place, one layer at a time (peak memory: the model plus
        one layer's experts in float32, chunked); "fp8-w8a8" also quantizes the gate-up projection's
        input per token as it comes (dgemma.model.quant). Returns the model."""
        from dgemma.model.quant import check_quantization

        check_quantization(quantization)
        for layer in self.layers:
            layer.experts.quantize_()
            layer.experts.fp8_activations = quantization == "fp8-w8a8"
        return self

    @property
    def quantization(self) -> str | None:
        """The scheme of `quantize` ("fp8" or "fp8-w8a8") the experts are in, or None."""
        experts = self.layers[0].experts
        if not experts.quantized:
            return None
        return "fp8-w8a8" if experts.fp8_activations else "fp8"

    @classmethod
    def random(cls, config: ModelConfig, *, device=None, dtype=None, seed: int = 0, std: float = 0.02):
        """Random weights (normal(0, std); norms, scales and layer scalars 1), drawn on `device` from a
        seeded generator: for tests and full-size benchmarks without a checkpoint."""
        model = cls.empty(config, device=device, dtype=dtype)
        generator = torch.Generator(model.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(
                    (
                        "norm.weight",
                        "layernorm.weight",
                        "layernorm_1.weight",
                        "layernorm_2.weight",
                        ".scale",
                        "per_expert_scale",
                        "layer_scalar",
                    )
                ):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)
        return model

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, *, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_length` encoded tokens each (plus one
        canvas of scratch positions a row, for `denoise_static`)."""
        if max_length > self.config.max_position_embeddings:
            raise CapacityError(
                f"max_length {max_length} exceeds the model's context of "
                f"{self.config.max_position_embeddings} positions"
            )
        return KVCache(
            self.config.layers,
            batch_size=batch_size,
            max_length=max_length,
            device=self.device,
            dtype=self.dtype,
            scratch=self.config.canvas_length,
        )

    # -- the two modes -------------------------------------------------------------------------------
    def _rope(self, spec: LayerSpec, positions: torch.Tensor, dtype: torch.dtype):
        key = (spec.rope, spec.head_dim)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(spec.rope, spec.head_dim).to(positions.device)
        return rope_cos_sin(self._inv_freq[key], positions, dtype)

    def _run_layers(self, x, cache: KVCache, rows: list[int], starts: list[int], *, denoise: bool):
        starts_B = torch.tensor(starts, device=x.device)
        positions = starts_B[:, None] + torch.arange(x.shape[1], device=x.device)
        invariant = self.batch_invariant
        index = None if denoise else cache.write_index(rows, x.shape[1])
        # the kernels' encode takes the rows as a device tensor: the write index's rows [B, 1], flattened
        rows_B = index[0].flatten() if index is not None and kernels_apply(x) else None

        def attention(i, layer, cos, sin):
            if denoise:
                return lambda h: layer.self_attn.denoise(
                    h, cos, sin, cache, i, rows, starts, invariant=invariant
                )
            return lambda h: layer.self_attn.encode(
                h, cos, sin, cache, i, rows, starts, invariant=invariant, write_index=index, rows_B=rows_B,
                starts_B=starts_B,
            )  # fmt: skip

        return self._layers(x, positions, attention, denoise=denoise, invariant=invariant)

    def _layers(self, x, positions, attention, *, denoise: bool, invariant: bool, split: int | None = None):
        """Every layer, then the final norm; `attention(i, layer, cos, sin)` gives layer i's attend.
        With `split`, tokens before it are in encode mode, and only the others are returned."""
        tables = {}
        # through the fused kernels, each layer's output kernel also computes the norm that follows it
        # (norms[i + 1]: the next layer's input norm, or the final norm)
        norms = [layer.input_layernorm for layer in self.layers] + [self.norm]
        chained = kernels_apply(x) and all(n.use_kernel for n in norms)
        normed = None
        for i, layer in enumerate(self.layers):
            spec = self.config.layers[i]
            key = (spec.rope, spec.head_dim)
            if key not in tables:
                tables[key] = self._rope(spec, positions, x.dtype)
            attend = attention(i, layer, *tables[key])
            mode = {"denoise": denoise, "invariant": invariant, "split": split}
            if chained:
                x, normed = layer.forward_chained(x, normed, attend, norms[i + 1], **mode)
            else:
                x = layer(x, attend, **mode)
        if chained:
            return normed if split is None else normed[:, split:].contiguous()
        return self.norm(x if split is None else x[:, split:])

    @property
    def embed_scale(self) -> float:
        """sqrt(D) rounded to the weight dtype first (53.0 in bf16 for 2816), as in the reference; a
        Python float, so multiplying by it launches no host-to-device copy (CUDA-graph safe)."""
        return float(torch.tensor(self.config.hidden_size**0.5, dtype=self.dtype))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.embed_scale

    def _check_ids(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise RequestError(f"{what} must be an integer tensor [batch, length], got {_describe(ids)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise RequestError(f"{what} holds ids outside the vocabulary 0..{self.config.vocab_size - 1}")
        return ids.to(self.device, torch.long)

    def encode(
        self,
        token_ids: torch.Tensor,
        cache: KVCache,
        *,
        rows: Sequence[int] | None = None,
        lengths: Sequence[int] | None = None,
    ):
        """Append `token_ids` [B, T] to the cache rows (all rows, or `rows`); return hidden [B, T, D].

        `lengths`: each row's real token count, its ids right-padded to T (prompts of different lengths
        in one forward). A row's cache advances by its length; the padding's K/V land past its end,
        where no later read looks before the next write replaces them (causal attention keeps them
        from the row's real tokens). The rows need room for T tokens each."""
        rows = cache.rows_or_all(rows)
        token_ids, lengths = self.check_encode(token_ids, cache, rows, lengths)
        hidden = self._run_layers(self._embed(token_ids), cache, rows, cache.lengths(rows), denoise=False)
        for row, n in zip(rows, lengths):
            cache.advance([row], n)
        return hidden

    def check_encode(
        self, token_ids: torch.Tensor, cache: KVCache, rows: Sequence[int], lengths: Sequence[int] | None
    ) -> tuple[torch.Tensor, list[int]]:
        """`encode`'s checks: ids [B, T] in the vocabulary, one row of them per cache row, each row's
        length 1 to T (None: T), room for T more tokens in each row. Returns the ids on the model's
        device and the lengths as ints."""
        token_ids = self._check_ids(token_ids, "token_ids")
        b, t = token_ids.shape
        if b != len(rows):
            raise RequestError(f"token_ids has {b} rows for {len(rows)} cache rows")
        lengths = [t] * b if lengths is None else [int(n) for n in lengths]
        if len(lengths) != b or not all(0 < n <= t for n in lengths):
            raise RequestError(f"lengths {lengths} must give each of the {b} rows 1 to {t} tokens")
        cache.check_room(rows, t)
        return token_ids, lengths

    def denoise_hidden(
        self,
        canvas_ids: torch.Tensor,
        cache: KVCache,
        self_conditioning_logits: torch.Tensor | None = None,
        *,
        rows: Sequence[int] | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        prefix_lengths: Sequence[int] | None = None,
        self_conditioning_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's final hidden states [B, C, D] (the head is applied separately).

        `prefix_lengths` lets each row see only its first tokens of the cache (default: all encoded):
        training encodes a whole clean sequence once, then denoises a canvas from the middle of it.
        `self_conditioning_embeds` [B, C, D] is the signal already through `soft_embedding` (the engine
        keeps that, not the logits: its memory grows with the hidden size, not the vocabulary)."""
        rows = cache.rows_or_all(rows)
        starts = cache.lengths(rows)
        if prefix_lengths is not None:
            prefix_lengths = [int(n) for n in prefix_lengths]
            if len(prefix_lengths) != len(rows) or any(
                not 0 <= n <= s for n, s in zip(prefix_lengths, starts)
            ):
                raise RequestError(
                    f"prefix_lengths {prefix_lengths} must be within the encoded lengths {starts}"
                )
            starts = prefix_lengths
        canvas_ids = self._check_ids(canvas_ids, "canvas_ids")
        if canvas_ids.shape[0] != len(rows):
            raise RequestError(f"canvas_ids has {canvas_ids.shape[0]} rows for {len(rows)} cache rows")
        top = max(starts, default=0) + canvas_ids.shape[1]
        if top > self.config.max_position_embeddings:
            raise CapacityError(
                f"canvas positions reach {top}, past the context of {self.config.max_position_embeddings}"
            )
        embeds = self._embed(canvas_ids)
        soft = None
        if self_conditioning_logits is not None:
            expected = (*canvas_ids.shape, self.config.vocab_size)
            if tuple(self_conditioning_logits.shape) != expected:
                raise RequestError(
                    f"self_conditioning_logits must have shape {list(expected)}, "
                    f"got {list(self_conditioning_logits.shape)}"
                )
            soft = self.soft_embedding(self_conditioning_logits.to(self.device))
        elif self_conditioning_embeds is not None:
            soft = self_conditioning_embeds.to(self.device, self.dtype)
        if soft is not None and self_conditioning_mask is not None:
            soft = soft * self_conditioning_mask.to(soft.device, soft.dtype)[:, None, None]
        x = self.self_conditioning(embeds, soft)
        return self._run_layers(x, cache, rows, starts, denoise=True)

    def denoise_static(
        self,
        canvas_ids_BC: torch.Tensor,
        soft_BCD: torch.Tensor,
        cache: KVCache,
        rows_B: torch.Tensor,
        starts_B: torch.Tensor,
    ) -> torch.Tensor:
        """`denoise_hidden` for CUDA graphs: every input a device tensor, no checks, no host sync.

        soft_BCD holds each row's self-conditioning signal (zeros on a canvas's first step, where the
        block maps zeros to exactly zero); rows_B and starts_B are the cache rows and prefix lengths.
        The canvas's K/V are written to the cache's scratch positions past each prefix (see KVCache)."""
        if cache.scratch < canvas_ids_BC.shape[1]:
            raise ValueError(
                f"denoise_static writes the canvas's K/V past the prefix: the cache needs at least "
                f"{canvas_ids_BC.shape[1]} scratch positions a row, it has {cache.scratch} (use new_cache)"
            )
        x = self.self_conditioning(self._embed(canvas_ids_BC), soft_BCD)
        positions = starts_B[:, None] + torch.arange(canvas_ids_BC.shape[1], device=x.device)
        spans = {}  # each row's run of keys, per window: computed by the first layer that needs it

        def attention(i, layer, cos, sin):
            return lambda h: layer.self_attn.denoise_static(h, cos, sin, cache, i, rows_B, starts_B, spans)

        return self._layers(x, positions, attention, denoise=True, invariant=False)

    def encode_static(
        self, token_ids_BT: torch.Tensor, cache: KVCache, rows_B: torch.Tensor, starts_B: torch.Tensor
    ) -> None:
        """`encode` for CUDA graphs: writes K/V at starts_B of rows_B, every input a device tensor, no
        checks; the caller advances the cache's lengths (`cache.advance`)."""
        x = self._embed(token_ids_BT)
        positions = starts_B[:, None] + torch.arange(token_ids_BT.shape[1], device=x.device)

        def attention(i, layer, cos, sin):
            return lambda h: layer.self_attn.encode_static(h, cos, sin, cache, i, rows_B, starts_B)

        self._layers(x, positions, attention, denoise=False, invariant=False)

    def commit_denoise_static(
        self,
        commit_ids_BC: torch.Tensor,
        canvas_ids_BC: torch.Tensor,
        cache: KVCache,
        rows_B: torch.Tensor,
        starts_B: torch.Tensor,
    ) -> torch.Tensor:
        """`encode_static` of the finished canvases commit_ids_BC at starts_B, then the first
        `denoise_static` step (no self-conditioning signal) of the next canvases canvas_ids_BC, in one
        forward: the weights are read once for both. Returns the next canvases' hidden states [B, C, D];
        the caller advances the cache's lengths by C. Each layer writes the commit's K/V before the
        canvas attends to them (`Attention.commit_denoise_static`)."""
        c = canvas_ids_BC.shape[1]
        if cache.scratch < c:
            raise ValueError(f"the cache needs {c} scratch positions a row, it has {cache.scratch}")
        x = torch.cat(
            [self._embed(commit_ids_BC), self.self_conditioning(self._embed(canvas_ids_BC), None)], 1
        )
        positions = starts_B[:, None] + torch.arange(2 * c, device=x.device)

        def attention(i, layer, cos, sin):
            return lambda h: layer.self_attn.commit_denoise_static(h, cos, sin, cache, i, rows_B, starts_B)

        return self._layers(x, positions, attention, denoise=True, invariant=False, split=c)

    def soft_embedding(self, logits_BCV: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ E * sqrt(D): the expected embedding under the previous step's distribution."""
        weight = self.embed_tokens.weight
        return self.expected_embedding(F.softmax(logits_BCV, dim=-1, dtype=torch.float32).to(weight.dtype))

    def expected_embedding(self, probs_BCV: torch.Tensor) -> torch.Tensor:
        """probs @ E * sqrt(D), probs in the embedding's dtype (`soft_embedding` after its softmax)."""
        return (probs_BCV @ self.embed_tokens.weight) * self.embed_scale

    def head(self, hidden_BCD: torch.Tensor) -> torch.Tensor:
        """The tied head's logits in the model's dtype, before the soft-cap."""
        return F.linear(hidden_BCD, self.embed_tokens.weight)

    def logits(self, hidden_BCD: torch.Tensor) -> torch.Tensor:
        """Tied head, then the fp32 soft-cap tanh(x / cap) * cap."""
        logits = self.head(hidden_BCD).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def denoise(
        self,
        canvas_ids: torch.Tensor,
        cache: KVCache,
        self_conditioning_logits: torch.Tensor | None = None,
        *,
        rows: Sequence[int] | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        prefix_lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """fp32 soft-capped logits [B, C, V] for the canvas; the cache is left unchanged."""
        hidden = self.denoise_hidden(
            canvas_ids,
            cache,
            self_conditioning_logits,
            rows=rows,
            self_conditioning_mask=self_conditioning_mask,
            prefix_lengths=prefix_lengths,
        )
        return self.logits(hidden)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
