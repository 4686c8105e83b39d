"""`dgemma bench`: speed and memory of the denoise loop on this GPU, with random weights built on the GPU.

Sections (each a function returning a plain dict; `main` prints a table and writes one JSON record):
  moe          the expert kernels alone per layer, against the device-to-device copy bandwidth
  correctness  the fast path (kernels + CUDA graphs) against the pure-torch path, same weights
  single       prefill, one denoise step, the commit, whole canvases at fixed steps, first canvas
  canvases     one step with 1, 2, 4, 8 canvases (several users in one step)
  streams      concurrent requests through the engine: aggregate tok/s, canvas latency p50/p99
Steps are fixed (the stop test is switched off) so the numbers do not depend on the random weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dgemma.bench_transformers import bench_transformers, ratios
from dgemma.denoise.sampler import ConfidenceSampler, EntropyBoundSampler, temperature
from dgemma.engine.generate import GPU_LOGIT_ROWS, Engine, Request
from dgemma.engine.runner import DenoiseRunner, capture
from dgemma.engine.vocab import VocabStage
from dgemma.errors import ConfigError
from dgemma.model.config import ModelConfig, parameter_counts
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.layers import Experts, Router
from dgemma.model.presets import release_config_dict
from dgemma.outputs import TextDelta
from dgemma.params import DiffusionDefaults, SamplingParams

logger = logging.getLogger(__name__)

NEVER_STABLE = 10**6  # a stability threshold no canvas reaches: every canvas runs its fixed steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], *, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        began = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - began) * 1e3)
    return times


def median(xs: Sequence[float]) -> float:
    return round(statistics.median(xs), 3)


def percentile(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def gigabytes(nbytes: float) -> float:
    return round(nbytes / 1e9, 3)


def fixed_steps(steps: int, max_new_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(
        seed=seed,
        max_new_tokens=max_new_tokens,
        max_denoising_steps=steps,
        stability_threshold=NEVER_STABLE,
        ignore_eos=True,
    )


def random_prompt(model: DiffusionGemma, length: int, seed: int) -> tuple[int, ...]:
    """Random ids past the specials, never the image placeholder."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (length,), generator=gen)
    if model.config.image_token_id is not None:
        ids[ids == model.config.image_token_id] = 3
    return tuple(ids.tolist())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||"""
    return float((got.float() - want.float()).norm() / want.float().norm())


def weight_bytes(model: DiffusionGemma) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- sections --------------------------------------------------------------------------------------


def release_expert_layer(*, fp8: bool = False) -> tuple[Experts, Router]:
    """One expert layer of the release's shapes and its router, random bf16 weights on the GPU (the
    experts in FP8 with `fp8`): the tile sweeps' subject (bench/*_sweep.py)."""
    config = ModelConfig.from_dict(release_config_dict())
    d, num_experts, top_k = config.hidden_size, config.num_experts, config.top_k_experts
    torch.manual_seed(0)
    experts = Experts(num_experts, d, config.moe_intermediate_size, config.hidden_activation)
    experts = experts.cuda().to(torch.bfloat16)
    router = Router(d, num_experts, top_k, config.rms_norm_eps).cuda().to(torch.bfloat16)
    for w in (experts.gate_up_proj, experts.down_proj, router.proj.weight):
        torch.nn.init.normal_(w, std=0.02)
    if fp8:
        experts.quantize_()
    return experts, router


def record_header(benchmark: str) -> dict:
    """The fields every record of a bench script starts with: what it measures, date, GPU, versions and
    the command that reproduces it (as typed)."""
    return {
        "benchmark": benchmark,
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "command": " ".join(["python", *sys.argv]),
    }


def copy_bandwidth_gbps(nbytes: int = 2 * 10**9) -> float:
    """Device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = median(timed_ms(lambda: dst.copy_(src), reps=10, warmup=2))
    return round(2 * nbytes / (ms / 1e3) / 1e9, 1)


def kernel_ms(fn: Callable[[], object], *, reps: int = 20) -> float:
    """Mean GPU time of `fn` over back-to-back calls between two CUDA events (launches overlap the
    previous call's work, so per-call host overhead does not count)."""
    fn()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    sync()
    return round(start.elapsed_time(end) / reps, 4)


def graph_ms(fn: Callable[[], object], *, calls: int = 1, reps: int = 20) -> float:
    """GPU time of one call of `fn`, from a CUDA graph of `calls` calls replayed `reps` times: no host
    time counts (alone, a small kernel's launch takes the host longer than the GPU takes to run it)."""
    graph = torch.cuda.CUDAGraph()
    capture(graph, lambda: [fn() for _ in range(calls)], None)
    graph.replay()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    sync()
    return start.elapsed_time(end) / (reps * calls)


# Tile sweeps of the expert kernels: (block_n, block_k, num_warps, num_stages, swap_ab), for blocks of
# few tokens (block_m <= 32: weight streaming) and of many (block_m >= 64: closer to compute-bound).
GATE_UP_TILES = {
    "few": [(64, 128, 4, 4, False), (64, 128, 4, 5, True), (128, 128, 4, 4, False), (64, 256, 4, 3, False),
            (64, 128, 4, 4, True), (128, 128, 8, 4, True), (64, 256, 4, 4, False), (64, 256, 4, 3, True)],
    "many": [(128, 64, 8, 4, False), (128, 64, 8, 3, False), (64, 64, 4, 4, False), (128, 128, 8, 3, False),
             (64, 128, 4, 3, False), (128, 64, 4, 4, False), (256, 64, 8, 3, False)],
}  # fmt: skip
DOWN_TILES = {
    "few": [(64, 64, 4, 4, False), (64, 128, 4, 5, True), (128, 64, 4, 4, False), (64, 64, 4, 4, True),
            (128, 128, 8, 4, True), (64, 128, 4, 4, False)],
    "many": [(128, 64, 8, 4, False), (128, 128, 8, 3, False), (256, 64, 8, 3, False), (64, 64, 4, 4, False),
             (128, 64, 4, 4, False), (256, 128, 8, 3, False), (64, 128, 4, 3, False)],
}  # fmt: skip
BLOCK_M_FOR_TOKENS = {256: (16, 32), 512: (16, 32, 64), 1024: (32, 64), 2048: (64, 128)}


def bench_moe(
    model: DiffusionGemma, tokens: Sequence[int] = (256, 512, 1024, 2048), sweep: bool = True
) -> dict:
    """One layer's experts per token count (1, 2, 4, 8 canvases): the whole call with the default tiles
    (time, and the rate at which it streams the expert weights), and with `sweep` each kernel alone per
    tile config in the default config's program order (`bench/moe_order_sweep.py` sweeps the orders),
    so the defaults can be chosen per token count (`dgemma.ops.moe.default_config`)."""
    from dgemma.ops.moe import MoeConfig, align, default_config, down, gate_up, moe

    layer = model.layers[0]
    experts = layer.experts
    num_experts, top_k = model.config.num_experts, model.config.top_k_experts
    nbytes = sum(w.numel() * w.element_size() for w in (experts.gate_up_proj, experts.down_proj))
    scales = {"gate_up_scale": experts.gate_up_scale, "down_scale": experts.down_scale}
    result = {"weight_bytes_per_layer": nbytes, "copy_gbps": copy_bandwidth_gbps(), "runs": [], "sweep": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in tokens:
        x = torch.randn(n, model.config.hidden_size, device="cuda", generator=gen).to(model.dtype)
        weights, index = layer.router(x)
        used = default_config(
            n * top_k, num_experts, x.dtype, experts.gate_up_proj.dtype, experts.fp8_activations
        )

        def call(x=x, weights=weights, index=index):  # as the layer calls it (fp8-w8a8: x quantized)
            if experts.fp8_activations:
                return experts.terms(x, weights, index).sum(1)
            return moe(x, experts.gate_up_proj, experts.down_proj, weights, index, **scales)

        ms = kernel_ms(call)
        gbps = round(nbytes / (ms / 1e3) / 1e9, 1)
        result["runs"].append({"tokens": n, "config": used.__dict__, "ms": ms, "weights_gbps": gbps})
        if not sweep or experts.fp8_activations:  # the sweep times the kernels on bf16 activations
            continue
        for block_m in BLOCK_M_FOR_TOKENS.get(n, (used.block_m,)):
            kind = "few" if block_m <= 32 else "many"
            slots = align(index, num_experts, block_m)
            base = dataclasses.replace(used, block_m=block_m)
            h = gate_up(
                x, experts.gate_up_proj, slots, top_k, activation=experts.act_name, config=base,
                scale=experts.gate_up_scale,
            )  # fmt: skip
            for kernel, tiles in (("gate_up", GATE_UP_TILES[kind]), ("down", DOWN_TILES[kind])):
                for bn, bk, warps, stages, swap in tiles:
                    if kernel == "gate_up":
                        cfg = MoeConfig(block_m=block_m, block_n=bn, block_k=bk, num_warps=warps,
                                        num_stages=stages, swap_ab=swap, group_m=used.group_m)  # fmt: skip

                        def run(cfg=cfg, x=x, slots=slots):
                            return gate_up(x, experts.gate_up_proj, slots, top_k,
                                           activation=experts.act_name, config=cfg,
                                           scale=experts.gate_up_scale)  # fmt: skip
                    else:
                        cfg = MoeConfig(block_m=block_m, down_block_n=bn, down_block_k=bk,
                                        down_num_warps=warps, down_num_stages=stages, down_swap_ab=swap,
                                        down_group_m=used.down()["group_m"])  # fmt: skip

                        def run(cfg=cfg, h=h, slots=slots, weights=weights):
                            return down(h, experts.down_proj, slots, weights, config=cfg,
                                        scale=experts.down_scale)  # fmt: skip

                    try:
                        ms = kernel_ms(run)
                    except Exception as exc:  # a tile config the compiler rejects (shared memory): skip it
                        logger.warning("%s tiles %s failed: %s", kernel, cfg, str(exc)[:200])
                        continue
                    result["sweep"].append(
                        {"tokens": n, "kernel": kernel, "block_m": block_m, "block_n": bn, "block_k": bk,
                         "num_warps": warps, "num_stages": stages, "swap_ab": swap, "ms": ms}
                    )  # fmt: skip
    result["best"] = _best_tiles(result["sweep"])
    return result


def _best_tiles(sweep: list[dict]) -> list[dict]:
    """Per token count: the fastest gate-up plus down pair that shares a block_m."""
    best = []
    for n in sorted({r["tokens"] for r in sweep}):
        pairs = []
        for block_m in sorted({r["block_m"] for r in sweep if r["tokens"] == n}):
            fastest = {}
            for kernel in ("gate_up", "down"):
                runs = [r for r in sweep if (r["tokens"], r["block_m"], r["kernel"]) == (n, block_m, kernel)]
                if runs:
                    fastest[kernel] = min(runs, key=lambda r: r["ms"])
            if len(fastest) == 2:
                pairs.append((fastest["gate_up"]["ms"] + fastest["down"]["ms"], fastest))
        if pairs:
            total, fastest = min(pairs, key=lambda p: p[0])
            best.append({"tokens": n, "ms": round(total, 4), **fastest})
    return best


@contextlib.contextmanager
def _pure_torch(model: DiffusionGemma):
    """The model's torch ops instead of its kernels inside the block (the spec the fast path is checked
    against); the setting it had is restored after."""
    before = model.use_kernels
    model.use_kernels = False
    try:
        yield
    finally:
        model.use_kernels = before


def _fast_vs_pure(model: DiffusionGemma, prompt_len: int) -> dict:
    """Logits of one denoise step after the same prompt, then of the next canvas's first step after a
    commit: fast path (kernels, CUDA graphs, static-shape attention, the commit fused with that first
    step) vs pure-torch path (expert loop, row-by-row attention, encode then denoise), same weights."""
    c = model.config.canvas_length
    prompt = torch.tensor([random_prompt(model, prompt_len, 1)], device=model.device)
    canvas, commit, following = (
        torch.tensor([random_prompt(model, c, seed)], device=model.device) for seed in (2, 3, 4)
    )
    fast_cache = model.new_cache(batch_size=2, max_length=prompt_len + c)  # row 1: the graphs' scratch row
    model.encode(prompt, fast_cache, rows=[0])
    runner = DenoiseRunner(model, fast_cache, graphs=True)
    fast = model.logits(runner.hidden([canvas], [None], [0], [prompt_len]))
    prompt_keys = fast_cache.keys[-1][0, :, :prompt_len].clone()
    fast_next = model.logits(runner.commit_and_hidden([commit], [following], [0]))
    with _pure_torch(model):
        ref_cache = model.new_cache(batch_size=1, max_length=prompt_len + c)
        model.encode(prompt, ref_cache)
        ref = model.denoise(canvas, ref_cache)
        model.encode(commit, ref_cache)
        ref_next = model.denoise(following, ref_cache)
    return {
        "logits_rel_err": rel_err(fast, ref),
        "argmax_agreement": float((fast.argmax(-1) == ref.argmax(-1)).float().mean()),
        # the prompt's positions (past them the fast path's scratch holds the canvas's K/V)
        "prefill_last_layer_keys_rel_err": rel_err(prompt_keys, ref_cache.keys[-1][0, :, :prompt_len]),
        "fused_commit_logits_rel_err": rel_err(fast_next, ref_next),
        "fused_commit_argmax_agreement": float((fast_next.argmax(-1) == ref_next.argmax(-1)).float().mean()),
        "commit_last_layer_keys_rel_err": rel_err(
            fast_cache.keys[-1][0, :, prompt_len : prompt_len + c],
            ref_cache.keys[-1][0, :, prompt_len : prompt_len + c],
        ),
    }


def _canvas_hidden(model: DiffusionGemma, prompt_len: int, canvases: int, seed: int):
    """(ids [N, C], hidden [N, C, D]): random canvases after one random prompt and the denoiser's final
    hidden states on them (the fast path's forward, no graphs)."""
    c = model.config.canvas_length
    cache = model.new_cache(batch_size=1, max_length=prompt_len)
    model.encode(torch.tensor([random_prompt(model, prompt_len, 1)], device=model.device), cache)
    ids = torch.tensor([random_prompt(model, c, seed + i) for i in range(canvases)], device=model.device)
    return ids, torch.cat([model.denoise_hidden(ids[i : i + 1], cache) for i in range(canvases)])


def _vocab_fused_vs_spec(model: DiffusionGemma, prompt_len: int, canvases: int = 4) -> dict:
    """The vocabulary stage on real hidden states of the fast path: the fused Triton passes vs the spec
    (fp32 logits, torch softmaxes, torch.multinomial), same generators (so the same sampling noise)."""
    ids, hidden = _canvas_hidden(model, prompt_len, canvases, seed=10)
    temps = [temperature(s, 16, 0.4, 0.8) for s in range(16, 16 - canvases, -1)]
    vocab = VocabStage(model)

    def run():
        return vocab.sample(
            hidden,
            list(ids),
            temps=temps,
            samplers=[EntropyBoundSampler(0.5)] * canvases,
            generators=[torch.Generator(model.device).manual_seed(i) for i in range(canvases)],
        )

    fused = run()
    with _pure_torch(model):
        spec = run()

    def cat(outcomes, name):
        return torch.cat([getattr(o, name).reshape(1, -1) for o in outcomes])

    accepted = torch.tensor([[int(o.accepted) for o in outcomes] for outcomes in (fused, spec)])
    return {
        "canvases": canvases,
        "argmax_agreement": float((cat(fused, "argmax") == cat(spec, "argmax")).float().mean()),
        # accepted positions carry the sampled token: equal where both paths accepted them
        "next_canvas_agreement": float(
            (cat(fused, "next_canvas") == cat(spec, "next_canvas")).float().mean()
        ),
        "accepted_fused": accepted[0].tolist(),
        "accepted_spec": accepted[1].tolist(),
        "mean_entropy_abs_err": float((cat(fused, "mean_entropy") - cat(spec, "mean_entropy")).abs().max()),
        "soft_embedding_rel_err": rel_err(
            model.expected_embedding(torch.cat([o.signal for o in fused])),
            model.expected_embedding(torch.cat([o.signal for o in spec])),
        ),
    }


def _vocab_graph_vs_fused(model: DiffusionGemma, prompt_len: int, canvases: int = 3) -> dict:
    """The vocabulary stage replayed from its CUDA graph (the engine's path) against the same fused
    passes run eagerly, two steps from the same seeds, both built-in samplers, a padded group: the
    share of equal tokens, whether each generator ends in the same state, and the soft embedding's
    difference (the graph computes it over the whole group, the eager path over the canvases given)."""
    ids, hidden = _canvas_hidden(model, prompt_len, canvases, seed=20)
    temps = [temperature(16 - i, 16, 0.4, 0.8) for i in range(canvases)]
    samplers = [EntropyBoundSampler(0.5), ConfidenceSampler(0.6), EntropyBoundSampler(2.0)][:canvases]
    stages = {"eager": VocabStage(model), "graph": VocabStage(model, graphs=True, groups=GPU_LOGIT_ROWS)}
    gens = {k: [torch.Generator(model.device).manual_seed(i) for i in range(canvases)] for k in stages}
    equal, total, soft_err = 0, 0, 0.0
    for _ in range(2):
        got = {
            k: stage.sample(hidden, list(ids), temps=temps, samplers=samplers, generators=gens[k])
            for k, stage in stages.items()
        }
        for name in ("next_canvas", "argmax"):
            a = torch.cat([getattr(o, name) for o in got["eager"]])
            b = torch.cat([getattr(o, name) for o in got["graph"]])
            equal, total = equal + int((a == b).sum()), total + a.numel()
        soft_err = max(
            soft_err,
            rel_err(
                stages["graph"].soft_embeddings(got["graph"]), stages["eager"].soft_embeddings(got["eager"])
            ),
        )
    return {
        "canvases": canvases,
        "token_agreement": equal / total,
        "accepted_equal": [int(a.accepted) == int(b.accepted) for a, b in zip(got["eager"], got["graph"])],
        "generators_equal": all(
            torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens["eager"], gens["graph"])
        ),
        "soft_embedding_rel_err": soft_err,
    }


def _random_rope_tables(tokens: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """cos, sin [1, tokens, head_dim] of random angles (rotate_half's layout), for the kernels' checks."""
    angles = torch.rand(1, tokens, head_dim // 2, device="cuda", generator=gen) * 100
    return (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))


def _glue_vs_torch(model: DiffusionGemma, tokens: int = 256) -> dict:
    """A layer's fused glue kernels (dgemma.ops.norm) vs the torch ops they replace, in the model's
    dtype on real-size rows: the share of output elements that are bitwise equal, and the largest
    difference relative to the output's scale."""
    from dgemma.model.layers import apply_rope
    from dgemma.ops.norm import ff_combine, gated, norm_rope, residual_norms

    layer, d = model.layers[0], model.config.hidden_size
    gen = torch.Generator("cuda").manual_seed(0)
    x, attn, mlp_out, experts_out = (
        torch.randn(1, tokens, d, device="cuda", generator=gen).to(model.dtype) for _ in range(4)
    )
    e = model.config.layers[0].head_dim
    q = torch.randn(1, tokens, model.config.num_heads, e, device="cuda", generator=gen).to(model.dtype)
    cos, sin = _random_rope_tables(tokens, e, model.dtype, gen)
    gate, up = (
        torch.randn(1, tokens, model.config.intermediate_size, device="cuda", generator=gen).to(model.dtype)
        for _ in range(2)
    )
    attn_layer, eps = layer.self_attn, layer.input_layernorm.eps
    fused = [
        *residual_norms(
            x, attn, layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
            layer.pre_feedforward_layernorm_2.weight, layer.router.scale, layer.router.root, eps,
        ),
        ff_combine(
            x, mlp_out, experts_out, layer.post_feedforward_layernorm_1.weight,
            layer.post_feedforward_layernorm_2.weight, layer.post_feedforward_layernorm.weight,
            layer.decoder_layer_scalar, eps,
        ),
        norm_rope(q, attn_layer.q_norm.weight, cos, sin, eps),
        gated(gate, up, layer.mlp.act_name),
    ]  # fmt: skip
    with _pure_torch(model):
        r = x + layer.post_attention_layernorm(attn)
        mixed = layer.post_feedforward_layernorm(
            layer.post_feedforward_layernorm_1(mlp_out) + layer.post_feedforward_layernorm_2(experts_out)
        )
        torch_ops = [
            r,
            layer.pre_feedforward_layernorm(r),
            layer.pre_feedforward_layernorm_2(r),
            layer.router.norm(r) * layer.router.scale * layer.router.root,
            (x + mixed) * layer.decoder_layer_scalar,
            apply_rope(attn_layer.q_norm(q), cos, sin),
            layer.mlp.act(gate) * up,
        ]
    names = [
        "residual",
        "pre_ff_norm",
        "pre_ff_norm_2",
        "router_input",
        "ff_combine",
        "q_norm_rope",
        "mlp_glue",
    ]
    return {
        name: {
            "bitwise_equal": float((f == t).float().mean()),
            "max_abs_err_vs_scale": float((f.float() - t.float()).abs().max() / t.float().abs().max()),
        }
        for name, f, t in zip(names, fused, torch_ops)
    }


def _commit_attention_vs_torch(model: DiffusionGemma, prompt_len: int) -> dict:
    """One sliding and one full layer's attention in the fused commit (`commit_denoise_static`: the
    finished canvas causally over its prefix, the next canvas over the new prefix), kernels (the norms
    writing the cache, the causal attention read in place) vs the torch path (cache write, gather,
    masked SDPA), in the model's dtype on random inputs and a random cache: the outputs' and the
    written keys' relative errors."""
    c, d, h = model.config.canvas_length, model.config.hidden_size, model.config.num_heads
    gen = torch.Generator("cuda").manual_seed(0)
    out = {}
    for kind in ("sliding", "full"):
        i = next(j for j, spec in enumerate(model.config.layers) if (spec.window is None) == (kind == "full"))
        attn, e = model.layers[i].self_attn, model.config.layers[i].head_dim
        cache = model.new_cache(batch_size=2, max_length=prompt_len + c)
        for store in (cache.keys[i], cache.values[i]):
            store.copy_(torch.randn(store.shape, device="cuda", generator=gen))
        x = torch.randn(1, 2 * c, d, device="cuda", generator=gen).to(model.dtype)
        cos, sin = _random_rope_tables(2 * c, e, model.dtype, gen)
        rows, starts = torch.tensor([0], device="cuda"), torch.tensor([prompt_len], device="cuda")
        saved = [cache.keys[i].clone(), cache.values[i].clone()]
        results = []
        for use_kernel in (True, False):
            cache.keys[i].copy_(saved[0])
            cache.values[i].copy_(saved[1])
            attn.q_norm.use_kernel = use_kernel
            try:
                with torch.inference_mode():
                    y = attn.commit_denoise_static(x, cos, sin, cache, i, rows, starts)
            finally:
                attn.q_norm.use_kernel = True
            results.append((y, cache.keys[i][0, :, prompt_len : prompt_len + 2 * c].clone()))
        (y_fast, k_fast), (y_torch, k_torch) = results
        out[kind] = {
            "layer": i,
            "heads": h,
            "output_rel_err": rel_err(y_fast, y_torch),
            "written_keys_rel_err": rel_err(k_fast, k_torch),
        }
    return out


def fp8_widening_exact(hidden: int = 256, inter: int = 64) -> dict:
    """Each of the 254 finite e4m3 codes (both zeros and the subnormals included) as a weight of one
    expert [hidden, inter], through the down kernel with one-hot bf16 inputs and unit scales and routing
    weights, so that each output is one weight as the kernel widened it; against torch's own e4m3 ->
    bf16 conversion, with the kernels' fast widening and with Triton's cast. (-0 comes back as +0 from
    the accumulator either way: compared by value.)"""
    from dgemma.ops.moe import align, default_config, down

    codes = torch.arange(256, dtype=torch.uint8, device="cuda")
    codes = codes[(codes & 0x7F) != 0x7F]  # 0x7F and 0xFF are NaN in e4m3fn
    raw = codes.repeat(hidden * inter // codes.numel() + 1)[: hidden * inter]
    weight = raw.view(1, hidden, inter).view(torch.float8_e4m3fn)
    index = torch.zeros(inter, 1, dtype=torch.long, device="cuda")
    route = torch.ones(inter, 1, device="cuda")
    want = weight[0].to(torch.bfloat16).t()
    out: dict = {"codes": codes.numel()}
    for fast in (True, False):
        cfg = dataclasses.replace(default_config(inter, 1, torch.bfloat16, weight.dtype), fast_widen=fast)
        slots = align(index, 1, cfg.block_m)
        pair_of_slot = slots[0]
        h = torch.zeros(pair_of_slot.numel(), inter, device="cuda", dtype=torch.bfloat16)
        real = pair_of_slot < inter
        h[real.nonzero().squeeze(1), pair_of_slot[real].long()] = 1.0
        y = down(h, weight, slots, route, config=cfg, scale=torch.ones(1, hidden, device="cuda"))
        out["fast_equal" if fast else "cast_equal"] = bool(torch.equal(y, want))
    return out


def bench_correctness(model: DiffusionGemma, prompt_len: int) -> dict:
    """The fast path against the pure-torch path: (1) one full-size expert layer in bf16 (the kernels'
    own error); (2) the whole model in bf16 (random weights amplify rounding through 30 layers and
    through routing flips: this measures the dtype as much as the code); (3) a full-width two-layer
    model (one sliding, one full layer) in float32 with a prompt longer than the sliding window: the
    code path with rounding out of the way."""
    out = {}
    layer = model.layers[0]
    x = torch.randn(
        256, model.config.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    x = x.to(model.dtype)
    weights, index = layer.router(x)
    got = layer.experts(x, weights, index)
    layer.experts.use_kernel = False
    want = layer.experts(x, weights, index)
    layer.experts.use_kernel = True
    out["experts_layer_bf16_rel_err"] = rel_err(got, want)
    out["fused_glue_bf16"] = _glue_vs_torch(model)
    out["commit_attention_bf16"] = _commit_attention_vs_torch(model, prompt_len)
    out["full_model_bf16"] = _fast_vs_pure(model, prompt_len)
    with torch.inference_mode():
        out["vocab_fused_vs_spec_bf16"] = _vocab_fused_vs_spec(model, prompt_len)
        out["vocab_graph_vs_eager_bf16"] = _vocab_graph_vs_fused(model, prompt_len)
    small = release_config_dict()
    small["text_config"].update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    two = DiffusionGemma.random(ModelConfig.from_dict(small), device="cuda", dtype=torch.float32, seed=1)
    if model.quantization is not None:  # the same kernels: FP8 tiles widened to float32
        two.quantize(model.quantization)
        out["fp8_widening"] = fp8_widening_exact()
    out["two_layers_fp32"] = _fast_vs_pure(two, (two.config.layers[0].window or 0) + 100)
    del two
    torch.cuda.empty_cache()
    return out


def bench_profile(model: DiffusionGemma, prompt_len: int, rows: int = 1, top: int = 25) -> dict:
    """CUDA time per kernel over one eager denoise forward of `rows` canvases (the graph replays the same
    kernels), the head and the sampler step: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    c = model.config.canvas_length
    cache = model.new_cache(batch_size=rows, max_length=prompt_len)
    for row in range(rows):
        model.encode(torch.tensor([random_prompt(model, prompt_len, row)], device="cuda"), cache, rows=[row])
    canvas = torch.tensor([random_prompt(model, c, 100 + row) for row in range(rows)], device="cuda")
    soft = torch.zeros(rows, c, model.config.hidden_size, device="cuda", dtype=model.dtype)
    rows_t = torch.arange(rows, device="cuda")
    starts = torch.full((rows,), prompt_len, device="cuda")
    gens = [torch.Generator("cuda").manual_seed(row) for row in range(rows)]
    vocab = VocabStage(model)

    def step():
        hidden = model.denoise_static(canvas, soft, cache, rows_t, starts)
        for lo in range(0, rows, GPU_LOGIT_ROWS):  # in the engine's groups
            n = min(GPU_LOGIT_ROWS, rows - lo)
            outcomes = vocab.sample(
                hidden[lo : lo + n],
                list(canvas[lo : lo + n]),
                temps=[torch.tensor(0.6)] * n,
                samplers=[EntropyBoundSampler(0.1)] * n,
                generators=gens[lo : lo + n],
            )
            model.expected_embedding(torch.cat([o.signal for o in outcomes]))

    step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    return {
        "rows": rows,
        "cuda_ms_total": round(total / 1e3, 3),
        "kernels": [
            {"name": e.key[:90], "ms": round(e.device_time_total / 1e3, 3), "calls": e.count}
            for e in events[:top]
        ],
    }


def _run_requests(engine: Engine, requests: Sequence[Request]) -> tuple[list[float], dict[int, list[float]]]:
    """Drive the engine; return each step's wall time (ms) and each request's commit times (s)."""
    for r in requests:
        engine.submit(r)
    steps: list[float] = []
    commits: dict[int, list[float]] = {r.index: [] for r in requests}
    began = time.perf_counter()
    commits_at_start = began
    while engine.busy:
        sync()
        t = time.perf_counter()
        events = engine.step()
        sync()
        now = time.perf_counter()
        steps.append((now - t) * 1e3)
        for e in events:
            if isinstance(e, TextDelta):
                commits[e.index].append(now - commits_at_start)
    return steps, commits


def _requests(model, n, prompt_len, steps, canvases, seed=0) -> list[Request]:
    c = model.config.canvas_length
    defaults = DiffusionDefaults()
    return [
        Request(
            index=i,
            prompt_ids=random_prompt(model, prompt_len, seed + i),
            params=fixed_steps(steps, canvases * c, seed + i).resolve(defaults),
        )
        for i in range(n)
    ]


def _engine(model, n, prompt_len, canvases, **kwargs) -> Engine:
    c = model.config.canvas_length
    return Engine(model, slots=n, max_length=prompt_len + (canvases - 1) * c, max_waiting=n, **kwargs)


def bench_first_canvas(model: DiffusionGemma, prompt_len: int, steps: int) -> dict:
    """From a loaded model (no graph captured yet) to the first committed canvas."""
    sync()
    began = time.perf_counter()
    engine = _engine(model, 1, prompt_len, 2)
    engine.submit(_requests(model, 1, prompt_len, steps, 2)[0])
    while True:
        if any(isinstance(e, TextDelta) for e in engine.step()):
            break
    sync()
    return {"first_canvas_s": round(time.perf_counter() - began, 3)}


def bench_single(model: DiffusionGemma, prompt_len: int, steps_list: Sequence[int], reps: int) -> dict:
    c = model.config.canvas_length
    out: dict = {}
    with torch.inference_mode():
        for length in sorted({prompt_len, 4096}):
            if length + c > model.config.max_position_embeddings:
                continue
            # as the engine admits a prompt (its runner: a CUDA graph per width, captured in the
            # warm-up call), and the eager forward
            cache = model.new_cache(batch_size=2, max_length=length)  # row 1: the runner's scratch row
            runner = DenoiseRunner(model, cache)
            ids = torch.tensor([random_prompt(model, length, 3)])

            def prefill(cache=cache, ids=ids, runner=runner):
                cache.reset()
                runner.prefill(ids, [0], [ids.shape[1]])

            def eager(cache=cache, ids=ids):
                cache.reset()
                model.encode(ids, cache, rows=[0])

            out[f"prefill{length}_eager_ms"] = median(timed_ms(eager, reps=reps))  # compiles the kernels
            # the engine's first prompt of this width captures its graph: two eager warm-ups and the capture
            out[f"prefill{length}_capture_ms"] = round(timed_ms(prefill, reps=1, warmup=0)[0], 1)
            out[f"prefill{length}_ms"] = median(timed_ms(prefill, reps=reps))
            del cache, runner
    engine = _engine(model, 1, prompt_len, 2)
    _run_requests(engine, _requests(model, 1, prompt_len, 1, 1))  # captures the one-row graphs
    canvas = torch.tensor([random_prompt(model, c, 4)], device=model.device)
    out["forward_graph_ms"] = median(
        timed_ms(lambda: engine.runner.hidden([canvas], [None], [0], [prompt_len]), reps=10)
    )
    hidden = engine.runner.hidden([canvas], [None], [0], [prompt_len]).clone()
    out["head_ms"] = median(timed_ms(lambda: model.logits(hidden), reps=10))
    sampler, gen = EntropyBoundSampler(0.5), torch.Generator(model.device).manual_seed(0)

    # the sampler's whole stage, the next step's soft embedding included: as the engine runs it (a
    # graph replay on CUDA) and the same passes launched eagerly
    def vocab_step(stage):
        outcomes = stage.sample(hidden, [canvas[0]], temps=[0.6], samplers=[sampler], generators=[gen])
        stage.soft_embeddings(outcomes)

    eager = VocabStage(model)
    with torch.inference_mode():
        out["vocab_stage_ms"] = median(timed_ms(lambda: vocab_step(engine.vocab), reps=10))
        out["vocab_stage_eager_ms"] = median(timed_ms(lambda: vocab_step(eager), reps=10))
    engine = None
    for steps, fused in itertools.product(steps_list, (True, False)):
        # canvases 2..reps+1 are timed: the first warms up (graph capture), the last is never committed.
        # A canvas's first step also encodes the previous canvas: in the same forward (fused), or in a
        # commit forward before it (unfused)
        engine = _engine(model, 1, prompt_len, reps + 2, fuse_commit=fused)
        step_ms, _ = _run_requests(engine, _requests(model, 1, prompt_len, steps, reps + 2))
        canvases = [step_ms[i * steps : (i + 1) * steps] for i in range(reps + 2)][1:-1]
        plain = [t for canvas in canvases for t in canvas[1:]]
        tag = "" if fused else "_unfused"
        out[f"canvas{steps}{tag}_ms"] = median([sum(canvas) for canvas in canvases])
        if fused:
            out.setdefault("denoise_step_ms", median(plain))
            out[f"tok_per_s_at_{steps}_steps"] = round(c / (out[f"canvas{steps}_ms"] / 1e3), 1)
        first = median([canvas[0] for canvas in canvases])
        out.setdefault(f"commit{tag}_ms", round(first - median(plain), 3))
        engine = None  # its graphs' memory goes before the next engine captures its own
    return out


def middle_canvas_step_ms(model: DiffusionGemma, engine: Engine, prompt_len: int, steps: int) -> float:
    """Median step of the middle canvas of 3-canvas requests (one per engine slot), its commit step left
    out: the engine's plain denoise step with that many canvases."""
    step_ms, _ = _run_requests(engine, _requests(model, engine.slots, prompt_len, steps, 3))
    return median(step_ms[steps + 1 : 2 * steps - 1])


def alternated_steps(
    counts: Sequence[int],
    rounds: int,
    variants: Sequence[tuple[str, object, Callable[[int], float]]],
    *,
    field: str,
    runs: list[dict],
    save: Callable[[], object],
) -> dict[str, float]:
    """An A/B of the engine's step in one process: for each count of canvases, `rounds` rounds of every
    variant (label, its value of `field` in the runs, n -> step ms) one after the other, so a machine's
    drift falls on all alike. Appends each run to `runs` ({"canvases", field, "attempt", "step_ms"}),
    calls `save` after each, and returns the medians {"{n}_canvases_{label}_ms": ms}."""
    for n in counts:
        for attempt in range(rounds):
            for label, value, step_ms in variants:
                ms = step_ms(n)
                runs.append({"canvases": n, field: value, "attempt": attempt, "step_ms": ms})
                print(f"{n} canvases, {label}: step {ms:.3f} ms", flush=True)
                save()
    return {
        f"{n}_canvases_{label}_ms": round(
            median([r["step_ms"] for r in runs if r["canvases"] == n and r[field] == value]), 3
        )
        for n in counts
        for label, value, _ in variants
    }


def bench_canvases(model: DiffusionGemma, prompt_len: int, counts: Sequence[int], steps: int) -> dict:
    """Median step time with n canvases denoised in one step (n users), and its ratio to one."""
    out: dict = {}
    for n in counts:
        out[f"step_ms_{n}_canvases"] = middle_canvas_step_ms(
            model, _engine(model, n, prompt_len, 3), prompt_len, steps
        )
    base = out.get(f"step_ms_{counts[0]}_canvases")
    for n in counts:
        out[f"step_ratio_{n}_canvases"] = round(out[f"step_ms_{n}_canvases"] / base, 3)
    return out


def bench_streams(model: DiffusionGemma, prompt_len: int, counts: Sequence[int], steps: int, canvases: int):
    """n concurrent requests of `canvases` canvases each, admitted together: aggregate tokens per second,
    the time between a request's commits (canvas latency), and peak memory."""
    c = model.config.canvas_length
    out = []
    for n in counts:
        engine = _engine(model, n, prompt_len, canvases)
        # warm-up requests of up to two canvases capture every graph the timed run replays (the
        # denoise graphs and, from a second canvas on, the fused commit ones) outside the timing
        warm = _requests(model, n, prompt_len, steps, min(2, canvases), seed=10_000)
        _run_requests(engine, warm)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        _, commits = _run_requests(engine, _requests(model, n, prompt_len, steps, canvases))
        wall = time.perf_counter() - began
        gaps = [b - a for times in commits.values() for a, b in itertools.pairwise(times)]
        first = [times[0] for times in commits.values()]
        out.append(
            {
                "streams": n,
                "tokens": n * canvases * c,
                "wall_s": round(wall, 3),
                "aggregate_tok_per_s": round(n * canvases * c / wall, 1),
                "canvas_latency_p50_ms": percentile([g * 1e3 for g in gaps], 0.5),
                "canvas_latency_p99_ms": percentile([g * 1e3 for g in gaps], 0.99),
                "first_canvas_p50_ms": percentile([f * 1e3 for f in first], 0.5),
                "peak_memory_gb": gigabytes(torch.cuda.max_memory_allocated()),
            }
        )
        del engine
        torch.cuda.empty_cache()
    single = out[0]["aggregate_tok_per_s"]
    for row in out:
        row["speedup_vs_first"] = round(row["aggregate_tok_per_s"] / single, 2)
    return out


def peak_memory_at(model: DiffusionGemma, prompt_len: int, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = _engine(model, 1, prompt_len, 2)
    _run_requests(engine, _requests(model, 1, prompt_len, steps, 2))
    peak = torch.cuda.max_memory_allocated()
    del engine
    return {f"peak_memory_gb_at_{prompt_len}": gigabytes(peak)}


# -- the command -----------------------------------------------------------------------------------


def versions() -> dict:
    import dgemma

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    out["dgemma"] = dgemma.__version__
    return out


def build_model(
    config: ModelConfig | None, model_dir: str | None, dtype: torch.dtype, quantization: str | None = None
) -> DiffusionGemma:
    if model_dir is not None:
        model = DiffusionGemma.from_pretrained(
            model_dir, device="cuda", dtype=dtype, progress=True, quantization=quantization
        )
    else:
        model = DiffusionGemma.random(config, device="cuda", dtype=dtype, seed=0)  # quantized by the caller
    model.pack_projections()  # as the engine runs it, also in the sections that call the model directly
    return model


def _one_step_logits(model: DiffusionGemma, prompt_len: int) -> torch.Tensor:
    """fp32 logits [C, V] of one denoise step after a prompt (kernels, no graphs): fixed inputs."""
    c = model.config.canvas_length
    cache = model.new_cache(batch_size=1, max_length=prompt_len)
    model.encode(torch.tensor([random_prompt(model, prompt_len, 7)], device=model.device), cache)
    canvas = torch.tensor([random_prompt(model, c, 8)], device=model.device)
    return model.denoise(canvas, cache)[0]


def quantization_error(model: DiffusionGemma, quantization: str, prompt_len: int) -> dict:
    """Quantize `model` in place and measure what it changes: one expert layer's output on one canvas of
    tokens against the same layer in float32, before (bf16 rounding alone) and after (plus FP8), where
    nothing amplifies the error; and one denoise step's logits before and after, which random weights
    amplify (bf16 itself moves them by O(1) against float32: see docs/benchmarks.md)."""
    experts = model.layers[0].experts
    gen = torch.Generator(model.device).manual_seed(0)
    x = torch.randn(model.config.canvas_length, model.config.hidden_size, device=model.device, generator=gen)
    with torch.inference_mode():
        weights, index = model.layers[0].router(x.to(model.dtype))
        exact = copy.deepcopy(experts).float()
        exact.use_kernel = False
        want = exact(x, weights, index, num_rows=1)
        del exact
        layer_before = experts(x.to(model.dtype), weights, index)
        logits_before = _one_step_logits(model, prompt_len)
        began = time.perf_counter()
        model.quantize(quantization)
        sync()
        seconds = time.perf_counter() - began
        torch.cuda.empty_cache()  # the unquantized experts' memory goes back
        layer_after = experts(x.to(model.dtype), weights, index)
        logits_after = _one_step_logits(model, prompt_len)
    agree = (logits_after.argmax(-1) == logits_before.argmax(-1)).float().mean().item()
    return {
        "quantize_s": round(seconds, 2),
        "expert_layer_rel_err_bf16": rel_err(layer_before, want),
        "expert_layer_rel_err_fp8": rel_err(layer_after, want),
        "logits_rel_err_vs_bf16": rel_err(logits_after, logits_before),
        "argmax_agreement_vs_bf16": round(agree, 4),
    }


def run_bench(
    *,
    config: ModelConfig | None,
    model_dir: str | None,
    quantization: str | None = None,
    prompt_len: int = 512,
    steps: Sequence[int] = (13, 16),
    canvases: Sequence[int] = (1, 2, 4, 8),
    streams: Sequence[int] = (),
    stream_canvases: int = 2,
    sections: Sequence[str] = ("moe", "correctness", "single", "canvases"),
    reps: int = 3,
    record: dict | None = None,
    on_section: Callable[[dict], None] | None = None,
) -> dict:
    """Run the sections in order; `record` is filled as they finish (on_section sees it each time)."""
    if quantization is not None and "transformers" in sections:
        raise ConfigError(
            "--compare-transformers runs the reference on the same weights: not with --quantization"
        )
    if not torch.cuda.is_available():
        raise ConfigError("dgemma bench measures the GPU path and needs a CUDA device; none is visible")
    record = record if record is not None else {}
    dtype = torch.bfloat16
    record.update(
        benchmark="dgemma bench",
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name(),
        dtype="bfloat16",
        quantization=quantization,
        versions=versions(),
        command="dgemma " + " ".join(sys.argv[1:]),
        prompt_len=prompt_len,
    )
    began = time.perf_counter()
    model = build_model(config, model_dir, dtype, quantization)
    sync()
    record["build_s"] = round(time.perf_counter() - began, 2)
    if quantization is not None and model.quantization is None:  # random weights: quantized here
        record["quantization_error"] = quantization_error(model, quantization, prompt_len)
    record["parameters"] = parameter_counts(model.config)["total"]
    record["weights_gb"] = gigabytes(weight_bytes(model))
    record["copy_gbps"] = copy_bandwidth_gbps()  # the roofline's bandwidth (plot, docs)
    torch.cuda.reset_peak_memory_stats()

    def section(name, fn):
        if name not in sections:
            return
        began = time.perf_counter()
        try:
            with torch.inference_mode():
                record[name] = fn()
        except Exception as exc:  # report and go on: one failing section must not lose the others
            logger.exception("section %s failed", name)
            record[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        record.setdefault("section_s", {})[name] = round(time.perf_counter() - began, 1)
        if on_section is not None:
            on_section(record)

    section("first_canvas", lambda: bench_first_canvas(model, prompt_len, max(steps)))
    section("moe", lambda: bench_moe(model))
    section("correctness", lambda: bench_correctness(model, prompt_len))
    section("single", lambda: bench_single(model, prompt_len, steps, reps))
    section("canvases", lambda: bench_canvases(model, prompt_len, canvases, max(steps)))
    section("memory", lambda: peak_memory_at(model, 4096, max(steps)))
    section("streams", lambda: bench_streams(model, prompt_len, streams, max(steps), stream_canvases))
    # after the timed sections: on 2026-11-23 a run that profiled first timed the one-canvas forward at
    # 23.1 ms, runs that did not at 21.8-22.0 ms, with the same kernel times (other machines, though)
    section("profile", lambda: bench_profile(model, prompt_len))
    section("profile8", lambda: bench_profile(model, prompt_len, rows=8))
    record["peak_memory_gb"] = gigabytes(torch.cuda.max_memory_allocated())
    flat = {**record.get("single", {}), **record.get("canvases", {}), **record.get("memory", {})}
    for key in ("denoise_step_ms", "canvas16_ms", "canvas13_ms", "prefill512_ms"):
        if key in flat:
            record[key] = flat[key]
    # last, and outside the peak memory above: the reference's full-vocabulary fp32 buffers are its own
    section("transformers", lambda: _bench_reference(model, prompt_len, steps))
    if isinstance(record.get("transformers"), dict) and "error" not in record["transformers"]:
        record["transformers_ratios"] = ratios(record)
    return record


def _bench_reference(model: DiffusionGemma, prompt_len: int, steps: Sequence[int]) -> dict:
    return bench_transformers(model, list(random_prompt(model, prompt_len, 3)), steps=tuple(steps))


def summary_rows(record: dict) -> list[tuple[str, str]]:
    rows = []
    for key in ("denoise_step_ms", "canvas13_ms", "canvas16_ms", "prefill512_ms", "peak_memory_gb"):
        if key in record:
            rows.append((key, str(record[key])))
    for name in (
        "quantization_error",
        "first_canvas",
        "single",
        "canvases",
        "memory",
        "correctness",
        "transformers",
    ):
        for key, value in (record.get(name) or {}).items():
            rows.append((f"{name}.{key}", str(value)))
    for key, value in (record.get("transformers_ratios") or {}).items():
        rows.append((f"transformers / dgemma {key}", f"{value}x"))
    for name in ("profile", "profile8"):
        prof = record.get(name) or {}
        if "cuda_ms_total" in prof:
            rows.append(
                (f"{name} total", f"{prof['cuda_ms_total']} ms of CUDA time, {prof['rows']} canvases")
            )
        for kernel in prof.get("kernels", [])[:12]:
            rows.append((f"{name} {kernel['name'][:60]}", f"{kernel['ms']} ms ({kernel['calls']} calls)"))
    moe = record.get("moe") or {}
    for run in moe.get("runs", []):
        cfg = run["config"]
        label = f"moe {run['tokens']} tokens, default tiles (block_m {cfg['block_m']})"
        rows.append((label, f"{run['ms']} ms, {run['weights_gbps']} GB/s (copy {moe['copy_gbps']})"))
    for best in moe.get("best", []):
        tiles = "; ".join(
            f"{k} m{best[k]['block_m']} n{best[k]['block_n']} k{best[k]['block_k']} w{best[k]['num_warps']}"
            f" s{best[k]['num_stages']}{' swap' if best[k]['swap_ab'] else ''} {best[k]['ms']} ms"
            for k in ("gate_up", "down")
        )
        rows.append((f"moe {best['tokens']} tokens, best tiles", f"{best['ms']} ms: {tiles}"))
    for row in record.get("streams") or []:
        if isinstance(row, dict) and "streams" in row:
            rows.append(
                (f"streams {row['streams']}", json.dumps({k: v for k, v in row.items() if k != "streams"}))
            )
    return rows


def plot(record: dict, path: Path) -> None:
    """Step time against canvases per step, with the roofline (all weights read once per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canv = record.get("canvases") or {}
    counts = sorted(int(k.split("_")[2]) for k in canv if k.startswith("step_ms_"))
    if not counts:
        return
    copy = record.get("copy_gbps") or (record.get("moe") or {}).get("copy_gbps")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [canv[f"step_ms_{n}_canvases"] for n in counts], "o-", label="dgemma denoise step")
    if copy:
        # the copy's rate counts bytes read and written (all the traffic HBM moved); a step reads
        # every weight once
        floor = record["weights_gb"] / copy * 1e3
        ax.axhline(floor, color="gray", linestyle="--", label=f"roofline: weights once ({floor:.1f} ms)")
    ax.set_xlabel("canvases per step")
    ax.set_ylabel("ms per step")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    experts = f", {record['quantization'].upper()} experts" if record.get("quantization") else ""
    ax.set_title(f"{record['gpu']}, {record['dtype']}{experts}, prompt {record['prompt_len']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
