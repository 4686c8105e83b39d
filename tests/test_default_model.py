"""The embedded default model: shipped whole, of the DiffusionGemma family, and usable on CPU."""

from __future__ import annotations

import json

from dgemma import LLM, SamplingParams
from dgemma.model.config import ModelConfig
from dgemma.model.presets import DEFAULT_MODEL_DIR


def test_the_files_fit_the_budget_and_describe_the_family():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "MODEL_CARD.md"):
        assert name in files
    assert sum(files.values()) <= 30 * 10**6
    assert all(size < 16 * 2**20 for size in files.values())
    config = ModelConfig.from_dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))
    kinds = {spec.window is None for spec in config.layers}
    assert kinds == {True, False}  # sliding and full layers
    assert config.num_experts >= 8 and 1 < config.top_k_experts < config.num_experts
    assert 8000 <= config.vocab_size <= 8192 + 16


def test_it_completes_python_on_cpu():
    llm = LLM(device="cpu")
    assert llm.path == DEFAULT_MODEL_DIR
    prompt = 'def add(a, b):\n    """Return the sum of a and b."""\n'
    out = llm.generate(prompt, SamplingParams(max_new_tokens=64, seed=0))[0]
    assert 0 < out.stats.completion_tokens <= 64
    assert out.stats.tokens_per_forward >= 4  # its generation config: at most 12 steps per 64-token canvas
    # the first body line is Python (the model's quality is measured in docs/benchmarks.md, not here)
    first = next(line for line in out.text.splitlines() if line.strip())
    assert first.startswith("    ")
