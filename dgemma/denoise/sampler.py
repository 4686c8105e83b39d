"""The diffusion policy as tensor functions: temperature schedule, sampling, acceptance, renoising, stopping.

Shape legend: B canvases, C canvas positions, V vocabulary.

One denoise step on a canvas (reference semantics, transformers' generation_diffusion_gemma.py):
  1. temperature t = t_min + (t_max - t_min) * cur_step / N, with cur_step counting N .. 1;
  2. tempered = logits / t; sample a token everywhere from softmax(tempered); argmax = tempered.argmax;
  3. the sampler accepts some positions (re-decided every step, not sticky);
  4. accepted positions keep the sampled token, all others get fresh uniform random tokens;
  5. stop when the argmax canvas is unchanged for `stability_threshold` steps and the mean entropy of
     the tempered logits is below `confidence_threshold`;
  6. the tempered logits are the next step's self-conditioning input (through their softmax).
Samplers are pluggable: `accept` is the only policy hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


def temperature(cur_step: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule over remaining steps: t_max at the first step (cur_step = N), never exactly t_min.

    A 0-d float32 tensor computed as the reference computes it (cur_step is an int32 tensor there), so
    the tempered logits agree to the last bit."""
    return t_min + (t_max - t_min) * (torch.tensor(cur_step, dtype=torch.int32) / max_steps)


def stack_temperatures(temps: list[torch.Tensor | float]) -> torch.Tensor:
    """Per-canvas temperatures (0-d tensors or floats) as one [G] float32 tensor, on the CPU."""
    return torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in temps])


def entropy(logits_BCV: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, computed as torch.distributions.Categorical does."""
    normalized = logits_BCV - logits_BCV.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(normalized, dim=-1)
    normalized = torch.clamp(normalized, min=torch.finfo(normalized.dtype).min)
    return -(normalized * probs).sum(-1)


class Sampler(ABC):
    """Decides which positions of the sampled canvas are kept this step; the rest are renoised."""

    name: str

    @abstractmethod
    def accept(self, entropy_BC: torch.Tensor, top_prob_BC: torch.Tensor) -> torch.Tensor:
        """Boolean [B, C]: positions whose sampled token is kept, from each position's entropy and top
        probability under softmax(tempered logits) (what the GPU's fused vocabulary pass computes, so a
        policy never needs the [B, C, V] logits)."""


class EntropyBoundSampler(Sampler):
    """EB-Sampler (arXiv 2505.24857), the reference default: sort positions by entropy and accept the k
    lowest with sum(H_1..H_k) - max(H_1..H_k) <= bound (an upper bound on their joint dependence)."""

    name = "entropy_bound"

    def __init__(self, entropy_bound: float):
        self.entropy_bound = entropy_bound

    def accept(self, entropy_BC: torch.Tensor, top_prob_BC: torch.Tensor) -> torch.Tensor:
        return entropy_bound_keep(entropy_BC, self.entropy_bound)


class ConfidenceSampler(Sampler):
    """Accept positions whose top probability (tempered) is at least `threshold`; the single most
    confident position is always accepted, so every step makes progress (as in Fast-dLLM)."""

    name = "confidence"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def accept(self, entropy_BC: torch.Tensor, top_prob_BC: torch.Tensor) -> torch.Tensor:
        return confidence_keep(top_prob_BC, self.threshold)


def entropy_bound_keep(entropy_BC: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """`EntropyBoundSampler.accept` with its bound a float or one per canvas ([B, 1] float32)."""
    sorted_h, order = torch.sort(entropy_BC, dim=-1, descending=False)
    # sorted ascending, so the running maximum of the first k is the k-th entry itself
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(keep_sorted), dim=-1, index=order, src=keep_sorted)


def confidence_keep(top_prob_BC: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """`ConfidenceSampler.accept` with its threshold a float or one per canvas ([B, 1] float32)."""
    keep = top_prob_BC >= threshold
    best = top_prob_BC.argmax(dim=-1, keepdim=True)
    return keep.scatter(-1, best, True)


def make_sampler(name: str, *, entropy_bound: float, confidence: float) -> Sampler:
    """The sampler a request asked for (names as in SamplingParams.sampler)."""
    if name == ConfidenceSampler.name:
        return ConfidenceSampler(confidence)
    return EntropyBoundSampler(entropy_bound)


def random_canvas(length: int, vocab_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform random tokens [1, C] (the initial canvas and the renoising draw)."""
    return torch.randint(0, vocab_size, (1, length), generator=generator, device=device)


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What one denoise step decided for one canvas (device tensors: reading them is the caller's sync)."""

    next_canvas: torch.Tensor  # [1, C] accepted samples, renoised elsewhere: the next step's input
    argmax: torch.Tensor  # [1, C] the draft; the committed canvas when the canvas stops
    # [1, C, V] softmax of the tempered logits in the embedding's dtype: the next step's
    # self-conditioning signal (DiffusionGemma.expected_embedding turns it into the soft embedding);
    # None where the vocabulary stage computed that embedding itself (`soft`)
    signal: torch.Tensor | None
    accepted: torch.Tensor  # 0-d: positions kept this step
    mean_entropy: torch.Tensor  # 0-d fp32, compared in fp32 as the reference does
    soft: torch.Tensor | None = None  # [1, C, D] the soft embedding of `signal`, where computed


def sample_step(
    logits_CV: torch.Tensor,
    canvas_C: torch.Tensor,
    *,
    temp: torch.Tensor | float,
    sampler: Sampler,
    generator: torch.Generator | None,
) -> StepOutcome:
    """Steps 2-4 and 6 for one canvas, drawing from its own generator in the reference's order
    (one multinomial over the canvas, then one uniform canvas for renoising)."""
    return sample_steps(
        logits_CV[None], [canvas_C], temps=[temp], samplers=[sampler], generators=[generator]
    )[0]


def sample_steps(
    logits_GCV: torch.Tensor,
    canvases: list[torch.Tensor],
    *,
    temps: list[torch.Tensor | float],
    samplers: list[Sampler],
    generators: list[torch.Generator | None],
    signal_dtype: torch.dtype = torch.float32,
) -> list[StepOutcome]:
    """Steps 2-4 and 6 for G canvases at once: one softmax, argmax and entropy pass over the group (the
    vocabulary-wide work), then each canvas draws from its own generator in the reference's order (one
    multinomial over the canvas, then one uniform canvas for renoising), so the outcome of a canvas does
    not depend on the others in the group. The self-conditioning signal is softmax of the tempered
    logits cast to `signal_dtype` (the embedding's), in that dtype: what the reference's soft embedding
    multiplies by the embedding matrix."""
    temp_G = stack_temperatures(temps).to(logits_GCV.device)
    tempered = logits_GCV / temp_G[:, None, None]
    probs = torch.softmax(tempered, dim=-1, dtype=torch.float32)
    argmax = tempered.argmax(dim=-1)
    h = entropy(tempered)
    top_prob = probs.amax(dim=-1)
    draws = [torch.multinomial(p, num_samples=1, generator=g).view(1, -1) for p, g in zip(probs, generators)]
    signal = probs
    if signal_dtype != torch.float32:
        signal = torch.softmax(tempered.to(signal_dtype), dim=-1, dtype=torch.float32).to(signal_dtype)
    return decide(argmax, h, top_prob, draws, canvases, samplers, generators, signal)


def decide(
    argmax_GC: torch.Tensor,
    entropy_GC: torch.Tensor,
    top_prob_GC: torch.Tensor,
    draws: list[torch.Tensor],
    canvases: list[torch.Tensor],
    samplers: list[Sampler],
    generators: list[torch.Generator | None],
    signal_GCV: torch.Tensor,
) -> list[StepOutcome]:
    """Acceptance and renoising (steps 3-4) for G canvases, given each position's statistics and each
    canvas's sampled tokens [1, C] (drawn before: the renoising draw comes after the sampling draw)."""
    vocab = signal_GCV.shape[-1]
    mean_entropy_G = entropy_GC.mean(dim=-1)
    outcomes = []
    for j, (canvas_C, sampler, generator) in enumerate(zip(canvases, samplers, generators)):
        keep = sampler.accept(entropy_GC[j : j + 1], top_prob_GC[j : j + 1])
        noise = random_canvas(canvas_C.shape[-1], vocab, generator, canvas_C.device)
        outcomes.append(
            StepOutcome(
                next_canvas=torch.where(keep, draws[j], noise),
                argmax=argmax_GC[j : j + 1],
                signal=signal_GCV[j : j + 1],
                accepted=keep.sum(),
                mean_entropy=mean_entropy_G[j],
            )
        )
    return outcomes


class StableAndConfident:
    """Stop test for one canvas: the argmax canvas equals each of the last `stability_threshold` ones
    and the mean entropy of the tempered logits is below `confidence_threshold`.

    It is fed, per step, whether the argmax canvas equals the previous step's and the mean entropy
    (a float32 value): equal to each of the last s ones is the same as unchanged for the last s steps,
    so the test keeps a count, and the engine reads both facts in its one host synchronisation a step."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        # the reference compares a float32 tensor with the Python float: in float32
        self.confidence_threshold = float(torch.tensor(confidence_threshold, dtype=torch.float32))
        self.stability_threshold = stability_threshold
        self.unchanged_steps = 0

    def __call__(self, unchanged: bool, mean_entropy: float) -> bool:
        self.unchanged_steps = self.unchanged_steps + 1 if unchanged else 0
        stable = self.unchanged_steps >= self.stability_threshold
        return stable and mean_entropy < self.confidence_threshold
