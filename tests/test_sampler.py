"""Sampler parity: fed the same logits and the same random draws, our acceptance, renoised canvas, argmax,
temperature and stop decision equal the reference classes' results (transformers 5.23)."""

from __future__ import annotations

import pytest
import torch

from dgemma.denoise.sampler import (
    ConfidenceSampler,
    EntropyBoundSampler,
    StableAndConfident,
    entropy,
    sample_step,
    temperature,
)


def reference_classes():
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as g

    return g


@pytest.mark.parametrize("bound", [0.05, 0.1, 1.0, 5.0])
def test_entropy_bound_acceptance_and_renoise_match_reference(bound):
    g = reference_classes()
    vocab, canvas = 50, 32
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        # logits with a spread of confidence: some positions peaked, some flat
        logits = torch.randn(1, canvas, vocab, generator=gen) * torch.linspace(0.1, 12, canvas)[None, :, None]
        current = torch.randint(0, vocab, (1, canvas), generator=gen)
        reference = g.EntropyBoundSampler(g.EntropyBoundSamplerConfig(entropy_bound=bound), canvas, vocab, 48)

        # the reference draws: multinomial over the canvas, then randint for renoising (global RNG)
        torch.manual_seed(100 + seed)
        probs = torch.softmax(logits, dim=-1)
        sampled = torch.multinomial(probs.view(-1, vocab), 1).view(1, canvas)
        accepted = reference.accept_canvas(current, sampled, logits, cur_step=1)
        expected_next = reference.renoise_canvas(accepted, cur_step=1)

        ours = sample_step(
            logits[0],
            current[0],
            temp=1.0,
            sampler=EntropyBoundSampler(bound),
            generator=torch.Generator().manual_seed(100 + seed),
        )
        assert torch.equal(ours.next_canvas, expected_next)
        assert int(ours.accepted) == int(reference.accepted_token_mask.sum())
        assert torch.equal(ours.argmax, logits.argmax(-1))
        # the self-conditioning signal: the softmax the reference's soft embedding takes of these logits
        assert torch.equal(ours.signal, torch.softmax(logits, dim=-1, dtype=torch.float32))


def stats(logits):
    """What a sampler's `accept` takes: entropy and top probability per position."""
    return entropy(logits), torch.softmax(logits, dim=-1).amax(dim=-1)


def test_acceptance_is_redecided_every_step():
    sampler = EntropyBoundSampler(0.5)
    confident = torch.full((1, 4, 10), -10.0)
    confident[..., 0] = 10.0
    flat = torch.zeros(1, 4, 10)
    assert sampler.accept(*stats(confident)).all()
    # the same sampler object keeps nothing from the previous call
    assert sampler.accept(*stats(flat)).sum() == 1  # only the lowest (tied) entropy fits the bound


def test_entropy_matches_categorical():
    logits = torch.randn(3, 7, 40) * 5
    logits[0, 0] = -torch.inf
    logits[0, 0, 3] = 2.0  # a one-hot distribution: entropy exactly 0, no NaN
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(entropy(logits), expected)


@pytest.mark.parametrize("steps", [1, 13, 48])
def test_temperature_schedule_matches_reference(steps):
    g = reference_classes()
    processor = g.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)
    scores = torch.ones(1, 2, 3)
    for cur_step in range(steps, 0, -1):
        expected = processor(None, scores, cur_step=torch.tensor(cur_step, dtype=torch.int32))
        assert torch.equal(scores / temperature(cur_step, steps, 0.4, 0.8), expected)
    assert float(temperature(steps, steps, 0.4, 0.8)) == pytest.approx(0.8)
    assert float(temperature(1, steps, 0.4, 0.8)) > 0.4  # the last step is not exactly t_min


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.005, 0.5, 4.0])
def test_stop_decision_matches_reference(stability, threshold):
    g = reference_classes()
    reference = g.StableAndConfidentStoppingCriteria(
        stability_threshold=stability, confidence_threshold=threshold
    )
    ours = StableAndConfident(stability, threshold)
    gen = torch.Generator().manual_seed(stability)
    argmaxes = [torch.tensor([[1, 2, 3, 4]])] * 3 + [torch.tensor([[1, 2, 3, 5]])] * 4
    decisions = []
    for i, argmax in enumerate(argmaxes):
        logits = torch.randn(1, 4, 6, generator=gen) * (1 + 3 * i)
        expected = bool(reference(argmax, logits)[0])
        # fed as the engine feeds it: unchanged since the last step, and the mean entropy read as a float
        unchanged = i > 0 and torch.equal(argmaxes[i - 1], argmax)
        got = ours(unchanged, entropy(logits).mean().item())
        assert got == expected, f"step {i}"
        decisions.append(got)
    if threshold == 4.0:  # entropy of 6 classes is < 1.8: only stability decides
        assert any(decisions) and (stability == 0 or not decisions[0])


def test_confidence_sampler_accepts_confident_positions_and_at_least_one():
    logits = torch.zeros(1, 5, 8)
    logits[0, 1, 2] = 10.0  # p ~ 0.9997
    logits[0, 3, 4] = 3.0  # p ~ 0.74
    accepted = ConfidenceSampler(0.9).accept(*stats(logits))
    assert accepted.tolist() == [[False, True, False, False, False]]
    accepted = ConfidenceSampler(0.7).accept(*stats(logits))
    assert accepted.tolist() == [[False, True, False, True, False]]
    flat = torch.zeros(1, 5, 8)
    assert int(ConfidenceSampler(0.99).accept(*stats(flat)).sum()) == 1


def test_step_draws_come_from_the_canvas_generator_only():
    logits = torch.randn(16, 30)
    canvas = torch.zeros(16, dtype=torch.long)
    a = sample_step(
        logits, canvas, temp=0.7, sampler=EntropyBoundSampler(1.0), generator=torch.Generator().manual_seed(3)
    )
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    b = sample_step(
        logits, canvas, temp=0.7, sampler=EntropyBoundSampler(1.0), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.next_canvas, b.next_canvas)
