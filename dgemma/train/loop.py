"""The training loop: AdamW with linear warmup and cosine decay, gradient accumulation, periodic eval on
fixed batches, bf16 autocast on GPU (fp32 master weights), and atomic checkpoints that resume exactly.

Everything random (which examples, which canvas, noise levels, corruption, self-conditioning) comes from
one generator whose state is checkpointed with the weights and the optimizer, so a resumed run
continues with the same losses the uninterrupted run would have had. The model is trained in its
batched (not batch-invariant) mode. Written for one process; a distributed wrapper (FSDP2) can shard the
model and the optimizer from outside without changing this loop's contract.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dgemma.errors import ConfigError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.weights import atomic_write
from dgemma.train.lora import LoraAdapters
from dgemma.train.objective import Example, ObjectiveConfig, compute_loss, make_batch

logger = logging.getLogger(__name__)
STATE_DIR = "trainer_state"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    seed: int = 0
    freeze_router: bool = True  # the SFT recipe keeps the router frozen; training from scratch must not
    pad_to: int | None = None  # pad every batch to this length (fixed shapes; None: the batch's longest)
    canvases_per_example: int = 1  # target canvases drawn per example, sharing its encoder pass
    gradient_checkpointing: bool = False  # recompute the feed-forward blocks in backward (less memory)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "eval_batches",
                     "canvases_per_example"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


def trainable_parameters(model: DiffusionGemma, *, freeze_router: bool) -> list[torch.nn.Parameter]:
    params = []
    for name, param in model.named_parameters():
        train = "layer_scalar" not in name and not (freeze_router and ".router." in name)
        param.requires_grad_(train)
        if train:
            params.append(param)
    return params


class Trainer:
    def __init__(
        self,
        model: DiffusionGemma,
        train_examples: list[Example],
        eval_examples: list[Example],
        config: TrainConfig,
        out_dir: Path,
        *,
        pad_id: int,
        on_log: Callable[[dict], None] | None = None,
        adapters: LoraAdapters | None = None,
    ):
        """`adapters`: train these LoRA adapters only (the model's own weights stay frozen)."""
        if not train_examples:
            raise ConfigError("no training examples")
        self.model, self.config, self.out_dir = model, config, Path(out_dir)
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.pad_id = pad_id
        self.on_log = on_log
        self.adapters = adapters
        if adapters is None:
            params = trainable_parameters(model, freeze_router=config.freeze_router)
        else:
            model.requires_grad_(False)
            params = list(adapters.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, 0.95),
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history: list[dict] = []

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.out_dir / STATE_DIR

    def save(self) -> None:
        """Weights, optimizer, RNG and step, written under temporary names and renamed into place."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self._trained().state_dict().items()}
        atomic_write(self.state_dir / "model.safetensors", lambda p: save_file(weights, p))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "rng": self.generator.get_state(),
            "step": self.step,
        }
        atomic_write(self.state_dir / "optimizer.pt", lambda p: torch.save(state, p))
        meta = {"step": self.step, "config": asdict(self.config), "history": self.history}
        atomic_write(
            self.state_dir / "trainer.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1))
        )

    def load(self) -> None:
        """Continue from the last checkpoint in out_dir (weights, optimizer, RNG, step, history)."""
        if not (self.state_dir / "trainer.json").exists():
            raise ConfigError(f"{self.state_dir}: no checkpoint to resume from")
        weights = load_file(self.state_dir / "model.safetensors", device=str(self.model.device))
        try:
            self._trained().load_state_dict(weights)
        except RuntimeError as exc:  # full weights vs adapters, or another model
            raise ConfigError(f"{self.state_dir}: the checkpoint does not match this run ({exc})") from None
        # our own file: tensors and plain containers only (weights_only refuses anything that runs code)
        state = torch.load(self.state_dir / "optimizer.pt", map_location=self.model.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"].cpu())
        self.step = int(state["step"])
        self.history = json.loads((self.state_dir / "trainer.json").read_text())["history"]

    def _trained(self) -> torch.nn.Module:
        """What this run changes: the adapters, or the whole model."""
        return self.model if self.adapters is None else self.adapters

    # -- the loop ----------------------------------------------------------------------------------
    def _loss(self, examples: list[Example], generator: torch.Generator, *, evaluating: bool = False):
        # eval losses keep the recipe's mask (the EOS, not the pads), so runs with and without
        # supervise_padding compare
        batch = make_batch(
            examples,
            self.model.config.canvas_length,
            self.pad_id,
            generator,
            pad_to=self.config.pad_to,
            canvases_per_example=self.config.canvases_per_example,
            supervise_padding=self.config.objective.supervise_padding and not evaluating,
        )
        if self.model.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return compute_loss(self.model, batch, self.config.objective, generator)
        return compute_loss(self.model, batch, self.config.objective, generator)

    def evaluate(self) -> dict:
        """Mean losses on the same eval batches every time (their own generator)."""
        if not self.eval_examples:
            return {}
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        totals = {"eval_diffusion": 0.0, "eval_encoder": 0.0}
        size = min(self.config.batch_size, len(self.eval_examples))
        was_training = self.model.training
        self.model.eval()  # no adapter dropout
        with torch.no_grad():
            for i in range(self.config.eval_batches):
                chunk = [self.eval_examples[(i * size + j) % len(self.eval_examples)] for j in range(size)]
                parts = self._loss(chunk, generator, evaluating=True)
                totals["eval_diffusion"] += float(parts.diffusion) / self.config.eval_batches
                totals["eval_encoder"] += float(parts.encoder) / self.config.eval_batches
        self.model.train(was_training)
        return totals

    def run(
        self, *, resume: bool = False, progress: bool = False, stop_after: int | None = None
    ) -> list[dict]:
        """Train to `max_steps` (or stop after step `stop_after`, checkpointed, as an interruption would)."""
        if resume:
            self.load()
        self.model.batch_invariant = False
        self.model.gradient_checkpointing = self.config.gradient_checkpointing
        self.model.train()
        bar = _Bar(self.config.max_steps, self.step) if progress else None
        c = self.config
        try:
            while self.step < c.max_steps:
                started = time.perf_counter()
                for group in self.optimizer.param_groups:
                    group["lr"] = c.lr_at(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                tokens, diffusion, encoder = 0, 0.0, 0.0
                for _ in range(c.grad_accum):
                    pick = torch.randint(len(self.train_examples), (c.batch_size,), generator=self.generator)
                    parts = self._loss([self.train_examples[i] for i in pick.tolist()], self.generator)
                    (parts.total / c.grad_accum).backward()
                    tokens += parts.diffusion_tokens + parts.encoder_tokens
                    diffusion += float(parts.diffusion.detach()) / c.grad_accum
                    encoder += float(parts.encoder.detach()) / c.grad_accum
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], c.grad_clip
                )
                self.optimizer.step()
                self.step += 1
                record = {
                    "step": self.step,
                    "loss": diffusion + c.objective.encoder_loss_weight * encoder,
                    "diffusion": diffusion,
                    "encoder": encoder,
                    "lr": c.lr_at(self.step - 1),
                    "grad_norm": float(norm),
                    "tokens_per_s": tokens / (time.perf_counter() - started),
                }
                if self.step % c.eval_every == 0 or self.step == c.max_steps:
                    record.update(self.evaluate())
                self.history.append(record)
                if bar is not None:
                    bar.update(record)
                if self.on_log is not None:
                    self.on_log(record)
                if self.step % c.save_every == 0 or self.step in (c.max_steps, stop_after):
                    self.save()
                if self.step == stop_after:
                    break
        finally:
            self.model.batch_invariant = True
            self.model.gradient_checkpointing = False
            self.model.eval()
            if bar is not None:
                bar.close()
        return self.history


class _Bar:
    """A progress bar on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from dgemma.logs import stderr_console

        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=stderr_console(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, status="")

    def update(self, record: dict) -> None:
        status = f"loss {record['loss']:.3f}  {record['tokens_per_s']:.0f} tok/s"
        if "eval_diffusion" in record:
            status += f"  eval {record['eval_diffusion']:.3f}/{record['eval_encoder']:.3f}"
        self.progress.update(self.task, completed=record["step"], status=status)

    def close(self) -> None:
        self.progress.stop()
