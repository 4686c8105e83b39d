"""Would one GEMM for q|k|v pay? The release's attention projections at 1, 2 and 8 canvases (256, 512 and
2048 tokens), bf16, random weights: q, k and v as three GEMMs (as the model runs them) against one GEMM
over the three weights stacked, then split. Each variant replayed from a CUDA graph of 30 layers' worth
(25 sliding, 5 full, as the release), so launches do not count; medians of alternated rounds.

    python bench/qkv_packing_probe.py --json OUT.json

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.bench import graph_ms, median, record_header
from dgemma.model.config import ModelConfig
from dgemma.model.presets import release_config_dict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = ModelConfig.from_dict(release_config_dict())
    d, h = config.hidden_size, config.num_heads
    layers = []
    for spec in config.layers:
        sizes = [h * spec.head_dim, spec.num_kv_heads * spec.head_dim]
        if spec.has_v_proj:
            sizes.append(spec.num_kv_heads * spec.head_dim)
        weights = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16) * 0.02 for n in sizes]
        layers.append((weights, torch.cat(weights), sizes))
    weight_bytes = sum(p.numel() * 2 for _, p, _ in layers)
    record = record_header("q|k|v as one GEMM against three")
    record["weight_bytes"] = weight_bytes
    record["rows"] = []
    for tokens in (256, 512, 2048):
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)

        def separate(x=x):
            for weights, _, _ in layers:
                for w in weights:
                    F.linear(x, w)

        def packed(x=x):
            for _, w, sizes in layers:
                F.linear(x, w).split(sizes, dim=-1)

        times = {"separate": [], "packed": []}
        for _ in range(args.rounds):
            times["separate"].append(graph_ms(separate))
            times["packed"].append(graph_ms(packed))
        row = {"tokens": tokens, **{f"{k}_ms": round(median(v), 4) for k, v in times.items()}}
        row["packed_gbps"] = round(weight_bytes / (row["packed_ms"] / 1e3) / 1e9, 1)
        row["separate_gbps"] = round(weight_bytes / (row["separate_ms"] / 1e3) / 1e9, 1)
        record["rows"].append(row)
        print(row, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
