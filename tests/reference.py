"""Tiny random DiffusionGemma checkpoints written by transformers (the reference) in the real HF layout.

Test-only: transformers is the executable specification we check against, never a runtime dependency.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    position_embedding_size=64,
    patch_size=4,
    pooling_kernel_size=2,
)


def text_config(**overrides) -> dict:
    """A tiny text config with both layer kinds, different head dims and KV-head counts."""
    config = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        max_position_embeddings=4096,
        use_bidirectional_attention="vision",
        eos_token_id=[1, 106],
    )
    config.update(overrides)
    return config


def make_reference(
    text: dict | None = None,
    *,
    canvas_length: int = 16,
    seed: int = 0,
    vision: bool = True,
    weight_scale: float = 1.0,
):
    """A transformers DiffusionGemmaForBlockDiffusion with random weights (non-trivial norms and scales).

    `weight_scale` multiplies the matrices: the default init (std 0.02) gives near-uniform logits, which
    never let a canvas stop early; a larger scale makes the model confident enough to."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = DiffusionGemmaConfig(
        text_config=text or text_config(),
        vision_config=TINY_VISION if vision else None,
        canvas_length=canvas_length,
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # ones everywhere would hide a norm applied at the wrong place: perturb every scale-like tensor
        for name, tensor in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
                tensor.copy_(1.0 + 0.3 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith(".bias"):  # zero-initialised: randomise, or a misplaced bias would not show
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.mul_(weight_scale)
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.copy_(0.8 + 0.4 * torch.rand(buffer.shape, generator=generator))
    return model


def save_reference(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path
