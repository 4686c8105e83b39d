"""`dgemma bench --compare-transformers`: the reference (transformers' DiffusionGemmaForBlockDiffusion) timed
on the very same weights in the same run, eager (dynamic cache) and compiled (static cache + its own
torch.compile and CUDA graphs), so the ratios compare code, not GPUs, clocks or weights.

The reference model is built on the meta device and its parameters are then *our* tensors (the HF names
are ours, `weights.hf_names`), so the comparison costs no second copy of the weights. transformers is a
benchmark and test dependency, never a runtime one: this module imports it only when asked.

Timing comes from the reference's own `generate` with fixed denoise steps, read through its streamer
hooks (a prompt put, a draft per denoise step, a put per committed canvas; each already waits for the
GPU): a denoise step is the time between two drafts of a canvas, a canvas with its commit the time
between two canvas puts, the prefill the time to the first draft less one step.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.weights import VISION_PREFIXES, hf_names

NEVER_STABLE = 10**6


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise RuntimeError(
            "--compare-transformers needs transformers (pip install transformers==5.23.0); "
            "it is a benchmark dependency, not a runtime one"
        ) from None
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        raise RuntimeError(
            f"transformers {transformers.__version__} has no DiffusionGemmaForBlockDiffusion "
            "(5.23 or later has it)"
        )
    return transformers


def _set(root: nn.Module, dotted: str, value) -> None:
    owner, _, leaf = dotted.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if isinstance(value, nn.Parameter):
        module._parameters[leaf] = value
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        setattr(module, leaf, value)


def transformers_model(model: DiffusionGemma, attn_implementation: str = "sdpa") -> nn.Module:
    """transformers' DiffusionGemmaForBlockDiffusion over `model`'s own parameter tensors (no copy)."""
    transformers = _import_transformers()
    config = transformers.DiffusionGemmaConfig.from_dict(dict(model.config.source))
    config._attn_implementation = attn_implementation
    if config.vision_config is None:  # text-only configs: the reference always builds a vision tower
        config.vision_config = transformers.Gemma4VisionConfig()
    with torch.device("meta"):
        hf = transformers.DiffusionGemmaForBlockDiffusion(config)
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    hf_buffers = dict(hf.named_buffers(remove_duplicate=False))  # e.g. the layer scalars
    for name, param in model.named_parameters():
        shared = nn.Parameter(param.detach(), requires_grad=False)
        for hf_name in hf_names(name):
            target = hf_params.get(hf_name, hf_buffers.get(hf_name))
            if target is None:
                continue
            if tuple(target.shape) != tuple(param.shape):
                raise RuntimeError(
                    f"{hf_name}: transformers expects {list(target.shape)}, dgemma holds {list(param.shape)}"
                )
            _set(hf, hf_name, shared if hf_name in hf_params else param.detach())
    device = model.device
    for module_name, module in list(hf.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if hasattr(module, "rope_init_fns"):  # rotary tables: recomputed from the config on the device
            _set(hf, module_name, type(module)(module.config, device=device))
        elif hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
    missing = [
        n
        for n, t in [*hf.named_parameters(), *hf.named_buffers()]
        if t.is_meta and not n.startswith(VISION_PREFIXES)  # the vision tower: never called here
    ]
    if missing:
        raise RuntimeError(
            f"transformers tensors dgemma does not hold: {missing[:5]} ({len(missing)} in all)"
        )
    return hf.eval()


class _Clock:
    """The reference's streamer hooks as a stopwatch (`put` and `put_draft` get CPU copies: the GPU
    has finished the work before each is called)."""

    def __init__(self):
        self.puts: list[float] = []
        self.drafts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def put_draft(self, value) -> None:
        self.drafts.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(hf, prompt: torch.Tensor, steps: int, canvases: int, static: bool) -> _Clock:
    clock = _Clock()
    kwargs = {"cache_implementation": "static"} if static else {}
    with torch.inference_mode():
        hf.generate(
            prompt,
            max_new_tokens=canvases * hf.config.canvas_length,
            max_denoising_steps=steps,
            stability_threshold=NEVER_STABLE,
            eos_token_id=None,
            streamer=clock,
            **kwargs,
        )
    if len(clock.puts) != canvases + 1 or len(clock.drafts) != canvases * steps:
        raise RuntimeError(
            f"the reference stopped early: {len(clock.puts) - 1} canvases, {len(clock.drafts)} steps"
        )
    return clock


def _times(clock: _Clock, steps: int) -> dict:
    ms = 1e3
    step = [
        (clock.drafts[k * steps + i + 1] - clock.drafts[k * steps + i]) * ms
        for k in range(len(clock.puts) - 1)
        for i in range(steps - 1)
    ]
    step_ms = statistics.median(step)
    canvas = [(b - a) * ms for a, b in zip(clock.puts[1:], clock.puts[2:])]
    return {
        "denoise_step_ms": round(step_ms, 2),
        "canvas_ms": round(statistics.median(canvas), 1),
        "prefill_ms": round((clock.drafts[0] - clock.puts[0]) * ms - step_ms, 1),
    }


def bench_transformers(
    model: DiffusionGemma,
    prompt_ids: list[int],
    *,
    steps: tuple[int, ...] = (13, 16),
    canvases: int = 3,
    compiled: bool = True,
) -> dict:
    """The reference on `model`'s weights: per mode, one denoise step (median), a canvas with its commit
    at each fixed step count, the prefill; compiled adds the time its first call spent compiling."""
    hf = transformers_model(model)
    prompt = torch.tensor([prompt_ids], device=model.device)
    out: dict = {"transformers": _import_transformers().__version__, "canvases_per_run": canvases}
    for mode in ("eager", "compiled") if compiled else ("eager",):
        static = mode == "compiled"
        began = time.perf_counter()
        _generate(hf, prompt, min(steps), canvases, static)  # warm-up (and compilation)
        result: dict = {"first_call_s": round(time.perf_counter() - began, 1)}
        for n in steps:
            times = _times(_generate(hf, prompt, n, canvases, static), n)
            result.setdefault("denoise_step_ms", times["denoise_step_ms"])
            result.setdefault("prefill_ms", times["prefill_ms"])
            result[f"canvas{n}_ms"] = times["canvas_ms"]
        out[mode] = result
    del hf
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def ratios(record: dict) -> dict:
    """transformers' time over dgemma's, per measurement and mode (above 1: dgemma is faster)."""
    ref = record.get("transformers") or {}
    ours = {k: record.get(k) for k in ("denoise_step_ms", "canvas13_ms", "canvas16_ms", "prefill512_ms")}
    out = {}
    for mode in ("eager", "compiled"):
        theirs = ref.get(mode) or {}
        for key, value in ours.items():
            their_key = "prefill_ms" if key.startswith("prefill") else key
            if value and theirs.get(their_key):
                out[f"{mode}/{key}"] = round(theirs[their_key] / value, 2)
    return out
