"""What callers receive: final outputs with stats, and the events of a stream (text deltas, drafts)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """How the answer was produced. `tokens_per_forward` = generated tokens / denoise steps."""

    prompt_tokens: int
    completion_tokens: int
    steps_per_canvas: tuple[int, ...]
    seconds: float

    @property
    def denoise_steps(self) -> int:
        return sum(self.steps_per_canvas)

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.denoise_steps if self.denoise_steps else 0.0


@dataclass(frozen=True, kw_only=True)
class GenerationOutput:
    """One finished answer. `finish_reason`: "stop" (EOS or a stop string) or "length" (max_new_tokens).

    `token_ids` are the generated tokens, without the EOS that ended the answer."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "steps_per_canvas": list(self.stats.steps_per_canvas),
            "tokens_per_forward": round(self.stats.tokens_per_forward, 4),
            "seconds": round(self.stats.seconds, 4),
            "prompt_tokens": self.stats.prompt_tokens,
            "completion_tokens": self.stats.completion_tokens,
        }


@dataclass(frozen=True, kw_only=True)
class TextDelta:
    """Committed text: appended to the answer of request `index`, never revised."""

    index: int
    text: str
    token_ids: tuple[int, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class Draft:
    """An intermediate canvas (argmax) of request `index` while it denoises; replaced by the next draft
    and finally by the committed text."""

    index: int
    canvas: int  # which canvas of the answer (0-based)
    step: int  # denoise steps taken on it so far
    text: str
    token_ids: tuple[int, ...]


StreamEvent = TextDelta | Draft | GenerationOutput
