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

With `graphs` (the engine's default on CUDA), a group of canvases whose samplers are the built-in ones
(entropy bound, confidence: their parameters become per-canvas tensors) takes the whole fused stage,
its acceptance, renoising and soft embedding included, as one CUDA graph replay per group size: the
host launches one graph instead of some forty kernels a canvas. Each canvas still draws from its own
generator: the graph draws from one registered generator per canvas slot, whose state (seed and
offset) is the canvas's generator's before the replay and goes back to it after, so the draws and the
generator's advance are those of the eager fused path. `static` runs the same batched stage uncaptured
(CPU tests, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgemma.denoise.sampler import (
    ConfidenceSampler,
    EntropyBoundSampler,
    Sampler,
    StepOutcome,
    confidence_keep,
    decide,
    entropy_bound_keep,
    random_canvas,
    sample_steps,
    stack_temperatures,
)
from dgemma.engine.runner import buckets_for, capture
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.layers import kernels_apply


@dataclass
class _Group:
    """The static inputs and outputs of the batched stage for G canvases (one graph when captured)."""

    graph: torch.cuda.CUDAGraph | None
    generators: list[torch.Generator]  # one per canvas slot, registered with the graph
    hidden_GCD: torch.Tensor
    # per canvas: temperature, entropy bound (entropy-bound canvases), threshold (confidence
    # canvases), 1.0 where the sampler is the confidence one: one copy from the host a call
    params_4G: torch.Tensor
    out: dict[str, torch.Tensor] | None = None


class VocabStage:
    """`sample(...)` for a group of canvases; `soft_embeddings(...)` for the next step."""

    def __init__(
        self, model: DiffusionGemma, *, graphs: bool = False, static: bool | None = None, groups: int = 4
    ):
        """graphs: replay the built-in samplers' fused stage from CUDA graphs (needs CUDA); static: run
        that batched stage uncaptured; groups: the most canvases one call takes (graph sizes are the
        powers of two below it and itself)."""
        if graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.graphs = graphs
        self.static = graphs if static is None else static
        self.buckets = buckets_for(groups)
        self._noise: torch.Tensor | None = None
        self._groups: dict[int, _Group] = {}
        self._pool = None

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
            batched = (
                self.static
                and len(canvases) <= self.buckets[-1]
                and all(type(s) in (EntropyBoundSampler, ConfidenceSampler) for s in samplers)
                and all(g is not None for g in generators)
            )
            method = self.batched if batched else self.fused
            return method(hidden_GCD, canvases, temps=temps, samplers=samplers, generators=generators)
        return sample_steps(
            model.logits(hidden_GCD),
            canvases,
            temps=temps,
            samplers=samplers,
            generators=generators,
            signal_dtype=model.dtype,
        )

    def soft_embeddings(self, outcomes: list[StepOutcome]) -> torch.Tensor:
        """[N, C, D] the next step's self-conditioning embeddings of these outcomes (one group's)."""
        if all(o.soft is not None for o in outcomes):
            return torch.cat([o.soft for o in outcomes])
        return self.model.expected_embedding(torch.cat([o.signal for o in outcomes]))

    def fused(self, hidden_GCD, canvases, *, temps, samplers, generators) -> list[StepOutcome]:
        """`sample` through the Triton passes (CUDA; CPU tensors run under TRITON_INTERPRET=1)."""
        g, c, _ = hidden_GCD.shape
        temp_R = stack_temperatures(temps).to(hidden_GCD.device, non_blocking=True).repeat_interleave(c)
        if self._noise is None or self._noise.shape[0] != c or self._noise.device != hidden_GCD.device:
            self._noise = torch.empty(
                c, self.model.config.vocab_size, dtype=torch.float32, device=hidden_GCD.device
            )
        stats, draws_GC, probs = self._draws(hidden_GCD, temp_R, generators, self._noise)
        return decide(
            stats.argmax.view(g, c),
            stats.entropy.view(g, c),
            stats.top_prob.view(g, c),
            list(draws_GC.split(1)),
            canvases,
            samplers,
            generators,
            probs,
        )

    def _draws(self, hidden_GCD, temp_R, generators, noise_CV):
        """The two fused passes over the head's logits: (their statistics, each canvas's sampled
        tokens [G, C], the self-conditioning signal [G, C, V]), each canvas's sampling noise drawn
        from its generator exactly as torch.multinomial draws it."""
        from dgemma.ops.vocab import vocab_sample, vocab_stats

        model = self.model
        g, c, _ = hidden_GCD.shape
        raw = model.head(hidden_GCD).view(g * c, -1)
        cap = model.config.final_logit_softcapping
        stats = vocab_stats(raw, temp_R, cap, model.dtype)
        probs = torch.empty(g, c, raw.shape[-1], dtype=model.dtype, device=raw.device)
        draws = []
        for j, generator in enumerate(generators):
            lo, hi = j * c, (j + 1) * c
            noise_CV.exponential_(1, generator=generator)  # torch.multinomial's draw for [C, V]
            draws.append(vocab_sample(raw[lo:hi], temp_R[lo:hi], cap, stats.rows(lo, hi), noise_CV, probs[j]))
        return stats, torch.stack(draws), probs

    def batched(self, hidden_GCD, canvases, *, temps, samplers, generators) -> list[StepOutcome]:
        """`fused` for the built-in samplers as one batched stage: a CUDA graph replay with `graphs`."""
        n = len(canvases)
        group = self._group(next(size for size in self.buckets if size >= n))
        group.hidden_GCD[:n].copy_(hidden_GCD)
        params = torch.tensor(
            [
                [float(t) for t in temps],
                [getattr(s, "entropy_bound", 0.0) for s in samplers],
                [getattr(s, "threshold", 0.0) for s in samplers],
                [float(isinstance(s, ConfidenceSampler)) for s in samplers],
            ],
            dtype=torch.float32,
        )
        if group.params_4G.is_cuda:
            # from pinned memory the copy is queued behind the forward; from pageable memory the host
            # would wait for the forward to finish before it could launch this stage
            params = params.pin_memory()
        group.params_4G[:, :n].copy_(params, non_blocking=True)
        for slot, generator in zip(group.generators, generators):
            slot.set_state(generator.get_state())
        if group.graph is None:
            group.out = self._batched_stage(group)
        else:
            group.graph.replay()
        for slot, generator in zip(group.generators, generators):
            generator.set_state(slot.get_state())
        out = group.out
        return [
            StepOutcome(
                next_canvas=out["next_canvas"][j : j + 1].clone(),
                argmax=out["argmax"][j : j + 1].clone(),
                signal=None,
                accepted=out["accepted"][j].clone(),
                mean_entropy=out["mean_entropy"][j].clone(),
                soft=out["soft"][j : j + 1].clone(),
            )
            for j in range(n)
        ]

    def _batched_stage(self, group: _Group) -> dict[str, torch.Tensor]:
        """What the graph holds: the fused passes, both built-in samplers' acceptance (each canvas
        takes its own), the renoising draw and the soft embedding, for every canvas slot."""
        model = self.model
        g, c, _ = group.hidden_GCD.shape
        vocab, device = model.config.vocab_size, group.hidden_GCD.device
        noise = torch.empty(c, vocab, dtype=torch.float32, device=device)
        temp_G, bound_G, threshold_G, confidence_G = group.params_4G
        temp_R = temp_G.repeat_interleave(c)
        stats, draws_GC, probs = self._draws(group.hidden_GCD, temp_R, group.generators, noise)
        entropy_GC, top_prob_GC = stats.entropy.view(g, c), stats.top_prob.view(g, c)
        keep = torch.where(
            confidence_G[:, None] > 0,
            confidence_keep(top_prob_GC, threshold_G[:, None]),
            entropy_bound_keep(entropy_GC, bound_G[:, None]),
        )
        # each canvas's renoising draw after its sampling draw, from its own generator (as `decide`)
        renoise = torch.cat([random_canvas(c, vocab, gen, device) for gen in group.generators])
        return {
            "next_canvas": torch.where(keep, draws_GC, renoise),
            "argmax": stats.argmax.view(g, c),
            "accepted": keep.sum(dim=-1),
            "mean_entropy": entropy_GC.mean(dim=-1),
            "soft": model.expected_embedding(probs),
        }

    def _group(self, size: int) -> _Group:
        if size in self._groups:
            return self._groups[size]
        model, device = self.model, self.model.device
        c, d = model.config.canvas_length, model.config.hidden_size
        group = _Group(
            graph=torch.cuda.CUDAGraph() if self.graphs else None,
            generators=[torch.Generator(device) for _ in range(size)],
            hidden_GCD=torch.zeros(size, c, d, dtype=model.dtype, device=device),
            params_4G=torch.ones(4, size, device=device),
        )
        if self.graphs:  # the slot generators draw inside the graph
            group.out = capture(group.graph, lambda: self._batched_stage(group), self._pool, group.generators)
            self._pool = group.graph.pool()
        self._groups[size] = group
        return group
