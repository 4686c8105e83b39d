"""This checkout's attention norms (`qkv_norms`), layer closing (`ff_combine`) and vocabulary passes
(`vocab_stats`, `vocab_sample`) against another version of their modules, alternated in one process:
each kernel alone on release shapes (GPU time from CUDA graphs; outputs compared), then the engine's
denoise step with each version.

    mkdir -p .ab && for m in norm vocab; do git show REV:dgemma/ops/$m.py > .ab/$m.py; done
    python bench/kernel_versions_ab.py --old .ab --json OUT.json [--canvases 1,8] [--rounds 3]

Release config, random bf16 weights, 512-token prompts. Kernels: a sliding and a full layer's norms
writing a cache (q, k and v as views of one packed projection, as the engine has them), ff_combine
with each token's 8 expert terms and the next norm, the two vocabulary passes over 256 and 1024 rows
of logits (one canvas; a group of four, the largest the engine's vocabulary stage takes). Step: the
median step of each request's middle canvas (its commit step left out), n concurrent requests of 3
canvases, 16 fixed steps, as `dgemma bench`'s canvases section times it. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dgemma.ops.norm as new_norm
import dgemma.ops.vocab as new_vocab
from dgemma.bench import (
    _engine,
    _random_rope_tables,
    alternated_steps,
    build_model,
    graph_ms,
    middle_canvas_step_ms,
    record_header,
    rel_err,
)
from dgemma.model.config import ModelConfig
from dgemma.model.presets import release_config_dict

PROMPT, STEPS = 512, 16
PATCHED = {new_norm: ("qkv_norms", "norm_rope", "ff_combine"), new_vocab: ("vocab_stats", "vocab_sample")}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def using(old: dict, on: bool):
    """The engine calls the old modules' functions inside the block (it imports them at each call)."""
    saved = {(m, f): getattr(m, f) for m, names in PATCHED.items() for f in names}
    try:
        if on:
            for (module, name), _ in saved.items():
                setattr(module, name, getattr(old[module], name))
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def gpu_ms(fn, calls: int) -> float:
    """GPU time of one call, from a CUDA graph of `calls` calls (alone, a call of these kernels at one
    canvas takes less GPU time than its launch takes the host)."""
    return round(graph_ms(fn, calls=calls, reps=10), 4)


def equal_share(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def norms_case(config: ModelConfig, kind: str, canvases: int):
    """Inputs of qkv_norms for one layer of `kind` over `canvases` canvases after a 512-token prompt."""
    spec = next(s for s in config.layers if (s.window is None) == (kind == "full"))
    h, kv, e, c = config.num_heads, spec.num_kv_heads, spec.head_dim, config.canvas_length
    gen = torch.Generator("cuda").manual_seed(1)
    own_values = spec.has_v_proj
    width = (h + kv * (2 if own_values else 1)) * e
    packed = torch.randn(canvases, c, width, device="cuda", generator=gen).to(torch.bfloat16)
    q_raw = packed[..., : h * e].view(canvases, c, h, e)
    k_raw = packed[..., h * e : (h + kv) * e].view(canvases, c, kv, e)
    v_raw = packed[..., (h + kv) * e :].view(canvases, c, kv, e) if own_values else k_raw
    cos, sin = (
        t.expand(canvases, -1, -1).contiguous() for t in _random_rope_tables(c, e, torch.bfloat16, gen)
    )
    storage = torch.zeros(2, canvases, kv, PROMPT + c, e, device="cuda", dtype=torch.bfloat16)
    weights = tuple(torch.rand(e, device="cuda", generator=gen).to(torch.bfloat16) + 0.5 for _ in range(2))
    kwargs = {
        "weights": weights,
        "eps": (1e-6, 1e-6, 1e-6),
        "keys": storage[0],
        "values": storage[1],
        "rows_B": torch.arange(canvases, device="cuda"),
        "starts_B": torch.full((canvases,), PROMPT, device="cuda"),
    }
    return (q_raw, k_raw, v_raw, cos, sin), kwargs, storage


def bench_norms(config: ModelConfig, old, canvases: int) -> list[dict]:
    rows = []
    for kind in ("sliding", "full"):
        args, kwargs, storage = norms_case(config, kind, canvases)
        out = {}
        for name, module in (("old", old), ("new", new_norm)):
            storage.zero_()
            q = module.qkv_norms(*args, **kwargs)
            out[name] = (q.clone(), storage.clone())
            out[f"{name}_ms"] = gpu_ms(lambda m=module, a=args, k=kwargs: m.qkv_norms(*a, **k), 30)
        rows.append(
            {
                "kernel": "qkv_norms",
                "layer": kind,
                "canvases": canvases,
                "old_ms": out["old_ms"],
                "new_ms": out["new_ms"],
                "q_bitwise_equal": equal_share(out["old"][0], out["new"][0]),
                "kv_bitwise_equal": equal_share(out["old"][1], out["new"][1]),
                "q_rel_err": rel_err(out["new"][0], out["old"][0]),
            }
        )
    return rows


def bench_ff_combine(config: ModelConfig, old, canvases: int) -> dict:
    """The layer's closing kernel: the experts' K terms per token summed, the norms, the residual, the
    layer scalar and the next layer's input norm."""
    c, d, k = config.canvas_length, config.hidden_size, config.top_k_experts
    gen = torch.Generator("cuda").manual_seed(3)
    r, mlp_out = (
        torch.randn(canvases, c, d, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2)
    )
    terms = torch.randn(canvases, c, k, d, device="cuda", generator=gen).to(torch.bfloat16)
    w = [torch.rand(d, device="cuda", generator=gen).to(torch.bfloat16) + 0.5 for _ in range(4)]
    args = (r, mlp_out, terms, *w[:3], torch.ones(1, device="cuda", dtype=torch.bfloat16), 1e-6)
    kwargs = {"next_norm": (w[3], 1e-6)}
    out = {}
    for name, module in (("old", old), ("new", new_norm)):
        out[name] = module.ff_combine(*args, **kwargs)
        out[f"{name}_ms"] = gpu_ms(lambda m=module: m.ff_combine(*args, **kwargs), 30)
    return {
        "kernel": "ff_combine",
        "canvases": canvases,
        "old_ms": out["old_ms"],
        "new_ms": out["new_ms"],
        "bitwise_equal": min(equal_share(a, b) for a, b in zip(out["old"], out["new"])),
    }


def bench_vocab(config: ModelConfig, old, canvases: int) -> dict:
    c, v = config.canvas_length, config.vocab_size
    r = c * canvases
    gen = torch.Generator("cuda").manual_seed(2)
    logits = (torch.randn(r, v, device="cuda", generator=gen) * 8).to(torch.bfloat16)
    temp = torch.rand(r, device="cuda", generator=gen) + 0.5
    cap = config.final_logit_softcapping
    noise = torch.empty(c, v, device="cuda").exponential_(generator=gen)
    out = {}
    for name, module in (("old", old), ("new", new_vocab)):
        stats = module.vocab_stats(logits, temp, cap, torch.bfloat16)
        probs = torch.empty(r, v, device="cuda", dtype=torch.bfloat16)

        def sample(m=module, s=stats, p=probs):
            rows = [slice(j * c, (j + 1) * c) for j in range(canvases)]
            return [
                m.vocab_sample(logits[j], temp[j], cap, s.rows(j.start, j.stop), noise, p[j]) for j in rows
            ]

        tokens = torch.cat(sample())
        out[name] = (stats, tokens, probs)
        out[f"{name}_stats_ms"] = gpu_ms(lambda m=module: m.vocab_stats(logits, temp, cap, torch.bfloat16), 5)
        out[f"{name}_sample_ms"] = gpu_ms(sample, 5)
    (s_old, t_old, p_old), (s_new, t_new, p_new) = out["old"], out["new"]
    return {
        "kernel": "vocab passes",
        "canvases": canvases,
        **{k: out[k] for k in ("old_stats_ms", "new_stats_ms", "old_sample_ms", "new_sample_ms")},
        "argmax_equal": equal_share(s_old.argmax, s_new.argmax),
        "tokens_equal": equal_share(t_old, t_new),
        "probs_bitwise_equal": equal_share(p_old, p_new),
        **{
            f"{f}_max_abs_diff": float((getattr(s_old, f) - getattr(s_new, f)).abs().max())
            for f in ("lse", "entropy", "top_prob", "lse_rounded")
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="folder with the other version's norm.py and vocab.py")
    p.add_argument("--json", required=True)
    p.add_argument("--canvases", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    old_norm = load(Path(args.old) / "norm.py", "old_norm")
    old_vocab = load(Path(args.old) / "vocab.py", "old_vocab")
    old = {new_norm: old_norm, new_vocab: old_vocab}
    config = ModelConfig.from_dict(release_config_dict())
    record = {
        **record_header("attention norms and vocabulary passes: this checkout vs another version"),
        "kernels": [],
    }
    counts = [int(n) for n in args.canvases.split(",")]
    with torch.inference_mode():
        for n in counts:
            record["kernels"] += bench_norms(config, old_norm, n)
            record["kernels"].append(bench_ff_combine(config, old_norm, n))
            record["kernels"].append(bench_vocab(config, old_vocab, min(n, 4)))
        for row in record["kernels"]:
            print(row, flush=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
        model = build_model(config, None, torch.bfloat16)

        def step_ms(n: int, version: str) -> float:
            with using(old, version == "old"):
                return middle_canvas_step_ms(model, _engine(model, n, PROMPT, 3), PROMPT, STEPS)

        record["steps"] = []
        record["summary"] = alternated_steps(
            counts,
            args.rounds,
            [(v, v, lambda n, v=v: step_ms(n, v)) for v in ("new", "old")],
            field="version",
            runs=record["steps"],
            save=lambda: Path(args.json).write_text(json.dumps(record, indent=1)),
        )
    print(record["summary"])
    Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
