"""Continuous batching: requests join and leave a running batch; a seeded answer stays the same whatever
else runs and whenever it was admitted; cancelled requests free their rows; overload is refused."""

from __future__ import annotations

import gc
import weakref

import pytest

from dgemma import SamplingParams
from dgemma.engine.generate import Engine
from dgemma.errors import CapacityError, QueueFullError
from dgemma.outputs import GenerationOutput

PROMPTS = ["def a():", "hello there", "x = [1, 2,", "class B:", "import os\n"]


def requests(llm, prompts, max_new_tokens=40):
    params = [SamplingParams(max_new_tokens=max_new_tokens, seed=10 + i) for i in range(len(prompts))]
    return llm._requests(prompts, params, drafts=False, enable_thinking=False)[0]


def alone(llm, request) -> GenerationOutput:
    engine = Engine(llm.model, slots=1, max_length=256, decode=llm._decode)
    engine.submit(request)
    return finish(engine)[request.index]


def finish(engine, outputs=None) -> dict[int, GenerationOutput]:
    outputs = {} if outputs is None else outputs
    while engine.busy:
        for event in engine.step():
            if isinstance(event, GenerationOutput):
                outputs[event.index] = event
    return outputs


def test_more_requests_than_rows_queue_and_equal_their_solo_answers(llm):
    reqs = requests(llm, PROMPTS)
    engine = Engine(llm.model, slots=2, max_length=256, decode=llm._decode)
    for r in reqs:
        engine.submit(r)
    outputs = finish(engine)
    assert sorted(outputs) == list(range(len(PROMPTS)))
    for r in reqs:
        assert outputs[r.index].token_ids == alone(llm, r).token_ids
    assert sorted(engine.free) == [0, 1] and engine.cache.lengths() == [0, 0]


def test_a_request_admitted_mid_flight_gets_its_solo_answer(llm):
    first, late = requests(llm, PROMPTS[:2], max_new_tokens=60)
    engine = Engine(llm.model, slots=3, max_length=256, decode=llm._decode)
    engine.submit(first)
    outputs = {}
    for _ in range(3):  # the first request is three denoise steps in when the second arrives
        for event in engine.step():
            if isinstance(event, GenerationOutput):
                outputs[event.index] = event
    engine.submit(late)
    finish(engine, outputs)
    assert outputs[late.index].token_ids == alone(llm, late).token_ids
    assert outputs[first.index].token_ids == alone(llm, first).token_ids


def test_cancel_frees_the_row_within_a_step(llm):
    a, b, waiting = requests(llm, PROMPTS[:3], max_new_tokens=60)
    engine = Engine(llm.model, slots=2, max_length=256, decode=llm._decode)
    for r in (a, b, waiting):
        engine.submit(r)
    engine.step()
    assert engine.free == [] and len(engine.waiting) == 1
    engine.cancel(waiting.index)  # a waiting request leaves the queue at once
    assert not engine.waiting
    engine.cancel(a.index)
    row_of_a = next(r.row for r in engine.active if r.request.index == a.index)
    events = engine.step()
    assert all(e.index != a.index for e in events)
    assert [r.request.index for r in engine.active] == [b.index]
    assert row_of_a in engine.free and engine.cache.lengths([row_of_a]) == [0]
    outputs = finish(engine)
    assert set(outputs) == {b.index}
    assert outputs[b.index].token_ids == alone(llm, b).token_ids


def test_overload_and_oversized_requests_are_refused_with_the_numbers(llm):
    engine = Engine(llm.model, slots=1, max_length=64, decode=llm._decode, max_waiting=1)
    first, second, third = requests(llm, PROMPTS[:3], max_new_tokens=16)
    engine.submit(first)  # takes the free row at the next step
    engine.submit(second)  # waits
    with pytest.raises(QueueFullError, match="1 requests are already waiting"):
        engine.submit(third)
    long_request = requests(llm, ["word " * 40], max_new_tokens=80)[0]
    with pytest.raises(CapacityError, match="cache positions"):
        Engine(llm.model, slots=1, max_length=64, decode=llm._decode).submit(long_request)


def test_a_dropped_engine_is_freed_at_once(llm):
    """No reference cycle keeps an engine (its cache, its CUDA graphs) alive until the garbage collector
    runs: on the GPU that could happen during another engine's graph capture and break it."""
    gc.disable()
    try:
        engine = Engine(llm.model, slots=1, max_length=64, decode=llm._decode, graphs=False, static=True)
        engine.submit(requests(llm, PROMPTS[:1], max_new_tokens=16)[0])
        engine.step()  # the static forwards are built (a graph's buffers and its forward)
        assert engine.runner._captured
        runner, cache = weakref.ref(engine.runner), weakref.ref(engine.cache)
        del engine
        assert runner() is None and cache() is None
    finally:
        gc.enable()


def test_prefill_groups_share_a_forward_within_the_budget_and_little_padding():
    from dgemma.engine.generate import prefill_groups

    assert prefill_groups([512] * 8, 4096) == [list(range(8))]
    assert prefill_groups([512] * 9, 4096) == [list(range(8)), [8]]  # the budget
    assert prefill_groups([100, 500, 480], 4096) == [[1, 2], [0]]  # longest first; 100 would be 80% padding
    assert prefill_groups([5000, 10], 4096) == [[0], [1]]  # longer than the budget: alone
    assert prefill_groups([30, 30], 0) == [[0], [1]]  # the CPU default: each prompt alone


def test_prompts_of_different_lengths_encode_in_one_padded_forward(llm):
    """`encode(..., lengths=...)` fills each row's cache as its own encode does (the padding's K/V lie
    past the row's end) and advances each row by its real length."""
    import torch

    model = llm.model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    alone = model.new_cache(batch_size=3, max_length=32)
    for row, ids in enumerate(prompts):
        model.encode(torch.tensor([ids]), alone, rows=[row])
    padded = torch.zeros(3, 7, dtype=torch.long)
    for row, ids in enumerate(prompts):
        padded[row, : len(ids)] = torch.tensor(ids)
    together = model.new_cache(batch_size=3, max_length=32)
    hidden = model.encode(padded, together, lengths=[7, 3, 5])
    assert together.lengths() == alone.lengths() == [7, 3, 5]
    for layer in range(len(together.keys)):
        for row, ids in enumerate(prompts):
            n = len(ids)
            for a, b in ((together.keys, alone.keys), (together.values, alone.values)):
                torch.testing.assert_close(a[layer][row, :, :n], b[layer][row, :, :n], rtol=1e-5, atol=1e-5)
    assert hidden.shape[:2] == (3, 7)
    with pytest.raises(Exception, match="lengths"):
        model.encode(padded, model.new_cache(batch_size=3, max_length=32), lengths=[7, 0, 5])
