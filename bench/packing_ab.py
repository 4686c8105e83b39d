"""The engine's denoise step with q|k|v and gate|up packed into one GEMM each (`PackedLinears`, the
default on CUDA) against the same model with the separate projections, alternated in one process.

    python bench/packing_ab.py --json OUT.json [--canvases 1,8] [--rounds 3] [--quantization fp8]

Release config, random weights, 512-token prompts, 16 fixed steps a canvas, n concurrent requests of 3
canvases: the median step of each request's middle canvas (its commit step left out), as `dgemma
bench`'s canvases section times it; and one canvas's hidden states both ways on the same inputs (the
GEMMs' shapes differ, so their rounding may). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.bench import (
    _engine,
    alternated_steps,
    build_model,
    middle_canvas_step_ms,
    random_prompt,
    record_header,
    rel_err,
)
from dgemma.model.attention import Attention
from dgemma.model.config import ModelConfig
from dgemma.model.layers import GatedMLP
from dgemma.model.presets import release_config_dict

PROMPT, STEPS = 512, 16


def set_packed(model, packed: bool) -> None:
    """Pack the projections, or give each module its own weights again (the engine then keeps them
    separate: `pack_projections` is made a no-op on this model)."""
    if packed:
        model.__dict__.pop("pack_projections", None)
        model.pack_projections()
        return
    for module in model.modules():
        if isinstance(module, (Attention, GatedMLP)) and module.packed is not None:
            for linear in module.packed.modules:
                linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            module.packed = None
    model.pack_projections = lambda: None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--canvases", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quantization", choices=["fp8"])
    args = p.parse_args()
    record = {**record_header("q|k|v and gate|up as one GEMM each vs separate GEMMs"), "runs": []}
    model = build_model(ModelConfig.from_dict(release_config_dict()), None, torch.bfloat16)
    if args.quantization:
        model.quantize(args.quantization)
    record["quantization"] = args.quantization
    with torch.inference_mode():
        c = model.config.canvas_length
        canvas = torch.tensor([random_prompt(model, c, 4)], device="cuda")
        hidden = {}
        for packed in (True, False):
            set_packed(model, packed)
            engine = _engine(model, 1, PROMPT, 2)
            prompt = torch.tensor([random_prompt(model, PROMPT, 3)], device="cuda")
            model.encode(prompt, engine.cache, rows=[0])
            hidden[packed] = engine.runner.hidden([canvas], [None], [0], [PROMPT]).clone()
            engine = None
        record["hidden_rel_err_packed_vs_separate"] = rel_err(hidden[True], hidden[False])
        print("hidden states, packed vs separate:", record["hidden_rel_err_packed_vs_separate"], flush=True)

        def step_ms(n: int, packed: bool) -> float:
            set_packed(model, packed)
            return middle_canvas_step_ms(model, _engine(model, n, PROMPT, 3), PROMPT, STEPS)

        record["summary"] = alternated_steps(
            [int(v) for v in args.canvases.split(",")],
            args.rounds,
            [("packed", True, lambda n: step_ms(n, True)), ("separate", False, lambda n: step_ms(n, False))],
            field="packed",
            runs=record["runs"],
            save=lambda: Path(args.json).write_text(json.dumps(record, indent=1)),
        )
    print(record["summary"])
    Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
