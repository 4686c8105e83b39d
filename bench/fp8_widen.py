"""How the FP8 expert kernels widen their weights to bf16: Triton's cast (e4m3 -> f16 -> bf16, three
conversion instructions per two values) against `dgemma.ops.moe._e4m3_to_bf16` (integer ops and one
packed multiply), on the device.

1. exactness: every finite e4m3 code through the down kernel, both ways of widening, against torch's own
   e4m3 -> bf16 conversion (`dgemma.bench.fp8_widening_exact`);
2. one release-shaped expert layer (random weights, FP8) at 256, 512, 1024 and 2048 tokens (1, 2, 4 and
   8 canvases) with the default tiles: each kernel's time both ways, alternated, and whether the
   outputs are bitwise equal.

`bench/fp8_tile_sweep.py` sweeps the tiles (with the widening the kernels use by default).

    python bench/fp8_widen.py --json OUT.json

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.bench import (
    copy_bandwidth_gbps,
    fp8_widening_exact,
    kernel_ms,
    median,
    record_header,
    release_expert_layer,
)
from dgemma.ops.moe import align, default_config, down, gate_up


def layer_ab(tokens: list[int], reps: int) -> list[dict]:
    experts, router = release_expert_layer(fp8=True)
    d, num_experts, top_k = experts.down_proj.shape[1], experts.gate_up_proj.shape[0], router.top_k
    nbytes = {
        "gate_up": experts.gate_up_proj.numel() * experts.gate_up_proj.element_size(),
        "down": experts.down_proj.numel() * experts.down_proj.element_size(),
    }
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in tokens:
        x = torch.randn(n, d, device="cuda", generator=gen).to(torch.bfloat16)
        with torch.inference_mode():
            weights, index = router(x)
            base = default_config(n * top_k, num_experts, x.dtype, experts.gate_up_proj.dtype)
            slots = align(index, num_experts, base.block_m)
            outs, times = {}, {"cast": {"gate_up": [], "down": []}, "fast": {"gate_up": [], "down": []}}
            for _, fast in itertools.product(range(reps), (False, True)):
                cfg = dataclasses.replace(base, fast_widen=fast)
                name = "fast" if fast else "cast"

                def up(cfg=cfg, x=x, slots=slots):
                    return gate_up(
                        x, experts.gate_up_proj, slots, top_k, activation=experts.act_name, config=cfg,
                        scale=experts.gate_up_scale,
                    )  # fmt: skip

                h = up()

                def dn(cfg=cfg, h=h, slots=slots, weights=weights):
                    return down(h, experts.down_proj, slots, weights, config=cfg, scale=experts.down_scale)

                times[name]["gate_up"].append(kernel_ms(up))
                times[name]["down"].append(kernel_ms(dn))
                outs[name] = (h, dn())
        row = {"tokens": n, "config": base.__dict__}
        for name in ("cast", "fast"):
            for kernel in ("gate_up", "down"):
                ms = median(times[name][kernel])
                row[f"{kernel}_{name}_ms"] = ms
                row[f"{kernel}_{name}_gbps"] = round(nbytes[kernel] / (ms / 1e3) / 1e9, 1)
        real = slots[0] < n * top_k  # h's rows of padding blocks past the last expert are never written
        row["h_equal"] = bool(torch.equal(outs["cast"][0][real], outs["fast"][0][real]))
        row["y_equal"] = bool(torch.equal(outs["cast"][1], outs["fast"][1]))
        rows.append(row)
        print(
            f"{n:5d} tokens  gate_up {row['gate_up_cast_ms']:.4f} -> {row['gate_up_fast_ms']:.4f} ms "
            f"({row['gate_up_cast_gbps']:.0f} -> {row['gate_up_fast_gbps']:.0f} GB/s)  down "
            f"{row['down_cast_ms']:.4f} -> {row['down_fast_ms']:.4f} ms ({row['down_cast_gbps']:.0f} -> "
            f"{row['down_fast_gbps']:.0f} GB/s)  equal {row['h_equal']} {row['y_equal']}",
            flush=True,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="256,512,1024,2048")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    record = record_header("FP8 weight widening: Triton's cast against integer ops")
    record["copy_gbps"] = copy_bandwidth_gbps()
    record["exactness"] = fp8_widening_exact()
    print("exactness:", record["exactness"], flush=True)
    record["layer"] = layer_ab([int(t) for t in args.tokens.split(",")], args.reps)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
