"""Write function-completion training data for the default model: the model's own answers.

    python scripts/build_completion_data.py MODEL_DIR CORPUS_DIR OUT.jsonl [--max-prompts N] \
        [--teacher autoregressive|diffusion] [--max-steps N] [--also-without-newline]

Sequence-level knowledge distillation (Kim & Rush 2016, arXiv 1606.07947), the standard cure for the
incoherent text of parallel (non-autoregressive) decoders (Gu et al. 2018, arXiv 1711.02281): a parallel
decoder trained on real text must spread its bets over the many ways a function can be written, and
committing many tokens at once mixes those ways; trained on one deterministic teacher's outputs it has
one way to learn. The teacher here is the same weights decoding greedily through the encoder path (the
encoder loss makes them an autoregressive model), so no other model is involved. With `--teacher
diffusion` the teacher is instead the model's own denoiser with its generation config (seeded per
prompt; `--max-steps` gives it more denoise steps per canvas than the config's, for better answers):
answers the denoiser itself reaches, to sharpen it on them.

Prompts are the top-level functions of the corpus's *training* files (signature and docstring, or the
signature alone), never the held-out files the evaluation prompts come from. A teacher answer is kept
when the function ends within the token budget (a line back at column 0, or an EOS) and the function
then parses with `ast.parse`; the record is `{"prompt", "completion", "source"}`, the completion being
the function's body, which `dgemma.train.data` turns into canvases aligned to the prompt's end, with an
EOS after the body. `--also-without-newline` writes each kept answer a second time with the prompt's
final newline moved to the start of the completion: the same text and tokens (newlines are tokens of
their own), the canvases starting one token earlier, as they do when a prompt comes without its
trailing newline (a prompt passed as `"$(cat file.py)"` loses it). Ends with one JSON line of counts.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_corpus import function_prompts
from eval_default_model import function_end, parses

from dgemma import LLM, SamplingParams
from dgemma.engine.autoregressive import generate_autoregressive_batch


def training_prompts(corpus: Path, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, source) from whole training files (not their per-definition records), deduplicated."""
    seen, out = set(), []
    with open(corpus / "train.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "::" in record["source"]:
                continue  # a definition record: its function is also in the file's record
            text = record["text"]
            tree = ast.parse(text)
            for docstring in (True, False):
                for name, prompt in function_prompts(tree, text, docstring=docstring):
                    if prompt not in seen:
                        seen.add(prompt)
                        out.append((prompt, f"{record['source']}::{name}"))
            if limit and len(out) >= limit:
                return out[:limit]
    return out


def function_body(completion: str, ended_by_eos: bool) -> str | None:
    """The completion up to the first line back at column 0, or None when the function does not end
    within it (the budget ran out first) or adds no body."""
    body, ended = function_end(completion)
    text = body.rstrip() + "\n"
    return text if (ended or ended_by_eos) and text.strip() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--teacher", choices=["autoregressive", "diffusion"], default="autoregressive")
    parser.add_argument("--max-steps", type=int, default=None, help="diffusion teacher: steps per canvas")
    parser.add_argument(
        "--also-without-newline", action="store_true",
        help="also write each answer with the prompt's final newline moved into the completion",
    )  # fmt: skip
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and args.teacher == "autoregressive" else torch.float32
    llm = LLM(args.model, device=device, dtype=dtype)
    eos = llm.defaults.eos_token_ids
    t0 = time.perf_counter()
    prompts = training_prompts(args.corpus, args.max_prompts)
    ids = [llm.tokenize(p) for p, _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # similar lengths batch together
    kept = unended = unparsed = 0
    with open(args.out, "w") as out:
        for n, start in enumerate(range(0, len(order), args.batch_size)):
            chunk = order[start : start + args.batch_size]
            if args.teacher == "diffusion":
                params = [
                    SamplingParams(
                        max_new_tokens=args.max_new_tokens, max_denoising_steps=args.max_steps, seed=i
                    )
                    for i in chunk
                ]
                outs = llm.generate([prompts[i][0] for i in chunk], params)
                answers = [list(o.token_ids) for o in outs]
                ended = [o.finish_reason == "stop" for o in outs]
            else:
                answers = generate_autoregressive_batch(
                    llm.model, [ids[i] for i in chunk], max_new_tokens=args.max_new_tokens, eos_token_ids=eos
                )
                ended = [len(a) < args.max_new_tokens for a in answers]
            for i, answer, by_eos in zip(chunk, answers, ended):
                prompt, source = prompts[i]
                body = function_body(llm.tokenizer.decode(answer), by_eos)
                if body is None:
                    unended += 1
                elif not parses(prompt + body):
                    unparsed += 1
                else:
                    kept += 1
                    out.write(json.dumps({"prompt": prompt, "completion": body, "source": source}) + "\n")
                    if args.also_without_newline and prompt.endswith("\n"):
                        record = {"prompt": prompt[:-1], "completion": "\n" + body, "source": source}
                        out.write(json.dumps(record) + "\n")
            out.flush()  # a run stopped early keeps every batch it finished
            print(f"batch {n + 1}: {start + len(chunk)}/{len(order)} prompts, {kept} kept "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps({
        "prompts": len(prompts), "kept": kept, "unended": unended, "unparsed": unparsed,
        "seconds": round(time.perf_counter() - t0, 1), "device": device, "teacher": args.teacher,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
