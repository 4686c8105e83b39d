"""The generation engine (reference semantics, multi-canvas, continuous batching).

`Engine` owns a KV cache of `slots` rows. Requests wait in a bounded queue until a row is free; each
`step()` admits waiting requests (encodes their prompts into their rows; on the GPU, prompts
admitted together share padded encode forwards, see `prefill_groups`), runs one batched `denoise`
over every canvas still denoising (whatever its step), lets each canvas take its sampler step with its
own generator, and commits the canvases that stopped: cut at the first EOS, trimmed to
`max_new_tokens` and emitted at once. If the answer goes on, the canvas is encoded into the cache at the
next step, in the same forward as the next canvas's first denoise step (one read of the weights for
both: `DenoiseRunner.commit_and_hidden`). A finished or cancelled request frees its row at once, and a
request admitted later joins the running batch at the next step.

A seeded answer does not depend on what else is batched, nor on when it was admitted: its generator is
its own, and the model computes each row independently of the others (batch invariance).
`run()` is the engine driven to completion over a fixed list of requests.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dgemma.denoise.sampler import Sampler, StableAndConfident, make_sampler, random_canvas, temperature
from dgemma.engine.runner import DenoiseRunner
from dgemma.engine.vocab import VocabStage
from dgemma.errors import CapacityError, QueueFullError, RequestError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.outputs import Draft, GenerationOutput, GenerationStats, StreamEvent, TextDelta
from dgemma.params import DEFAULT_MAX_NEW_TOKENS, ResolvedParams
from dgemma.text.stream import TextStream

GPU_LOGIT_ROWS = 4  # canvases whose fp32 logits [C, V] a step holds at once on the GPU
# prompt tokens (padding included) one encode forward takes on the GPU when several requests are
# admitted at once; the CPU encodes each prompt alone (batch invariance, see docs/design.md)
GPU_PREFILL_TOKENS = 4096


@dataclass(frozen=True, kw_only=True)
class Request:
    index: int
    prompt_ids: tuple[int, ...]
    params: ResolvedParams
    drafts: bool = False


@dataclass
class _Row:
    """Mutable state of one request while it runs."""

    request: Request
    row: int
    max_new_tokens: int
    generator: torch.Generator
    sampler: Sampler
    text: TextStream
    started: float
    canvas: torch.Tensor | None = None
    # the previous step's tempered logits through the soft embedding [1, C, D] (None on a first step)
    self_conditioning: torch.Tensor | None = None
    stopper: StableAndConfident | None = None
    draft: torch.Tensor | None = None  # [1, C] the previous step's argmax canvas (None on a first step)
    pending: torch.Tensor | None = None  # [1, C] a committed canvas not encoded yet (see the module doc)
    cur_step: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def check_prompt(prompt_ids: Sequence[int], config) -> None:
    if not prompt_ids:
        raise RequestError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise RequestError(
            f"prompt token ids {bad[:5]} are outside the vocabulary 0..{config.vocab_size - 1}"
        )
    if config.image_token_id is not None and config.image_token_id in prompt_ids:
        raise RequestError(
            "image inputs are not supported yet (the prompt holds the image placeholder token)"
        )


def plan_lengths(prompt_len: int, requested: int | None, canvas: int, context: int) -> int:
    """The max_new_tokens a request runs with: as asked, or the default bounded by the context."""
    room = (context - prompt_len) // canvas * canvas  # canvases are denoised whole
    if room <= 0:
        raise CapacityError(
            f"the prompt has {prompt_len} tokens; with one {canvas}-token canvas it exceeds the "
            f"model's context of {context} positions"
        )
    if requested is None:
        return min(DEFAULT_MAX_NEW_TOKENS, room)
    if requested > room:
        raise CapacityError(
            f"max_new_tokens {requested} does not fit: the prompt has {prompt_len} tokens and the context "
            f"is {context} positions, which leaves room for {room} new tokens ({canvas}-token canvases)"
        )
    return requested


def run(
    model: DiffusionGemma,
    requests: Sequence[Request],
    *,
    decode: Callable[[Sequence[int]], str] | None = None,
    engine: Engine | None = None,
) -> Iterator[StreamEvent]:
    """Generate for all requests; yield TextDelta / Draft events and one GenerationOutput per request.

    `engine`: an idle engine with a row for each request and rows long enough (see `fits`), reused (on
    the GPU its CUDA graphs are captured already); by default one sized for these requests. Every
    request is checked before any work, and the engine is left idle however the caller stops."""
    if not requests:
        return
    # every request is checked before any work; the cache is sized for the longest
    need = max(plan_request(model, r, decode)[1] for r in requests)
    if engine is None:
        engine = Engine(model, slots=len(requests), max_length=need, decode=decode, max_waiting=len(requests))
    elif engine.busy or not engine.fits(len(requests), need):
        raise ValueError("run() needs an idle engine with a row of enough positions for each request")
    try:
        for request in requests:
            engine.submit(request)
        while engine.busy:
            yield from engine.step()
    finally:  # an error, or a consumer that stopped early: nothing is left running in the engine
        engine.clear()


def prefill_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Which prompts (indices into `lengths`) share an encode forward: longest first, a group grows
    while rows x its longest prompt stays within `budget` tokens and at most a quarter of that is
    padding. A budget below two prompts' length encodes each alone."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        if group is not None:
            padded = (len(group) + 1) * lengths[group[0]]
            real = sum(lengths[j] for j in group) + lengths[i]
            if padded <= budget and 4 * real >= 3 * padded:
                group.append(i)
                continue
        groups.append([i])
    return groups


def plan_request(model: DiffusionGemma, request: Request, decode=None) -> tuple[int, int]:
    """(max_new_tokens it runs with, cache positions it needs: the last canvas is never encoded);
    raises if it can never run."""
    if request.params.stop and decode is None:
        raise RequestError("stop strings need a tokenizer, and this checkpoint ships none")
    config = model.config
    check_prompt(request.prompt_ids, config)
    c = config.canvas_length
    max_new = plan_lengths(
        len(request.prompt_ids), request.params.max_new_tokens, c, config.max_position_embeddings
    )
    return max_new, len(request.prompt_ids) + (-(-max_new // c) - 1) * c


class Engine:
    """Continuous batching over a KV cache of `slots` rows of `max_length` positions each.

    Not thread-safe: one thread calls `submit`, `cancel` and `step` (a server wraps it in its loop)."""

    def __init__(
        self,
        model: DiffusionGemma,
        *,
        slots: int,
        max_length: int,
        decode: Callable[[Sequence[int]], str] | None = None,
        max_waiting: int = 256,
        graphs: bool | None = None,
        static: bool | None = None,
        fuse_commit: bool = True,
        prefill_tokens: int | None = None,
    ):
        if slots < 1 or max_waiting < 0:
            raise CapacityError(
                f"the engine needs slots >= 1 and max_waiting >= 0, got {slots}, {max_waiting}"
            )
        self.model = model
        self.decode = decode
        self.slots = slots
        self.max_waiting = max_waiting
        # CUDA graphs by default on the GPU (graphs=False: the eager path; static=True without graphs:
        # the graphs' forwards run uncaptured, see DenoiseRunner); they pad batches with a scratch row
        # after the request rows
        graphs = model.device.type == "cuda" if graphs is None else graphs
        static = graphs if static is None else static
        self.cache = model.new_cache(batch_size=slots + (1 if static else 0), max_length=max_length)
        self.runner = DenoiseRunner(model, self.cache, graphs=graphs, static=static, fuse_commit=fuse_commit)
        # the head's fp32 logits are [rows, C, V]: on the GPU a few rows at a time, so memory per step
        # does not grow with the batch (on CPU the whole batch: one call, as the reference does)
        self.logit_rows = GPU_LOGIT_ROWS if model.device.type == "cuda" else slots
        # on CUDA the built-in samplers' vocabulary stage is a graph replay too (see VocabStage)
        self.vocab = VocabStage(model, graphs=graphs, static=static, groups=self.logit_rows)
        # prompts admitted together are encoded in groups of up to this many tokens (see prefill_groups)
        if prefill_tokens is None:
            prefill_tokens = GPU_PREFILL_TOKENS if model.device.type == "cuda" else 0
        self.prefill_tokens = prefill_tokens
        self._no_draft = torch.full((1, model.config.canvas_length), -1, device=model.device)
        self.free: list[int] = list(range(slots))
        self.waiting: deque[_Row] = deque()
        self.active: list[_Row] = []
        self._cancelled: set[int] = set()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def fits(self, num_requests: int, positions: int) -> bool:
        """Whether `num_requests` requests needing up to `positions` cache positions run at once."""
        return num_requests <= self.slots and positions <= self.cache.max_length

    def clear(self) -> None:
        """Drop every request, waiting or running, and free their rows."""
        self.waiting.clear()
        self._release(list(self.active))
        self._cancelled.clear()

    def submit(self, request: Request) -> None:
        """Queue a request (its `index` names it in the events); raises if it can never run or the
        queue is full. Nothing is computed until `step`."""
        max_new, need = plan_request(self.model, request, self.decode)
        if need > self.cache.max_length:
            raise CapacityError(
                f"the request needs {need} cache positions (prompt {len(request.prompt_ids)} tokens plus "
                f"its canvases); the engine's rows hold {self.cache.max_length}"
            )
        # requests that will take a free row at the next step are not waiting for one
        if len(self.waiting) - len(self.free) >= self.max_waiting:
            raise QueueFullError(
                f"{len(self.waiting) - len(self.free)} requests are already waiting for a free row "
                f"(at most {self.max_waiting}); try again later"
            )
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.waiting.append(
            _Row(
                request=request,
                row=-1,
                max_new_tokens=max_new,
                generator=torch.Generator(self.model.device).manual_seed(seed),
                sampler=make_sampler(
                    params.sampler, entropy_bound=params.entropy_bound, confidence=params.confidence
                ),
                text=TextStream(self.decode or (lambda ids: ""), params.stop),
                started=time.perf_counter(),
            )
        )

    def cancel(self, index: int) -> None:
        """Drop a request: a waiting one at once, a running one (and its cache row) at the next step."""
        kept = [r for r in self.waiting if r.request.index != index]
        if len(kept) != len(self.waiting):
            self.waiting = deque(kept)
        elif any(r.request.index == index for r in self.active):
            self._cancelled.add(index)

    def step(self) -> list[StreamEvent]:
        """One engine step: admit, denoise every active canvas once, commit what stopped."""
        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            return list(self._denoise_step()) if self.active else []

    def _drop_cancelled(self) -> None:
        if self._cancelled:
            gone = [r for r in self.active if r.request.index in self._cancelled]
            self._release(gone)
            self._cancelled.clear()

    def _release(self, rows: list[_Row]) -> None:
        if rows:
            gone = {id(r) for r in rows}
            self.active = [r for r in self.active if id(r) not in gone]
            self.cache.reset([r.row for r in rows])
            self.free.extend(r.row for r in rows)

    def _admit(self) -> None:
        c, vocab = self.model.config.canvas_length, self.model.config.vocab_size
        admitted = []
        while self.free and self.waiting:
            r = self.waiting.popleft()
            r.row = self.free.pop(0)
            admitted.append(r)
        prompts = [r.request.prompt_ids for r in admitted]
        for group in prefill_groups([len(p) for p in prompts], self.prefill_tokens):
            width = len(prompts[group[0]])  # the group's longest prompt
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for j, i in enumerate(group):
                ids[j, : len(prompts[i])] = torch.tensor(prompts[i])
            lengths = [len(prompts[i]) for i in group]
            self.runner.prefill(ids, [admitted[i].row for i in group], lengths)
        for r in admitted:
            _new_canvas(r, c, vocab)
            self.active.append(r)

    def _forward(self) -> tuple[list[_Row], torch.Tensor]:
        """The denoiser's hidden states of every active canvas, in the order of the rows returned: the
        canvases past their first step, then those whose previous canvas is still to be encoded."""
        plain = [r for r in self.active if r.pending is None]
        fresh = [r for r in self.active if r.pending is not None]
        hidden = []
        if plain:
            rows = [r.row for r in plain]
            canvases, soft = [r.canvas for r in plain], [r.self_conditioning for r in plain]
            hidden.append(self.runner.hidden(canvases, soft, rows, self.cache.lengths(rows)))
        if fresh:
            commits, canvases = [r.pending for r in fresh], [r.canvas for r in fresh]
            hidden.append(self.runner.commit_and_hidden(commits, canvases, [r.row for r in fresh]))
            for r in fresh:
                r.pending = None
        return plain + fresh, hidden[0] if len(hidden) == 1 else torch.cat(hidden)

    def _denoise_step(self) -> Iterator[StreamEvent]:
        model, decode = self.model, self.decode
        active, hidden = self._forward()
        committed: list[_Row] = []
        for lo in range(0, len(active), self.logit_rows):
            group = active[lo : lo + self.logit_rows]
            outcomes = self.vocab.sample(
                hidden[lo : lo + len(group)],
                [r.canvas[0] for r in group],
                temps=[_temperature(r) for r in group],
                samplers=[r.sampler for r in group],
                generators=[r.generator for r in group],
            )
            # what the stop test needs, read in one host synchronisation for the group
            drafts = torch.cat([o.argmax for o in outcomes])
            previous = torch.cat([self._no_draft if r.draft is None else r.draft for r in group])
            unchanged = (drafts == previous).all(dim=-1).float()
            facts = torch.stack([unchanged, torch.stack([o.mean_entropy for o in outcomes])], dim=1).tolist()
            going_on = []
            for r, outcome, (same, mean_entropy) in zip(group, outcomes, facts):
                stop = r.stopper(bool(same), mean_entropy)
                r.canvas, r.draft = outcome.next_canvas, outcome.argmax
                r.cur_step -= 1
                r.steps_per_canvas[-1] += 1
                if r.request.drafts:
                    ids = tuple(outcome.argmax[0].tolist())
                    yield Draft(
                        index=r.request.index,
                        canvas=len(r.steps_per_canvas) - 1,
                        step=r.steps_per_canvas[-1],
                        text=decode(ids) if decode is not None else "",
                        token_ids=ids,
                    )
                if stop or r.cur_step == 0:
                    r.canvas = outcome.argmax  # the committed canvas is the argmax one
                    committed.append(r)
                else:
                    going_on.append((r, outcome))
            if going_on:  # the next step's self-conditioning signal, for the group's continuing canvases
                soft = self.vocab.soft_embeddings([outcome for _, outcome in going_on])
                for j, (r, _) in enumerate(going_on):
                    r.self_conditioning = soft[j : j + 1]
        yield from _commit(committed)
        for r in committed:
            if r.finish_reason is None:  # encoded at the next step, with the next canvas's first step
                r.pending = r.canvas
                _new_canvas(r, model.config.canvas_length, model.config.vocab_size)
        self._release([r for r in active if r.finish_reason is not None])


def _temperature(r: _Row) -> torch.Tensor:
    p = r.request.params
    return temperature(r.cur_step, p.max_denoising_steps, p.t_min, p.t_max)


def _new_canvas(r: _Row, canvas_length: int, vocab_size: int) -> None:
    params = r.request.params
    r.canvas = random_canvas(canvas_length, vocab_size, r.generator, r.generator.device)
    r.self_conditioning = r.draft = None
    r.stopper = StableAndConfident(params.stability_threshold, params.confidence_threshold)
    r.cur_step = params.max_denoising_steps
    r.steps_per_canvas.append(0)


def _commit(committed: list[_Row]) -> Iterator[StreamEvent]:
    """Cut each stopped canvas at its first EOS, trim it to the budget, emit it, decide if the answer ends."""
    for r in committed:
        tokens = r.canvas[0].tolist()
        eos = r.request.params.eos_token_ids
        cut = next((i for i, t in enumerate(tokens) if t in eos), None)
        budget = r.max_new_tokens - len(r.text.token_ids)
        keep = tokens[: cut if cut is not None else len(tokens)][:budget]
        before = len(r.text.token_ids)
        delta = r.text.add(keep)
        keep = r.text.token_ids[before:]  # a stop string may have cut the canvas shorter
        if r.text.stopped or (cut is not None and cut <= budget):
            r.finish_reason = "stop"
        elif len(r.text.token_ids) >= r.max_new_tokens:
            r.finish_reason = "length"
        if r.finish_reason is not None:
            delta += r.text.finish()
        if delta or keep:
            yield TextDelta(index=r.request.index, text=delta, token_ids=tuple(keep))
        if r.finish_reason is not None:
            yield GenerationOutput(
                index=r.request.index,
                text=r.text.text,
                token_ids=tuple(r.text.token_ids),
                finish_reason=r.finish_reason,
                stats=GenerationStats(
                    prompt_tokens=len(r.request.prompt_ids),
                    completion_tokens=len(r.text.token_ids),
                    steps_per_canvas=tuple(r.steps_per_canvas),
                    seconds=time.perf_counter() - r.started,
                ),
            )
