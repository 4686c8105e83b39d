"""The canvas's attention over the cache (`dgemma.ops.attention.attend_cache`) swept over its tiles and
key splits on release shapes, then the winners timed inside the denoise forward.

    python bench/attention_sweep.py --json OUT.json [--rows 1,2,4,8] [--forward-rows 1,8]

1. Each layer kind (sliding: 8 K/V heads of 256; full: 2 K/V heads of 512; 16 query heads), a
   512-token prefix and a 256-token canvas (768 visible keys), bf16, B rows: every `Tiles` of the grid
   (folded query rows a program, keys an iteration, stages, warps, splits of the keys), GPU time of
   back-to-back calls between CUDA events (`dgemma.bench.kernel_ms`), and its largest error against
   SDPA over the same keys in float32. A config the GPU cannot run (shared memory, registers) is
   recorded as such.
2. The release model with random weights: the engine's denoise forward (its CUDA graph) at each of
   `--forward-rows`, with the shipped `choose_tiles` and with the sweep's fastest tiles per layer kind
   and row count patched in (captured anew for each), alternated twice.

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

import dgemma.ops.attention as attention_ops
from dgemma.bench import (
    _engine,
    _requests,
    _run_requests,
    build_model,
    kernel_ms,
    random_prompt,
    record_header,
)
from dgemma.model.config import ModelConfig
from dgemma.model.presets import release_config_dict
from dgemma.ops.attention import Tiles, attend_cache

PREFIX, CANVAS, HEADS = 512, 256, 16
DEVICE, DTYPE = "cuda", torch.bfloat16
LAYERS = {"sliding": (8, 256), "full": (2, 512)}  # K/V heads, head dim


def grid(rows: int) -> list[Tiles]:
    """Wide at one row (few programs: the split count matters), narrower at more."""
    splits = (1, 2, 3, 4, 6, 8) if rows == 1 else (1, 2, 3) if rows <= 4 else (1, 2)
    return [
        Tiles(*t)
        for t in itertools.product((16, 32, 64, 128), (32, 64), (2, 3), (4, 8), splits)
        if not (t[0] == 16 and t[3] == 8)  # 16 rows over 8 warps: idle warps
    ]


def kernel_sweep(layer: str, rows: int) -> dict:
    kv, e = LAYERS[layer]
    gen = torch.Generator(DEVICE).manual_seed(0)
    positions = PREFIX + CANVAS
    q = torch.randn(rows, CANVAS, HEADS, e, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(rows + 1, kv, positions, e, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(rows + 1, kv, positions, e, device=DEVICE, dtype=DTYPE, generator=gen)
    q, k = q / e**0.25, k / e**0.25  # scores of order one, as the norms make them
    rows_B = torch.arange(rows, device=DEVICE)
    lo_B = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    hi_B = torch.full((rows,), positions, dtype=torch.long, device=DEVICE)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2),
        k[:rows].float().repeat_interleave(HEADS // kv, dim=1),
        v[:rows].float().repeat_interleave(HEADS // kv, dim=1),
        scale=1.0,
    ).transpose(1, 2)

    def run(tiles: Tiles | None) -> dict:
        out = attend_cache(q, k, v, rows_B, lo_B, hi_B, tiles=tiles)
        err = float((out.float() - want).abs().max())
        return {
            "ms": kernel_ms(lambda: attend_cache(q, k, v, rows_B, lo_B, hi_B, tiles=tiles)),
            "max_abs_err": err,
        }

    shipped = attention_ops.choose_tiles(e, DTYPE, rows * kv, HEADS // kv * CANVAS)
    runs = []
    for tiles in grid(rows):
        try:
            runs.append({"tiles": list(tiles), **run(tiles)})
        except Exception as error:  # out of shared memory or registers: recorded
            runs.append({"tiles": list(tiles), "error": type(error).__name__})
            torch.cuda.synchronize()
    timed = [r for r in runs if "ms" in r]
    best = min(timed, key=lambda r: r["ms"])
    return {
        "layer": layer,
        "rows": rows,
        "shipped": {"tiles": list(shipped), **run(None)},
        "best": best,
        "top5": sorted(timed, key=lambda r: r["ms"])[:5],
        "runs": runs,
    }


@torch.inference_mode()
def forward_ms(model, rows: int) -> float:
    """The engine's denoise forward (graph replay) at `rows` canvases, with the tiles in force now."""
    c = model.config.canvas_length
    engine = _engine(model, rows, PREFIX, 2)
    _run_requests(engine, _requests(model, rows, PREFIX, 1, 1))  # admits, captures the graphs
    canvases = [torch.tensor([random_prompt(model, c, 100 + r)], device=DEVICE) for r in range(rows)]
    ms = kernel_ms(lambda: engine.runner.hidden(canvases, [None] * rows, list(range(rows)), [PREFIX] * rows))
    engine = None
    torch.cuda.empty_cache()
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--forward-rows", default="1,8")
    args = p.parse_args()
    record = {
        **record_header("attend_cache's tiles and key splits on release shapes, then in the denoise forward"),
        "sweep": [],
    }
    best: dict[tuple[int, int], Tiles] = {}  # (head dim, rows) -> fastest tiles
    for layer, rows in itertools.product(LAYERS, (int(r) for r in args.rows.split(","))):
        s = kernel_sweep(layer, rows)
        record["sweep"].append(s)
        best[LAYERS[layer][1], rows] = Tiles(*s["best"]["tiles"])
        print(
            f"{layer:8s} {rows} rows: shipped {s['shipped']['tiles']} {s['shipped']['ms']:.4f} ms; "
            f"best {s['best']['tiles']} {s['best']['ms']:.4f} ms (err {s['best']['max_abs_err']:.4f})",
            flush=True,
        )
        Path(args.json).write_text(json.dumps(record, indent=1))

    model = build_model(ModelConfig.from_dict(release_config_dict()), None, torch.bfloat16)
    shipped_choose = attention_ops.choose_tiles
    kv_heads = {e: kv for kv, e in LAYERS.values()}

    def swept_choose(head_dim, dtype, blocks, folded_rows):
        rows = blocks // kv_heads[head_dim]
        return best.get((head_dim, rows)) or shipped_choose(head_dim, dtype, blocks, folded_rows)

    record["forward"] = []
    for rows in (int(r) for r in args.forward_rows.split(",")):
        for attempt, variant in itertools.product(range(2), ("shipped", "swept")):
            attention_ops.choose_tiles = shipped_choose if variant == "shipped" else swept_choose
            ms = forward_ms(model, rows)
            record["forward"].append({"rows": rows, "variant": variant, "attempt": attempt, "forward_ms": ms})
            print(f"forward {rows} rows {variant}: {ms:.3f} ms", flush=True)
            Path(args.json).write_text(json.dumps(record, indent=1))
    attention_ops.choose_tiles = shipped_choose


if __name__ == "__main__":
    main()
