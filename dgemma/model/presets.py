"""The released checkpoint's config (google/diffusiongemma-26B-A4B-it, text part), for building full-size
models with random weights where the real checkpoint is not at hand (benchmarks, load tests).

Sizes as listed in shared/reference/diffusiongemma.md, section 2 (from the model card and the checkpoint's
config.json).
"""

from __future__ import annotations

import copy
from pathlib import Path

_RELEASE = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "model_type": "diffusion_gemma",
    "canvas_length": 256,
    "boi_token_id": 255999,
    "eoi_token_id": 258882,
    "image_token_id": 258880,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "vocab_size": 262144,
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "num_hidden_layers": 30,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
        "num_experts": 128,
        "top_k_experts": 8,
        "moe_intermediate_size": 704,
        "enable_moe_block": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "use_bidirectional_attention": "vision",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
    },
}

# The embedded default model: a 13.7M-parameter Python code-completion DiffusionGemma trained with
# scripts/train_default_model.py (MODEL_CARD.md beside its weights says how, on what, and how well).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
# load-time weight quantizations (dgemma.model.quant); here, without torch, for the CLI's choices
QUANTIZATIONS = ("fp8", "fp8-w8a8")

RELEASE_GENERATION_CONFIG = {
    "max_denoising_steps": 48,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "max_new_tokens": 256,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
    "bos_token_id": 2,
}


def release_config_dict() -> dict:
    """A fresh copy of the release's config.json (text part; no vision tower)."""
    return copy.deepcopy(_RELEASE)
