"""The vocabulary stage of a denoise step: from the denoiser's hidden states to each canvas's sampled,
accepted and renoised tokens, its draft (argmax), its stop statistics and its self-conditioning signal.

One contract, two implementations, chosen per call like the model's other kernels:
- the spec (CPU, or `model.use_kernels = False`): `DiffusionGemma.logits` (fp32 soft-capped) and
  `sample_steps`, as the reference computes them;
- on CUDA with Triton, the fused passes of `dgemma.ops.vocab`: the head's logits stay in the model's
  dtype and two passes over them replace some twenty fp32 passes. The sampling noise is drawn from each
  canvas's generator exactly as `torch.multinomial` draws it (q ~ Exp(1) over the [C, V] probabilities,
  then argmax(p / q)), so a seeded answer makes the same draws on both paths; tokens differ only where
  rounding breaks a near-tie. Memory per group of canvases: the logits and the self-conditioning
  probabilities in the model's dtype and one canvas of fp32 noise, a fixed workspace whatever the
  number of canvases (the engine takes `GPU_LOGIT_ROWS` canvases at a time).

Either way the signal for the next step's self-conditioning is softmax(tempered logits in the model's
dtype) in the model's dtype, which `DiffusionGemma.expected_embedding` turns into the soft embedding
(the reference: `soft_embedding` of the tempered logits cast to the embedding dtype).
"""

from __future__ import annotations

import torch

from dgemma.denoise.sampler import Sampler, StepOutcome, decide, sample_steps
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.layers import kernels_apply


class VocabStage:
    """`sample(...)` for a group of canvases; keeps the fused path's noise buffer between steps."""

    def __init__(self, model: DiffusionGemma):
        self.model = model
        self._noise: torch.Tensor | None = None

    def sample(
        self,
        hidden_GCD: torch.Tensor,
        canvases: list[torch.Tensor],
        *,
        temps: list[torch.Tensor | float],
        samplers: list[Sampler],
        generators: list[torch.Generator | None],
    ) -> list[StepOutcome]:
        """One sampler step for G canvases (hidden_GCD: their final hidden states)."""
        model = self.model
        if model.use_kernels and kernels_apply(hidden_GCD):
            return self.fused(hidden_GCD, canvases, temps=temps, samplers=samplers, generators=generators)
        return sample_steps(
            model.logits(hidden_GCD),
            canvases,
            temps=temps,
            samplers=samplers,
            generators=generators,
            signal_dtype=model.dtype,
        )

    def fused(self, hidden_GCD, canvases, *, temps, samplers, generators) -> list[StepOutcome]:
        """`sample` through the Triton passes (CUDA; CPU tensors run under TRITON_INTERPRET=1)."""
        from dgemma.ops.vocab import vocab_sample, vocab_stats

        model = self.model
        g, c, _ = hidden_GCD.shape
        raw = model.head(hidden_GCD).view(g * c, -1)
        vocab, device = raw.shape[-1], raw.device
        temp_R = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in temps])
        temp_R = temp_R.to(device, non_blocking=True).repeat_interleave(c)
        cap = model.config.final_logit_softcapping
        stats = vocab_stats(raw, temp_R, cap, model.dtype)
        probs = torch.empty(g, c, vocab, dtype=model.dtype, device=device)
        if self._noise is None or self._noise.shape != (c, vocab) or self._noise.device != device:
            self._noise = torch.empty(c, vocab, dtype=torch.float32, device=device)
        draws = []
        for j, generator in enumerate(generators):
            lo, hi = j * c, (j + 1) * c
            self._noise.exponential_(1, generator=generator)  # torch.multinomial's draw for [C, V]
            sampled = vocab_sample(raw[lo:hi], temp_R[lo:hi], cap, stats.rows(lo, hi), self._noise, probs[j])
            draws.append(sampled.view(1, c))
        return decide(
            stats.argmax.view(g, c),
            stats.entropy.view(g, c),
            stats.top_prob.view(g, c),
            draws,
            canvases,
            samplers,
            generators,
            probs,
        )
