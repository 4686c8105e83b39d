"""A wider tile sweep of the FP8 expert kernels than `dgemma bench --sections moe`, at one canvas (256
tokens, one release-shaped layer with random weights): block_m 16 and 32, block_n 32-128, block_k
64-256, 2 or 4 warps, 3-6 stages, both operand orders (options narrow or widen these). Each kernel
alone, GPU time between CUDA events.

    python bench/fp8_tile_sweep.py --json OUT.json     # the fastest configs per kernel are printed
    python bench/fp8_tile_sweep.py --warps 4,8 --block-n 64,128 --no-swap --json OUT.json

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.bench import kernel_ms, release_expert_layer
from dgemma.ops.moe import MoeConfig, align, down, gate_up


def tiles(block_ns=(32, 64, 128), warps_list=(2, 4), swaps=(False, True)):
    for bn, bk, warps, stages, swap in itertools.product(
        block_ns, (64, 128, 256), warps_list, (3, 4, 5, 6), swaps
    ):
        if bn * bk <= 128 * 256 and not (warps == 2 and bn > 64):
            yield bn, bk, warps, stages, swap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--block-n", default="32,64,128", help="comma-separated block_n values")
    parser.add_argument("--warps", default="2,4", help="comma-separated num_warps values")
    parser.add_argument("--no-swap", action="store_true", help="only the activations as the left operand")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    experts, router = release_expert_layer(fp8=True)
    d, num_experts, top_k = experts.down_proj.shape[1], experts.gate_up_proj.shape[0], router.top_k
    x = torch.randn(args.tokens, d, device="cuda", dtype=torch.bfloat16)
    rows = []
    with torch.inference_mode():
        weights, index = router(x)
        for block_m in (16, 32):
            slots = align(index, num_experts, block_m)
            h = gate_up(
                x, experts.gate_up_proj, slots, top_k, activation=experts.act_name,
                config=MoeConfig(block_m=block_m), scale=experts.gate_up_scale,
            )  # fmt: skip
            for bn, bk, warps, stages, swap in tiles(
                tuple(int(v) for v in args.block_n.split(",")),
                tuple(int(v) for v in args.warps.split(",")),
                (False,) if args.no_swap else (False, True),
            ):
                runs = {}
                if bk > 64:  # gate-up: K is the hidden size, short blocks only slow it
                    c = MoeConfig(block_m=block_m, block_n=bn, block_k=bk, num_warps=warps,
                                  num_stages=stages, swap_ab=swap)  # fmt: skip
                    runs["gate_up"] = lambda c=c, slots=slots: gate_up(
                        x, experts.gate_up_proj, slots, top_k, activation=experts.act_name, config=c,
                        scale=experts.gate_up_scale,
                    )  # fmt: skip
                if bk <= 128:  # down: K is the expert's intermediate size (704)
                    c = MoeConfig(block_m=block_m, down_block_n=bn, down_block_k=bk, down_num_warps=warps,
                                  down_num_stages=stages, down_swap_ab=swap)  # fmt: skip
                    runs["down"] = lambda c=c, slots=slots, h=h: down(
                        h, experts.down_proj, slots, weights, config=c, scale=experts.down_scale
                    )
                for kernel, fn in runs.items():
                    try:
                        ms = kernel_ms(fn)
                    except Exception:  # a tile config the compiler rejects (shared memory): skip it
                        continue
                    rows.append({"tokens": args.tokens, "kernel": kernel, "block_m": block_m, "block_n": bn,
                                 "block_k": bk, "num_warps": warps, "num_stages": stages, "swap_ab": swap,
                                 "ms": ms})  # fmt: skip
    for kernel in ("gate_up", "down"):
        print(kernel)
        for r in sorted((r for r in rows if r["kernel"] == kernel), key=lambda r: r["ms"])[:6]:
            print("   ", r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=0) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
