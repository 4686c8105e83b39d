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
from dgemma.denoise.sampler import EntropyBoundSampler, temperature
from dgemma.engine.generate import GPU_LOGIT_ROWS, Engine, Request
from dgemma.engine.vocab import VocabStage
from dgemma.model.config import ModelConfig, parameter_counts
from dgemma.model.diffusion_gemma import DiffusionGemma
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


def copy_bandwidth_gbps(nbytes: int = 2 * 10**9) -> float:
    """Device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = median(timed_ms(lambda: dst.copy_(src), reps=10, warmup=2))
    return round(2 * nbytes / (ms / 1e3) / 1e9, 1)


def bench_moe(model: DiffusionGemma, tokens: Sequence[int] = (256, 2048), sweep: bool = True) -> dict:
    """One layer's experts with the Triton kernels, per token count and tile config: time and the rate at
    which the kernels stream the expert weights (bytes of weights / time)."""
    from dgemma.ops.moe import MoeConfig, default_config, moe

    layer = model.layers[0]
    experts = layer.experts
    nbytes = experts.gate_up_proj.numel() * 2 + experts.down_proj.numel() * 2
    configs = [None]
    if sweep:
        configs += [
            MoeConfig(
                block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=st, swap_ab=sw, down_block_k=dk
            )
            for m, n, k, w, st, sw, dk in [
                (16, 64, 256, 4, 3, False, 64),
                (16, 128, 128, 4, 4, False, 64),
                (16, 64, 128, 4, 4, True, 64),
                (16, 64, 256, 4, 3, True, 64),
                (16, 64, 128, 4, 5, True, 128),
                (16, 128, 128, 4, 4, True, 64),
                (16, 128, 128, 8, 4, True, 128),
                (16, 128, 256, 8, 3, True, 128),
                (32, 64, 128, 4, 4, True, 64),
                (32, 128, 128, 8, 4, True, 128),
                (64, 128, 64, 8, 4, False, 64),
                (64, 128, 128, 8, 3, True, 64),
                (128, 128, 64, 8, 4, True, 64),
            ]
        ]
    result = {"weight_bytes_per_layer": nbytes, "copy_gbps": copy_bandwidth_gbps(), "runs": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in tokens:
        x = torch.randn(n, model.config.hidden_size, device="cuda", generator=gen).to(model.dtype)
        weights, index = layer.router(x)
        for cfg in configs:

            def call(x=x, weights=weights, index=index, cfg=cfg):
                return moe(x, experts.gate_up_proj, experts.down_proj, weights, index, config=cfg)

            try:
                ms = median(timed_ms(call, reps=20, warmup=3))
            except Exception as exc:  # a tile config the compiler rejects (shared memory): skip it
                logger.warning("MoE config %s failed: %s", cfg, exc)
                continue
            used = cfg or default_config(n * index.shape[1], experts.gate_up_proj.shape[0], x.dtype)
            result["runs"].append(
                {
                    "tokens": n,
                    "config": used.__dict__,
                    "default": cfg is None,
                    "ms": ms,
                    "weights_gbps": round(nbytes / (ms / 1e3) / 1e9, 1),
                }
            )
        if hasattr(torch, "_grouped_mm"):
            from dgemma.ops.moe import moe_grouped_mm

            def grouped(x=x, weights=weights, index=index):
                return moe_grouped_mm(x, experts.gate_up_proj, experts.down_proj, weights, index)

            try:
                ms = median(timed_ms(grouped, reps=20, warmup=3))
                result["grouped_mm"] = [
                    *result.get("grouped_mm", []),
                    {"tokens": n, "ms": ms, "weights_gbps": round(nbytes / (ms / 1e3) / 1e9, 1)},
                ]
                want = moe(x, experts.gate_up_proj, experts.down_proj, weights, index)
                result["grouped_mm"][-1]["rel_err_vs_triton"] = rel_err(grouped(), want)
            except Exception as exc:
                result["grouped_mm"] = [{"error": f"{type(exc).__name__}: {exc}"}]
    return result


def _fast_vs_pure(model: DiffusionGemma, prompt_len: int) -> dict:
    """Logits of one denoise step after the same prompt: fast path (kernels, CUDA graphs, static-shape
    attention) vs pure-torch path (expert loop, row-by-row attention), same weights."""
    from dgemma.engine.runner import DenoiseRunner

    c = model.config.canvas_length
    prompt = torch.tensor([random_prompt(model, prompt_len, 1)], device=model.device)
    canvas = torch.tensor([random_prompt(model, c, 2)], device=model.device)
    fast_cache = model.new_cache(batch_size=2, max_length=prompt_len)  # row 1: the graphs' scratch row
    model.encode(prompt, fast_cache, rows=[0])
    fast = model.logits(
        DenoiseRunner(model, fast_cache, graphs=True).hidden([canvas], [None], [0], [prompt_len])
    )
    model.use_kernels = False
    try:
        ref_cache = model.new_cache(batch_size=1, max_length=prompt_len)
        model.encode(prompt, ref_cache)
        ref = model.denoise(canvas, ref_cache)
    finally:
        model.use_kernels = True
    return {
        "logits_rel_err": rel_err(fast, ref),
        "argmax_agreement": float((fast.argmax(-1) == ref.argmax(-1)).float().mean()),
        # the prompt's positions (past them the fast path's scratch holds the canvas's K/V)
        "prefill_last_layer_keys_rel_err": rel_err(
            fast_cache.keys[-1][0, :, :prompt_len], ref_cache.keys[-1][0, :, :prompt_len]
        ),
    }


def _vocab_fused_vs_spec(model: DiffusionGemma, prompt_len: int, canvases: int = 4) -> dict:
    """The vocabulary stage on real hidden states of the fast path: the fused Triton passes vs the spec
    (fp32 logits, torch softmaxes, torch.multinomial), same generators (so the same sampling noise)."""
    c = model.config.canvas_length
    cache = model.new_cache(batch_size=1, max_length=prompt_len)
    model.encode(torch.tensor([random_prompt(model, prompt_len, 1)], device=model.device), cache)
    ids = torch.tensor([random_prompt(model, c, 10 + i) for i in range(canvases)], device=model.device)
    hidden = torch.cat([model.denoise_hidden(ids[i : i + 1], cache) for i in range(canvases)])
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
    model.use_kernels = False
    try:
        spec = run()
    finally:
        model.use_kernels = True

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
    out["full_model_bf16"] = _fast_vs_pure(model, prompt_len)
    with torch.inference_mode():
        out["vocab_fused_vs_spec_bf16"] = _vocab_fused_vs_spec(model, prompt_len)
    small = release_config_dict()
    small["text_config"].update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    two = DiffusionGemma.random(ModelConfig.from_dict(small), device="cuda", dtype=torch.float32, seed=1)
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


def _engine(model, n, prompt_len, canvases, graphs=None) -> Engine:
    c = model.config.canvas_length
    return Engine(model, slots=n, max_length=prompt_len + (canvases - 1) * c, max_waiting=n, graphs=graphs)


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
            cache = model.new_cache(batch_size=1, max_length=length)
            ids = torch.tensor([random_prompt(model, length, 3)], device=model.device)

            def prefill(cache=cache, ids=ids):
                cache.reset()
                model.encode(ids, cache)

            out[f"prefill{length}_ms"] = median(timed_ms(prefill, reps=reps))
            del cache
    engine = _engine(model, 1, prompt_len, 2)
    _run_requests(engine, _requests(model, 1, prompt_len, 1, 1))  # captures the one-row graphs
    canvas = torch.tensor([random_prompt(model, c, 4)], device=model.device)
    out["forward_graph_ms"] = median(
        timed_ms(lambda: engine.runner.hidden([canvas], [None], [0], [prompt_len]), reps=10)
    )
    hidden = engine.runner.hidden([canvas], [None], [0], [prompt_len]).clone()
    out["head_ms"] = median(timed_ms(lambda: model.logits(hidden), reps=10))
    sampler, gen = EntropyBoundSampler(0.5), torch.Generator(model.device).manual_seed(0)

    def vocab_step():
        engine.vocab.sample(hidden, [canvas[0]], temps=[0.6], samplers=[sampler], generators=[gen])

    with torch.inference_mode():
        out["vocab_stage_ms"] = median(timed_ms(vocab_step, reps=10))
    del engine
    for steps in steps_list:
        # canvases 2..reps+1 are timed: the first warms up (graph capture), the last is never committed
        engine = _engine(model, 1, prompt_len, reps + 2)
        step_ms, _ = _run_requests(engine, _requests(model, 1, prompt_len, steps, reps + 2))
        canvases = [step_ms[i * steps : (i + 1) * steps] for i in range(reps + 2)][1:-1]
        plain = [t for canvas in canvases for t in canvas[:-1]]
        out[f"canvas{steps}_ms"] = median([sum(canvas) for canvas in canvases])
        out.setdefault("denoise_step_ms", median(plain))
        out.setdefault("commit_ms", round(median([canvas[-1] for canvas in canvases]) - median(plain), 3))
        out[f"tok_per_s_at_{steps}_steps"] = round(c / (out[f"canvas{steps}_ms"] / 1e3), 1)
    return out


def bench_canvases(model: DiffusionGemma, prompt_len: int, counts: Sequence[int], steps: int) -> dict:
    """Median step time with n canvases denoised in one step (n users), and its ratio to one."""
    out: dict = {}
    for n in counts:
        engine = _engine(model, n, prompt_len, 3)
        step_ms, _ = _run_requests(engine, _requests(model, n, prompt_len, steps, 3))
        # the middle canvas of each request, commit step excluded
        out[f"step_ms_{n}_canvases"] = median(step_ms[steps + 1 : 2 * steps - 1])
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
        warm = _engine(model, n, prompt_len, 1)
        _run_requests(warm, _requests(model, n, prompt_len, steps, 1, seed=10_000))  # capture the graphs
        del warm
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        engine = _engine(model, n, prompt_len, canvases)
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


def build_model(config: ModelConfig | None, model_dir: str | None, dtype: torch.dtype) -> DiffusionGemma:
    if model_dir is not None:
        return DiffusionGemma.from_pretrained(model_dir, device="cuda", dtype=dtype, progress=True)
    return DiffusionGemma.random(config, device="cuda", dtype=dtype, seed=0)


def run_bench(
    *,
    config: ModelConfig | None,
    model_dir: str | None,
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
    if not torch.cuda.is_available():
        raise RuntimeError("dgemma bench measures the GPU path and needs a CUDA device")
    record = record if record is not None else {}
    dtype = torch.bfloat16
    record.update(
        benchmark="dgemma bench",
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name(),
        dtype="bfloat16",
        versions=versions(),
        command="dgemma " + " ".join(sys.argv[1:]),
        prompt_len=prompt_len,
    )
    began = time.perf_counter()
    model = build_model(config, model_dir, dtype)
    sync()
    record["build_s"] = round(time.perf_counter() - began, 2)
    record["parameters"] = parameter_counts(model.config)["total"]
    record["weights_gb"] = gigabytes(weight_bytes(model))
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
    section("profile", lambda: bench_profile(model, prompt_len))
    section("profile8", lambda: bench_profile(model, prompt_len, rows=8))
    section("single", lambda: bench_single(model, prompt_len, steps, reps))
    section("canvases", lambda: bench_canvases(model, prompt_len, canvases, max(steps)))
    section("memory", lambda: peak_memory_at(model, 4096, max(steps)))
    section("streams", lambda: bench_streams(model, prompt_len, streams, max(steps), stream_canvases))
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
    for name in ("first_canvas", "single", "canvases", "memory", "correctness", "transformers"):
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
        label = f"moe {run['tokens']} tok m{cfg['block_m']} n{cfg['block_n']} k{cfg['block_k']}"
        label += f" w{cfg['num_warps']} s{cfg['num_stages']} dk{cfg['down_block_k']}"
        label += (" swap" if cfg["swap_ab"] else "") + (" (default)" if run["default"] else "")
        rows.append((label, f"{run['ms']} ms, {run['weights_gbps']} GB/s (copy {moe['copy_gbps']})"))
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
    copy = (record.get("moe") or {}).get("copy_gbps")
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
    ax.set_title(f"{record['gpu']}, {record['dtype']}, prompt {record['prompt_len']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
