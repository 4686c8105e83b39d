"""Logits of encode + denoise equal transformers' DiffusionGemmaForBlockDiffusion (the dynamic-cache path
that `generate` uses) within 1e-4 relative error, and seeded generation equals `generate` token for token.

The reference is driven exactly as its generate() drives it: the encoder appends the prompt (then each
committed canvas) to a DynamicCache, and the model's forward runs the decoder on the canvas with
self-conditioning logits from the previous step. Three or more committed canvases take the prefix past the
sliding window, where the reference's sliding layers show the canvas only the last window - 1 tokens.
"""

from __future__ import annotations

import pytest
import torch
from reference import make_reference, save_reference, text_config

from dgemma import DiffusionGemma
from dgemma.engine.generate import Request, run
from dgemma.outputs import GenerationOutput
from dgemma.params import DiffusionDefaults, SamplingParams

TOLERANCE = 1e-4

CONFIGS = {
    "base": dict(text=text_config(), batch=2, prompt=11),
    "more_experts_top3": dict(
        text=text_config(num_experts=8, top_k_experts=3, moe_intermediate_size=16), batch=1, prompt=5
    ),
    "wide_heads_mha_full": dict(
        text=text_config(
            head_dim=8,
            global_head_dim=64,
            num_global_key_value_heads=4,
            num_key_value_heads=4,
            sliding_window=5,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            num_hidden_layers=6,
        ),
        batch=3,
        prompt=3,
    ),
    "bias_exact_gelu_default_layout_canvas_12": dict(
        text=text_config(
            attention_bias=True,
            hidden_activation="gelu",
            layer_types=None,  # the config's own default: 5 sliding then 1 full
            num_hidden_layers=6,
            num_global_key_value_heads=None,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0, "factor": 4.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.5,
                    "rope_theta": 1e4,
                },
            },
        ),
        batch=2,
        prompt=9,
        canvas=12,
    ),
    "window_larger_than_prefix": dict(
        text=text_config(sliding_window=64, top_k_experts=1), batch=2, prompt=7
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    reference = make_reference(spec["text"], canvas_length=spec.get("canvas", 16), seed=3)
    path = save_reference(reference, tmp_path_factory.mktemp(request.param))
    ours = DiffusionGemma.from_pretrained(path, device="cpu", dtype=torch.float32)
    return reference, ours, spec


def test_encode_and_denoise_match_reference(pair):
    from transformers import DynamicCache

    reference, ours, spec = pair
    vocab, batch, canvas_len = ours.config.vocab_size, spec["batch"], ours.config.canvas_length
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, vocab, (batch, spec["prompt"]), generator=generator)
    ref_cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
    cache = ours.new_cache(batch_size=batch, max_length=spec["prompt"] + 4 * canvas_len)
    with torch.no_grad():
        ref_hidden = reference.model.encoder(input_ids=prompt, past_key_values=ref_cache).last_hidden_state
        assert rel_err(ours.encode(prompt, cache), ref_hidden) < TOLERANCE
        for canvas_index in range(4):  # prompt + 3 committed canvases: past every sliding window here
            canvas = torch.randint(0, vocab, (batch, canvas_len), generator=generator)
            self_conditioning = None
            for _ in range(2):  # first step without, second with self-conditioning logits
                expected = reference(
                    decoder_input_ids=canvas,
                    past_key_values=ref_cache,
                    self_conditioning_logits=self_conditioning,
                ).logits
                got = ours.denoise(canvas, cache, self_conditioning)
                assert got.dtype == torch.float32 and got.shape == (batch, canvas_len, vocab)
                err = rel_err(got, expected)
                assert err < TOLERANCE, f"canvas {canvas_index}: relative error {err:.2e}"
                self_conditioning = expected / 0.6
            reference.model.encoder(input_ids=canvas, past_key_values=ref_cache)
            ours.encode(canvas, cache)
    assert cache.lengths() == [spec["prompt"] + 4 * canvas_len] * batch


def test_denoise_leaves_cache_unchanged(pair):
    _, ours, spec = pair
    cache = ours.new_cache(batch_size=1, max_length=64)
    ours.encode(torch.arange(3, 3 + spec["prompt"])[None], cache)
    keys = [k.clone() for k in cache.keys]
    ours.denoise(torch.zeros(1, ours.config.canvas_length, dtype=torch.long), cache)
    assert cache.lengths() == [spec["prompt"]]
    assert all(torch.equal(a, b) for a, b in zip(keys, cache.keys))


@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory):
    """float64 on both sides: in float32 the reference's grouped expert matmul sums in another order, and
    over dozens of sampling steps a 1e-7 difference eventually flips a near-tie; in float64 it cannot."""
    reference = make_reference(text_config(vocab_size=64), canvas_length=8, seed=5, weight_scale=4.0)
    path = save_reference(reference, tmp_path_factory.mktemp("gen"))
    reference = reference.to(torch.float64)
    reference.set_experts_implementation("eager")  # grouped_mm has no float64
    return reference, DiffusionGemma.from_pretrained(path, device="cpu", dtype=torch.float64)


@pytest.mark.parametrize(
    "settings",
    [
        # never stops early: every canvas runs all steps, several canvases, length-limited
        dict(max_denoising_steps=5, entropy_bound=0.5, stability_threshold=1, confidence_threshold=0.01),
        # stops when the argmax is stable: exercises adaptive stopping and renoising
        dict(max_denoising_steps=12, entropy_bound=2.0, stability_threshold=1, confidence_threshold=10.0),
        dict(max_denoising_steps=6, entropy_bound=0.3, stability_threshold=0, confidence_threshold=3.5),
    ],
)
def test_seeded_generation_equals_reference_generate(small_vocab_pair, settings):
    """Batch 1, same seed: our per-request generator draws in the reference's order (initial canvas,
    then per step one multinomial and one renoising canvas), so the tokens are identical."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    reference, ours = small_vocab_pair
    prompt = [5, 9, 33, 12, 7]
    hf_settings = {k: v for k, v in settings.items() if k != "entropy_bound"}
    steps_seen = []
    for seed in range(5):
        torch.manual_seed(seed)
        expected = (
            reference.generate(
                torch.tensor([prompt]),
                max_new_tokens=24,
                sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings["entropy_bound"]),
                t_min=0.4,
                t_max=0.8,
                eos_token_id=[1],
                pad_token_id=0,
                **hf_settings,
            )
            .sequences[0, len(prompt) :]
            .tolist()
        )
        params = SamplingParams(seed=seed, max_new_tokens=24, t_min=0.4, t_max=0.8, **settings)
        request = Request(
            index=0, prompt_ids=tuple(prompt), params=params.resolve(DiffusionDefaults(eos_token_ids=(1,)))
        )
        (output,) = [e for e in run(ours, [request]) if isinstance(e, GenerationOutput)]
        steps_seen.extend(output.stats.steps_per_canvas)
        if 1 in expected:  # the reference keeps the EOS then pads; we end the answer before the EOS
            assert output.finish_reason == "stop"
            assert list(output.token_ids) == expected[: expected.index(1)]
        else:
            assert output.finish_reason == "length"
            assert list(output.token_ids) == expected
    if settings["stability_threshold"] == 0:  # these settings must exercise adaptive stopping
        assert min(steps_seen) < settings["max_denoising_steps"], steps_seen


def test_batched_training_path_matches_the_invariant_path(pair):
    """batch_invariant=False (training: padded, masked, one call per layer) computes the same function."""
    _, ours, spec = pair
    vocab, c = ours.config.vocab_size, ours.config.canvas_length
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, vocab, (1, n), generator=gen) for n in (spec["prompt"], spec["prompt"] + 13)]
    canvas = torch.randint(0, vocab, (2, c), generator=gen)
    results = []
    for invariant in (True, False):
        ours.batch_invariant = invariant
        try:
            cache = ours.new_cache(batch_size=2, max_length=64)
            for row, prompt in enumerate(prompts):
                ours.encode(prompt, cache, rows=[row])
            ours.encode(canvas, cache)  # a batched commit over rows of different lengths
            results.append(
                ours.denoise(canvas, cache, prefix_lengths=[spec["prompt"] + c, spec["prompt"] + 5])
            )
        finally:
            ours.batch_invariant = True
    assert rel_err(results[1], results[0]) < TOLERANCE
