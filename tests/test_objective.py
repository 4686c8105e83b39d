"""The training objective's pieces: corruption statistics, masks, the loss at t -> 0, the
self-conditioning rate, gradients through both modes, and a tiny run whose loss falls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgemma import DiffusionGemma
from dgemma.model.config import ModelConfig
from dgemma.train.objective import (
    Example,
    ObjectiveConfig,
    compute_loss,
    corrupt,
    draw_noise,
    make_batch,
    num_canvases,
)

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def model():
    from fixtures import tiny_config_dict

    config = ModelConfig.from_dict(tiny_config_dict(vocab_size=128, canvas_length=8))
    return DiffusionGemma.random(config, device="cpu", dtype=torch.float32, seed=0, std=0.1)


def chat_example(prompt_len=5, response_len=11):
    prompt = list(range(10, 10 + prompt_len))
    response = [*range(40, 40 + response_len - 1), EOS]
    return Example(token_ids=tuple(prompt + response), response_start=prompt_len, loss_start=prompt_len)


def test_corruption_replaces_a_share_t_with_uniform_tokens():
    gen = torch.Generator().manual_seed(0)
    clean = torch.full((4, 5000), 7)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy, replaced = corrupt(clean, t, 100, gen)
    shares = replaced.float().mean(1)
    assert shares[0] == 0 and shares[3] == 1
    assert abs(float(shares[1]) - 0.25) < 0.03 and abs(float(shares[2]) - 0.5) < 0.03
    assert torch.equal(noisy[~replaced], clean[~replaced])
    counts = torch.bincount(noisy[3], minlength=100).float()
    assert counts.min() > 20 and counts.max() < 80  # uniform over the vocabulary (mean 50)


def test_noise_levels_and_self_conditioning_rate():
    t, sc = draw_noise(20000, ObjectiveConfig(eps=0.01), torch.Generator().manual_seed(1))
    assert float(t.min()) >= 0.01 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.505) < 0.01
    assert abs(float(sc.float().mean()) - 0.5) < 0.02
    _, never = draw_noise(1000, ObjectiveConfig(self_conditioning_prob=0.0), torch.Generator())
    assert not never.any()


def test_canvases_tile_the_response_and_the_last_is_padded():
    example = chat_example(prompt_len=5, response_len=11)  # response: 10 tokens + EOS = 11
    assert num_canvases(example, 8) == 2
    seen = set()
    for seed in range(20):
        batch = make_batch([example], 8, PAD, torch.Generator().manual_seed(seed))
        start = int(batch.canvas_start_B[0])
        seen.add(start)
        if start == 13:  # the second canvas: 3 real tokens (the last is the EOS), then 5 pads
            assert batch.canvas_BC[0].tolist()[:3] == [48, 49, EOS]
            assert batch.canvas_mask_BC[0].tolist() == [True] * 3 + [False] * 5
            assert batch.ids_BT.shape[1] == 21
    assert seen == {5, 13}
    # chat: the encoder loss covers the response only (targets from position 5 on)
    assert batch.encoder_mask_BT[0].tolist() == [False] * 5 + [True] * 11 + [False] * (
        batch.ids_BT.shape[1] - 16
    )


def test_supervised_padding_makes_the_pads_after_the_eos_targets():
    example = chat_example(prompt_len=5, response_len=11)
    for seed in range(20):
        recipe = make_batch([example], 8, PAD, torch.Generator().manual_seed(seed))
        padded = make_batch([example], 8, PAD, torch.Generator().manual_seed(seed), supervise_padding=True)
        assert torch.equal(recipe.canvas_BC, padded.canvas_BC)  # same draws, same canvases
        assert padded.canvas_mask_BC.all()
        if int(recipe.canvas_start_B[0]) == 13:  # the last canvas: its 5 pads are targets only now
            assert recipe.canvas_mask_BC.sum() == 3
            assert padded.canvas_BC[0].tolist()[3:] == [PAD] * 5


def test_loss_at_t_zero_is_clean_cross_entropy(model):
    example = chat_example(prompt_len=6, response_len=14)
    batch = make_batch([example, chat_example(3, 4)], 8, PAD, torch.Generator().manual_seed(0))
    parts = compute_loss(
        model,
        batch,
        ObjectiveConfig(),
        torch.Generator().manual_seed(0),
        t_B=torch.zeros(2),
        self_conditioning_B=torch.zeros(2, dtype=torch.bool),
    )
    # the same quantity, computed directly with the research API
    with torch.no_grad():
        losses = []
        for b in range(2):
            cache = model.new_cache(batch_size=1, max_length=64)
            start = int(batch.canvas_start_B[b])
            model.encode(batch.ids_BT[b : b + 1, :start], cache)
            logits = model.denoise(batch.canvas_BC[b : b + 1], cache)[0]
            mask = batch.canvas_mask_BC[b]
            losses.append(F.cross_entropy(logits[mask], batch.canvas_BC[b][mask], reduction="sum"))
    expected = sum(losses) / int(batch.canvas_mask_BC.sum())
    assert torch.allclose(parts.diffusion, expected, rtol=1e-5)
    assert parts.total == parts.diffusion + parts.encoder


def test_several_canvases_per_example_share_its_encoder_pass(model):
    examples = [chat_example(prompt_len=6, response_len=30), chat_example(3, 12)]
    batch = make_batch(examples, 8, PAD, torch.Generator().manual_seed(1), canvases_per_example=3)
    assert batch.ids_BT.shape[0] == 2 and batch.canvas_BC.shape == (6, 8)
    assert batch.canvas_row_B.tolist() == [0, 0, 0, 1, 1, 1]
    for i, (row, start) in enumerate(zip(batch.canvas_row_B.tolist(), batch.canvas_start_B.tolist())):
        assert batch.canvas_BC[i].tolist() == batch.ids_BT[row, start : start + 8].tolist()
    assert len(set(batch.canvas_start_B[:3].tolist())) > 1  # independent draws
    # the loss over 6 canvases equals the mean over the same canvases denoised one at a time
    parts = compute_loss(
        model,
        batch,
        ObjectiveConfig(),
        torch.Generator().manual_seed(0),
        t_B=torch.zeros(6),
        self_conditioning_B=torch.zeros(6, dtype=torch.bool),
    )
    with torch.no_grad():
        total = 0.0
        for i, (row, start) in enumerate(zip(batch.canvas_row_B.tolist(), batch.canvas_start_B.tolist())):
            cache = model.new_cache(batch_size=1, max_length=64)
            model.encode(batch.ids_BT[row : row + 1, :start], cache)
            logits = model.denoise(batch.canvas_BC[i : i + 1], cache)[0]
            mask = batch.canvas_mask_BC[i]
            total += F.cross_entropy(logits[mask], batch.canvas_BC[i][mask], reduction="sum")
    assert torch.allclose(parts.diffusion, total / int(batch.canvas_mask_BC.sum()), rtol=1e-5)


def test_self_conditioning_changes_the_loss_and_gradients_reach_both_modes(model):
    batch = make_batch([chat_example(), chat_example(4, 9)], 8, PAD, torch.Generator().manual_seed(2))
    t = torch.full((2,), 0.5)
    kwargs = dict(t_B=t)
    model.requires_grad_(True)
    off = compute_loss(model, batch, ObjectiveConfig(), torch.Generator().manual_seed(3), **kwargs,
                       self_conditioning_B=torch.zeros(2, dtype=torch.bool))  # fmt: skip
    on = compute_loss(model, batch, ObjectiveConfig(), torch.Generator().manual_seed(3), **kwargs,
                      self_conditioning_B=torch.ones(2, dtype=torch.bool))  # fmt: skip
    assert not torch.allclose(on.diffusion, off.diffusion)
    try:
        on.total.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        names = ["layers.0.self_attn.q_proj.weight", "layers.3.experts.gate_up_proj", "embed_tokens.weight",
                 "self_conditioning.mlp.up_proj.weight", "layers.1.router.proj.weight"]  # fmt: skip
        for name in names:
            assert (
                grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0
            )
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_the_cache_keeps_the_encoder_pass_in_the_autograd_graph(model):
    """The denoiser reads the encoder's K/V from the cache: under autograd, writing them there must not
    cut the gradient (the fast path's cache moves K/V as integer words only without gradients)."""
    model.requires_grad_(True)
    try:
        cache = model.new_cache(batch_size=1, max_length=12)
        model.encode(torch.arange(10, 22)[None], cache)
        assert cache.keys[0].requires_grad and cache.values[-1].requires_grad
        cache.keys[0].sum().backward()
        assert model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_tiny_training_run_reduces_the_loss(model):
    trainee = DiffusionGemma.random(model.config, device="cpu", dtype=torch.float32, seed=4, std=0.1)
    trainee.requires_grad_(True)
    for name, p in trainee.named_parameters():
        if "layer_scalar" in name:
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=3e-3)
    examples = [chat_example(4 + i % 3, 6 + i) for i in range(6)]
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        parts = compute_loss(trainee, make_batch(examples, 8, PAD, gen), ObjectiveConfig(), gen)
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
        losses.append(float(parts.total.detach()))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
