"""The order the expert kernels start their programs in (`MoeConfig.group_m`, `dgemma.ops.moe._tile_of`),
swept with a few tile configs per token count, on one release-shaped expert layer with random weights.

group_m 0 (the only order before 2026-11-23) starts one output tile column of every block at a time:
the blocks of an expert share its weight tile in L2, but each block's input (x for the gate-up kernel,
h for the down kernel) is read again for every column, and at many tokens those inputs outgrow what L2
keeps beside the streaming weights. group_m g starts every tile of g blocks, then the next g.

    python bench/moe_order_sweep.py --json OUT.json [--quantization fp8] [--step]

Each kernel alone, GPU time between CUDA events (`dgemma.bench.kernel_ms`), then the whole layer
(align, both kernels, the sum of each token's terms) with the default config and with its tiles in the
fastest orders found. With --step, the release model with random weights is then built and the
engine's step timed at 1, 2, 4 and 8 canvases (`dgemma bench`'s canvases section) with the shipped
configs in the old order, as shipped, and as the sweep found fastest (patched into `default_config`;
see `time_steps`), alternated twice. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dgemma.ops.moe
from dgemma.bench import (
    bench_canvases,
    bench_profile,
    build_model,
    copy_bandwidth_gbps,
    kernel_ms,
    record_header,
    release_expert_layer,
)
from dgemma.model.config import ModelConfig
from dgemma.model.layers import Experts, Router
from dgemma.model.presets import release_config_dict
from dgemma.ops.moe import MoeConfig, align, default_config, down, gate_up, moe

GROUPS = (0, 1, 2, 4, 16)
# tile configs tried besides each token count's default (block_m, block_n, block_k, warps, stages, swap_ab),
# the runners-up of bench/results/2026-11-22_h100_fused_commit_moe_sweep.json and a few wider ones
EXTRA = {
    "gate_up": {
        256: [(16, 64, 128, 4, 5, True)],
        512: [(32, 64, 128, 4, 4, False)],
        1024: [(64, 128, 64, 8, 4, False)],
        2048: [(64, 256, 64, 8, 3, False), (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False)],
    },
    "down": {
        256: [(16, 64, 128, 4, 5, True)],
        512: [(32, 64, 128, 4, 4, False)],
        1024: [(64, 128, 64, 8, 4, False)],
        2048: [(64, 256, 64, 8, 3, False), (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 2, False),
               (128, 128, 128, 8, 3, False), (128, 256, 32, 8, 4, False)],
    },
}  # fmt: skip


def kernel_config(kernel: str, tiles: tuple, group: int) -> MoeConfig:
    bm, bn, bk, warps, stages, swap = tiles
    if kernel == "gate_up":
        return MoeConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                         swap_ab=swap, group_m=group)  # fmt: skip
    return MoeConfig(block_m=bm, down_block_n=bn, down_block_k=bk, down_num_warps=warps,
                     down_num_stages=stages, down_swap_ab=swap, down_group_m=group)  # fmt: skip


def default_tiles(cfg: MoeConfig) -> dict:
    d = cfg.down()
    return {
        "gate_up": (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.swap_ab),
        "down": (cfg.block_m, d["block_n"], cfg.down_block_k, d["num_warps"], d["num_stages"], d["swap_ab"]),
    }


def sweep_tokens(experts: Experts, router: Router, n: int, quantization: str, record: dict) -> None:
    """Each candidate tile config of each kernel in each order at n tokens, then the whole layer."""
    d, (num_experts, _, _), top_k = experts.down_proj.shape[1], experts.gate_up_proj.shape, router.top_k
    scales = {"scale": experts.gate_up_scale}, {"scale": experts.down_scale}
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    weights, index = router(x)
    base = default_config(n * top_k, num_experts, torch.bfloat16, experts.gate_up_proj.dtype)
    defaults = default_tiles(base)
    candidates = {k: [defaults[k], *EXTRA[k].get(n, [])] for k in ("gate_up", "down")}
    if quantization == "fp8":  # the FP8 tiles have their own sweep: order only
        candidates = {k: v[:1] for k, v in candidates.items()}

    def run_gate_up(cfg, slots):
        return gate_up(
            x, experts.gate_up_proj, slots, top_k, activation=experts.act_name, config=cfg, **scales[0]
        )

    def run_down(cfg, slots, h):
        return down(h, experts.down_proj, slots, weights, config=cfg, **scales[1])

    for kernel in ("gate_up", "down"):
        for tiles in candidates[kernel]:
            slots = align(index, num_experts, tiles[0])
            run = functools.partial(run_gate_up, slots=slots)
            if kernel == "down":  # its input, from gate-up tiles that fit any block_m
                h = run_gate_up(MoeConfig(block_m=tiles[0], block_k=64, num_stages=2), slots)
                run = functools.partial(run_down, slots=slots, h=h)
            for group in GROUPS:
                cfg = kernel_config(kernel, tiles, group)
                try:
                    ms = kernel_ms(functools.partial(run, cfg))
                except Exception as exc:  # a tile config the compiler rejects (shared memory)
                    print(f"skip {kernel} {tiles} {group}: {str(exc)[:120]}", flush=True)
                    continue
                row = {"tokens": n, "kernel": kernel, "tiles": list(tiles), "group_m": group, "ms": ms,
                       "default_tiles": tiles == defaults[kernel]}  # fmt: skip
                record["sweep"].append(row)
                print(json.dumps(row), flush=True)
    # the whole layer: the default config, and the default tiles in their fastest orders
    ordered = choice(record["sweep"], n, num_experts, top_k, experts.gate_up_proj.dtype, tiles=False)
    for label, cfg in (("default", base), ("ordered", ordered)):
        call = functools.partial(
            moe, x, experts.gate_up_proj, experts.down_proj, weights, index, config=cfg,
            gate_up_scale=experts.gate_up_scale, down_scale=experts.down_scale,
        )  # fmt: skip
        ms = kernel_ms(call)
        nbytes = record["weight_bytes_per_layer"]
        row = {"tokens": n, "config": label, "group_m": cfg.group_m, "down_group_m": cfg.down()["group_m"],
               "ms": ms, "weights_gbps": round(nbytes / (ms / 1e3) / 1e9, 1)}  # fmt: skip
        record["layer"].append(row)
        print(json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="256,512,1024,2048")
    parser.add_argument("--quantization", choices=("none", "fp8"), default="none")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--step", action="store_true", help="then time the release model's step with the choices"
    )
    args = parser.parse_args()
    experts, router = release_expert_layer(fp8=args.quantization == "fp8")
    nbytes = sum(w.numel() * w.element_size() for w in (experts.gate_up_proj, experts.down_proj))
    record = {
        **record_header("moe_order_sweep"), "quantization": args.quantization,
        "weight_bytes_per_layer": nbytes,
        "copy_gbps": copy_bandwidth_gbps(), "sweep": [], "layer": [],
    }  # fmt: skip
    with torch.inference_mode():
        for n in (int(t) for t in args.tokens.split(",")):
            sweep_tokens(experts, router, n, args.quantization, record)
    print(f"copy {record['copy_gbps']} GB/s; fastest per (tokens, kernel):")
    for n in sorted({r["tokens"] for r in record["sweep"]}):
        for kernel in ("gate_up", "down"):
            rows = [r for r in record["sweep"] if (r["tokens"], r["kernel"]) == (n, kernel)]
            best = min(rows, key=lambda r: r["ms"])
            now = next(r["ms"] for r in rows if r["default_tiles"] and r["group_m"] == 0)
            print(f"  {n:5d} {kernel:8s} default tiles, order 0: {now:.4f} ms; best {best['ms']:.4f} ms: "
                  f"{best['tiles']} group {best['group_m']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.step:
        del experts, router
        record["step"] = time_steps(record["sweep"], args.quantization)
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def choice(sweep: list[dict], tokens: int, num_experts: int, top_k: int, dtype, *, tiles: bool) -> MoeConfig:
    """The sweep's fastest order for the default tiles (tiles=False), or its fastest tiles and order
    with a block_m both kernels share (tiles=True), at `tokens`."""
    rows = [r for r in sweep if r["tokens"] == tokens and (tiles or r["default_tiles"])]
    pairs = []
    for g in (r for r in rows if r["kernel"] == "gate_up"):
        for dn in (r for r in rows if r["kernel"] == "down" and r["tiles"][0] == g["tiles"][0]):
            pairs.append((g["ms"] + dn["ms"], g, dn))
    _, g, dn = min(pairs, key=lambda p: p[0])
    bm, bn, bk, warps, stages, swap = g["tiles"]
    _, dbn, dbk, dwarps, dstages, dswap = dn["tiles"]
    base = dgemma.ops.moe.default_config(tokens * top_k, num_experts, torch.bfloat16, dtype)
    return dataclasses.replace(
        base, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, swap_ab=swap,
        group_m=g["group_m"], down_block_n=dbn, down_block_k=dbk, down_num_warps=dwarps,
        down_num_stages=dstages, down_swap_ab=dswap, down_group_m=dn["group_m"],
    )  # fmt: skip


def pick(original, override, top_k: int, num_pairs, num_experts, dtype=torch.bfloat16, weight_dtype=None,
         fp8_activations=False) -> MoeConfig:  # fmt: skip
    """`default_config`, changed by `override(config, tokens)` (bf16 and FP8 weights alike; not float32
    or FP8 activations, which the sweep does not cover)."""
    cfg = original(num_pairs, num_experts, dtype, weight_dtype, fp8_activations)
    if dtype == torch.float32 or fp8_activations:
        return cfg
    return override(cfg, num_pairs // top_k)


def time_steps(sweep: list[dict], quantization: str, rounds: int = 2) -> dict:
    """The engine's step at 1, 2, 4 and 8 canvases three ways, alternated `rounds` times (the spread
    between rounds is the noise): `column_order`, the shipped tiles in the order used before
    2026-11-23 (group 0); `default`, the shipped configs; `swept`, the sweep's fastest tiles and orders
    at the token counts it swept (the shipped configs elsewhere)."""
    config = ModelConfig.from_dict(release_config_dict())
    model = build_model(config, None, torch.bfloat16)
    if quantization == "fp8":
        model.quantize(quantization)
    torch.cuda.empty_cache()
    num_experts, top_k = config.num_experts, config.top_k_experts
    weight_dtype = model.layers[0].experts.gate_up_proj.dtype
    swept = {
        n: choice(sweep, n, num_experts, top_k, weight_dtype, tiles=quantization == "none")
        for n in sorted({r["tokens"] for r in sweep})
    }
    overrides = {
        "column_order": lambda cfg, n: dataclasses.replace(cfg, group_m=0, down_group_m=0),
        "default": lambda cfg, n: cfg,
        "swept": lambda cfg, n: swept.get(n, cfg),
    }
    original = dgemma.ops.moe.default_config
    out = {"swept": {n: dataclasses.asdict(c) for n, c in swept.items()}}
    for round_ in range(rounds):
        for label, override in overrides.items():
            dgemma.ops.moe.default_config = functools.partial(pick, original, override, top_k)
            try:
                with torch.inference_mode():
                    run = bench_canvases(model, 512, (1, 2, 4, 8), 16)
                    if round_ == 0:
                        run["profile"] = bench_profile(model, 512, rows=1, top=4)
                        run["profile8"] = bench_profile(model, 512, rows=8, top=4)
            finally:
                dgemma.ops.moe.default_config = original
            out.setdefault(label, []).append(run)
            print(label, json.dumps({k: v for k, v in run.items() if k.startswith("step_ms")}), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
