"""Build the Python code corpus of the embedded default model from openly licensed source on this machine.

Sources: the Python standard library (PSF License) and installed distributions whose metadata declares a
permissive license (MIT, BSD, Apache, PSF, ISC). Every file is read as UTF-8, parsed with `ast` (files
that do not parse are dropped), deduplicated by content, and assigned to train or held-out by a hash of
its content (so the split does not depend on the machine's file order). Each top-level function and
class of a training file is also written as a record of its own, so that completing a definition from
its first line (how the model is used) is in the training distribution, not only whole files. The 50
signature prompts (signature + docstring of a function) come from held-out files only.

    python scripts/build_corpus.py OUT_DIR [--max-files N] [--prompts 50]

Writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl ({"text", "source", "license"} per line),
OUT_DIR/prompts.jsonl ({"prompt", "source"}) and OUT_DIR/manifest.json (counts and licenses).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as md
import json
import random
import re
import sysconfig
from pathlib import Path

# whole words only: "mit" must not match "permitted"
PERMISSIVE = re.compile(r"\b(mit|bsd|apache|psf|isc)\b|python software foundation")
HELDOUT_SHARE = 0.03
MIN_BYTES, MAX_BYTES = 300, 60_000


def license_of(dist: md.Distribution) -> str | None:
    meta = dist.metadata
    texts = [meta.get("License-Expression") or "", (meta.get("License") or "")[:200]]
    texts += [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    match = PERMISSIVE.search(" ".join(texts).lower())
    return None if match is None else match.group(0)


def sources() -> list[tuple[Path, str, str]]:
    """(file, source label, license) for the stdlib and permissively licensed distributions."""
    out = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" not in path.parts and "test" not in path.parts[len(stdlib.parts) :][:1]:
            out.append((path, f"stdlib/{path.relative_to(stdlib)}", "PSF-2.0"))
    for dist in md.distributions():
        name = dist.metadata.get("Name") or "?"
        lic = license_of(dist)
        if lic is None:
            continue
        for file in dist.files or []:
            if file.suffix == ".py":
                out.append((Path(dist.locate_file(file)), f"{name}/{file}", lic))
    return out


def definitions(tree: ast.Module, text: str) -> list[tuple[str, str]]:
    """(name, source) of each top-level function and class, decorators included."""
    lines = text.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            segment = "".join(lines[first - 1 : node.end_lineno])
            if 150 <= len(segment) <= 8000:
                out.append((node.name, segment))
    return out


def function_prompts(tree: ast.Module, text: str, *, docstring: bool = True):
    """(name, prompt) of each top-level undecorated function with a body beyond its docstring: the
    signature line(s) and the docstring, or (docstring=False) the signature alone of functions without
    one. The prompts a code-completion model is asked to continue."""
    lines = text.splitlines(keepends=True)
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
            continue
        has_doc = ast.get_docstring(node) is not None
        if has_doc != docstring or (has_doc and len(node.body) < 2):
            continue
        end = node.body[0].end_lineno if has_doc else node.body[0].lineno - 1
        prompt = "".join(lines[node.lineno - 1 : end])
        if 40 < len(prompt) < 1200 and prompt.endswith("\n"):
            yield node.name, prompt


def signature_prompt(tree: ast.Module, text: str) -> str | None:
    """The first function's signature line(s) and docstring, as an evaluation prompt."""
    return next((prompt for _, prompt in function_prompts(tree, text)), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    seen: set[str] = set()
    counts = {"train": 0, "heldout": 0, "definitions": 0, "bytes": 0}
    licenses: dict[str, int] = {}
    candidates: list[tuple[str, str]] = []
    with open(args.out / "train.jsonl", "w") as train, open(args.out / "heldout.jsonl", "w") as heldout:
        for path, label, lic in sources():
            try:
                data = path.read_bytes()
                text = data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not MIN_BYTES <= len(data) <= MAX_BYTES:
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                continue
            try:
                tree = ast.parse(text)
            except (SyntaxError, ValueError, RecursionError):
                continue
            seen.add(digest)
            split = "heldout" if int(digest[:8], 16) / 16**8 < HELDOUT_SHARE else "train"
            record = json.dumps({"text": text, "source": label, "license": lic})
            (heldout if split == "heldout" else train).write(record + "\n")
            if split == "train":
                for name, segment in definitions(tree, text):
                    train.write(
                        json.dumps({"text": segment, "source": f"{label}::{name}", "license": lic}) + "\n"
                    )
                    counts["definitions"] += 1
            counts[split] += 1
            counts["bytes"] += len(data)
            licenses[lic] = licenses.get(lic, 0) + 1
            if split == "heldout":
                prompt = signature_prompt(tree, text)
                if prompt:
                    candidates.append((prompt, label))
            if args.max_files and counts["train"] + counts["heldout"] >= args.max_files:
                break
    random.Random(0).shuffle(candidates)
    with open(args.out / "prompts.jsonl", "w") as f:
        for prompt, label in candidates[: args.prompts]:
            f.write(json.dumps({"prompt": prompt, "source": label}) + "\n")
    manifest = {**counts, "prompts": min(len(candidates), args.prompts), "licenses": licenses}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
