"""The command line: stdout carries only the answer (or one JSON object); errors are one clear line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dgemma.cli import main


def test_generate_json(tiny_dir, capsys):
    code = main(
        [
            "generate",
            "def add(a, b):",
            "--model",
            str(tiny_dir),
            "--seed",
            "0",
            "--max-new-tokens",
            "20",
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    record = json.loads(out)  # exactly one JSON object on stdout
    assert set(record) >= {
        "text",
        "token_ids",
        "finish_reason",
        "steps_per_canvas",
        "tokens_per_forward",
        "seconds",
    }
    assert record["finish_reason"] in ("stop", "length") and len(record["token_ids"]) <= 20


def test_generate_plain_prints_only_the_text(tiny_dir, capsys):
    from dgemma import LLM, SamplingParams

    expected = LLM(tiny_dir).generate("def add(a, b):", SamplingParams(seed=1, max_new_tokens=12))[0].text
    assert (
        main(
            ["generate", "def add(a, b):", "--model", str(tiny_dir), "--seed", "1", "--max-new-tokens", "12"]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"


def test_generate_chat_and_drafts(tiny_dir, capsys):
    args = [
        "generate",
        "hi",
        "--model",
        str(tiny_dir),
        "--chat",
        "--think",
        "--seed",
        "2",
        "--max-new-tokens",
        "8",
    ]
    assert main([*args, "--show-drafts"]) == 0
    drafted = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == drafted  # the animation lives on stderr only


def test_errors_are_one_line_without_traceback(tiny_dir, tmp_path):
    cases = [
        ["generate", "x", "--model", str(tmp_path / "missing")],
        ["generate", "x", "--model", str(tiny_dir), "--max-new-tokens", "0"],
        ["generate", "x", "--model", str(tiny_dir), "--entropy-bound", "-1"],
        ["bench", "--quantization", "fp8", "--compare-transformers"],
    ]
    if not torch.cuda.is_available():  # the bench's one line where it cannot measure
        cases.append(["bench", "--sections", "single"])
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "dgemma.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        assert proc.stderr.startswith("dgemma: error: ") and "Traceback" not in proc.stderr


def test_no_model_means_the_embedded_default(monkeypatch, capsys):
    monkeypatch.delenv("DGEMMA_MODEL", raising=False)
    assert main(["generate", "def add(a, b):", "--max-new-tokens", "16", "--seed", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["completion_tokens"] == 16 or record["finish_reason"] == "stop"
    assert record["tokens_per_forward"] > 1


def test_generate_with_fp8_experts(monkeypatch, capsys):
    """--quantization fp8 loads the experts in FP8 (the CPU runs the dequantizing spec path); an
    unknown scheme is refused by the parser, naming the choices."""
    monkeypatch.delenv("DGEMMA_MODEL", raising=False)
    args = ["generate", "def add(a, b):", "--max-new-tokens", "16", "--seed", "0", "--json"]
    assert main([*args, "--quantization", "fp8"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["completion_tokens"] == 16 or record["finish_reason"] == "stop"
    with pytest.raises(SystemExit):
        main([*args, "--quantization", "int4"])
    assert "fp8" in capsys.readouterr().err


def test_dgemma_model_variable_overrides_the_default(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DGEMMA_MODEL", str(tmp_path / "nowhere"))
    assert main(["generate", "x"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("as_json", [False, True])
def test_info(tiny_dir, capsys, as_json):
    assert main(["info", str(tiny_dir), *(["--json"] if as_json else [])]) == 0
    out = capsys.readouterr().out
    if as_json:
        record = json.loads(out)
        assert record["layers"] == 4 and record["full_layers"] == 1 and record["experts"] == 4
        assert record["weights_bytes"]["float32"] == 2 * record["weights_bytes"]["bfloat16"]
        experts = record["parameters"]["experts"]
        fp8 = record["weights_bytes"]["bfloat16_fp8_experts"]
        assert record["weights_bytes"]["bfloat16"] - experts < fp8 < record["weights_bytes"]["bfloat16"]
    else:
        assert "4 experts, top-2" in out and "head_dim 32, 1 KV heads, no v_proj" in out


def test_info_parameter_count_matches_the_weights(tiny_dir):
    from dgemma import DiffusionGemma
    from dgemma.model.config import parameter_counts

    model = DiffusionGemma.from_pretrained(tiny_dir)
    counted = sum(p.numel() for n, p in model.named_parameters() if "layer_scalar" not in n)
    assert parameter_counts(model.config)["total"] == counted


def test_a_closed_pipe_ends_generate_quietly(tiny_dir):
    """`dgemma generate ... | head -c 1`: no traceback when the reader goes away early."""
    import subprocess
    import sys

    code = "from dgemma.cli import main; raise SystemExit(main())"
    args = [
        sys.executable,
        "-c",
        code,
        "generate",
        "hello",
        "--model",
        str(tiny_dir),
        "--max-new-tokens",
        "64",
    ]
    args += ["--seed", "0", "--show-drafts"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first byte
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err
    assert proc.returncode == 141
