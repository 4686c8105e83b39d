"""Regenerate tests/golden/generate.json: seeded outputs of the tiny checkpoint (tests/fixtures.py).

Run `python tests/make_golden.py` after a deliberate change of generation behaviour, and say why in the
commit. Never edit the JSON by hand. `--check` compares instead of writing (exit status 1 on a
difference): the goldens must hold on any CPU, so check them on a new kind of machine with it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
GOLDEN = HERE / "golden" / "generate.json"

CASES = [
    {"prompt": "def add(a, b):", "params": {"seed": 0, "max_new_tokens": 40}},
    {"prompt": "def add(a, b):", "params": {"seed": 1, "max_new_tokens": 40}},
    {"prompt": "The quick brown fox", "params": {"seed": 7, "max_new_tokens": 21, "max_denoising_steps": 4}},
    {"prompt": [{"role": "user", "content": "hi"}], "params": {"seed": 3, "max_new_tokens": 48}},
    {
        "prompt": "import os",
        "params": {"seed": 5, "max_new_tokens": 32, "sampler": "confidence", "confidence": 0.5},
    },
    {
        "prompt": "for i in",
        "params": {"seed": 11, "max_new_tokens": 50, "confidence_threshold": 8.0, "stability_threshold": 0},
    },
]


def generate_cases(llm) -> list[dict]:
    from dgemma import SamplingParams

    results = []
    for case in CASES:
        out = llm.generate(case["prompt"], SamplingParams(**case["params"]))[0]
        results.append({**case, "expected": {**out.to_dict(), "seconds": None, "tokens_per_forward": None}})
    return results


def main() -> int:
    sys.path.insert(0, str(HERE))
    from fixtures import write_tiny_checkpoint

    from dgemma import LLM

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(write_tiny_checkpoint(Path(tmp) / "tiny"), device="cpu")
        results = generate_cases(llm)
    if "--check" in sys.argv[1:]:
        golden = json.loads(GOLDEN.read_text())
        differ = [i for i, (a, b) in enumerate(zip(results, golden)) if a["expected"] != b["expected"]]
        print(f"{len(results) - len(differ)} of {len(results)} cases equal {GOLDEN.name}; differ: {differ}")
        return 1 if differ or len(results) != len(golden) else 0
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(results)} cases to {GOLDEN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
