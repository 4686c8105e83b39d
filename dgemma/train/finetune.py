"""`dgemma finetune`: full or LoRA fine-tuning of a checkpoint on a JSONL file, end to end.

Reads the checkpoint (weights, tokenizer, chat template, generation config), the data (`{"text": ...}`
records for continuation, `{"messages": [...]}` for chat SFT through the template, `{"prompt": ...,
"completion": ...}` for plain-text completion SFT; malformed lines are
reported by file:line and skipped), holds out an eval split, trains with `Trainer` (atomic checkpoints
in OUT/trainer_state, exact `--resume`), and writes:

- full fine-tuning: OUT/model, a checkpoint in the HF layout;
- LoRA: OUT/adapter (PEFT layout) and OUT/model, the adapters merged into the base weights.

Both model directories carry the base checkpoint's tokenizer, chat template and generation config, so
they load in dgemma (and in transformers) as they are.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from dgemma.errors import ConfigError, DataError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.weights import (
    checkpoint_files,
    default_device_and_dtype,
    resolve_checkpoint,
    save_checkpoint,
)
from dgemma.params import DiffusionDefaults
from dgemma.text.chat import ChatTemplate
from dgemma.text.tokenizer import Tokenizer
from dgemma.train.data import TokenIds, load_examples
from dgemma.train.loop import STATE_DIR, TrainConfig, Trainer
from dgemma.train.lora import LoraAdapters, LoraConfig

logger = logging.getLogger(__name__)
# files of the base checkpoint that travel with the fine-tuned weights
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    model: str
    data: Path
    out: Path
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # None: full fine-tuning
    train: TrainConfig | None = None  # max_steps may be left to `epochs`
    epochs: float | None = None
    eval_data: Path | None = None
    eval_split: float = 0.05
    max_length: int = 1024
    device: str | None = None
    resume: bool = False


def plan_steps(epochs: float, examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * examples / (batch_size * grad_accum)))


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share of the examples (at least one when there are two or more)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"eval split must be in [0, 1), got {fraction}")
    count = 0 if fraction == 0 or len(examples) < 2 else max(1, round(fraction * len(examples)))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def finetune(options: FinetuneOptions, *, progress: bool = False, on_log=None) -> dict:
    """Run the whole job; returns a summary (steps, first and last eval losses, output paths)."""
    started = time.perf_counter()
    source = resolve_checkpoint(options.model)
    device, _ = default_device_and_dtype(options.device, None)
    # fp32 master weights everywhere; on GPU the loop runs the forward in bf16 autocast
    model = DiffusionGemma.from_pretrained(source, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_checkpoint(source)
    if tokenizer is None:
        raise ConfigError(f"{source}: no tokenizer.json; fine-tuning needs the checkpoint's tokenizer")
    template = ChatTemplate.from_checkpoint(source)
    defaults = DiffusionDefaults.from_checkpoint(source, model.config.eos_token_ids)
    config = model.config
    if config.bos_token_id is None:
        raise ConfigError(f"{source}: config.json has no bos_token_id")
    ids = TokenIds(bos=config.bos_token_id, eos=defaults.eos_token_ids[0], stop=defaults.eos_token_ids)
    max_length = min(options.max_length, config.max_position_embeddings)

    def load(path: Path) -> list:
        return load_examples([path], tokenizer=tokenizer, template=template, ids=ids, max_length=max_length)

    examples = load(options.data)
    base = options.train or TrainConfig(max_steps=1)
    if options.eval_data is not None:
        train, held_out = examples, load(options.eval_data)
    else:
        train, held_out = split_examples(examples, options.eval_split, base.seed)
    if not train:
        raise DataError(f"{options.data}: no training examples left after the eval split")
    max_steps = base.max_steps
    if options.epochs is not None:
        max_steps = plan_steps(options.epochs, len(train), base.batch_size, base.grad_accum)
    train_config = replace(
        base,
        max_steps=max_steps,
        freeze_router=base.freeze_router if options.lora is None else True,
        warmup_steps=min(base.warmup_steps, max(0, max_steps // 10)),
    )
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    if options.resume:
        _check_resumable(out, train_config, options.lora)
    elif (out / STATE_DIR).exists():
        raise ConfigError(f"{out / STATE_DIR} exists: pass --resume to continue that run, or another --out")
    adapters = None if options.lora is None else LoraAdapters(model, options.lora, seed=base.seed)
    n_tokens = sum(len(e.token_ids) for e in train)
    logger.info(
        "fine-tuning %s (%s) on %d examples (%d tokens), %d held out; %d steps",
        source, "LoRA" if adapters else "full", len(train), n_tokens, len(held_out), max_steps,
    )  # fmt: skip
    (out / "finetune_config.json").write_text(
        json.dumps(
            {
                "model": str(options.model),
                "data": str(options.data),
                "lora": None if options.lora is None else asdict(options.lora),
                "train": asdict(train_config),
            },
            indent=2,
            default=str,
        )
    )
    trainer = Trainer(
        model, train, held_out, train_config, out, pad_id=config.pad_token_id or 0, on_log=on_log,
        adapters=adapters,
    )  # fmt: skip
    trainer.run(resume=options.resume, progress=progress)

    outputs = {}
    if adapters is not None:
        outputs["adapter"] = str(adapters.save(out / "adapter"))
        adapters.merge()
        adapters.detach()
    outputs["model"] = str(save_checkpoint(model, out / "model", dtype=_stored_dtype(source)))
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / "model" / name)
    evals = [r for r in trainer.history if "eval_diffusion" in r]
    summary = {
        "steps": trainer.step,
        "examples": {"train": len(train), "eval": len(held_out)},
        "first_eval": evals[0] if evals else None,
        "last_eval": evals[-1] if evals else None,
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "outputs": outputs,
    }
    (out / "finetune_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stored_dtype(directory: Path) -> torch.dtype:
    """The dtype the base checkpoint stores its weights in (the fine-tuned one is written alike)."""
    with safe_open(str(checkpoint_files(directory)[0]), framework="pt", device="cpu") as handle:
        name = next(iter(handle.keys()))
        stored = handle.get_slice(name).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def _check_resumable(out: Path, config: TrainConfig, lora: LoraConfig | None) -> None:
    saved_path = out / "finetune_config.json"
    if not (out / STATE_DIR / "trainer.json").exists() or not saved_path.exists():
        raise ConfigError(f"{out}: nothing to resume (no {STATE_DIR}/trainer.json)")
    saved = json.loads(saved_path.read_text())
    now = {"lora": None if lora is None else asdict(lora), "train": asdict(config)}
    now = json.loads(json.dumps(now, default=str))
    for key in ("lora", "train"):
        if saved[key] != now[key]:
            changed = sorted(
                k for k in set(saved[key] or {}) | set(now[key] or {})
                if (saved[key] or {}).get(k) != (now[key] or {}).get(k)
            )  # fmt: skip
            raise ConfigError(
                f"--resume needs the options of the interrupted run; these differ: {changed or key}"
            )
