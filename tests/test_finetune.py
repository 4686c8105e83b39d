"""LoRA (merge, unmerge, PEFT files) and `dgemma finetune` end to end: full and LoRA runs on CPU whose
eval loss falls, and whose merged checkpoints load in dgemma and in transformers with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.cli import main
from dgemma.errors import CheckpointError, ConfigError
from dgemma.train.lora import LoraAdapters, LoraConfig

TOLERANCE = 1e-4


def perturb(adapters: LoraAdapters, seed: int = 0) -> None:
    """B starts at zero (a no-op adapter); give it values so the tests can see the branch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in adapters.pairs.values():
            pair.lora_B.copy_(0.05 * torch.randn(pair.lora_B.shape, generator=generator))


def logits_of(model: DiffusionGemma) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (2, 9), generator=generator)
    canvas = torch.randint(3, model.config.vocab_size, (2, model.config.canvas_length), generator=generator)
    cache = model.new_cache(batch_size=2, max_length=64)
    with torch.no_grad():
        model.encode(prompt, cache)
        return model.denoise(canvas, cache)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture()
def model(tiny_dir):
    return DiffusionGemma.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("experts", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores_the_base(model, experts):
    base = logits_of(model)
    targets = ("q_proj", "v_proj", "o_proj", "down_proj") + (("experts",) if experts else ())
    adapters = LoraAdapters(model, LoraConfig(rank=4, alpha=8, target_modules=targets))
    assert torch.equal(logits_of(model), base)  # B = 0: the adapters start as a no-op
    perturb(adapters)
    unmerged = logits_of(model)
    assert rel_err(unmerged, base) > 1e-3  # the branch changes the outputs
    adapters.merge()
    assert rel_err(logits_of(model), unmerged) < TOLERANCE
    adapters.unmerge()
    assert rel_err(logits_of(model), unmerged) < TOLERANCE
    adapters.detach()
    assert rel_err(logits_of(model), base) < TOLERANCE


def test_adapters_round_trip_in_the_peft_layout(model, tiny_dir, tmp_path):
    adapters = LoraAdapters(model, LoraConfig(rank=2, alpha=4, target_modules=("q_proj", "experts")))
    perturb(adapters, seed=3)
    expected = logits_of(model)
    adapters.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["q_proj"]
    from safetensors.torch import load_file

    names = list(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in names

    fresh = DiffusionGemma.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)
    LoraAdapters.load(fresh, tmp_path / "adapter")
    assert torch.equal(logits_of(fresh), expected)


def test_bad_lora_settings_and_files_are_named(model, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="target modules"):
        LoraConfig(target_modules=("qkv",))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json"):
        LoraAdapters.load(model, tmp_path)


def write_data(path, count=40):
    """Continuation records a tiny model can learn: short arithmetic-like lines in its byte vocabulary."""
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x + {i % 7}\n" * 3}) for i in range(count)]
    lines.insert(5, "{broken json")
    lines.insert(9, json.dumps({"txt": "no text field"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune(args, capsys) -> dict:
    assert main(["finetune", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_reduces_eval_loss_and_the_result_loads_in_dgemma_and_transformers(
    mode, tiny_dir, tmp_path, capsys, caplog
):
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    args = ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--steps", "30",
            "--batch-size", "4", "--eval-every", "10", "--eval-split", "0.1", "--lr", "3e-3",
            "--device", "cpu"]  # fmt: skip
    if mode == "full":
        args += ["--full", "--gradient-checkpointing", "--supervise-padding"]
    summary = finetune(args, capsys)
    assert "data.jsonl:6" in caplog.text and "data.jsonl:10" in caplog.text  # named, skipped, run goes on
    assert summary["steps"] == 30 and summary["examples"]["eval"] == 4
    first, last = summary["first_eval"], summary["last_eval"]
    assert last["eval_diffusion"] < first["eval_diffusion"]
    assert last["eval_encoder"] < first["eval_encoder"]
    if mode == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").exists()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (out / "model" / name).exists()

    # the merged checkpoint in dgemma (text generation works) and in transformers (same logits)
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    from dgemma import LLM, SamplingParams

    llm = LLM(out / "model", device="cpu")
    assert llm.generate("def f3(x):\n", SamplingParams(max_new_tokens=8, seed=0))[0].stats.completion_tokens
    ours = DiffusionGemma.from_pretrained(out / "model", device="cpu", dtype=torch.float32)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(out / "model", dtype=torch.float32).eval()
    prompt = torch.tensor([[2, 40, 41, 42, 43, 44]])
    canvas = torch.randint(3, ours.config.vocab_size, (1, ours.config.canvas_length))
    cache = ours.new_cache(batch_size=1, max_length=64)
    ref_cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
    with torch.no_grad():
        ours.encode(prompt, cache)
        reference.model.encoder(input_ids=prompt, past_key_values=ref_cache)
        expected = reference(decoder_input_ids=canvas, past_key_values=ref_cache).logits
        assert rel_err(ours.denoise(canvas, cache), expected) < TOLERANCE


def test_resume_continues_and_refuses_changed_options(tiny_dir, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl", count=20)
    common = ["--model", str(tiny_dir), "--data", str(data), "--batch-size", "2", "--eval-every", "5",
              "--save-every", "3", "--device", "cpu"]  # fmt: skip
    straight = finetune([*common, "--out", str(tmp_path / "a"), "--steps", "8"], capsys)
    # an interrupted run: stop after step 3 (checkpointed), then resume to 8
    from dgemma.train import finetune as ft

    interrupted = tmp_path / "b"
    original = ft.Trainer.run
    try:
        ft.Trainer.run = lambda self, **kw: original(self, **{**kw, "stop_after": 3})
        finetune([*common, "--out", str(interrupted), "--steps", "8"], capsys)
    finally:
        ft.Trainer.run = original
    assert main(["finetune", *common, "--out", str(interrupted), "--steps", "8"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["finetune", *common, "--out", str(interrupted), "--steps", "9", "--resume"]) == 2
    assert "max_steps" in capsys.readouterr().err
    resumed = finetune([*common, "--out", str(interrupted), "--steps", "8", "--resume"], capsys)

    def numbers(record):  # everything but the timing
        return {k: v for k, v in record.items() if k != "tokens_per_s"}

    assert numbers(resumed["last_eval"]) == numbers(straight["last_eval"])
