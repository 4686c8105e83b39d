"""Checkpoint loading: the HF layout (single file or sharded with an index), vision weights skipped, and a
CheckpointError naming the file or tensor for every malformed input. Nothing is ever unpickled."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma import CheckpointError, DiffusionGemma
from dgemma.model.config import ModelConfig
from dgemma.model.weights import save_checkpoint


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def logits_of(model, seed=0):
    cache = model.new_cache(batch_size=1, max_length=64)
    model.encode(torch.tensor([[2, 10, 11, 12]]), cache)
    canvas = torch.randint(
        0,
        model.config.vocab_size,
        (1, model.config.canvas_length),
        generator=torch.Generator().manual_seed(seed),
    )
    return model.denoise(canvas, cache)


def test_sharded_round_trip_gives_identical_logits(tiny_dir, tmp_path):
    model = DiffusionGemma.from_pretrained(tiny_dir, device="cpu")
    out = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    again = DiffusionGemma.from_pretrained(out, device="cpu")
    assert torch.equal(logits_of(model), logits_of(again))


def test_bfloat16_load_is_close_to_float32(tiny_dir):
    full = DiffusionGemma.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32)
    half = DiffusionGemma.from_pretrained(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    # every weight is the float32 one rounded to bfloat16, no more
    halves = dict(half.named_parameters())
    for name, param in full.named_parameters():
        assert torch.equal(halves[name], param.to(torch.bfloat16)), name
    a, b = logits_of(full), logits_of(half)
    assert b.dtype == torch.float32
    # a random model's logits move a lot under bf16 rounding (the tiny one's experts amplify it), so
    # the logits are compared by direction: ~0.95 here, where unrelated canvases give ~0.05
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.9


def test_vision_weights_are_skipped_with_one_log_line(tmp_path, caplog):
    from reference import make_reference, save_reference

    path = save_reference(make_reference(vision=True), tmp_path / "vision")
    with caplog.at_level(logging.INFO, logger="dgemma"):
        model = DiffusionGemma.from_pretrained(path, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "vision" in r.getMessage()]
    assert len(lines) == 1 and "skipped" in lines[0]
    assert model.config.has_vision


def _rewrite_single_file(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    _rewrite_single_file(d, lambda t: t.pop("model.decoder.layers.2.router.proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor.*model\.decoder\.layers\.2\.router\.proj\.weight"
    ):
        DiffusionGemma.from_pretrained(d, device="cpu")


def test_unexpected_tensor_is_named(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    _rewrite_single_file(d, lambda t: t.__setitem__("model.decoder.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.decoder\.layers\.0\.mystery\.weight'"
    ):
        DiffusionGemma.from_pretrained(d, device="cpu")


def test_misshaped_tensor_is_named_with_both_shapes(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    name = "model.decoder.layers.3.self_attn.q_proj.weight"
    _rewrite_single_file(d, lambda t: t.__setitem__(name, torch.zeros(64, 64)))
    with pytest.raises(
        CheckpointError, match=rf"{name.replace('.', '[.]')}' has shape \[64, 64\].*\[128, 64\]"
    ):
        DiffusionGemma.from_pretrained(d, device="cpu")


def test_corrupt_and_truncated_files_are_named(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        DiffusionGemma.from_pretrained(d, device="cpu")
    d2 = copy_ckpt(tiny_dir, tmp_path / "t")
    data = (d2 / "model.safetensors").read_bytes()
    (d2 / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        DiffusionGemma.from_pretrained(d2, device="cpu")


def test_unknown_model_type_and_bad_config(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'llama'"):
        DiffusionGemma.from_pretrained(d, device="cpu")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        DiffusionGemma.from_pretrained(d, device="cpu")
    bad = json.loads(json.dumps(config))
    bad["text_config"]["top_k_experts"] = 9
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="top_k_experts 9 exceeds num_experts 4"):
        DiffusionGemma.from_pretrained(d, device="cpu")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        DiffusionGemma.from_pretrained(d, device="cpu")


def test_pickle_only_checkpoint_is_refused(tiny_dir, tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"would run code if unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are refused"):
        DiffusionGemma.from_pretrained(d, device="cpu")


def test_index_naming_a_missing_shard(tiny_dir, tmp_path):
    model = DiffusionGemma.from_pretrained(tiny_dir, device="cpu")
    out = save_checkpoint(model, tmp_path / "s", max_shard_bytes=300_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        DiffusionGemma.from_pretrained(out, device="cpu")


def test_not_a_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        DiffusionGemma.from_pretrained(tmp_path / "nope" / "deeper")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        DiffusionGemma.from_pretrained(f)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="fetching it from the Hugging Face Hub failed"):
        DiffusionGemma.from_pretrained("no-such-org/no-such-model-xyz")


def test_release_config_spelling_and_save_pretrained_spelling_agree():
    from fixtures import tiny_config_dict

    released = tiny_config_dict()
    per_layer = json.loads(json.dumps(released))
    text = per_layer["text_config"]
    del text["global_head_dim"], text["num_global_key_value_heads"]
    text["per_layer_config"] = {"3": {"head_dim": 32, "num_key_value_heads": 1}}
    a, b = ModelConfig.from_dict(released), ModelConfig.from_dict(per_layer)
    assert a == b
    assert [s.head_dim for s in a.layers] == [16, 16, 16, 32]
    assert [s.num_kv_heads for s in a.layers] == [2, 2, 2, 1]
    assert [s.has_v_proj for s in a.layers] == [True, True, True, False]


def test_fp8_quantization_at_load_time(tiny_dir, tmp_path):
    """`quantization="fp8"`: the experts load into FP8 with per-channel scales (the same as quantizing
    the loaded model), every other weight as it was; the logits stay close to the unquantized model's;
    a quantized model refuses to be saved or trained, and an unknown quantization is named."""
    from dgemma.model.quant import FP8, dequantize

    plain = DiffusionGemma.from_pretrained(tiny_dir, device="cpu")
    loaded = DiffusionGemma.from_pretrained(tiny_dir, device="cpu", quantization="fp8")
    after = DiffusionGemma.from_pretrained(tiny_dir, device="cpu").quantize("fp8")
    assert plain.quantization is None and loaded.quantization == after.quantization == "fp8"
    for name, p in loaded.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert p.dtype == FP8
            assert torch.equal(p.float(), after.get_parameter(name).float())
        else:
            assert p.dtype == torch.float32 and torch.equal(p, plain.get_parameter(name))
    experts = loaded.layers[0].experts
    assert torch.equal(experts.down_scale, after.layers[0].experts.down_scale)
    # each weight within e4m3's rounding: half a unit of 3 mantissa bits, or of the subnormal step
    w, deq = plain.layers[0].experts.gate_up_proj, dequantize(experts.gate_up_proj, experts.gate_up_scale)
    bound = 2**-4 * w.abs() + 2**-10 * experts.gate_up_scale[..., None]
    assert ((deq - w).abs() <= bound * 1.001).all() and not torch.equal(deq, w)
    # the quantized model computes exactly the unquantized one with the dequantized expert weights
    with torch.no_grad():
        for layer, q in zip(plain.layers, loaded.layers):
            layer.experts.gate_up_proj.copy_(dequantize(q.experts.gate_up_proj, q.experts.gate_up_scale))
            layer.experts.down_proj.copy_(dequantize(q.experts.down_proj, q.experts.down_scale))
    with torch.inference_mode():
        want, got = logits_of(plain), logits_of(loaded)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="quantized"):
        save_checkpoint(loaded, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(RuntimeError, match="inference"):
        logits_of(loaded)  # with autograd on: training needs the unquantized weights
    # fp8-w8a8: the same weights, and the experts' gate-up input rounded to FP8 per token as it comes
    w8a8 = DiffusionGemma.from_pretrained(tiny_dir, device="cpu", quantization="fp8-w8a8")
    assert w8a8.quantization == "fp8-w8a8" and all(layer.experts.fp8_activations for layer in w8a8.layers)
    assert torch.equal(w8a8.layers[0].experts.gate_up_proj.float(), experts.gate_up_proj.float())
    with torch.inference_mode():
        w8a8_logits = logits_of(w8a8)
    assert 0 < float((w8a8_logits - got).norm() / got.norm()) < 0.25
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        DiffusionGemma.from_pretrained(tiny_dir, device="cpu", quantization="int3")


def test_default_dtype_is_bfloat16_on_a_gpu_only_for_large_models():
    from dgemma.model.config import parameter_counts
    from dgemma.model.presets import DEFAULT_MODEL_DIR, release_config_dict
    from dgemma.model.weights import default_device_and_dtype

    embedded = parameter_counts(ModelConfig.from_file(DEFAULT_MODEL_DIR / "config.json"))["total"]
    release = parameter_counts(ModelConfig.from_dict(release_config_dict()))["total"]
    assert default_device_and_dtype("cuda", None, release) == (torch.device("cuda"), torch.bfloat16)
    assert default_device_and_dtype("cuda", None, embedded) == (torch.device("cuda"), torch.float32)
    assert default_device_and_dtype("cuda", None) == (torch.device("cuda"), torch.bfloat16)
    assert default_device_and_dtype("cpu", None, release)[1] == torch.float32
    assert default_device_and_dtype("cuda", torch.float16, embedded)[1] == torch.float16  # asked for
