"""`LLM`: the Python entry point. Loads a checkpoint (model, tokenizer, chat template, generation
defaults) and generates for text prompts, chat conversations or token-id prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dgemma.engine.generate import Engine, Request, plan_request, run
from dgemma.errors import RequestError
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.model.presets import DEFAULT_MODEL_DIR
from dgemma.model.weights import resolve_checkpoint
from dgemma.outputs import GenerationOutput, StreamEvent
from dgemma.params import DiffusionDefaults, SamplingParams
from dgemma.text.chat import ChatTemplate, check_messages
from dgemma.text.tokenizer import Tokenizer

# One prompt: text, chat messages [{"role": ..., "content": ...}], or token ids.
Prompt = str | Sequence[dict] | Sequence[int]


class LLM:
    """DiffusionGemma ready to generate.

    >>> llm = LLM()                     # the embedded default model; or LLM("path/or/hub-id")
    >>> out = llm.generate("def fibonacci(n):", SamplingParams(max_new_tokens=128, seed=0))[0]
    >>> out.text, out.finish_reason, out.stats.tokens_per_forward

    `quantization="fp8"` stores the experts' weights in FP8 as they load; "fp8-w8a8" also rounds their
    gate-up input to FP8 per token (dgemma.model.quant).

    The generation engine (its KV cache and, on the GPU, its captured CUDA graphs) is kept between
    calls, so a second call starts at once; it grows to the largest batch and length asked so far
    (`del llm` frees it). Not thread-safe: a server runs its own engine (dgemma.serve).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        quantization: str | None = None,
    ):
        directory = resolve_checkpoint(DEFAULT_MODEL_DIR if model is None else model)
        self.path = directory
        self.model = DiffusionGemma.from_pretrained(
            directory, device=device, dtype=dtype, progress=progress, quantization=quantization
        )
        self.tokenizer = Tokenizer.from_checkpoint(directory)
        self.chat_template = ChatTemplate.from_checkpoint(directory)
        self.defaults = DiffusionDefaults.from_checkpoint(directory, self.model.config.eos_token_ids)
        self._engine: Engine | None = None

    # -- prompts -----------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt, *, enable_thinking: bool = False) -> list[int]:
        """Token ids of one prompt (chat messages go through the checkpoint's chat template)."""
        if isinstance(prompt, str):
            ids = self._need_tokenizer().encode(prompt)
            bos = self.model.config.bos_token_id
            return ids if bos is None or ids[:1] == [bos] else [bos, *ids]
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            check_messages(list(prompt))
            if self.chat_template is None:
                raise RequestError("this checkpoint has no chat template; pass plain text or token ids")
            text = self.chat_template.render(list(prompt), enable_thinking=enable_thinking)
            return self._need_tokenizer().encode(text, add_special_tokens=False)
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(prompt)
        raise RequestError(
            "a prompt must be a string, a list of chat messages ({'role', 'content'}) or a list of token ids"
        )

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RequestError("this checkpoint ships no tokenizer.json: pass token ids instead of text")
        return self.tokenizer

    def _requests(
        self, prompts, params, *, drafts: bool, enable_thinking: bool
    ) -> tuple[list[Request], bool]:
        single = _is_single(prompts)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise RequestError("no prompts given")
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list) or not all(
                isinstance(p, SamplingParams) for p in param_list
            ):
                raise RequestError(f"give one SamplingParams, or one per prompt ({len(prompt_list)})")
        requests = [
            Request(
                index=i,
                prompt_ids=tuple(self.tokenize(p, enable_thinking=enable_thinking)),
                params=sp.resolve(self.defaults),
                drafts=drafts,
            )
            for i, (p, sp) in enumerate(zip(prompt_list, param_list))
        ]
        return requests, single

    # -- generation --------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        enable_thinking: bool = False,
    ) -> list[GenerationOutput]:
        """Generate for one prompt or a batch; returns one output per prompt, in order."""
        requests, _ = self._requests(prompts, params, drafts=False, enable_thinking=enable_thinking)
        events = run(self.model, requests, decode=self._decode, engine=self._engine_for(requests))
        return sorted((e for e in events if isinstance(e, GenerationOutput)), key=lambda o: o.index)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        drafts: bool = False,
        enable_thinking: bool = False,
    ) -> Iterator[StreamEvent]:
        """Yield `TextDelta` (committed text), `Draft` (when `drafts`) and a final `GenerationOutput` per
        prompt. Events carry the prompt's `index`."""
        requests, _ = self._requests(prompts, params, drafts=drafts, enable_thinking=enable_thinking)
        yield from run(self.model, requests, decode=self._decode, engine=self._engine_for(requests))

    def _engine_for(self, requests: list[Request]) -> Engine:
        """The kept engine, replaced by a larger one when these requests do not fit in it."""
        need = max(plan_request(self.model, r, self._decode)[1] for r in requests)
        engine = self._engine
        if engine is None or engine.busy or not engine.fits(len(requests), need):
            slots = max(len(requests), engine.slots if engine is not None else 0)
            length = max(need, engine.cache.max_length if engine is not None else 0)
            self._engine = engine = None  # the old cache is freed before the new one is allocated
            engine = self._engine = Engine(
                self.model, slots=slots, max_length=length, decode=self._decode, max_waiting=slots
            )
        return engine

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


def _is_single(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return True
    # chat messages or token ids: one prompt
    return (
        isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(x, (dict, int)) for x in prompts)
    )
