"""`dgemma generate | info`: the command line. The only module that reads the environment or configures
logging. Results go to stdout; logs, progress and the draft animation go to stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dgemma.errors import ConfigError, DgemmaError
from dgemma.model.presets import QUANTIZATIONS

DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
}


def _default_model() -> str:
    from dgemma.model.presets import DEFAULT_MODEL_DIR

    return os.environ.get("DGEMMA_MODEL") or str(DEFAULT_MODEL_DIR)


def _load_llm(args):
    """The LLM of `_add_model_args`' options (--model, --device, --dtype, --quantization)."""
    import torch

    from dgemma.api import LLM

    return LLM(
        _model_or_default(args.model),
        device=args.device,
        dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        progress=sys.stderr.isatty(),
        quantization=args.quantization,
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id "
        "(default: $DGEMMA_MODEL, else the embedded small Python code-completion model)",
    )
    p.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if present, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="default: bfloat16 on GPU (float32 below 1B parameters), float32 on CPU",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="fp8: the experts' weights in FP8 as they load (half the bytes a step reads); fp8-w8a8: "
        "also their gate-up input, per token (faster with many requests, a little less exact)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgemma", description="Run DiffusionGemma, the block-diffusion Gemma 4."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt (only the answer goes to stdout)")
    gen.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    _add_model_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=None, help="exact cap (default 2048 or EOS)")
    gen.add_argument("--seed", type=int, default=None, help="make the answer reproducible")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user turn of the chat template"
    )
    gen.add_argument("--system", default=None, help="system prompt (with --chat)")
    gen.add_argument("--think", action="store_true", help="switch thinking on (with --chat)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--sampler", choices=["entropy_bound", "confidence"], default="entropy_bound")
    gen.add_argument("--max-denoising-steps", type=int, default=None)
    gen.add_argument("--entropy-bound", type=float, default=None)
    gen.add_argument(
        "--confidence", type=float, default=0.9, help="top-probability threshold (confidence sampler)"
    )
    gen.add_argument(
        "--show-drafts", action="store_true", help="animate the canvas while it denoises (stderr)"
    )
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object with text, token ids and stats"
    )

    ft = sub.add_parser(
        "finetune",
        help="fine-tune on a JSONL file (LoRA by default, or --full) with the diffusion objective",
        description='Records: {"text": ...} (continuation), {"messages": [...]} (chat SFT through '
        'the model\'s chat template) or {"prompt": ..., "completion": ...} (completion SFT). '
        "Writes OUT/model (HF layout; LoRA merged) and, with LoRA, "
        "OUT/adapter (PEFT layout); checkpoints go to OUT/trainer_state (continue with --resume).",
    )
    ft.add_argument("--model", default=None, help="checkpoint to start from (default: the embedded model)")
    ft.add_argument("--data", type=Path, required=True, help="training data, JSONL")
    ft.add_argument("--out", type=Path, required=True, help="output directory")
    ft.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    ft.add_argument("--lora-rank", type=int, default=16)
    ft.add_argument("--lora-alpha", type=float, default=32.0)
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names; add 'experts' for the MoE weights",
    )
    ft.add_argument("--lr", type=float, default=None, help="peak rate (default 2e-4 LoRA, 2e-5 full)")
    ft.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, as a share of --lr")
    ft.add_argument("--warmup-steps", type=int, default=20, help="linear warmup (at most 10%% of the steps)")
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--grad-accum", type=int, default=1)
    length = ft.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    ft.add_argument("--eval-data", type=Path, default=None, help="eval JSONL (default: an --eval-split)")
    ft.add_argument("--eval-split", type=float, default=0.05, help="share of the data held out for eval")
    ft.add_argument("--eval-every", type=int, default=50)
    ft.add_argument("--save-every", type=int, default=100)
    ft.add_argument("--max-length", type=int, default=1024, help="tokens per example (longer text is split)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    ft.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% more time")
    ft.add_argument(
        "--supervise-padding",
        action="store_true",
        help="also train the pads after each answer's EOS (helps answers shorter than a canvas settle; "
        "the published recipe leaves them out)",
    )
    ft.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if present)")
    ft.add_argument("-v", "--verbose", action="store_true")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    srv.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: dir name)"
    )
    srv.add_argument("--max-running", type=int, default=32, help="requests denoised together (cache rows)")
    srv.add_argument("--max-waiting", type=int, default=256, help="queued requests before 503s")
    srv.add_argument(
        "--request-timeout", type=float, default=None, help="seconds before a request is cancelled"
    )
    srv.add_argument(
        "--max-context", type=int, default=None, help="cache positions per row (default: context)"
    )

    bench = sub.add_parser(
        "bench", help="GPU speed and memory of the denoise loop (random full-size weights by default)"
    )
    bench.add_argument("--model", default=None, help="a checkpoint to load instead of random weights")
    bench.add_argument(
        "--config",
        default="release",
        help="'release' (the 26B-A4B config, default) or a config.json path; weights are random",
    )
    bench.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="FP8 experts, see generate --help (with random weights it also measures what changes)",
    )
    bench.add_argument("--prompt-len", type=int, default=512)
    bench.add_argument("--steps", default="13,16", help="fixed denoise steps per canvas (comma list)")
    bench.add_argument("--canvases", default="1,2,4,8", help="canvases per step to time (comma list)")
    bench.add_argument(
        "--streams", default="", help="concurrent requests through the engine, e.g. 1,4,8,32 (default: none)"
    )
    bench.add_argument("--stream-canvases", type=int, default=2, help="canvases per streamed request")
    bench.add_argument(
        "--sections",
        default="first_canvas,moe,correctness,profile,profile8,single,canvases,memory,streams",
        help="which sections to run (comma list)",
    )
    bench.add_argument("--reps", type=int, default=3, help="timed canvases per measurement")
    bench.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also time transformers' DiffusionGemmaForBlockDiffusion (eager and compiled) on the same "
        "weights, last, and print the ratios (needs transformers installed; the compile takes minutes)",
    )
    bench.add_argument("--json", default=None, help="write the record here (updated after each section)")
    bench.add_argument("--plot", default=None, help="PNG of step time against the roofline")
    bench.add_argument("-v", "--verbose", action="store_true")

    info = sub.add_parser("info", help="config summary, parameter counts and memory needed per dtype")
    info.add_argument("model", nargs="?", default=None, help="checkpoint directory or Hub repo id")
    info.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dgemma.logs import configure_logging

    configure_logging(getattr(args, "verbose", False))
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "finetune":
            return _finetune(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return _bench(args)
        return _info(args)
    except DgemmaError as exc:
        print(f"dgemma: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgemma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`dgemma generate ... | head`): stop quietly, and point stdout
        # at /dev/null so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE


def _model_or_default(value: str | None) -> str:
    return value or _default_model()


def _serve(args) -> int:
    import uvicorn

    from dgemma.engine.generate import Engine
    from dgemma.serve.app import build_app
    from dgemma.serve.worker import EngineWorker

    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ConfigError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    llm = _load_llm(args)
    context = llm.model.config.max_position_embeddings
    max_context = args.max_context or context
    if not 0 < max_context <= context or args.max_running < 1 or args.max_waiting < 0:
        raise ConfigError(f"need 0 < --max-context <= {context}, --max-running >= 1 and --max-waiting >= 0")
    engine = Engine(
        llm.model,
        slots=args.max_running,
        max_length=max_context,
        decode=llm._decode,
        max_waiting=args.max_waiting,
    )
    worker = EngineWorker(engine)
    worker.start()
    name = args.served_model_name or llm.path.name
    app = build_app(llm, worker, model_id=name, api_key=args.api_key, request_timeout=args.request_timeout)
    print(f"dgemma: serving '{name}' on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        worker.stop()
    return 0


def _int_list(value: str, flag: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        numbers = ()
    if not all(n > 0 for n in numbers) or (value.strip() and not numbers):
        raise ConfigError(f"{flag} takes positive integers separated by commas, got {value!r}")
    return numbers


def _bench(args) -> int:
    from dgemma.bench import plot, run_bench, summary_rows
    from dgemma.model.config import ModelConfig
    from dgemma.model.presets import release_config_dict

    if args.model is not None:
        config = None
    elif args.config == "release":
        config = ModelConfig.from_dict(release_config_dict())
    else:
        config = ModelConfig.from_file(Path(args.config))
    steps = _int_list(args.steps, "--steps")
    if not steps or args.prompt_len < 1 or args.reps < 1:
        raise ConfigError("need at least one --steps value, --prompt-len >= 1 and --reps >= 1")
    out = Path(args.json) if args.json else None

    def save(record):
        if out is not None:
            out.write_text(json.dumps(record, indent=1) + "\n")

    record = run_bench(
        config=config,
        model_dir=args.model,
        quantization=args.quantization,
        prompt_len=args.prompt_len,
        steps=steps,
        canvases=_int_list(args.canvases, "--canvases"),
        streams=_int_list(args.streams, "--streams"),
        stream_canvases=args.stream_canvases,
        sections=[s.strip() for s in args.sections.split(",") if s.strip()]
        + (["transformers"] if args.compare_transformers else []),
        reps=args.reps,
        on_section=save,
    )
    save(record)
    if args.plot:
        try:
            plot(record, Path(args.plot))
        except ImportError:
            print(
                "dgemma: --plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr
            )
    width = max((len(k) for k, _ in summary_rows(record)), default=0)
    for key, value in summary_rows(record):
        print(f"{key:<{width}}  {value}")
    print(json.dumps({k: record.get(k) for k in ("gpu", "denoise_step_ms", "canvas16_ms", "peak_memory_gb")}))
    return 0


def _finetune(args) -> int:
    from dgemma.train.finetune import FinetuneOptions, finetune
    from dgemma.train.loop import TrainConfig
    from dgemma.train.lora import LoraConfig
    from dgemma.train.objective import ObjectiveConfig

    lora = None
    if not args.full:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraConfig(
            rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets
        )
    train = TrainConfig(
        max_steps=args.steps or 1,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else (2e-5 if args.full else 2e-4),
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        objective=ObjectiveConfig(supervise_padding=args.supervise_padding),
    )
    options = FinetuneOptions(
        model=_model_or_default(args.model),
        data=args.data,
        out=args.out,
        lora=lora,
        train=train,
        epochs=None if args.steps else (args.epochs or 1.0),
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        max_length=args.max_length,
        device=args.device,
        resume=args.resume,
    )
    tty = sys.stderr.isatty()

    def log(record: dict) -> None:
        if "eval_diffusion" in record and not tty:  # the progress bar shows them on a terminal
            print(
                f"step {record['step']}: loss {record['loss']:.4f}  eval diffusion "
                f"{record['eval_diffusion']:.4f}  encoder {record['eval_encoder']:.4f}",
                file=sys.stderr,
                flush=True,
            )

    summary = finetune(options, progress=tty, on_log=log)
    print(json.dumps(summary, indent=2))
    return 0


def _generate(args) -> int:
    from dgemma.outputs import Draft, GenerationOutput, TextDelta
    from dgemma.params import SamplingParams

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stop=tuple(args.stop),
        sampler=args.sampler,
        max_denoising_steps=args.max_denoising_steps,
        entropy_bound=args.entropy_bound,
        confidence=args.confidence,
    )
    llm = _load_llm(args)
    prompt: object = prompt_text
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt_text}
        ]
    animate = args.show_drafts and not args.json
    view = _DraftView() if animate else None
    final = None
    try:
        for event in llm.stream(prompt, params, drafts=animate, enable_thinking=args.think):
            if isinstance(event, Draft) and view is not None:
                view.draft(event)
            elif isinstance(event, TextDelta):
                if view is not None:
                    view.commit(event.text)
                elif not args.json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            elif isinstance(event, GenerationOutput):
                final = event
    finally:
        if view is not None:
            view.close()
    assert final is not None
    if args.json:
        print(json.dumps(final.to_dict(), ensure_ascii=False))
    elif view is not None:
        sys.stdout.write(final.text + "\n")
    else:
        sys.stdout.write("\n")
    return 0


class _DraftView:
    """A live view on stderr: committed text, then the current draft canvas in a dim style."""

    def __init__(self):
        from rich.live import Live

        from dgemma.logs import stderr_console

        self.committed = ""
        self.live = Live(console=stderr_console(), refresh_per_second=20, transient=True)
        self.live.start()

    def _show(self, draft: str, caption: str) -> None:
        from rich.panel import Panel
        from rich.text import Text

        body = Text(_printable(self.committed))
        body.append(_printable(draft), style="dim cyan")
        self.live.update(Panel(body, title="dgemma", subtitle=caption))

    def draft(self, event) -> None:
        self._show(event.text, f"canvas {event.canvas + 1}, step {event.step}")

    def commit(self, text: str) -> None:
        self.committed += text
        self._show("", "committed")

    def close(self) -> None:
        self.live.stop()


def _printable(text: str) -> str:
    """Control characters would break the live frame: show them as a middle dot (display only)."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\u00b7" for ch in text)


def _info(args) -> int:
    from dgemma.model.config import ModelConfig, kv_bytes_per_token, parameter_counts
    from dgemma.model.weights import resolve_checkpoint

    directory = resolve_checkpoint(_model_or_default(args.model))
    config = ModelConfig.from_file(directory / "config.json")
    counts = parameter_counts(config)
    memory = {
        name: counts["total"] * size for name, size in (("bfloat16", 2), ("float16", 2), ("float32", 4))
    }
    # --quantization fp8: the experts in one byte each plus a float32 scale per output channel
    scales = config.num_layers * config.num_experts * (2 * config.moe_intermediate_size + config.hidden_size)
    memory["bfloat16_fp8_experts"] = (
        2 * (counts["total"] - counts["experts"]) + counts["experts"] + 4 * scales
    )
    kinds = [s.layer_type for s in config.layers]
    summary = {
        "path": str(directory),
        "layers": config.num_layers,
        "sliding_layers": kinds.count("sliding_attention"),
        "full_layers": kinds.count("full_attention"),
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_heads,
        "sliding": _layer_summary(config, "sliding_attention"),
        "full": _layer_summary(config, "full_attention"),
        "experts": config.num_experts,
        "top_k_experts": config.top_k_experts,
        "vocab_size": config.vocab_size,
        "canvas_length": config.canvas_length,
        "context": config.max_position_embeddings,
        "parameters": counts,
        "weights_bytes": memory,
        "kv_cache_bytes_per_token_bf16": kv_bytes_per_token(config, 2),
        "has_vision_tower": config.has_vision,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    gb = 1e9
    print(f"DiffusionGemma checkpoint  {directory}")
    sliding, full = summary["sliding_layers"], summary["full_layers"]
    print(
        f"  layers        {config.num_layers} ({sliding} sliding, {full} full), "
        f"hidden {config.hidden_size}, {config.num_heads} heads"
    )
    for kind in ("sliding", "full"):
        if summary[kind]:
            print(f"  {kind:<13} {summary[kind]}")
    print(
        f"  MoE           {config.num_experts} experts, top-{config.top_k_experts}, "
        f"expert width {config.moe_intermediate_size}; dense MLP {config.intermediate_size}"
    )
    print(
        f"  vocabulary    {config.vocab_size}, canvas {config.canvas_length} tokens, "
        f"context {config.max_position_embeddings}"
    )
    total, active = counts["total"] / 1e9, counts["active_per_token"] / 1e9
    print(f"  parameters    {total:.2f}B total, {active:.2f}B active per token")
    for group in ("experts", "attention", "dense_mlp", "embedding", "router", "self_conditioning"):
        print(f"    {group:<18}{counts[group] / 1e9:8.3f}B")
    sizes = (f"{k.replace('_fp8_experts', ' with FP8 experts')} {v / gb:.1f} GB" for k, v in memory.items())
    print("  weights       " + ", ".join(sizes))
    kib = summary["kv_cache_bytes_per_token_bf16"] / 1024
    print(f"  KV cache      {kib:.0f} KiB per prefix token (bfloat16)")
    return 0


def _layer_summary(config, kind: str) -> str:
    specs = [s for s in config.layers if s.layer_type == kind]
    if not specs:
        return ""
    s = specs[0]
    window = f", window {s.window}" if s.window else ", no v_proj"
    rope = f"{s.rope.rope_type} RoPE theta {s.rope.theta:g}"
    if s.rope.rope_type == "proportional":
        rope += f" x{s.rope.partial_rotary_factor:g}"
    return f"head_dim {s.head_dim}, {s.num_kv_heads} KV heads{window}, {rope}"


if __name__ == "__main__":
    raise SystemExit(main())
