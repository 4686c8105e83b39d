"""Generation through the public API on the tiny checkpoint: golden outputs, batch invariance of seeded
requests, exact max_new_tokens, stop strings, streaming and drafts, finished rows leaving the batch,
and every request error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from make_golden import GOLDEN, generate_cases

from dgemma import CapacityError, Draft, GenerationOutput, RequestError, SamplingParams, TextDelta

CASES = json.loads(Path(GOLDEN).read_text())


def test_golden_outputs(llm):
    for got, case in zip(generate_cases(llm), CASES):
        for key in ("text", "token_ids", "finish_reason", "steps_per_canvas", "completion_tokens"):
            assert got["expected"][key] == case["expected"][key], (case["prompt"], key)


def test_golden_cases_cover_both_endings_and_early_stopping():
    reasons = {c["expected"]["finish_reason"] for c in CASES}
    steps = [s for c in CASES for s in c["expected"]["steps_per_canvas"]]
    assert reasons == {"stop", "length"}
    assert min(steps) < 4  # some canvas stopped before its step budget


def test_seeded_requests_are_batch_invariant(llm):
    prompts = [c["prompt"] for c in CASES]
    params = [SamplingParams(**c["params"]) for c in CASES]
    batched = llm.generate(prompts, params)
    assert [o.index for o in batched] == list(range(len(CASES)))
    for out, case in zip(batched, CASES):
        assert list(out.token_ids) == case["expected"]["token_ids"], case["prompt"]
    # and in another order, with unseeded neighbours
    mixed = llm.generate(
        ["x = 1", prompts[1], "y", prompts[0]],
        [SamplingParams(max_new_tokens=30), params[1], SamplingParams(max_new_tokens=5), params[0]],
    )
    assert list(mixed[1].token_ids) == CASES[1]["expected"]["token_ids"]
    assert list(mixed[3].token_ids) == CASES[0]["expected"]["token_ids"]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_max_new_tokens_is_exact(llm, n):
    (out,) = llm.generate("def f():", SamplingParams(seed=2, max_new_tokens=n, ignore_eos=True))
    assert len(out.token_ids) == n == out.stats.completion_tokens
    assert out.finish_reason == "length"
    assert len(out.stats.steps_per_canvas) == -(-n // llm.model.config.canvas_length)


def test_default_max_new_tokens_is_not_the_checkpoint_one_canvas_cap(llm):
    # generation_config.json says max_new_tokens 256 (the release's trap); the default must not cap there
    (out,) = llm.generate("a", SamplingParams(seed=0, ignore_eos=True, max_denoising_steps=1))
    context = llm.model.config.max_position_embeddings
    canvas = llm.model.config.canvas_length
    assert len(out.token_ids) == min(2048, (context - 2) // canvas * canvas) > 256


def test_stats(llm):
    (out,) = llm.generate("def add(a, b):", SamplingParams(seed=0, max_new_tokens=40))
    assert out.stats.prompt_tokens == len(llm.tokenize("def add(a, b):"))
    assert out.stats.completion_tokens == len(out.token_ids) > 0
    assert out.stats.tokens_per_forward == pytest.approx(len(out.token_ids) / sum(out.stats.steps_per_canvas))
    assert out.stats.seconds > 0
    record = out.to_dict()
    assert set(record) >= {
        "text",
        "token_ids",
        "finish_reason",
        "steps_per_canvas",
        "tokens_per_forward",
        "seconds",
    }


def test_stop_string_ends_the_answer(llm):
    golden = CASES[0]["expected"]["text"]
    stop = golden[10:13]
    (out,) = llm.generate(
        CASES[0]["prompt"], SamplingParams(**CASES[0]["params"], stop=[stop, "never-there"])
    )
    assert out.finish_reason == "stop"
    assert out.text == golden[: golden.index(stop)]
    assert stop not in out.text


def test_stream_deltas_add_up_and_drafts_are_opt_in(llm):
    params = SamplingParams(seed=0, max_new_tokens=40)
    events = list(llm.stream("def add(a, b):", params, drafts=True))
    final = [e for e in events if isinstance(e, GenerationOutput)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    drafts = [e for e in events if isinstance(e, Draft)]
    assert len(final) == 1 and events[-1] is final[0]
    assert "".join(d.text for d in deltas) == final[0].text
    assert sum(len(d.token_ids) for d in deltas) == len(final[0].token_ids)
    assert len(drafts) == sum(final[0].stats.steps_per_canvas)
    assert (
        drafts[0].canvas == 0
        and drafts[0].step == 1
        and len(drafts[0].token_ids) == llm.model.config.canvas_length
    )
    assert not any(isinstance(e, Draft) for e in llm.stream("def add(a, b):", params))


def test_finished_requests_leave_the_batch(llm, monkeypatch):
    sizes = []
    original = llm.model.denoise_hidden

    def recording(canvas_ids, cache, *args, **kwargs):
        sizes.append(canvas_ids.shape[0])
        return original(canvas_ids, cache, *args, **kwargs)

    monkeypatch.setattr(llm.model, "denoise_hidden", recording)
    short = SamplingParams(seed=1, max_new_tokens=16, ignore_eos=True, max_denoising_steps=3)
    long = SamplingParams(seed=2, max_new_tokens=64, ignore_eos=True, max_denoising_steps=3)
    llm.generate(["a", "b"], [short, long])
    assert sizes == [2, 2, 2] + [1] * 9  # after its one canvas the short request costs nothing


def test_chat_template_and_thinking(llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    off = llm.chat_template.render(messages)
    on = llm.chat_template.render(messages, enable_thinking=True)
    assert off.startswith("<bos><|turn>system\n") and off.endswith(
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert "<|think|>" in on and "<|think|>" not in off
    ids = llm.tokenize(messages, enable_thinking=True)
    assert ids[0] == 2 and llm.tokenizer.token_to_id("<|think|>") in ids


def test_text_and_token_prompts_agree(llm):
    ids = llm.tokenize("def add(a, b):")
    assert ids[0] == llm.model.config.bos_token_id
    a = llm.generate("def add(a, b):", SamplingParams(seed=4, max_new_tokens=20))[0]
    b = llm.generate(ids, SamplingParams(seed=4, max_new_tokens=20))[0]
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_max"),
        ({"entropy_bound": "big"}, "entropy_bound"),
        ({"entropy_bound": float("nan")}, "entropy_bound"),
        ({"max_denoising_steps": 0}, "max_denoising_steps"),
        ({"sampler": "greedy"}, "sampler"),
        ({"confidence": 1.5}, "confidence"),
        ({"stop": [""]}, "stop"),
        ({"stability_threshold": -1}, "stability_threshold"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs)


def test_request_errors(llm):
    with pytest.raises(CapacityError, match=r"prompt has \d+ tokens.*context of 512"):
        llm.generate([10] * 500)
    with pytest.raises(CapacityError, match="max_new_tokens 1000 does not fit"):
        llm.generate("hello", SamplingParams(max_new_tokens=1000))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]
    with pytest.raises(RequestError, match="image_url inputs are not supported yet"):
        llm.generate(image)
    with pytest.raises(RequestError, match="image inputs are not supported yet"):
        llm.generate([2, 8, 10])  # token 8 is the image placeholder in the tiny config
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([2, 99999])
    with pytest.raises(RequestError, match="no prompts"):
        llm.generate([])
    with pytest.raises(RequestError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(RequestError, match=r"messages\[0\]\.role"):
        llm.generate([{"role": "robot", "content": "hi"}])


def test_research_api_surface(llm):
    model = llm.model
    cache = model.new_cache(batch_size=2, max_length=40)
    hidden = model.encode(torch.tensor([[2, 5, 6], [2, 7, 8]]), cache)
    assert hidden.shape == (2, 3, model.config.hidden_size) and cache.lengths() == [3, 3]
    canvas = torch.zeros(2, model.config.canvas_length, dtype=torch.long)
    logits = model.denoise(canvas, cache)
    assert logits.shape == (2, model.config.canvas_length, model.config.vocab_size)
    assert float(logits.abs().max()) <= 30.0  # soft-capped
    again = model.denoise(canvas, cache, logits)
    assert not torch.equal(again, logits) and cache.lengths() == [3, 3]
    with pytest.raises(RequestError, match="self_conditioning_logits must have shape"):
        model.denoise(canvas, cache, logits[:, :3])
    with pytest.raises(CapacityError, match="do not fit"):
        model.encode(torch.zeros(2, 38, dtype=torch.long), cache)
    with pytest.raises(RequestError, match="integer tensor"):
        model.encode(torch.zeros(2, 3), cache)
    with pytest.raises(CapacityError, match="exceeds the model's context"):
        model.new_cache(batch_size=1, max_length=10**6)


def test_batched_autoregressive_decoding_equals_one_prompt_at_a_time(llm):
    from dgemma.engine.autoregressive import generate_autoregressive, generate_autoregressive_batch

    gen = torch.Generator().manual_seed(3)
    # ragged lengths, two of them past the sliding window (8), so rows feed prompt and predicted tokens
    prompts = [[2, *torch.randint(5, 300, (n,), generator=gen).tolist()] for n in (2, 11, 5, 23)]
    eos = [1, 45]  # 45: the token these random weights repeat after the second prompt, so it stops at once
    batched = generate_autoregressive_batch(llm.model, prompts, max_new_tokens=12, eos_token_ids=eos)
    single = [generate_autoregressive(llm.model, p, max_new_tokens=12, eos_token_ids=eos) for p in prompts]
    assert batched == single
    assert [len(a) for a in batched] == [12, 0, 12, 12]
    with pytest.raises(RequestError, match="at least one token"):
        generate_autoregressive_batch(llm.model, [[2], []], max_new_tokens=4, eos_token_ids=eos)


def test_the_engine_is_kept_between_calls_and_left_idle(tiny_dir):
    from dgemma import LLM

    llm = LLM(tiny_dir)  # its own: the engine it keeps is what is checked
    params = SamplingParams(seed=3, max_new_tokens=40)
    (first,) = llm.generate("def add(a, b):", params)
    engine = llm._engine
    (again,) = llm.generate("def add(a, b):", params)
    assert llm._engine is engine and again.token_ids == first.token_ids
    # a stream abandoned after its first event leaves nothing running, and the next call is unaffected
    stream = llm.stream(["x = 1", "def f():"], params)
    next(stream)
    stream.close()
    assert llm._engine.slots == 2 and not llm._engine.busy
    assert llm.generate("def add(a, b):", params)[0].token_ids == first.token_ids
    # a larger batch gets a larger engine, which a smaller call then reuses
    llm.generate(["a", "b", "c"], params)
    bigger = llm._engine
    llm.generate("b", params)
    assert bigger.slots == 3 and llm._engine is bigger
