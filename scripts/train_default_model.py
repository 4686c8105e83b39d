"""Train the embedded default model from scratch: a small DiffusionGemma for Python code completion.

    python scripts/build_corpus.py corpus/
    python scripts/train_default_model.py --corpus corpus/ --out run/ --minutes 8 [--resume | --init-from DIR]

1. trains a byte-level BPE tokenizer (8192 entries) on the training split;
2. builds the model (both sliding and full layers, 8 experts top-2, self-conditioning; ~13M parameters),
   trains it with the diffusion + encoder objective for the given minutes (the step count is set from a
   short timing run, so the learning-rate schedule ends on time); `--resume` continues a run exactly,
   `--init-from` starts a new schedule (and optimizer) from an exported model and its tokenizer;
3. writes the checkpoint in the HF layout (bfloat16 weights in shards under 16 MB, config, tokenizer,
   chat template, generation config) to OUT/model at every save and at the end, and the training
   record to OUT/train_metrics.json.
   `scripts/eval_default_model.py` measures the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.model.config import ModelConfig
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.presets import RELEASE_GENERATION_CONFIG
from dgemma.model.weights import save_checkpoint
from dgemma.text.tokenizer import Tokenizer
from dgemma.train.data import TokenIds, load_examples
from dgemma.train.loop import TrainConfig, Trainer
from dgemma.train.objective import ObjectiveConfig, compute_loss, make_batch
from dgemma.train.tokenizer import train_bpe

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>"]
PAD, EOS, BOS = 0, 1, 2
MAX_LENGTH = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content + '<turn|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)


def model_config(vocab_size: int) -> dict:
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": 64,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "diffusion_gemma_text",
            "vocab_size": vocab_size,
            "hidden_size": 320,
            "intermediate_size": 512,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "global_head_dim": 128,
            "num_global_key_value_heads": 1,
            "sliding_window": 256,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": 128,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": 30.0,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "pad_token_id": PAD,
            "eos_token_id": EOS,
            "bos_token_id": BOS,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1e6,
                },
            },
        },
    }


def texts(path: Path, max_bytes: int = 60 * 10**6):
    """The training texts, up to `max_bytes` (enough to learn an 8k vocabulary)."""
    seen = 0
    with open(path) as f:
        for line in f:
            text = json.loads(line)["text"]
            seen += len(text)
            if seen > max_bytes:
                return
            yield text


def train_tokenizer(corpus: Path, vocab_size: int):
    return train_bpe(texts(corpus / "train.jsonl"), vocab_size=vocab_size, special_tokens=SPECIALS)


def mix(corpus: list, completions: list, share: float) -> list:
    """One list to draw from uniformly, in which about `share` of the draws are completion examples."""
    if not 0 < share < 1:
        raise SystemExit(f"--completion-share must be in (0, 1), got {share}")
    copies = max(1, round(share / (1 - share) * len(corpus) / len(completions)))
    return corpus + completions * copies


def generation_config() -> dict:
    """The sampler settings tuned for this model (MODEL_CARD.md, "Sampler settings"): at most 5 steps per
    64-token canvas, temperature 0.6 falling to 0.3, entropy bound 1.0, and a canvas stops as soon as
    its mean entropy is under 0.05 (stability threshold 0: no unchanged step needed). The pad ends an
    answer as the EOS does: trained with supervised padding, the model writes pads after an answer's
    end, and sometimes a pad where the EOS should be; what follows a pad is never part of the answer."""
    config = {
        **RELEASE_GENERATION_CONFIG,
        "max_denoising_steps": 5,
        "sampler_config": {"entropy_bound": 1.0, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_max": 0.6,
        "t_min": 0.3,
        "stability_threshold": 0,
        "confidence_threshold": 0.05,
        "eos_token_id": [EOS, PAD],
    }
    del config["max_new_tokens"]
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--canvases-per-example", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init-from", type=Path, default=None, help="an exported model to continue from")
    parser.add_argument("--max-train-files", type=int, default=None)
    parser.add_argument(
        "--completions", type=Path, default=None,
        help="prompt/completion JSONL (scripts/build_completion_data.py) mixed into the corpus",
    )  # fmt: skip
    parser.add_argument(
        "--completion-share", type=float, default=0.5, help="share of draws from --completions"
    )
    parser.add_argument(
        "--supervise-padding", action="store_true",
        help="also supervise the pads after the EOS (dgemma.train.objective.ObjectiveConfig)",
    )  # fmt: skip
    parser.add_argument("--device", default=None)
    parser.add_argument("--profile", action="store_true", help="print the top ops of two steps first")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    t0 = time.perf_counter()

    tok_path = args.out / "tokenizer.json"
    if args.init_from is not None:
        tok_path.write_text((args.init_from / "tokenizer.json").read_text())
    elif not tok_path.exists():
        train_tokenizer(args.corpus, args.vocab).save(str(tok_path))
    tokenizer = Tokenizer.from_checkpoint(args.out)
    print(f"tokenizer: {tokenizer.vocab_size} entries ({time.perf_counter() - t0:.0f} s)", flush=True)
    ids = TokenIds(bos=BOS, eos=EOS, stop=(EOS,))
    train = load_examples(
        [args.corpus / "train.jsonl"], tokenizer=tokenizer, template=None, ids=ids, max_length=MAX_LENGTH
    )
    heldout = load_examples(
        [args.corpus / "heldout.jsonl"], tokenizer=tokenizer, template=None, ids=ids, max_length=MAX_LENGTH
    )
    if args.max_train_files:
        train = train[: args.max_train_files]
    if args.completions is not None:
        completions = load_examples(
            [args.completions], tokenizer=tokenizer, template=None, ids=ids, max_length=MAX_LENGTH
        )
        train = mix(train, completions, args.completion_share)
        print(
            f"completions: {len(completions)} examples, {args.completion_share:.0%} of the draws", flush=True
        )
    n_tokens = sum(len(e.token_ids) for e in train)
    print(f"examples: {len(train)} train ({n_tokens / 1e6:.1f}M tokens), {len(heldout)} held out "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    config_dict = model_config(tokenizer.vocab_size)
    config = ModelConfig.from_dict(config_dict)
    if args.init_from is not None:
        model = DiffusionGemma.from_pretrained(args.init_from, device=device, dtype=torch.float32)
        if model.config.source != config.source:
            raise SystemExit(f"{args.init_from}: its config differs from this script's")
    else:
        model = DiffusionGemma.random(config, device=device, dtype=torch.float32, seed=0, std=0.02)

    # fixed shapes: cuDNN attention would otherwise build a new plan for every new sequence length
    pad_to = MAX_LENGTH + config.canvas_length
    torch.backends.cuda.enable_cudnn_sdp(False)
    # time a few steps to size the schedule so that it ends when the budget does
    model.requires_grad_(True)
    model.batch_invariant = False
    gen = torch.Generator().manual_seed(123)

    def trial_steps(count: int) -> float:
        """Seconds per forward + backward step (no optimizer step; its own generator)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            pick = torch.randint(len(train), (args.batch_size,), generator=gen)
            batch = make_batch(
                [train[j] for j in pick],
                config.canvas_length,
                PAD,
                gen,
                pad_to=pad_to,
                canvases_per_example=args.canvases_per_example,
                supervise_padding=args.supervise_padding,
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                compute_loss(model, batch, ObjectiveConfig(), gen).total.backward()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / count

    trial_steps(2)  # warm-up
    step_s = trial_steps(6)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            trial_steps(2)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))
    max_steps = max(20, int(args.minutes * 60 / (step_s * 1.08)))
    print(f"{step_s * 1000:.0f} ms per step -> {max_steps} steps", flush=True)

    train_config = TrainConfig(
        max_steps=max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(200, max_steps // 10),
        eval_every=max(1, max_steps // 8),
        save_every=max(1, max_steps // 12),
        freeze_router=False,  # from scratch: the router must learn
        pad_to=pad_to,
        canvases_per_example=args.canvases_per_example,
        objective=ObjectiveConfig(supervise_padding=args.supervise_padding),
    )

    def export() -> None:
        save_checkpoint(
            model,
            model_dir,
            dtype=torch.bfloat16,
            max_shard_bytes=15 * 10**6,  # files under 16 MB each
            extra_files={
                "tokenizer.json": tok_path.read_text(),
                "tokenizer_config.json": json.dumps(
                    {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
                ),
                "chat_template.jinja": CHAT_TEMPLATE,
                "generation_config.json": json.dumps(generation_config(), indent=2),
            },
        )

    def log_evals(record: dict) -> None:
        if "eval_diffusion" in record:
            print(json.dumps(record), flush=True)
        if record["step"] % train_config.save_every == 0:
            export()  # a usable model even if the run is cut off

    trainer = Trainer(model, train, heldout, train_config, args.out, pad_id=PAD, on_log=log_evals)
    trainer.run(resume=args.resume, progress=sys.stderr.isatty())
    final = trainer.history[-1]
    export()
    metrics = {
        "train_steps": trainer.step,
        "train_minutes": round((time.perf_counter() - t0) / 60, 1),
        "step_ms": round(step_s * 1000, 1),
        "heldout_diffusion_loss": final.get("eval_diffusion"),
        "heldout_encoder_loss": final.get("eval_encoder"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": trainer.history[:: max(1, len(trainer.history) // 50)],
    }
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
