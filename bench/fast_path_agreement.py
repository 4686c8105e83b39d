"""Seeded generations of the embedded default model: GPU fast path vs GPU pure-torch path.

    python bench/fast_path_agreement.py [--json OUT] [--quantization fp8]

The fast path is the engine's default on CUDA (Triton expert kernels, denoise replayed from CUDA graphs,
static-shape attention); the pure-torch path is the executable spec (expert loop, row-by-row
attention, eager). Same weights (bfloat16 and float32), same seeds, same sampler: where the numerics
allow, the tokens are identical. Reports the share of prompts whose answers are identical and the
share of token positions that agree. With `--quantization`, both paths run the quantized experts, and
the fast path's answers are also compared with the unquantized model's (what quantizing changes), with
how many of each complete a function that parses. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma import LLM, SamplingParams
from dgemma.bench import record_header
from dgemma.engine.generate import Engine, Request
from dgemma.model.presets import QUANTIZATIONS
from dgemma.outputs import GenerationOutput

PROMPTS = [
    "def fibonacci(n):",
    'def read_lines(path):\n    """Return the lines of a text file without newlines."""\n',
    "class Stack:\n    def __init__(self):",
    "def is_prime(n: int) -> bool:",
    "import os\n\ndef list_python_files(root):",
    'def merge_sorted(a, b):\n    """Merge two sorted lists."""\n',
    "def parse_args(argv=None):",
    "def flatten(nested):",
    "def chunks(items, size):",
    'def word_count(text):\n    """Count each word in text."""\n',
    "class Vector:\n    def __init__(self, x, y):",
    "def gcd(a, b):",
]


def generate(llm: LLM, *, graphs: bool, kernels: bool) -> list[tuple[int, ...]]:
    llm.model.use_kernels = kernels
    requests = [
        Request(
            index=i,
            prompt_ids=tuple(llm.tokenize(p)),
            params=SamplingParams(seed=i, max_new_tokens=128).resolve(llm.defaults),
        )
        for i, p in enumerate(PROMPTS)
    ]
    outputs = {}
    # one request at a time: batch composition is not what is compared here
    for request in requests:
        engine = Engine(llm.model, slots=1, max_length=2048, decode=llm._decode, graphs=graphs)
        engine.submit(request)
        while engine.busy:
            for event in engine.step():
                if isinstance(event, GenerationOutput):
                    outputs[event.index] = event.token_ids
    llm.model.use_kernels = True
    return [outputs[i] for i in range(len(requests))]


def compare(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> dict:
    same_answers = sum(x == y for x, y in zip(a, b))
    positions = sum(max(len(x), len(y)) for x, y in zip(a, b))
    agree = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    return {"identical_answers": f"{same_answers}/{len(a)}", "token_agreement": round(agree / positions, 4)}


def parsed(llm: LLM, answers: list[tuple[int, ...]]) -> str:
    """How many answers complete their function so that it parses (scripts/eval_default_model.py's test)."""
    from scripts.eval_default_model import function_source, parses

    ok = sum(parses(function_source(p, llm._decode(list(a)))) for p, a in zip(PROMPTS, answers))
    return f"{ok}/{len(answers)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    args = parser.parse_args()
    record = {
        **record_header("seeded answers of the embedded model: fast path vs pure torch"),
        "prompts": len(PROMPTS),
    }
    record["quantization"] = args.quantization
    for dtype in (torch.bfloat16, torch.float32):
        llm = LLM(device="cuda", dtype=dtype, quantization=args.quantization)
        fast = generate(llm, graphs=True, kernels=True)
        pure = generate(llm, graphs=False, kernels=False)
        again = generate(llm, graphs=True, kernels=True)
        name = str(dtype).removeprefix("torch.")
        record[name] = {**compare(fast, pure), "fast_path_repeatable": fast == again}
        if args.quantization is not None:
            plain = generate(LLM(device="cuda", dtype=dtype), graphs=True, kernels=True)
            record[name]["vs_unquantized"] = compare(fast, plain)
            record[name]["functions_that_parse"] = {
                "quantized": parsed(llm, fast),
                "unquantized": parsed(llm, plain),
            }
        print(name, record[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
