"""Checkpoint `config.json` -> frozen `ModelConfig` (no transformers import).

Accepts the Hugging Face layout (`model_type: diffusion_gemma` with a `text_config`), both spellings of the
full-attention overrides (`global_head_dim` / `num_global_key_value_heads` as released, or the
`per_layer_config` that transformers' `save_pretrained` writes), and reads every size from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgemma.errors import CheckpointError

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")
SUPPORTED_ROPE_TYPES = ("default", "proportional")


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """Rotary embedding of one layer type. `inv_freq` has head_dim / 2 entries (zeros = no rotation)."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """Attention geometry of one layer, resolved once from the config."""

    layer_type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    has_v_proj: bool  # full layers reuse the raw k_proj output as V
    window: int | None  # sliding window (keys strictly closer than this), None for full layers
    rope: RopeSpec

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the model needs from `config.json`. Frozen; derived per-layer values live in `layers`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 131072
    canvas_length: int = 256
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (1,)
    image_token_id: int | None = None
    has_vision: bool = False
    # The file's own dict, kept so a checkpoint can be written back unchanged (not part of equality).
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found (a checkpoint needs config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type == "diffusion_gemma":
            text = data.get("text_config")
            if not isinstance(text, dict):
                raise CheckpointError("model_type 'diffusion_gemma' needs a 'text_config' object")
            canvas_length = data.get("canvas_length", 256)
            image_token_id = data.get("image_token_id")
            has_vision = isinstance(data.get("vision_config"), dict)
        elif model_type == "diffusion_gemma_text":
            text, canvas_length, image_token_id, has_vision = (
                data,
                data.get("canvas_length", 256),
                None,
                False,
            )
        else:
            raise CheckpointError(
                f"unknown model_type {model_type!r}: dgemma runs 'diffusion_gemma' checkpoints "
                "(DiffusionGemmaForBlockDiffusion)"
            )
        if text.get("model_type", "diffusion_gemma_text") != "diffusion_gemma_text":
            raise CheckpointError(f"unknown text_config.model_type {text.get('model_type')!r}")
        return _parse_text_config(text, data, canvas_length, image_token_id, has_vision)


def _get(text: dict, key: str, kind: type, default: Any = ..., *, positive: bool = True) -> Any:
    if key not in text or text[key] is None:
        if default is ...:
            raise CheckpointError(f"text_config.{key} is missing")
        return default
    value = text[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"text_config.{key} must be {kind.__name__}, got {value!r}")
    if positive and kind in (int, float) and value <= 0:
        raise CheckpointError(f"text_config.{key} must be > 0, got {value!r}")
    return value


def _rope_spec(text: dict, layer_type: str) -> RopeSpec:
    params = text.get("rope_parameters") or {}
    defaults = {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    spec = params.get(layer_type, defaults[layer_type]) if isinstance(params, dict) else None
    if not isinstance(spec, dict):
        raise CheckpointError(f"text_config.rope_parameters.{layer_type} must be an object")
    rope_type = spec.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"rope_parameters.{layer_type}.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return RopeSpec(
        rope_type=rope_type,
        theta=float(spec.get("rope_theta", defaults[layer_type]["rope_theta"])),
        partial_rotary_factor=float(spec.get("partial_rotary_factor", 1.0)),
        factor=float(spec.get("factor", 1.0)),
    )


def _parse_text_config(
    text: dict, top: dict, canvas_length: Any, image_token_id: Any, has_vision: bool
) -> ModelConfig:
    hidden = _get(text, "hidden_size", int)
    num_heads = _get(text, "num_attention_heads", int)
    num_layers = _get(text, "num_hidden_layers", int)
    head_dim = _get(text, "head_dim", int, hidden // num_heads)
    num_kv_heads = _get(text, "num_key_value_heads", int, num_heads)
    window = _get(text, "sliding_window", int, 512)
    if window < 2:
        raise CheckpointError(f"text_config.sliding_window must be >= 2, got {window}")
    if text.get("use_bidirectional_attention") == "all":
        raise CheckpointError(
            "text_config.use_bidirectional_attention='all' (a bidirectional encoder) is not supported; "
            "DiffusionGemma releases use a causal encoder ('vision' or null)"
        )

    layer_types = text.get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise CheckpointError(f"text_config.layer_types must list {num_layers} entries, got {layer_types!r}")
    bad = sorted({t for t in layer_types if t not in (SLIDING, FULL)})
    if bad:
        raise CheckpointError(
            f"text_config.layer_types has unknown entries {bad} (allowed: {SLIDING}, {FULL})"
        )

    # Full-attention overrides: released configs say global_*; save_pretrained writes per_layer_config.
    overrides: dict[int, dict] = {}
    per_layer = text.get("per_layer_config")
    if isinstance(per_layer, dict):
        for key, value in per_layer.items():
            try:
                overrides[int(key)] = dict(value)
            except (TypeError, ValueError):
                raise CheckpointError(f"text_config.per_layer_config has a bad entry {key!r}") from None
    else:
        global_override: dict[str, int] = {"head_dim": _get(text, "global_head_dim", int, 512)}
        global_kv = text.get("num_global_key_value_heads")
        if global_kv is not None and text.get("attention_k_eq_v", True):
            global_override["num_key_value_heads"] = _get(text, "num_global_key_value_heads", int)
        overrides = {i: global_override for i, t in enumerate(layer_types) if t == FULL}

    ropes = {t: _rope_spec(text, t) for t in set(layer_types)}
    layers = []
    for i, layer_type in enumerate(layer_types):
        override = overrides.get(i, {})
        spec = LayerSpec(
            layer_type=layer_type,
            head_dim=int(override.get("head_dim", head_dim)),
            num_kv_heads=int(override.get("num_key_value_heads", num_kv_heads)),
            has_v_proj=layer_type == SLIDING,
            window=window if layer_type == SLIDING else None,
            rope=ropes[layer_type],
        )
        if num_heads % spec.num_kv_heads:
            raise CheckpointError(
                f"layer {i}: num_attention_heads {num_heads} is not a multiple of its "
                f"{spec.num_kv_heads} key/value heads"
            )
        if spec.head_dim % 2:
            raise CheckpointError(f"layer {i}: head_dim {spec.head_dim} must be even for rotary embeddings")
        if spec.rope.rope_type == "default" and spec.rope.partial_rotary_factor != 1.0:
            raise CheckpointError(
                f"layer {i}: 'default' RoPE with partial_rotary_factor != 1 is not supported"
            )
        layers.append(spec)

    activation = text.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"text_config.hidden_activation {activation!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    num_experts = _get(text, "num_experts", int)
    top_k = _get(text, "top_k_experts", int)
    if top_k > num_experts:
        raise CheckpointError(f"text_config.top_k_experts {top_k} exceeds num_experts {num_experts}")
    if not isinstance(canvas_length, int) or isinstance(canvas_length, bool) or canvas_length <= 0:
        raise CheckpointError(f"canvas_length must be a positive integer, got {canvas_length!r}")

    eos = text.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    softcap = text.get("final_logit_softcapping", 30.0)
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap <= 0):
        raise CheckpointError(f"text_config.final_logit_softcapping must be > 0 or null, got {softcap!r}")
    vocab = _get(text, "vocab_size", int)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_get(text, "intermediate_size", int),
        num_heads=num_heads,
        layers=tuple(layers),
        num_experts=num_experts,
        top_k_experts=top_k,
        moe_intermediate_size=_get(text, "moe_intermediate_size", int),
        rms_norm_eps=_get(text, "rms_norm_eps", float, 1e-6),
        hidden_activation=activation,
        attention_bias=bool(text.get("attention_bias", False)),
        final_logit_softcapping=None if softcap is None else float(softcap),
        max_position_embeddings=_get(text, "max_position_embeddings", int, 131072),
        canvas_length=canvas_length,
        pad_token_id=text.get("pad_token_id", 0),
        bos_token_id=text.get("bos_token_id", 2),
        eos_token_ids=eos_ids,
        image_token_id=image_token_id,
        has_vision=has_vision,
        source=top,
    )


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by group (the text model; shared encoder/decoder weights counted once)."""
    d = config.hidden_size
    attention = 0
    for spec in config.layers:
        q = config.num_heads * spec.head_dim
        kv = spec.num_kv_heads * spec.head_dim
        attention += d * q + d * kv * (2 if spec.has_v_proj else 1) + q * d + 2 * spec.head_dim
    experts = config.num_layers * config.num_experts * 3 * config.moe_intermediate_size * d
    dense = config.num_layers * 3 * config.intermediate_size * d
    router = config.num_layers * (config.num_experts * d + d + config.num_experts)
    norms = config.num_layers * 7 * d + d
    self_conditioning = 3 * config.intermediate_size * d + d
    embedding = config.vocab_size * d
    total = attention + experts + dense + router + norms + self_conditioning + embedding
    active_experts = config.num_layers * config.top_k_experts * 3 * config.moe_intermediate_size * d
    return {
        "attention": attention,
        "experts": experts,
        "dense_mlp": dense,
        "router": router,
        "norms": norms,
        "self_conditioning": self_conditioning,
        "embedding": embedding,
        "total": total,
        "active_per_token": total - experts + active_experts,
    }


def kv_bytes_per_token(config: ModelConfig, bytes_per_element: int) -> int:
    """Bytes of K and V cached per prefix token, summed over layers (full-length storage)."""
    return sum(2 * s.num_kv_heads * s.head_dim * bytes_per_element for s in config.layers)
