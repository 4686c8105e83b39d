"""`dgemma bench --compare-transformers` on CPU: the reference built over dgemma's own tensors (no copy)
generates exactly what transformers loading the same checkpoint generates, and its timing reads out."""

from __future__ import annotations

import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.bench_transformers import bench_transformers, ratios, transformers_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return DiffusionGemma.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)


def test_the_reference_runs_on_our_tensors_and_generates_like_a_loaded_checkpoint(ours, tiny_dir):
    hf = transformers_model(ours)
    embed = ours.embed_tokens.weight
    assert hf.model.decoder.embed_tokens.weight.data_ptr() == embed.data_ptr()
    assert hf.model.encoder.language_model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    loaded = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
        tiny_dir, dtype=torch.float32
    ).eval()
    prompt = torch.tensor([[2, 5, 9, 33, 71, 12, 40, 41, 42, 43, 44]])  # longer than the window (8)
    outputs = []
    for model in (hf, loaded):
        torch.manual_seed(0)
        # no EOS stop, as the bench runs it (the loaded model would also read the checkpoint's EOS ids)
        out = model.generate(prompt, max_new_tokens=48, max_denoising_steps=4, eos_token_id=None)
        outputs.append(out.sequences)
    assert outputs[0].shape[1] == prompt.shape[1] + 48 and torch.equal(*outputs)


def test_a_text_only_config_gets_the_vision_tower_the_reference_always_builds(tiny_dir):
    from dgemma.model.config import ModelConfig

    source = {k: v for k, v in ModelConfig.from_file(tiny_dir / "config.json").source.items()}
    source.pop("vision_config", None)
    model = DiffusionGemma.random(ModelConfig.from_dict(source), device="cpu", dtype=torch.float32, seed=0)
    hf = transformers_model(model)
    assert hf.model.decoder.layers[0].self_attn.q_proj.weight.data_ptr() == (
        model.layers[0].self_attn.q_proj.weight.data_ptr()
    )


def test_timing_reads_steps_canvases_and_prefill(ours):
    out = bench_transformers(ours, [2, 5, 9, 33], steps=(2, 3), canvases=3, compiled=False)
    eager = out["eager"]
    assert set(eager) == {"first_call_s", "denoise_step_ms", "prefill_ms", "canvas2_ms", "canvas3_ms"}
    assert 0 < eager["denoise_step_ms"] < eager["canvas3_ms"]
    record = {"transformers": out, "denoise_step_ms": eager["denoise_step_ms"] / 2, "canvas3_ms": None}
    assert ratios(record) == {"eager/denoise_step_ms": 2.0}
