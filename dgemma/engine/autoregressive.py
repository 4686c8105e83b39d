"""The same weights decoding autoregressively through the encoder path (greedy): the encoder loss trains
the causal mode as a language model, so this is the AR baseline to compare diffusion against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgemma.model.diffusion_gemma import DiffusionGemma


@torch.inference_mode()
def generate_autoregressive(
    model: DiffusionGemma, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_token_ids: Sequence[int]
) -> list[int]:
    """Greedy next-token decoding, one encode call per token; stops before an EOS id."""
    cache = model.new_cache(batch_size=1, max_length=len(prompt_ids) + max_new_tokens)
    hidden = model.encode(torch.tensor([list(prompt_ids)], device=model.device), cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model.logits(hidden[:, -1]).argmax(-1))
        if token in eos_token_ids:
            break
        out.append(token)
        hidden = model.encode(torch.tensor([[token]], device=model.device), cache)
    return out
