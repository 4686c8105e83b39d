"""How much of a prompt's encode is the host's? The eager `DiffusionGemma.encode` (what the engine runs
when it admits a prompt) against the same layers on the same kernels captured in a CUDA graph (the
encode's rows, positions and write index made device tensors first), release config, random bf16
weights, one row of 512 and one of 4096 tokens: the wall time of each (a replay launches nothing from
Python), and whether both write the same K/V.

    python bench/prefill_graph_probe.py --json OUT.json

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.bench import build_model, median, random_prompt, record_header, rel_err, timed_ms
from dgemma.engine.runner import capture
from dgemma.model.config import ModelConfig
from dgemma.model.presets import release_config_dict


def captured_encode(model, ids: torch.Tensor, cache) -> torch.cuda.CUDAGraph:
    """`model.encode(ids, cache)` on cache row 0 from its start, as a CUDA graph: the layers and kernels
    the eager encode runs, with its rows, positions and write index made device tensors beforehand."""
    length = ids.shape[1]
    starts_B = torch.zeros(1, dtype=torch.long, device="cuda")
    positions = torch.arange(length, device="cuda")[None, :]
    index = cache.write_index([0], length)
    rows_B = index[0].flatten()

    def attention(i, layer, cos, sin):
        return lambda h: layer.self_attn.encode(
            h,
            cos,
            sin,
            cache,
            i,
            [0],
            [0],
            invariant=False,
            write_index=index,
            rows_B=rows_B,
            starts_B=starts_B,
        )

    def forward():
        model._layers(model._embed(ids), positions, attention, denoise=False, invariant=False)

    graph = torch.cuda.CUDAGraph()
    capture(graph, forward, None)
    return graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--lengths", default="512,4096")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    model = build_model(ModelConfig.from_dict(release_config_dict()), None, torch.bfloat16)
    record = {
        **record_header("prompt encode: eager forward vs the same forward from a CUDA graph"),
        "runs": [],
    }
    with torch.inference_mode():
        for length in (int(n) for n in args.lengths.split(",")):
            cache = model.new_cache(batch_size=1, max_length=length)
            ids = torch.tensor([random_prompt(model, length, 3)], device="cuda")

            def eager(cache=cache, ids=ids):
                cache.reset()
                model.encode(ids, cache)

            eager_ms = median(timed_ms(eager, reps=args.reps))
            written = [t[:, :, :length].clone() for t in cache.keys + cache.values]
            for t in cache.keys + cache.values:
                t.zero_()
            cache.reset()
            graph = captured_encode(model, ids, cache)
            graph_ms = median(timed_ms(graph.replay, reps=args.reps))
            again = [t[:, :, :length] for t in cache.keys + cache.values]
            run = {
                "tokens": length,
                "eager_ms": round(eager_ms, 3),
                "graph_ms": round(graph_ms, 3),
                "kv_bitwise_equal": all(torch.equal(a, b) for a, b in zip(written, again)),
                "kv_max_rel_err": max(rel_err(b, a) for a, b in zip(written, again)),
            }
            record["runs"].append(run)
            print(run, flush=True)
            del graph, cache, written, again
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
