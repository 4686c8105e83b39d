"""Measure a code-completion checkpoint on held-out signature prompts (prompts.jsonl of build_corpus.py).

    python scripts/eval_default_model.py MODEL_DIR PROMPTS.jsonl [--entropy-bounds 0.5 1.0] \
        [--max-steps 12 16] [--temperatures 0.8,0.4 0.5,0.2] [--confidence-thresholds 0.005 0.05] [--ar]

For each prompt (a function's signature and docstring) the model completes up to 128 tokens; the
completion is cut at the end of the function (its first top-level line) and counted as valid when it
adds at least one body line and the whole parses with `ast.parse` (and, stricter, when the body then
holds a statement besides docstrings: a bare signature's answer may be a docstring alone). Reports parse
rate, code rate, mean denoise steps per canvas, tokens per forward (over the whole set, and the median
of the answers' own ratios, as `dgemma generate --json` reports one answer), the share of answers
ending with EOS and tokens per second with the default sampler at each entropy bound, and (`--ar`) the
same weights decoding autoregressively through the encoder path. `--max-new-tokens 0` lifts the cap,
as `dgemma generate` runs. Seeds are the prompt indices (plus `--seed-offset`), so runs are
reproducible. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma import LLM, SamplingParams
from dgemma.engine.autoregressive import generate_autoregressive


def function_end(completion: str) -> tuple[str, bool]:
    """(the completion up to the end of the function: its first line back at column 0, whether such a
    line came, i.e. the function ended within the completion)."""
    body = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            return "".join(body), True
        body.append(line)
    return "".join(body), False


def function_source(prompt: str, completion: str) -> str | None:
    """The prompt plus the completion up to the end of the function, or None if it adds no body."""
    body, _ = function_end(completion)
    if not body.strip():
        return None  # a docstring-only function parses, but nothing was completed
    return prompt + body


def syntax_tree(source: str | None) -> ast.Module | None:
    """The parsed source, or None if there is none or it does not parse."""
    if source is None:
        return None
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return None


def parses(source: str | None) -> bool:
    return syntax_tree(source) is not None


def adds_code(source: str | None) -> bool:
    """Whether the function parses and its body holds a statement besides string literals: the stricter
    count, since a bare signature's answer may be a docstring alone, which parses."""
    tree = syntax_tree(source)
    if tree is None:
        return False
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return bool(functions) and any(
        not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))
        for s in functions[0].body
    )


def evaluate(
    llm: LLM,
    prompts: list[str],
    bound: float | None,
    max_steps: int | None,
    max_new_tokens: int | None,
    temperatures: tuple[float, float] | None = None,
    confidence_threshold: float | None = None,
    stability_threshold: int | None = None,
    seed_offset: int = 0,
) -> dict:
    ok = code = steps = canvases = tokens = ended = 0
    seconds = 0.0
    per_answer = []
    t_max, t_min = temperatures or (llm.defaults.t_max, llm.defaults.t_min)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            entropy_bound=bound,
            max_denoising_steps=max_steps,
            t_max=t_max,
            t_min=t_min,
            confidence_threshold=confidence_threshold,
            stability_threshold=stability_threshold,
            seed=seed_offset + i,
        )
        out = llm.generate(prompt, params)[0]
        source = function_source(prompt, out.text)
        ok += parses(source)
        code += adds_code(source)
        steps += out.stats.denoise_steps
        canvases += len(out.stats.steps_per_canvas)
        tokens += out.stats.completion_tokens
        seconds += out.stats.seconds
        ended += out.finish_reason == "stop"
        per_answer.append(out.stats.completion_tokens / out.stats.denoise_steps)
    return {
        "entropy_bound": bound or llm.defaults.entropy_bound,
        "max_denoising_steps": max_steps or llm.defaults.max_denoising_steps,
        "t_max": t_max,
        "t_min": t_min,
        "confidence_threshold": confidence_threshold or llm.defaults.confidence_threshold,
        "stability_threshold": (
            llm.defaults.stability_threshold if stability_threshold is None else stability_threshold
        ),
        "parse_rate": ok / len(prompts),
        "code_rate": code / len(prompts),  # parses and adds a statement besides docstrings
        "steps_per_canvas": steps / canvases,
        "tokens_per_forward": tokens / steps,
        # what `dgemma generate --json` reports, one answer at a time: low for one-line answers
        "tokens_per_forward_per_answer_median": statistics.median(per_answer),
        "ended_with_eos": ended / len(prompts),
        "tokens_per_s": tokens / seconds,
        "seconds_per_prompt": seconds / len(prompts),
    }


def evaluate_ar(llm: LLM, prompts: list[str], max_new_tokens: int) -> dict:
    ok = tokens = 0
    seconds = 0.0
    for prompt in prompts:
        t = time.perf_counter()
        ids = generate_autoregressive(
            llm.model,
            llm.tokenize(prompt),
            max_new_tokens=max_new_tokens,
            eos_token_ids=llm.defaults.eos_token_ids,
        )
        seconds += time.perf_counter() - t
        tokens += len(ids)
        ok += parses(function_source(prompt, llm.tokenizer.decode(ids)))
    return {
        "parse_rate": ok / len(prompts),
        "tokens_per_s": tokens / seconds,
        "seconds_per_prompt": seconds / len(prompts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("prompts", type=Path)
    parser.add_argument(
        "--entropy-bounds",
        type=float,
        nargs="+",
        default=[0.0],
        help="entropy bounds to try (0: the model's)",
    )
    parser.add_argument(
        "--max-steps", type=int, nargs="+", default=[0], help="max denoise steps per canvas (0: the model's)"
    )
    parser.add_argument(
        "--temperatures",
        nargs="+",
        default=[None],
        metavar="T_MAX,T_MIN",
        help="temperature schedules to try, e.g. 0.8,0.4 (default: the model's)",
    )
    parser.add_argument(
        "--confidence-thresholds", type=float, nargs="+", default=[0.0],
        help="mean-entropy stop thresholds to try (0: the model's)",
    )  # fmt: skip
    parser.add_argument(
        "--stability-thresholds", type=int, nargs="+", default=[None],
        help="unchanged steps the stop rule needs, to try (default: the model's; 0 lets a canvas stop "
        "at its first step)",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="cap per answer (0: none, as `dgemma generate`)"
    )
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument(
        "--seed-offset", type=int, default=0,
        help="seeds are the prompt indices plus this: other samples of the same model",
    )  # fmt: skip
    parser.add_argument("--ar", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    llm = LLM(args.model, device=args.device)
    prompts = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines()][: args.limit]
    # one untimed answer first: the first call pays one-off setup (thread pools, lazy initialisation,
    # on the GPU kernel compilation) that would otherwise count against the first configuration's speed
    llm.generate(prompts[0], SamplingParams(max_new_tokens=8, seed=0))
    result = {
        "prompts": len(prompts),
        "seed_offset": args.seed_offset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "diffusion": [],
    }
    cap = args.max_new_tokens or None
    schedules = [None if t is None else tuple(map(float, t.split(","))) for t in args.temperatures]
    grid = itertools.product(
        args.max_steps, schedules, args.entropy_bounds, args.confidence_thresholds, args.stability_thresholds
    )  # in this order, the last varying fastest
    for max_steps, schedule, bound, threshold, stability in grid:
        run = evaluate(
            llm, prompts, bound or None, max_steps or None, cap, schedule, threshold or None, stability,
            args.seed_offset,
        )  # fmt: skip
        result["diffusion"].append(run)
        print(json.dumps(run), flush=True)
    if args.ar:
        result["autoregressive"] = evaluate_ar(llm, prompts, args.max_new_tokens or 2048)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
