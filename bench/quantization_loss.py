"""What FP8 experts cost the embedded default model in loss: the training objective's diffusion and
encoder losses of the unquantized and the quantized model ("fp8", "fp8-w8a8") on the same Python text
and the same noise.

    python bench/quantization_loss.py [--chunks 64] [--json OUT]

The text is the standard library of the running Python (sorted files, every k-th, the first 512 tokens
of each). The training corpus drew on a standard library too (another Python's), so these are not
held-out losses: the difference between the two models is what this measures. float32 on the CPU (the
pure-torch path: the quantized weights dequantized, exactly what the kernels compute).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.presets import DEFAULT_MODEL_DIR
from dgemma.text.tokenizer import Tokenizer
from dgemma.train.objective import Example, ObjectiveConfig, compute_loss, make_batch

CHUNK = 512
BATCH = 8


def chunks(tokenizer: Tokenizer, bos: int, count: int) -> list[Example]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out: list[Example] = []
    for path in files[:: max(1, len(files) // count)]:
        ids = tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
        if len(ids) >= CHUNK:
            out.append(
                Example(token_ids=(bos, *ids[: CHUNK - 1]), response_start=1, loss_start=1, random_start=True)
            )
        if len(out) == count:
            break
    return out


def losses(model: DiffusionGemma, examples: list[Example], pad_id: int) -> dict:
    generator = torch.Generator().manual_seed(0)  # the same canvases, noise and self-conditioning draws
    diffusion = encoder = 0.0
    with torch.inference_mode():
        for lo in range(0, len(examples), BATCH):
            batch = make_batch(examples[lo : lo + BATCH], model.config.canvas_length, pad_id, generator)
            parts = compute_loss(model, batch, ObjectiveConfig(), generator)
            diffusion += float(parts.diffusion) * len(batch.canvas_BC)
            encoder += float(parts.encoder) * len(batch.canvas_BC)
    return {"diffusion": round(diffusion / len(examples), 4), "encoder": round(encoder / len(examples), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    plain = DiffusionGemma.from_pretrained(DEFAULT_MODEL_DIR, device="cpu", dtype=torch.float32)
    config = plain.config
    examples = chunks(Tokenizer.from_checkpoint(DEFAULT_MODEL_DIR), config.bos_token_id, args.chunks)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    record = {
        "model": "dgemma/default_model (float32, CPU)",
        "text": f"{len(examples)} chunks of {CHUNK} tokens from {sysconfig.get_paths()['stdlib']}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "unquantized": losses(plain, examples, pad),
        "fp8": losses(plain.quantize("fp8"), examples, pad),
        "fp8-w8a8": losses(plain.quantize("fp8-w8a8"), examples, pad),  # the same FP8 weights
    }
    print(json.dumps(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
