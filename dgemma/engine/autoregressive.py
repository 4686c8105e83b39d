"""The same weights decoding autoregressively through the encoder path (greedy): the encoder loss trains
the causal mode as a language model, so this is the AR baseline to compare diffusion against (and the
teacher that writes distillation data for the default model, `scripts/build_completion_data.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgemma.errors import RequestError
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


@torch.inference_mode()
def generate_autoregressive_batch(
    model: DiffusionGemma,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
) -> list[list[int]]:
    """Greedy decoding of many prompts of different lengths at once, with no padding and no host
    synchronisation per token: every row advances one position per call, feeding its own prompt token
    while it has one and its previous prediction after that. The answers match `generate_autoregressive`
    up to the rounding of batched kernels (the model runs in its batched, not batch-invariant, mode).
    Sorting prompts by length first keeps the wasted positions few."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RequestError("every prompt needs at least one token")
    lengths = torch.tensor([len(p) for p in prompts], device=model.device)
    shortest, longest = int(lengths.min()), int(lengths.max())
    padded = torch.zeros(len(prompts), longest + max_new_tokens, dtype=torch.long, device=model.device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(list(p), device=model.device)
    cache = model.new_cache(batch_size=len(prompts), max_length=longest + max_new_tokens)
    invariant, model.batch_invariant = model.batch_invariant, False
    try:
        hidden = model.encode(padded[:, :shortest], cache)[:, -1]
        end = longest + max_new_tokens
        for position in range(shortest, end):
            predicted = model.logits(hidden).argmax(-1)
            padded[:, position] = torch.where(position < lengths, padded[:, position], predicted)
            if position + 1 < end:  # the last position is predicted, never encoded
                hidden = model.encode(padded[:, position : position + 1], cache)[:, -1]
    finally:
        model.batch_invariant = invariant
    eos = set(eos_token_ids)
    answers = []
    for p, row in zip(prompts, padded.tolist()):
        new = row[len(p) : len(p) + max_new_tokens]
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        answers.append(new[:cut])
    return answers
