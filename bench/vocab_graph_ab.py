"""The engine's denoise step with the vocabulary stage replayed from its CUDA graph (the default on
CUDA) against the same engine with the stage launched eagerly, alternated in one process.

    python bench/vocab_graph_ab.py --json OUT.json [--canvases 1,4,8] [--rounds 3]

Release config, random bf16 weights, 512-token prompts, 16 fixed steps a canvas, n concurrent
requests of 3 canvases: the median step of each request's middle canvas (its commit step left out), as
`dgemma bench`'s canvases section times it. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.bench import _engine, alternated_steps, build_model, middle_canvas_step_ms, record_header
from dgemma.engine.vocab import VocabStage
from dgemma.model.config import ModelConfig
from dgemma.model.presets import release_config_dict

PROMPT, STEPS = 512, 16


def step_ms(model, n: int, graphs: bool) -> float:
    engine = _engine(model, n, PROMPT, 3)
    if not graphs:
        engine.vocab = VocabStage(model)  # the fused passes, launched eagerly
    return middle_canvas_step_ms(model, engine, PROMPT, STEPS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--canvases", default="1,4,8")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    record = {
        **record_header(
            "the engine step with the vocabulary stage as a CUDA graph replay vs launched eagerly"
        ),
        "runs": [],
    }
    model = build_model(ModelConfig.from_dict(release_config_dict()), None, torch.bfloat16)
    with torch.inference_mode():
        record["median_step_ms"] = alternated_steps(
            [int(c) for c in args.canvases.split(",")],
            args.rounds,
            [
                ("graph", True, lambda n: step_ms(model, n, True)),
                ("eager", False, lambda n: step_ms(model, n, False)),
            ],
            field="graph",
            runs=record["runs"],
            save=lambda: Path(args.json).write_text(json.dumps(record, indent=1)),
        )
    print(json.dumps(record["median_step_ms"]), flush=True)
    Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
