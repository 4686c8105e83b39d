"""Temporary probe: FP8 activations into the experts' gate-up projection (W8A8) vs FP8 weights only."""
import itertools, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dgemma.bench import bench_canvases, bench_single, kernel_ms, rel_err
from dgemma.model.config import ModelConfig
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.presets import release_config_dict
from dgemma.model.quant import quantize_rows
from dgemma.ops.moe import MoeConfig, align, default_config, gate_up

out = {"layer": [], "sweep": [], "model": []}
model = DiffusionGemma.random(ModelConfig.from_dict(release_config_dict()), device="cuda", dtype=torch.bfloat16)
layer = model.layers[0]
ex = layer.experts
import copy
exact = copy.deepcopy(ex).float(); exact.use_kernel = False
gen = torch.Generator("cuda").manual_seed(0)
xs = {n: torch.randn(n, 2816, device="cuda", generator=gen) for n in (256, 512, 1024, 2048)}
with torch.inference_mode():
    routes = {n: layer.router(x.to(torch.bfloat16)) for n, x in xs.items()}
    want = exact(xs[256], *routes[256], num_rows=1)
    del exact
    model.quantize("fp8"); torch.cuda.empty_cache()
    for act in (False, True):
        ex.fp8_activations = act
        got = ex(xs[256].to(torch.bfloat16), *routes[256])
        row = {"fp8_activations": act, "rel_err_vs_fp32": rel_err(got, want)}
        for n, x in xs.items():
            xb = x.to(torch.bfloat16)
            row[f"ms_{n}"] = kernel_ms(lambda: ex.terms(xb, *routes[n]))
        out["layer"].append(row); print(row, flush=True)
    # gate-up alone, W8A8, a few tiles
    for n in (256, 2048):
        xq, s = quantize_rows(xs[n].to(torch.bfloat16))
        w, idx = routes[n]
        base = default_config(n * 8, 128, torch.bfloat16, ex.gate_up_proj.dtype)
        for bm in ((32, 16) if n == 256 else (128, 64)):
            slots = align(idx, 128, bm)
            for bn, bk, warps, st, swap in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4, 5), (False,)):
                if warps == 8 and bn < 128 or bn * bk > 128 * 256:
                    continue
                c = MoeConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=st, swap_ab=swap)
                try:
                    ms = kernel_ms(lambda: gate_up(xq, ex.gate_up_proj, slots, 8, activation="gelu_pytorch_tanh", config=c,
                                                   scale=ex.gate_up_scale, x_scale=s, out_dtype=torch.bfloat16))
                except Exception as exc:
                    print("fail", c, str(exc)[:200]); continue
                out["sweep"].append(dict(tokens=n, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=st, ms=ms))
        best = sorted([r for r in out["sweep"] if r["tokens"] == n], key=lambda r: r["ms"])[:5]
        print(n, "gate_up W8A8 best", best, flush=True)
        slots = align(idx, 128, base.block_m)
        print(n, "gate_up W8A16 default", kernel_ms(lambda: gate_up(xs[n].to(torch.bfloat16), ex.gate_up_proj, slots, 8, activation="gelu_pytorch_tanh", config=base, scale=ex.gate_up_scale)), flush=True)
    for act in (False, True, False, True):
        for l in model.layers:
            l.experts.fp8_activations = act
        row = {"fp8_activations": act}
        row.update({k: v for k, v in bench_single(model, 512, (16,), 3).items() if k in ("forward_graph_ms", "denoise_step_ms", "canvas16_ms", "canvas16_unfused_ms")})
        row.update(bench_canvases(model, 512, (1, 8), 16))
        out["model"].append(row); print(row, flush=True)
Path(os.environ.get("OUT", "/tmp"), "w8a8.json").write_text(json.dumps(out, indent=0))
