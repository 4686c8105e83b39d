"""The embedded default model: shipped whole, of the DiffusionGemma family, and usable on CPU."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert out.finish_reason == "stop"  # it ends the function with an EOS
    budget = llm.defaults.max_denoising_steps
    assert budget <= 10 and out.stats.steps_per_canvas[0] <= budget  # its generation config's
    # a body, and Python (the model's quality is measured in docs/benchmarks.md, not here)
    assert out.text.startswith("    ")
    ast.parse(prompt + out.text)
    # a whole canvas (no EOS): 64 tokens within the step budget
    full = llm.generate(prompt, SamplingParams(max_new_tokens=64, seed=0, ignore_eos=True))[0]
    assert full.stats.completion_tokens == 64 and full.stats.tokens_per_forward >= 64 / budget


def test_a_pad_ends_an_answer_as_the_eos_does():
    """Trained with supervised padding, the model writes pads after an answer, and sometimes a pad with
    no EOS before it (a bare signature's drifting docstring, here): its generation config lists the
    pad among the ids that end an answer, so no pad is ever part of one, and the answer stops there
    instead of running on to the token budget."""
    llm = LLM(device="cpu")
    pad = llm.model.config.pad_token_id
    assert pad in llm.defaults.eos_token_ids
    out = llm.generate("def fibonacci(n):", SamplingParams(seed=0))[0]
    assert out.finish_reason == "stop" and out.stats.completion_tokens < 256
    assert pad not in out.token_ids and llm.defaults.eos_token_ids[0] not in out.token_ids


def test_the_evaluation_cuts_at_the_function_end_and_counts_code_apart_from_docstrings():
    """scripts/eval_default_model.py, whose parse and code rates the model card reports."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "eval_default_model.py"
    spec = importlib.util.spec_from_file_location("eval_default_model", path)
    evaluation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluation)
    prompt = 'def f(x):\n    """Doc."""\n'
    source = evaluation.function_source(prompt, "    return x + 1\nprint(f(2))\n")
    assert source == prompt + "    return x + 1\n"  # cut where the function ends
    assert evaluation.parses(source) and evaluation.adds_code(source)
    assert evaluation.function_source(prompt, "\n") is None and not evaluation.parses(None)
    assert not evaluation.parses(evaluation.function_source(prompt, "    return (x\n"))
    docstring_only = evaluation.function_source("def g(y):\n", '    """Only a docstring."""\n')
    assert evaluation.parses(docstring_only) and not evaluation.adds_code(docstring_only)


def test_static_forwards_and_the_fused_commit_give_the_eager_answers():
    """The GPU's forwards (static shapes, batches padded with the scratch row, each finished canvas
    encoded in the same forward as the next canvas's first step, prompts admitted together encoded in
    one padded forward), run uncaptured on the CPU, give the reference path's tokens, fused or not,
    with requests joining at different steps. (A trained model:
    a random one's near-uniform distributions turn float32 rounding into different samples.)"""
    from dgemma.engine.generate import Engine
    from dgemma.outputs import GenerationOutput

    llm = LLM(device="cpu")
    prompts = ["def mean(xs):\n", "class Stack:\n    def push(self, item):\n", "import os\n\n\ndef walk("]
    params = [SamplingParams(max_new_tokens=70, seed=5 + i, ignore_eos=True) for i in range(3)]
    reqs = llm._requests(prompts, params, drafts=False, enable_thinking=False)[0]

    def answers(**kwargs):
        engine = Engine(llm.model, slots=3, max_length=256, decode=llm._decode, **kwargs)
        engine.submit(reqs[0])
        for _ in range(2):  # the others join two steps in: their canvases commit at other steps
            engine.step()
        for r in reqs[1:]:
            engine.submit(r)
        outputs = {}
        while engine.busy:
            outputs.update((e.index, e.token_ids) for e in engine.step() if isinstance(e, GenerationOutput))
        assert not any(engine.cache.lengths())
        return outputs

    eager = answers()
    assert sorted(eager) == [0, 1, 2] and all(len(ids) == 70 for ids in eager.values())  # one commit each
    assert answers(graphs=False, static=True) == eager
    assert answers(graphs=False, static=True, fuse_commit=False) == eager
    # the two prompts admitted together encoded in one padded forward, as on the GPU
    assert answers(graphs=False, static=True, prefill_tokens=4096) == eager


def test_the_readme_first_command_runs_as_written(tmp_path):
    """The README's first command, after its install step, through a POSIX shell: it must run on the
    embedded model and print a function body (the installed `dgemma` script, or the module if absent)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first = re.search(r"```bash\n#[^\n]*\n([^\n]+)\n", readme).group(1)
    install, _, command = first.partition(" && ")
    assert install == "pip install -e ." and "dgemma generate" in command
    if shutil.which("dgemma") is None:  # not installed as a script: the same entry point
        command = command.replace("dgemma generate", f"{sys.executable} -m dgemma.cli generate")
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("    ") and proc.stdout.strip()
