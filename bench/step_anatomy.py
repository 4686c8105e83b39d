"""Where a denoise step's wall time goes besides the kernels themselves: the engine's denoise forward
(the CUDA graph it replays) profiled kernel by kernel on the release model with random weights.

    python bench/step_anatomy.py --json OUT.json [--rows 1,8] [--quantization fp8] [--pdl]

For each batch size: the graph replay's wall time (CUDA events), the number of kernels, the sum of
their durations, and the idle time between consecutive kernels (each kernel's start minus the previous
one's end), totalled per kernel name and listed in order for one middle layer. A step's wall time above
its kernels' sum is this idle time: launch latency and the tail of each kernel, paid once per kernel.
With --pdl, a chain of small Triton kernels captured in a graph is timed with and without programmatic
dependent launch (each kernel waits for the previous one with `gdc_wait`, so the results are the same),
to measure what each kernel boundary costs and what PDL saves of it. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

PROMPT = 512


def kernel_timeline(fn, reps: int = 3) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every CUDA kernel that `reps` calls of fn ran, in start order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return sorted(kernels, key=lambda k: k[1])


def anatomy(timeline: list[tuple[str, float, float]], reps: int) -> dict:
    """Per call: kernels, their summed time, the idle time between them; per kernel name the same."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    per_call = len(timeline) // reps  # a graph replays the same kernels each call
    idle, prev_end = 0.0, 0.0
    for i, (name, start, end) in enumerate(timeline):
        # the idle time before each call's first kernel is the host's, not the graph's: left out
        gap = 0.0 if i % per_call == 0 else max(0.0, start - prev_end)
        prev_end = end if i % per_call == 0 else max(prev_end, end)
        idle += gap
        row = by_name[name[:80]]
        row[0] += 1
        row[1] += end - start
        row[2] += gap
    busy = sum(end - start for _, start, end in timeline)
    names = sorted(by_name.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
    return {
        "kernels_per_call": len(timeline) / reps,
        "kernel_ms_per_call": round(busy / reps / 1e3, 3),
        "idle_ms_per_call": round(idle / reps / 1e3, 3),
        "idle_us_per_boundary": round(idle / max(1, len(timeline) - reps), 2),
        "by_name": [
            {
                "name": n,
                "calls": c / reps,
                "ms": round(t / reps / 1e3, 4),
                "idle_before_ms": round(g / reps / 1e3, 4),
            }
            for n, (c, t, g) in names
        ],
    }


def one_layer(timeline: list[tuple[str, float, float]], marker: str = "_ff_combine_kernel") -> list[dict]:
    """The kernels of one middle layer of the first call, in order (between two `marker` kernels)."""
    ends = [i for i, (name, _, _) in enumerate(timeline) if name.startswith(marker)]
    if len(ends) < 12:
        return []
    lo, hi = ends[9] + 1, ends[10] + 1  # layer 10 (a sliding one)
    out = []
    for i in range(lo, hi):
        name, start, end = timeline[i]
        out.append(
            {
                "name": name[:80],
                "us": round(end - start, 2),
                "idle_before_us": round(start - timeline[i - 1][2], 2),
            }
        )
    return out


@torch.inference_mode()
def step_anatomy(model, rows: int) -> dict:
    c = model.config.canvas_length
    engine = _engine(model, rows, PROMPT, 2)
    _run_requests(engine, _requests(model, rows, PROMPT, 1, 1))  # admits, captures the graphs
    canvases = [torch.tensor([random_prompt(model, c, 100 + r)], device="cuda") for r in range(rows)]
    row_ids, starts = list(range(rows)), [PROMPT] * rows

    def forward():
        engine.runner.hidden(canvases, [None] * rows, row_ids, starts)

    wall = kernel_ms(forward, reps=20)
    timeline, source = kernel_timeline(forward, reps=3), "graph replay"
    if not timeline:  # a profiler that does not see inside graphs: the same forward, uncaptured
        soft = torch.zeros(rows, c, model.config.hidden_size, device="cuda", dtype=model.dtype)
        ids, rows_t = torch.cat(canvases), torch.arange(rows, device="cuda")
        starts_t = torch.full((rows,), PROMPT, device="cuda")
        timeline = kernel_timeline(lambda: model.denoise_static(ids, soft, engine.cache, rows_t, starts_t), 3)
        source = "eager forward (the profiler reported no kernels inside the graph)"
    out = {
        "rows": rows,
        "source": source,
        "graph_replay_ms": round(wall, 3),
        **anatomy(timeline, 3),
        "layer_10": one_layer(timeline),
    }
    engine = None  # its graphs' memory goes before the next batch size captures its own
    torch.cuda.empty_cache()
    return out


def pdl_chain(length: int = 600) -> dict:
    """A graph of `length` small Triton kernels (each adds 1 to a 1 MB tensor), with and without PDL."""
    import triton
    import triton.language as tl

    @triton.jit
    def _bump(x_ptr, n, PDL: tl.constexpr, EARLY: tl.constexpr, BLOCK: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=ok) + 1, mask=ok)

    n, block = 1 << 18, 1024
    x = torch.zeros(n, device="cuda")
    a = torch.randn(256, 2816, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2816, 2816, device="cuda", dtype=torch.bfloat16)
    out = {}
    for label, pdl, early, gemm in (
        ("plain", False, False, False),
        ("pdl_wait", True, False, False),
        ("pdl_wait_early_trigger", True, True, False),
        ("plain_with_gemms", False, False, True),
        ("pdl_with_gemms", True, True, True),
    ):

        def chain(pdl=pdl, early=early, gemm=gemm):
            for i in range(length):
                if gemm and i % 2:
                    torch.mm(a, w)
                else:
                    _bump[(n // block,)](x, n, PDL=pdl, EARLY=early, BLOCK=block, launch_pdl=pdl)

        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        x.zero_()
        graph.replay()
        torch.cuda.synchronize()
        bumps = length // 2 if gemm else length
        correct = bool((x == bumps).all())
        ms = kernel_ms(graph.replay, reps=20)
        out[label] = {"us_per_kernel": round(ms * 1e3 / length, 3), "correct": correct}
        del graph
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--quantization", choices=["fp8", "fp8-w8a8"])
    p.add_argument("--pdl", action="store_true")
    args = p.parse_args()
    record = {
        **record_header("step anatomy: the denoise graph's kernels and the idle time between them"),
        "quantization": args.quantization,
    }
    if args.pdl:
        record["pdl_chain"] = pdl_chain()
        print("pdl chain", json.dumps(record["pdl_chain"]), flush=True)
    model = build_model(ModelConfig.from_dict(release_config_dict()), None, torch.bfloat16)
    if args.quantization:
        model.quantize(args.quantization)
    record["steps"] = []
    for rows in (int(r) for r in args.rows.split(",")):
        record["steps"].append(step_anatomy(model, rows))
        s = record["steps"][-1]
        print(
            f"{rows} rows: replay {s['graph_replay_ms']} ms, {s['kernels_per_call']:.0f} kernels, "
            f"{s['kernel_ms_per_call']} ms in kernels, {s['idle_ms_per_call']} ms idle "
            f"({s['idle_us_per_boundary']} us a boundary)",
            flush=True,
        )
        for r in s["by_name"][:30]:
            print(f"  {r['calls']:6.1f} {r['ms']:8.3f} ms {r['idle_before_ms']:7.3f} idle  {r['name']}")
        for r in s["layer_10"]:
            print(f"    {r['us']:8.2f} us {r['idle_before_us']:6.2f} idle  {r['name']}")
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
