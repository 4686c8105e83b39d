"""Training data and loop: malformed lines named by file:line without losing the run, chat prompts masked,
and a resumed run that continues with exactly the losses of the uninterrupted one."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dgemma import DataError, DiffusionGemma
from dgemma.text.chat import ChatTemplate
from dgemma.text.tokenizer import Tokenizer
from dgemma.train.data import TokenIds, load_examples
from dgemma.train.loop import TrainConfig, Trainer
from dgemma.train.objective import Example

IDS = TokenIds(bos=2, eos=1, stop=(1, 4))


@pytest.fixture(scope="module")
def text_tools(tiny_dir):
    return Tokenizer.from_checkpoint(tiny_dir), ChatTemplate.from_checkpoint(tiny_dir)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_are_named_and_skipped(tmp_path, text_tools, caplog):
    tokenizer, template = text_tools
    data = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "def add(a, b):\n    return a + b\n"}),
            "{not json",
            json.dumps([1, 2]),
            json.dumps({"code": "x"}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"text": "for i in range(3):\n    print(i)\n"}),
            json.dumps({"prompt": "def f():\n", "completion": ""}),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        examples = load_examples([data], tokenizer=tokenizer, template=template, ids=IDS, max_length=64)
    assert len(examples) == 2
    messages = " ".join(r.getMessage() for r in caplog.records)
    for line, what in [
        (2, "not valid JSON"),
        (3, "expected a JSON object"),
        (4, "a record needs a 'text' string, a 'messages' list, or 'prompt' and 'completion' strings"),
        (6, "'messages' must list at least one"),
        (8, "'completion' must be a non-empty string"),
    ]:
        assert f"d.jsonl:{line}: {what}" in messages
    with pytest.raises(DataError, match=r"no usable training examples \(1 malformed records, first: .*:1:"):
        load_examples([write_lines(tmp_path / "bad.jsonl", ["[]"])], tokenizer=tokenizer, template=template,
                      ids=IDS, max_length=64)  # fmt: skip
    with pytest.raises(DataError, match="cannot open"):
        load_examples(
            [tmp_path / "missing.jsonl"], tokenizer=tokenizer, template=template, ids=IDS, max_length=64
        )


def test_chat_prompt_is_masked_and_answer_ends_at_the_turn_end(tmp_path, text_tools):
    tokenizer, template = text_tools
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(): pass"}]
    }
    (example,) = load_examples([write_lines(tmp_path / "c.jsonl", [json.dumps(record)])],
                               tokenizer=tokenizer, template=template, ids=IDS, max_length=128)  # fmt: skip
    prompt = template.render(record["messages"][:1], add_generation_prompt=True)
    assert (
        example.response_start
        == example.loss_start
        == len(tokenizer.encode(prompt, add_special_tokens=False))
    )
    answer = example.token_ids[example.response_start :]
    assert answer[-1] == 4 and 4 not in answer[:-1]  # cut at the template's turn end, an EOS id
    assert tokenizer.decode(answer).startswith("def f(): pass")


def test_prompt_completion_records_mask_the_prompt_and_align_canvases_to_its_end(tmp_path, text_tools):
    tokenizer, _ = text_tools
    record = {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}
    (example,) = load_examples([write_lines(tmp_path / "p.jsonl", [json.dumps(record)])],
                               tokenizer=tokenizer, template=None, ids=IDS, max_length=64)  # fmt: skip
    prompt_ids = [IDS.bos, *tokenizer.encode(record["prompt"], add_special_tokens=False)]
    assert list(example.token_ids[: len(prompt_ids)]) == prompt_ids  # encoded as inference encodes a prompt
    assert example.response_start == example.loss_start == len(prompt_ids) and not example.random_start
    answer = example.token_ids[example.response_start :]
    assert answer[-1] == IDS.eos and tokenizer.decode(answer[:-1]) == record["completion"]
    with pytest.raises(DataError, match="longer than max_length 8"):
        load_examples([write_lines(tmp_path / "long.jsonl", [json.dumps(record)])],
                      tokenizer=tokenizer, template=None, ids=IDS, max_length=8)  # fmt: skip


def test_long_text_is_windowed(tmp_path, text_tools):
    tokenizer, _ = text_tools
    text = "x = 1\n" * 200
    examples = load_examples([write_lines(tmp_path / "t.jsonl", [json.dumps({"text": text})])],
                             tokenizer=tokenizer, template=None, ids=IDS, max_length=32)  # fmt: skip
    assert len(examples) > 3 and all(len(e.token_ids) <= 32 and e.token_ids[0] == 2 for e in examples)
    assert examples[-1].token_ids[-1] == 1 and all(e.random_start for e in examples)


def make_trainer(tmp_path, max_steps, **overrides):
    from fixtures import tiny_config_dict

    from dgemma.model.config import ModelConfig

    model = DiffusionGemma.random(ModelConfig.from_dict(tiny_config_dict(vocab_size=96, canvas_length=8)),
                                  device="cpu", dtype=torch.float32, seed=0, std=0.1)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    examples = [
        Example(
            token_ids=(2, *torch.randint(5, 96, (int(n),), generator=gen).tolist(), 1),
            response_start=1,
            loss_start=1,
            random_start=True,
        )
        for n in torch.randint(6, 30, (12,), generator=gen)
    ]
    cfg = TrainConfig(max_steps=max_steps, batch_size=3, lr=3e-3, warmup_steps=2, eval_every=3, save_every=3,
                      freeze_router=False, pad_to=40, **overrides)  # fmt: skip
    return Trainer(model, examples[:9], examples[9:], cfg, tmp_path, pad_id=0)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", 6).run()
    # an interrupted run: the same schedule, stopped (and checkpointed) after step 4, then resumed
    make_trainer(tmp_path / "split", 6).run(stop_after=4)
    resumed = make_trainer(tmp_path / "split", 6)
    history = resumed.run(resume=True)
    assert [r["loss"] for r in history] == [r["loss"] for r in full]  # bit for bit, steps 5-6 included
    assert resumed.step == 6 and len(history) == 6
    assert full[-1]["loss"] < full[0]["loss"]
    assert "eval_diffusion" in full[2]


def test_supervised_padding_trains_differently_and_evaluates_as_the_recipe(tmp_path):
    from dgemma.train.objective import ObjectiveConfig

    recipe = make_trainer(tmp_path / "recipe", 3)
    padded = make_trainer(tmp_path / "padded", 3, objective=ObjectiveConfig(supervise_padding=True))
    assert recipe.evaluate() == padded.evaluate()  # the same weights: eval keeps the recipe's mask
    recipe_losses = [r["loss"] for r in recipe.run()]
    padded_losses = [r["loss"] for r in padded.run()]
    assert recipe_losses[0] != padded_losses[0]  # the pads after each EOS are targets


def test_bad_train_config_is_refused():
    from dgemma import ConfigError

    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(max_steps=1, lr=0)
