"""The GPU fast path's pieces, checked on CPU against the pure-torch spec: the Triton expert kernels under
TRITON_INTERPRET=1 (float32: the interpreter's bf16 matmul is not faithful), the graph-capturable denoise
forward (static shapes, device-tensor rows) and the engine's runner. bf16 on the GPU is checked by
`dgemma bench` (correctness section) on the device."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from fixtures import tiny_config_dict

from dgemma.cache.kv_cache import KVCache
from dgemma.engine.runner import DenoiseRunner, buckets_for
from dgemma.model.config import ModelConfig
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.layers import Experts, Router
from dgemma.ops import triton_available

needs_interpreter = pytest.mark.skipif(
    not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton, run under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
)


@needs_interpreter
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize(("block_m", "num_tokens"), [(16, 40), (32, 7), (16, 1)])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_moe_kernels_match_the_expert_loop(activation, block_m, num_tokens, swap_ab):
    from dgemma.ops.moe import MoeConfig, moe

    torch.manual_seed(0)
    num_experts, hidden, inter, top_k = 8, 64, 48, 2
    experts = Experts(num_experts, hidden, inter, activation)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    router = Router(hidden, num_experts, top_k, 1e-6)
    torch.nn.init.normal_(router.proj.weight, std=0.5)
    router.per_expert_scale.data.uniform_(0.5, 1.5)
    x = torch.randn(num_tokens, hidden)
    with torch.no_grad():
        weights, index = router(x)
        expected = experts(x, weights, index)
        # tiles narrower than the intermediate size and the hidden size: the masked edges are exercised
        config = MoeConfig(block_m=block_m, block_n=32, block_k=32, down_block_k=32, swap_ab=swap_ab)
        # the down kernel with tiles of its own (narrower than the hidden size, the other operand order)
        split = dataclasses.replace(
            config, down_block_k=16, down_block_n=16, down_num_warps=2, down_num_stages=2,
            down_swap_ab=not swap_ab,
        )  # fmt: skip
        # programs started a few blocks at a time instead of a tile column at a time; a group larger than
        # the blocks is one group cut short (every live block in it)
        grouped = [dataclasses.replace(config, group_m=g, down_group_m=d) for g, d in ((1, 64), (64, 2))]
        got, got_split, *got_grouped = (
            moe(x, experts.gate_up_proj, experts.down_proj, weights, index, activation=activation, config=c)
            for c in (config, split, *grouped)
        )
    for result in (got, got_split, *got_grouped):
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("swap_ab", [False, True])
def test_fp8_experts_kernels_match_the_dequantized_loop(swap_ab):
    """FP8 experts: the kernels (FP8 tiles widened in registers, the fp32 accumulator times each output
    channel's scale) equal the spec's expert loop on the same quantized weights, and both stay within
    FP8's rounding of the unquantized experts."""
    from dgemma.model.quant import FP8, dequantize
    from dgemma.ops.moe import MoeConfig, moe

    torch.manual_seed(1)
    num_experts, hidden, inter, top_k = 8, 64, 48, 2
    experts = Experts(num_experts, hidden, inter, "gelu_pytorch_tanh")
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    with torch.no_grad():
        experts.gate_up_proj[3, 5] = 0.0  # a zero channel: scale 1, not a division by zero
    router = Router(hidden, num_experts, top_k, 1e-6)
    torch.nn.init.normal_(router.proj.weight, std=0.5)
    x = torch.randn(40, hidden)
    with torch.no_grad():
        weights, index = router(x)
        unquantized = experts(x, weights, index)
        experts.quantize_()
        assert experts.quantized and experts.gate_up_proj.dtype == FP8 and experts.gate_up_scale[3, 5] == 1
        expected = experts(x, weights, index)
        config = MoeConfig(
            block_m=16, block_n=32, block_k=32, down_block_k=16, down_block_n=32, swap_ab=swap_ab
        )
        got = moe(
            x, experts.gate_up_proj, experts.down_proj, weights, index, config=config,
            gate_up_scale=experts.gate_up_scale, down_scale=experts.down_scale,
        )  # fmt: skip
        with pytest.raises(ValueError, match="scales"):
            moe(x, experts.gate_up_proj, experts.down_proj, weights, index, config=config)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 of itself, the outputs within a few percent
    w = dequantize(experts.gate_up_proj, experts.gate_up_scale)
    assert w.norm() > 0 and (unquantized - expected).norm() / unquantized.norm() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline assembly: compiled CUDA kernels only")
def test_fp8_widening_is_exact_on_cuda():
    """The kernels' integer-op widening of FP8 weights (`_e4m3_to_bf16`, which the interpreter cannot
    run) gives every finite e4m3 value exactly, as Triton's cast does; run on the device."""
    from dgemma.bench import fp8_widening_exact

    assert fp8_widening_exact() == {"codes": 254, "fast_equal": True, "cast_equal": True}


@needs_interpreter
@pytest.mark.parametrize("swap_ab", [False, True])
def test_fp8_activations_kernels_match_the_loop(swap_ab):
    """FP8 activations into the gate-up projection (a scale per token, FP8 x FP8 products): the kernels
    equal the spec's loop on the same quantized inputs, within a few percent of the unquantized
    experts; an FP8 x without its scales is refused."""
    from dgemma.model.quant import quantize_rows
    from dgemma.ops.moe import MoeConfig, moe

    torch.manual_seed(3)
    num_experts, hidden, inter, top_k = 8, 64, 48, 2
    experts = Experts(num_experts, hidden, inter, "gelu_pytorch_tanh")
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    router = Router(hidden, num_experts, top_k, 1e-6)
    torch.nn.init.normal_(router.proj.weight, std=0.5)
    x = torch.randn(40, hidden)
    x[7] = 0.0  # a token of zeros: scale 1
    with torch.no_grad():
        weights, index = router(x)
        unquantized = experts(x, weights, index)
        experts.quantize_()
        experts.fp8_activations = True
        expected = experts(x, weights, index)
        x_q, x_scale = quantize_rows(x)
        assert x_scale[7] == 1
        config = MoeConfig(
            block_m=16, block_n=32, block_k=32, down_block_k=16, down_block_n=32, swap_ab=swap_ab
        )
        got = moe(
            x_q, experts.gate_up_proj, experts.down_proj, weights, index, config=config,
            gate_up_scale=experts.gate_up_scale, down_scale=experts.down_scale, x_scale=x_scale,
            out_dtype=x.dtype,
        )  # fmt: skip
        with pytest.raises(ValueError, match="x_scale"):
            moe(x_q, experts.gate_up_proj, experts.down_proj, weights, index, config=config,
                gate_up_scale=experts.gate_up_scale, down_scale=experts.down_scale)  # fmt: skip
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (unquantized - expected).norm() / unquantized.norm() < 0.08


@needs_interpreter
@pytest.mark.parametrize(("num_experts", "top_k"), [(128, 8), (6, 3)])
def test_routing_kernel_matches_the_router(num_experts, top_k):
    """Softmax, top-k (largest first), renormalisation and the per-expert scale in one kernel equal
    the router's torch ops (a tie between two experts goes to the lower index, as in torch.topk)."""
    from dgemma.ops.moe import route

    torch.manual_seed(2)
    router = Router(32, num_experts, top_k, 1e-6)
    torch.nn.init.normal_(router.proj.weight, std=0.5)
    router.per_expert_scale.data.uniform_(0.5, 1.5)
    h = torch.randn(40, 32)
    with torch.no_grad():
        want_w, want_i = router.route(h)
        logits = router.proj(h)
        logits[3, :] = 0.25  # every expert tied: the lowest indices, in order
        got_w, got_i = route(logits, router.per_expert_scale, top_k)
    assert got_i.dtype == torch.int64 and got_w.dtype == torch.float32
    rows = [r for r in range(40) if r != 3]
    assert torch.equal(got_i[rows], want_i[rows])
    torch.testing.assert_close(got_w[rows], want_w[rows], rtol=1e-6, atol=1e-7)
    assert got_i[3].tolist() == list(range(top_k))
    torch.testing.assert_close(got_w[3], router.per_expert_scale[:top_k] / top_k)


@needs_interpreter
def test_align_pads_each_expert_to_whole_blocks():
    from dgemma.ops.moe import align

    index = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5: experts 2,0,2,1,0,2
    pair_of_slot, block_expert = align(index, num_experts=4, block_m=4)
    slots = pair_of_slot.view(-1, 4).tolist()
    sentinel = index.numel()
    # each expert's pairs (in any order) then the sentinel up to a whole block; unused blocks after
    assert [sorted(b) for b in slots[:3]] == [
        [1, 4, sentinel, sentinel],
        [3] + [sentinel] * 3,
        [0, 2, 5, sentinel],
    ]
    assert all(b.index(sentinel) == sum(p != sentinel for p in b) for b in slots[:3])  # sentinels last
    assert all(p == sentinel for b in slots[3:] for p in b)
    assert block_expert.tolist()[:3] == [0, 1, 2] and all(e == 4 for e in block_expert.tolist()[3:])
    # many pairs, many experts (several align programs): every pair placed once, in its expert's blocks
    index = torch.randint(0, 37, (300, 3), generator=torch.Generator().manual_seed(0))
    pair_of_slot, block_expert = align(index, num_experts=37, block_m=16)
    placed = pair_of_slot[pair_of_slot < index.numel()].long()
    assert sorted(placed.tolist()) == list(range(index.numel()))
    slot_expert = block_expert.repeat_interleave(16)[: len(pair_of_slot)]
    is_pair = pair_of_slot < index.numel()
    assert torch.equal(slot_expert[is_pair].long(), index.reshape(-1)[pair_of_slot[is_pair].long()])


def model_and_cache(lengths: list[int], *, bias: bool = False):
    """The tiny model (float32; with `bias`, attention biases that differ per mode) and a cache whose
    first rows hold random prompts of these lengths (one more row: scratch)."""
    config = ModelConfig.from_dict(tiny_config_dict())
    if bias:
        config = dataclasses.replace(config, attention_bias=True)
    model = DiffusionGemma.random(config, device="cpu", dtype=torch.float32, seed=3, std=0.1)
    if bias:
        for name, p in model.named_parameters():
            if "_bias." in name:
                p.data.normal_(0, 0.5)
    cache = model.new_cache(batch_size=len(lengths) + 1, max_length=max(lengths) + 24)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for row, n in enumerate(lengths):  # prompts longer and shorter than the sliding window (8)
            model.encode(torch.randint(3, 300, (1, n), generator=gen), cache, rows=[row])
    return model, cache


def twin_cache(model: DiffusionGemma, cache: KVCache) -> KVCache:
    """A copy of `cache` (float32, CPU), so that each run starts from the same cached prefixes."""
    twin = KVCache(model.config.layers, batch_size=cache.batch_size, max_length=cache.max_length,
                   device="cpu", dtype=torch.float32, scratch=cache.scratch)  # fmt: skip
    for store, again in zip(cache.keys + cache.values, twin.keys + twin.values):
        again.copy_(store)
    return twin


def test_static_denoise_matches_the_row_by_row_path():
    lengths = [3, 20, 9]
    model, cache = model_and_cache(lengths)
    c, d = model.config.canvas_length, model.config.hidden_size
    canvas = torch.randint(0, 300, (3, c), generator=torch.Generator().manual_seed(1))
    soft = torch.randn(3, c, d) * 0.1
    soft[1] = 0  # a first step: no self-conditioning signal
    with torch.inference_mode():
        expected = model.denoise_hidden(
            canvas,
            cache,
            rows=[0, 1, 2],
            self_conditioning_embeds=soft,
            self_conditioning_mask=torch.tensor([1, 0, 1]),
        )
        prefixes = [(k[r, :, :n].clone(), v[r, :, :n].clone()) for r, n in enumerate(lengths)
                    for k, v in zip(cache.keys, cache.values)]  # fmt: skip
        # rows in another order, passed as device tensors
        got = model.denoise_static(
            canvas[[2, 0, 1]], soft[[2, 0, 1]], cache, torch.tensor([2, 0, 1]), torch.tensor([9, 3, 20])
        )
    torch.testing.assert_close(got, expected[[2, 0, 1]], rtol=1e-4, atol=1e-5)
    # the canvas's K/V went to the scratch positions past each prefix: every prefix is untouched
    after = [
        (k[r, :, :n], v[r, :, :n]) for r, n in enumerate(lengths) for k, v in zip(cache.keys, cache.values)
    ]
    assert all(torch.equal(a, b) for pair, again in zip(prefixes, after) for a, b in zip(pair, again))
    assert cache.lengths() == [*lengths, 0]
    with pytest.raises(ValueError, match="scratch"):
        bare = KVCache(model.config.layers, batch_size=1, max_length=30, device="cpu", dtype=torch.float32)
        model.denoise_static(canvas[:1], soft[:1], bare, torch.tensor([0]), torch.tensor([3]))


def test_self_conditioning_embeds_equal_the_logits_path():
    model, cache = model_and_cache([5])
    c, v = model.config.canvas_length, model.config.vocab_size
    logits = torch.randn(1, c, v)
    canvas = torch.randint(0, 300, (1, c))
    with torch.inference_mode():
        via_logits = model.denoise_hidden(canvas, cache, logits, rows=[0])
        via_embeds = model.denoise_hidden(
            canvas, cache, rows=[0], self_conditioning_embeds=model.soft_embedding(logits)
        )
    assert torch.equal(via_logits, via_embeds)


def test_runner_buckets_and_eager_path():
    assert buckets_for(1) == (1,)
    assert buckets_for(6) == (1, 2, 4, 6)
    assert buckets_for(8) == (1, 2, 4, 8)
    model, cache = model_and_cache([4, 6])
    runner = DenoiseRunner(model, cache)
    assert not runner.graphs  # CPU: eager
    with pytest.raises(ValueError, match="CUDA"):
        DenoiseRunner(model, cache, graphs=True)
    # eager commit = encode
    canvas = torch.randint(0, 300, (1, model.config.canvas_length))
    with torch.inference_mode():
        runner.commit([canvas], [1])
    assert cache.lengths() == [4, 6 + model.config.canvas_length, 0]


def test_the_runners_prefill_writes_the_cache_as_encode_does():
    """DenoiseRunner.prefill (the engine's admission; static forwards, as the CUDA graphs run them):
    prompts right-padded to whole canvases and the batch padded with the scratch row, the same K/V and
    lengths as `encode`; a width past the rows' storage, or rows that hold tokens, take `encode`."""
    model, _ = model_and_cache([1])
    c = model.config.canvas_length  # 16
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 300, (3, 2 * c + 3), generator=gen)
    for lengths, max_length in (([13, 10, 7], 40), ([2 * c + 3, 20, 1], 3 * c), ([2 * c + 3], 2 * c + 8)):
        t = max(lengths)
        # rows 0-3 for requests (batch buckets 1, 2, 4: three prompts take one scratch row), row 4 scratch
        caches = [model.new_cache(batch_size=5, max_length=max_length) for _ in range(2)]
        runner = DenoiseRunner(model, caches[1], graphs=False, static=True)
        with torch.inference_mode():
            model.encode(ids[: len(lengths), :t], caches[0], rows=[2, 0, 1][: len(lengths)], lengths=lengths)
            runner.prefill(ids[: len(lengths), :t], [2, 0, 1][: len(lengths)], lengths)
        assert caches[1].lengths() == caches[0].lengths()
        for layer in range(len(model.layers)):
            for row, n in enumerate(caches[0].lengths()[:3]):
                for want, got in ((caches[0].keys, caches[1].keys), (caches[0].values, caches[1].values)):
                    torch.testing.assert_close(
                        got[layer][row, :, :n], want[layer][row, :, :n], rtol=1e-4, atol=1e-5
                    )
    with torch.inference_mode():  # row 2 holds the last prompt (35 tokens): 5 more go through encode
        runner.prefill(ids[:1, :5], [2], [5])
        model.encode(ids[:1, :5], caches[0], rows=[2])
    assert caches[1].lengths() == caches[0].lengths() == [0, 0, 2 * c + 8, 0, 0]
    assert torch.equal(caches[1].keys[0][2, :, : 2 * c + 8], caches[0].keys[0][2, :, : 2 * c + 8])


def test_static_encode_writes_the_cache_as_encode_does():
    lengths = [3, 20, 9]
    model, cache = model_and_cache(lengths)
    _, twin = model_and_cache(lengths)
    c = model.config.canvas_length
    canvas = torch.randint(0, 300, (2, c), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model.encode(canvas, cache, rows=[2, 1])
        # the scratch row (3) pads the batch, as the engine's CUDA graphs do
        model.encode_static(
            torch.cat([canvas, canvas[:1]]), twin, torch.tensor([2, 1, 3]), torch.tensor([9, 20, 0])
        )
    twin.advance([2, 1], c)
    assert twin.lengths([0, 1, 2]) == cache.lengths([0, 1, 2])
    for layer in range(len(model.layers)):
        for a, b in ((cache.keys[layer], twin.keys[layer]), (cache.values[layer], twin.values[layer])):
            torch.testing.assert_close(b[:3], a[:3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_commit_and_first_step_equal_the_two_calls(bias):
    """`commit_denoise_static` = encode the finished canvas, then denoise the next one: the same hidden
    states and the same cache, with each mode's layer scalar (and biases, where a model has them)."""
    lengths = [3, 20, 9]  # prefixes shorter and longer than the sliding window (8)
    models = []
    for _ in range(2):
        config = ModelConfig.from_dict(tiny_config_dict())
        if bias:
            config = dataclasses.replace(config, attention_bias=True)
        model = DiffusionGemma.random(config, device="cpu", dtype=torch.float32, seed=3, std=0.1)
        for i, layer in enumerate(model.layers):
            layer.encoder_layer_scalar.fill_(0.5 + 0.1 * i)
            layer.decoder_layer_scalar.fill_(1.5 - 0.1 * i)
        cache = model.new_cache(batch_size=len(lengths) + 1, max_length=max(lengths) + 24)
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for row, n in enumerate(lengths):
                model.encode(torch.randint(3, 300, (1, n), generator=gen), cache, rows=[row])
        models.append((model, cache))
    (model, cache), (_, twin) = models
    c = model.config.canvas_length
    gen = torch.Generator().manual_seed(5)
    commit, canvas = (torch.randint(0, 300, (2, c), generator=gen) for _ in range(2))
    with torch.inference_mode():
        model.encode(commit, cache, rows=[2, 1])
        expected = model.denoise_hidden(canvas, cache, rows=[2, 1])
        # the scratch row (3) pads the batch, as the engine's CUDA graphs do
        got = model.commit_denoise_static(
            torch.cat([commit, commit[:1]]),
            torch.cat([canvas, canvas[:1]]),
            twin,
            torch.tensor([2, 1, 3]),
            torch.tensor([9, 20, 0]),
        )
    twin.advance([2, 1], c)
    torch.testing.assert_close(got[:2], expected, rtol=1e-4, atol=1e-5)
    assert twin.lengths([0, 1, 2]) == cache.lengths([0, 1, 2])
    for layer in range(len(model.layers)):
        for a, b in ((cache.keys[layer], twin.keys[layer]), (cache.values[layer], twin.values[layer])):
            for row, n in enumerate(cache.lengths([0, 1, 2])):  # the prefixes; past them is scratch
                torch.testing.assert_close(b[row, :, :n], a[row, :, :n], rtol=1e-4, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("with_scale", [True, False])
def test_rms_norm_kernel_matches_the_torch_norm(with_scale):
    from dgemma.model.layers import RMSNorm
    from dgemma.ops.norm import rms_norm

    norm = RMSNorm(48, 1e-6, with_scale=with_scale)
    if with_scale:
        norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48) * 3
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), rtol=1e-5, atol=1e-6)


def _vocab_stage_inputs(dtype, monkeypatch):
    """The tiny model in `dtype` with the vocabulary tiles shrunk (vocabulary 384: 4 programs a row; a
    ragged tail is test_vocabulary_passes_on_a_ragged_row's), and three canvases' hidden states at three
    scales, canvases and temperatures."""
    import dgemma.ops.vocab as ops

    monkeypatch.setattr(ops, "BLOCK", 32)
    monkeypatch.setattr(ops, "SPLIT", 96)
    model, _ = model_and_cache([5])
    model = model.to(dtype)
    c, d = model.config.canvas_length, model.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    hidden = (torch.randn(3, c, d, generator=gen) * torch.tensor([0.5, 4.0, 40.0])[:, None, None]).to(dtype)
    canvases = list(torch.randint(0, 384, (3, c), generator=gen))
    return model, hidden, canvases, [0.8, torch.tensor(0.55), 0.41]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_vocabulary_pass_matches_the_spec(dtype, monkeypatch):
    """The Triton vocabulary passes against the spec (fp32 logits, torch softmaxes, torch.multinomial)
    on the same hidden states with the same generators: identical argmax, draws, acceptance and next
    canvas; entropy and the self-conditioning signal to rounding. Tiles shrunk so that a row spans
    several programs and a masked tail."""
    from dgemma.denoise.sampler import ConfidenceSampler, EntropyBoundSampler
    from dgemma.engine.vocab import VocabStage

    model, hidden, canvases, temps = _vocab_stage_inputs(dtype, monkeypatch)
    c = model.config.canvas_length
    samplers = [EntropyBoundSampler(0.5), EntropyBoundSampler(2.0), ConfidenceSampler(0.6)]
    stage = VocabStage(model)

    def run(fn):
        gens = [torch.Generator().manual_seed(100 + j) for j in range(3)]
        with torch.inference_mode():
            return fn(hidden, canvases, temps=temps, samplers=samplers, generators=gens)

    fused, spec = run(stage.fused), run(stage.sample)  # on CPU, `sample` is the spec
    for f, s in zip(fused, spec):
        assert torch.equal(f.argmax, s.argmax)
        assert torch.equal(f.next_canvas, s.next_canvas)
        assert int(f.accepted) == int(s.accepted) > 0
        torch.testing.assert_close(f.mean_entropy, s.mean_entropy, rtol=1e-5, atol=1e-5)
        assert f.signal.dtype == s.signal.dtype == dtype
        # the same softmax of the same rounded logits: equal but for the last bit of a few entries
        rtol = 1e-4 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(f.signal, s.signal, rtol=rtol, atol=1e-7)
    assert 0 < int(spec[0].accepted) < c  # some positions accepted, some renoised: both branches checked


@needs_interpreter
@pytest.mark.parametrize("cap", [None, 30.0])
def test_vocabulary_passes_on_a_ragged_row(cap, monkeypatch):
    """vocab_stats and vocab_sample against torch on a vocabulary no tile divides: 300 entries, 32-entry
    blocks of four groups of 8 neighbours, 96 entries a program, so the last program holds 12 and two of
    its groups never see an entry. Row 0 ties its maximum across programs, row 1 within a group (the
    first wins, as torch.argmax), row 2 has its maximum in the ragged tail."""
    import dgemma.ops.vocab as ops

    monkeypatch.setattr(ops, "BLOCK", 32)
    monkeypatch.setattr(ops, "SPLIT", 96)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 300, generator=gen) * 4
    logits[0, [37, 150]] = 20.0
    logits[1, [41, 43]] = 20.0
    logits[2, 295] = 20.0
    temp = torch.tensor([0.7, 1.0, 1.3])
    x = (torch.tanh(logits / cap) * cap if cap else logits) / temp[:, None]
    stats = ops.vocab_stats(logits, temp, cap, torch.bfloat16)
    assert stats.argmax.tolist() == [37, 41, 295] == x.argmax(-1).tolist()
    p = x.softmax(-1)
    want = {
        "lse": x.logsumexp(-1),
        "entropy": -(p * p.log()).sum(-1),
        "top_prob": p.amax(-1),
        "lse_rounded": x.bfloat16().float().logsumexp(-1),
    }
    for name, value in want.items():
        torch.testing.assert_close(getattr(stats, name), value, rtol=1e-5, atol=1e-5, msg=name)
    noise = torch.empty_like(x).exponential_(generator=gen)
    probs = torch.empty(3, 300, dtype=torch.bfloat16)
    token = ops.vocab_sample(logits, temp, cap, stats, noise, probs)
    assert token.tolist() == (p / noise).argmax(-1).tolist()
    torch.testing.assert_close(probs, x.bfloat16().float().softmax(-1).bfloat16(), rtol=8e-3, atol=1e-7)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_vocabulary_stage_matches_the_fused_one(dtype, monkeypatch):
    """The batched stage (what the CUDA graph holds: both built-in samplers with per-canvas parameters,
    in a padded group) against the per-canvas fused path, two steps in a row from the same seeds:
    identical tokens, acceptance and generator states after each step (the draws are the same draws),
    mean entropy equal, and the soft embedding equal to the one the engine computed from the signal."""
    import dgemma.engine.vocab as vocab_module
    from dgemma.denoise.sampler import ConfidenceSampler, EntropyBoundSampler
    from dgemma.engine.vocab import VocabStage

    monkeypatch.setattr(vocab_module, "kernels_apply", lambda x: True)  # the fused passes on the CPU
    model, hidden, canvases, temps = _vocab_stage_inputs(dtype, monkeypatch)
    c = model.config.canvas_length
    samplers = [EntropyBoundSampler(0.5), ConfidenceSampler(0.6), EntropyBoundSampler(2.0)]
    plain, batched = VocabStage(model), VocabStage(model, static=True, groups=4)  # 3 canvases: 1 padding slot
    gens = {stage: [torch.Generator().manual_seed(100 + j) for j in range(3)] for stage in (plain, batched)}
    with torch.inference_mode():
        for step in range(2):
            got = {
                stage: stage.sample(
                    hidden * (1 + step), canvases, temps=temps, samplers=samplers, generators=gens[stage]
                )
                for stage in (plain, batched)
            }
            for f, b in zip(got[plain], got[batched]):
                assert torch.equal(f.argmax, b.argmax)
                assert torch.equal(f.next_canvas, b.next_canvas)
                assert int(f.accepted) == int(b.accepted) > 0
                assert torch.equal(f.mean_entropy, b.mean_entropy)
            for g_plain, g_batched in zip(gens[plain], gens[batched]):
                assert torch.equal(g_plain.get_state(), g_batched.get_state())
            assert got[batched][0].signal is None
            rtol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(
                batched.soft_embeddings(got[batched]), plain.soft_embeddings(got[plain]), rtol=rtol, atol=1e-5
            )
    assert list(batched._groups) == [4]
    assert 0 < int(got[plain][0].accepted) < c  # both branches of the acceptance checked


@needs_interpreter
def test_fused_layer_glue_kernels_match_the_torch_ops():
    """residual_norms, ff_combine and norm_rope against the RMSNorm modules, adds and apply_rope they
    replace (float32: the interpreter's bf16 casts truncate; bf16 is checked on the device)."""
    from dgemma.model.layers import RMSNorm, apply_rope
    from dgemma.ops.norm import ff_combine, norm_rope, residual_norms

    torch.manual_seed(0)
    b, t, d, eps = 2, 5, 48, 1e-6
    norms = [RMSNorm(d, eps) for _ in range(6)]
    for n in norms:
        n.weight.data.uniform_(0.5, 1.5)
    plain = RMSNorm(d, eps, with_scale=False)
    scale, root = torch.rand(d) + 0.5, d**-0.5
    x, attn, mlp_out, experts_out = (torch.randn(b, t, d) for _ in range(4))
    with torch.no_grad():
        r = x + norms[0](attn)
        want = (r, norms[1](r), norms[2](r), plain(r) * scale * root)
        got = residual_norms(x, attn, norms[0].weight, norms[1].weight, norms[2].weight, scale, root, eps)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        weights = [n.weight for n in norms[3:]]
        mixed = r + norms[5](norms[3](mlp_out) + norms[4](experts_out))
        for scalar in (
            torch.tensor([0.7]),
            torch.linspace(0.5, 1.5, t)[:, None],
        ):  # one value, one per position
            got = ff_combine(r, mlp_out, experts_out, *weights, scalar, eps)
            torch.testing.assert_close(got, mixed * scalar, rtol=1e-5, atol=1e-5)
        # the experts' per-token terms [B, T, K, D], summed in the kernel
        terms = torch.randn(b, t, 3, d)
        got = ff_combine(r, mlp_out, terms, *weights, torch.tensor([0.7]), eps)
        want = (r + norms[5](norms[3](mlp_out) + norms[4](terms.sum(2)))) * 0.7
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # with the norm that follows the layer (the next layer's input norm), from the same kernel
        out, normed = ff_combine(
            r, mlp_out, terms, *weights, torch.tensor([0.7]), eps, next_norm=(scale, 0.3)
        )
        following = RMSNorm(d, 0.3)
        following.weight.data.copy_(scale)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(normed, following(out), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="layer scalar"):
            ff_combine(r, mlp_out, experts_out, *weights, torch.ones(t + 1), eps)
        heads, e = 3, 16
        q = torch.randn(b, t, heads, e)
        angles = torch.rand(b, t, e // 2) * 6
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        qn = RMSNorm(e, eps)
        qn.weight.data.uniform_(0.5, 1.5)
        torch.testing.assert_close(
            norm_rope(q, qn.weight, cos, sin, eps), apply_rope(qn(q), cos, sin), rtol=1e-5, atol=1e-5
        )


@needs_interpreter
@pytest.mark.parametrize("own_values", [True, False])  # a sliding layer's v_proj; a full layer's V = raw K
# a program takes 2 heads of (4, 2); 4 of (6, 3), its last blocks partly masked
@pytest.mark.parametrize("h, kv", [(4, 2), (6, 3)])
def test_the_attention_norms_write_keys_and_values_straight_into_the_cache(own_values, h, kv):
    """qkv_norms equals the norms, the rotations and the cache write it replaces, at each row's own
    positions (rows out of order), and touches nothing else in the cache."""
    from dgemma.model.layers import RMSNorm, apply_rope
    from dgemma.ops.norm import qkv_norms

    torch.manual_seed(0)
    b, t, e, eps = 2, 5, 16, 0.1  # eps large and distinct per norm: a mixed-up eps shows
    q_raw, k_raw = torch.randn(b, t, h, e), torch.randn(b, t, kv, e)
    v_raw = torch.randn(b, t, kv, e) if own_values else k_raw
    q_norm, k_norm, v_norm = RMSNorm(e, eps), RMSNorm(e, 2 * eps), RMSNorm(e, 3 * eps, with_scale=False)
    q_norm.weight.data.uniform_(0.5, 1.5)
    k_norm.weight.data.uniform_(0.5, 1.5)
    angles = torch.rand(b, t, e // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    spec = ModelConfig.from_dict(tiny_config_dict()).layers[0]
    layers = [dataclasses.replace(spec, num_kv_heads=kv, head_dim=e)]
    cache, want = (
        KVCache(layers, batch_size=3, max_length=20, device="cpu", dtype=torch.float32) for _ in range(2)
    )
    for store in cache.keys + cache.values:
        store.normal_()
    for store, again in zip(cache.keys + cache.values, want.keys + want.values):
        again.copy_(store)
    rows, starts = torch.tensor([2, 0]), torch.tensor([7, 0])
    storage = {"keys": cache.keys[0], "values": cache.values[0], "rows_B": rows, "starts_B": starts}
    norms = {"weights": (q_norm.weight, k_norm.weight), "eps": (eps, 2 * eps, 3 * eps)}
    with torch.no_grad():
        k, v = apply_rope(k_norm(k_raw), cos, sin), v_norm(v_raw)
        want.write(0, (rows[:, None], starts[:, None] + torch.arange(t)), k, v)
        q = qkv_norms(q_raw, k_raw, v_raw, cos, sin, **norms, **storage)
        torch.testing.assert_close(q, apply_rope(q_norm(q_raw), cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.keys[0], want.keys[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.values[0], want.values[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="K/V storage"):
        qkv_norms(q_raw, k_raw, v_raw, cos, sin, **norms, **{**storage, "keys": cache.keys[0][:, :1]})


@needs_interpreter
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "silu"])
def test_the_dense_mlps_glue_in_one_kernel_matches_torch(activation, monkeypatch):
    """gated(gate, up) = act(gate) * up, over several programs and a partial last one."""
    import dgemma.ops.norm as norm_ops
    from dgemma.model.layers import activation as torch_activation

    monkeypatch.setattr(norm_ops, "GATED_BLOCK", 64)
    torch.manual_seed(0)
    gate, up = torch.randn(3, 5, 37) * 3, torch.randn(3, 5, 37)
    want = torch_activation(activation)(gate) * up
    torch.testing.assert_close(norm_ops.gated(gate, up, activation), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one shape and dtype"):
        norm_ops.gated(gate, up[..., :36], activation)


@needs_interpreter
@pytest.mark.parametrize("bias", [False, True])  # with biases, each mode's own (no packed projections)
def test_a_layer_with_the_fused_glue_equals_the_plain_layer(bias, monkeypatch):
    """The wiring: Layer and Attention through the fused kernels (forced on, on the CPU: norms, experts
    summed in ff_combine, attention over the cache in place) vs the plain modules, in both modes and
    mixed (the fused commit's split), an encode of two right-padded prompts after the rows' prefixes
    (its causal attention in the kernel) and a static encode after those (the runner's prefill and
    commit): hidden states and the K/V they write."""
    import dgemma.model.attention as attention_module
    import dgemma.model.diffusion_gemma as model_module
    import dgemma.model.layers as layers_module

    lengths = [3, 20]
    model, cache = model_and_cache(lengths, bias=bias)
    for i, layer in enumerate(model.layers):
        layer.encoder_layer_scalar.fill_(0.5 + 0.1 * i)
        layer.decoder_layer_scalar.fill_(1.5 - 0.1 * i)
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(".scale"):
                p.data.uniform_(0.5, 1.5)
    c = model.config.canvas_length
    gen = torch.Generator().manual_seed(7)
    commit, canvas = (torch.randint(0, 300, (2, c), generator=gen) for _ in range(2))
    rows, starts = torch.tensor([1, 0]), torch.tensor([20, 3])

    prompts = torch.randint(3, 300, (2, 13), generator=gen)  # the second right-padded (10 real tokens)

    def run():
        twin = twin_cache(model, cache)
        with torch.inference_mode():
            soft = torch.randn(2, c, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
            outs = [
                model.denoise_static(canvas, soft * 0.1, twin, rows, starts),
                model.commit_denoise_static(commit, canvas, twin, rows, starts),
            ]
            encoded = model.encode(prompts, twin, rows=[1, 0], lengths=[13, 10])  # causal, after the prefixes
            # 8 more tokens on each row (and the scratch row from 0), as the runner's graphs write them
            model.encode_static(
                prompts[:, :8].repeat(3, 1)[:3], twin, torch.tensor([1, 0, 2]), torch.tensor([33, 13, 0])
            )
        return [*outs, encoded[0], encoded[1, :10], twin.keys[0][0, :, :21], twin.values[-1][1, :, :41]]

    plain = run()
    for module in (attention_module, model_module, layers_module):  # every kernel, the experts' too
        monkeypatch.setattr(module, "kernels_apply", lambda x: True)
    fused = run()
    for f, p in zip(fused, plain):
        # float32 through four layers: the kernels' and torch's sums differ in order (a few 1e-5 at most)
        torch.testing.assert_close(f, p, rtol=1e-4, atol=5e-5)


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 3])
def test_attention_over_the_cache_in_place_matches_sdpa(splits, monkeypatch):
    """attend_cache (keys read where the cache keeps them, split over programs and merged) against
    SDPA over the gathered run of each row's keys, float32, two rows of different ranges."""
    import dgemma.ops.attention as attention_ops

    # several key blocks per split, several query blocks per (row, K/V head)
    monkeypatch.setattr(attention_ops, "choose_tiles", lambda *_: attention_ops.Tiles(16, 16, 1, 4, splits))
    torch.manual_seed(0)
    b, c, h, kv, e, positions = 2, 12, 4, 2, 16, 80
    q = torch.randn(b, c, h, e)
    k_cache, v_cache = torch.randn(3, kv, positions, e), torch.randn(3, kv, positions, e)
    rows, lo, hi = torch.tensor([2, 0]), torch.tensor([5, 0]), torch.tensor([70, 33])
    got = attention_ops.attend_cache(q, k_cache, v_cache, rows, lo, hi)
    for i in range(b):
        k = k_cache[rows[i], :, lo[i] : hi[i]].repeat_interleave(h // kv, dim=0)
        v = v_cache[rows[i], :, lo[i] : hi[i]].repeat_interleave(h // kv, dim=0)
        want = torch.nn.functional.scaled_dot_product_attention(q[i].transpose(0, 1), k, v, scale=1.0)
        torch.testing.assert_close(got[i], want.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert attention_ops.supports(512, torch.bfloat16) and not attention_ops.supports(512, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        attention_ops.attend_cache(
            torch.randn(1, 2, 2, 48), k_cache[..., :48], v_cache[..., :48], rows, lo, hi
        )


def causal_sdpa(q_CHE, k_KSE, v_KSE, start: int, window: int | None) -> torch.Tensor:
    """The spec's causal attention of queries at positions start + t over one cache row's keys (the
    last `window` of them if sliding), through SDPA with its mask: [C, H, E]."""
    c, h, _ = q_CHE.shape
    q_pos = start + torch.arange(c, device=q_CHE.device)[:, None]
    k_pos = torch.arange(k_KSE.shape[1], device=q_CHE.device)[None, :]
    sees = k_pos <= q_pos
    if window is not None:
        sees &= k_pos > q_pos - window
    k, v = (z.repeat_interleave(h // z.shape[0], dim=0) for z in (k_KSE, v_KSE))
    out = torch.nn.functional.scaled_dot_product_attention(
        q_CHE.transpose(0, 1), k, v, attn_mask=sees, scale=1.0
    )
    return out.transpose(0, 1)


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [None, 9])
def test_causal_attention_over_the_cache_matches_the_masked_sdpa(splits, window, monkeypatch):
    """attend_cache with causal_from (the fused commit's encode queries, here the second half of a
    longer run of tokens, written into the matching half of `out`): each query sees the keys up to its
    own position, the last `window` of them if sliding; against SDPA with the spec's causal mask."""
    import dgemma.ops.attention as attention_ops

    monkeypatch.setattr(attention_ops, "choose_tiles", lambda *_: attention_ops.Tiles(16, 16, 1, 4, splits))
    torch.manual_seed(1)
    b, c, h, kv, e, positions = 2, 12, 4, 2, 16, 80
    q_run = torch.randn(b, 2 * c, h, e)
    k_cache, v_cache = torch.randn(3, kv, positions, e), torch.randn(3, kv, positions, e)
    rows, starts = torch.tensor([2, 0]), torch.tensor([30, 0])
    lo = torch.zeros_like(starts) if window is None else (starts - (window - 1)).clamp(min=0)
    out = torch.full_like(q_run, float("nan"))
    got = attention_ops.attend_cache(
        q_run[:, c:], k_cache, v_cache, rows, lo, starts + c, causal_from=starts, window=window,
        out=out[:, c:],
    )  # fmt: skip
    assert got.data_ptr() == out[:, c:].data_ptr() and out[:, :c].isnan().all()
    for i in range(b):
        want = causal_sdpa(q_run[i, c:], k_cache[rows[i]], v_cache[rows[i]], int(starts[i]), window)
        torch.testing.assert_close(out[i, c:], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="laid out as q"):
        attention_ops.attend_cache(
            q_run[:, c:], k_cache, v_cache, rows, lo, starts + c, out=out[:, :c].clone()
        )


@needs_interpreter
def test_packed_projections_equal_the_separate_ones(monkeypatch):
    """q|k|v and gate|up as one GEMM each (`PackedLinears`, what the engine sets up on CUDA), forced on
    the CPU with every kernel: the static denoise, the fused commit and a prompt's encode equal the
    unpacked model's, the kernels reading the projections as views of one output (strided rows). The
    parameters become views of the block with their values unchanged; a weight re-pointed since, or
    hooked, falls back to the separate GEMMs."""
    import dgemma.model.attention as attention_module
    import dgemma.model.diffusion_gemma as model_module
    import dgemma.model.layers as layers_module
    from dgemma.model.layers import GatedMLP

    for module in (attention_module, model_module, layers_module):
        monkeypatch.setattr(module, "kernels_apply", lambda x: True)
    model, cache = model_and_cache([3, 20])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = model.config.canvas_length
    gen = torch.Generator().manual_seed(7)
    commit, canvas = (torch.randint(0, 300, (2, c), generator=gen) for _ in range(2))
    prompt = torch.randint(3, 300, (1, 11), generator=gen)
    rows, starts = torch.tensor([1, 0]), torch.tensor([20, 3])
    soft = torch.randn(2, c, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.1

    def run():
        twin = twin_cache(model, cache)
        with torch.inference_mode():
            outs = [
                model.denoise_static(canvas, soft, twin, rows, starts),
                model.commit_denoise_static(commit, canvas, twin, rows, starts),
            ]
            model.encode(prompt, twin, rows=[2])
        return [*outs, twin.keys[0][2, :, :11].clone(), twin.values[-1][2, :, :11].clone()]

    plain = run()
    packable = [m for m in model.modules() if isinstance(m, (attention_module.Attention, GatedMLP))]
    for m in packable:
        m.pack()
    attn = model.layers[0].self_attn
    assert attn.packed.weight() is not None and attn.k_proj.weight.data_ptr() > attn.q_proj.weight.data_ptr()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for got, want in zip(run(), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a weight re-pointed since: that module falls back (its block dropped), the results stay the same
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    model.layers[0].mlp.up_proj.register_forward_hook(lambda *_: None)  # as a LoRA adapter hooks it
    for got, want in zip(run(), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert attn.packed.block is None and model.layers[0].mlp.packed.weight() is None
    assert model.layers[0].mlp.packed.block is not None
    model.double()  # new storage for every weight: no block is kept alive beside them
    assert all(m.packed is None for m in packable)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a compiled kernel's regression: CUDA only")
@pytest.mark.parametrize("window", [1024, None])
def test_causal_attention_on_cuda_matches_the_masked_sdpa(window):
    """The causal attention compiled for the GPU, float32 head dim 256 with the 32 x 64, 8-warp tiles:
    a branch on the window inside the key loop was miscompiled there (H100, Triton 3.6: NaN and wrong
    rows), so the kernel masks without one. Against SDPA with the spec's mask; run on the device."""
    import dgemma.ops.attention as attention_ops

    torch.manual_seed(0)
    t, h, kv, e, positions = 512, 16, 8, 256, 800
    q = torch.randn(1, t, h, e, device="cuda")
    k_cache, v_cache = (
        torch.randn(2, kv, positions, e, device="cuda"),
        torch.randn(2, kv, positions, e, device="cuda"),
    )
    rows, starts = torch.tensor([0], device="cuda"), torch.tensor([0], device="cuda")
    got = attention_ops.attend_cache(
        q, k_cache, v_cache, rows, torch.zeros_like(starts), starts + t, causal_from=starts, window=window,
        tiles=attention_ops.Tiles(32, 64, 2, 8, 1),
    )  # fmt: skip
    want = causal_sdpa(q[0], k_cache[0], v_cache[0], 0, window)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
