"""Per-request generation parameters: validated on construction, unset fields filled from the checkpoint's
`generation_config.json` (then from the reference defaults).

`max_new_tokens` deliberately ignores the checkpoint's value: the release ships 256 (one canvas), which
would silently cap every answer. The default is `DEFAULT_MAX_NEW_TOKENS` (or up to EOS), bounded by the
context.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dgemma.errors import CheckpointError, RequestError

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 2048
SAMPLER_NAMES = ("entropy_bound", "confidence")


@dataclass(frozen=True, kw_only=True)
class DiffusionDefaults:
    """Denoising defaults, from generation_config.json; reference values where the file is silent."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = (1,)

    @classmethod
    def from_checkpoint(cls, directory: Path, eos_token_ids: tuple[int, ...]) -> DiffusionDefaults:
        path = Path(directory) / "generation_config.json"
        base = cls(eos_token_ids=eos_token_ids)
        if not path.exists():
            return base
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        values: dict[str, Any] = {}
        sampler_config = data.get("sampler_config")
        if isinstance(sampler_config, dict) and sampler_config.get("entropy_bound") is not None:
            values["entropy_bound"] = sampler_config["entropy_bound"]
        for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
            if data.get(name) is not None:
                values[name] = data[name]
        eos = data.get("eos_token_id")
        if eos is not None:
            values["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
        if data.get("max_new_tokens") is not None:
            logger.debug(
                "ignoring generation_config max_new_tokens=%s (one canvas cap)", data["max_new_tokens"]
            )
        try:
            SamplingParams(**{k: v for k, v in values.items() if k in _PARAM_NAMES})
        except RequestError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return replace(base, **values)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """What a caller may set per request. None means: the checkpoint's default.

    max_new_tokens: exact cap on generated tokens (the last canvas is trimmed); default 2048 or EOS.
    seed: makes the request reproducible, whatever else is batched with it (it owns its generator).
    stop: strings that end the answer (not included in the text).
    sampler: "entropy_bound" (reference default) or "confidence" (commit positions whose top
        probability reaches `confidence`).
    """

    max_new_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    sampler: str = "entropy_bound"
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    confidence: float = 0.9
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop) if isinstance(self.stop, list) else self.stop)
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("max_denoising_steps", self.max_denoising_steps, minimum=1)
        _check_int("stability_threshold", self.stability_threshold, minimum=0)
        _check_float("entropy_bound", self.entropy_bound, low=0.0, low_open=True)
        _check_float("t_min", self.t_min, low=0.0, low_open=True)
        _check_float("t_max", self.t_max, low=0.0, low_open=True)
        _check_float("confidence_threshold", self.confidence_threshold, low=0.0, low_open=True)
        _check_float("confidence", self.confidence, low=0.0, high=1.0, low_open=True)
        if self.t_min is not None and self.t_max is not None and self.t_max < self.t_min:
            raise RequestError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")
        if self.sampler not in SAMPLER_NAMES:
            raise RequestError(f"sampler must be one of {', '.join(SAMPLER_NAMES)}, got {self.sampler!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    def resolve(self, defaults: DiffusionDefaults) -> ResolvedParams:
        values = {f.name: getattr(self, f.name) for f in fields(DiffusionDefaults) if hasattr(self, f.name)}
        merged = {k: (getattr(defaults, k) if v is None else v) for k, v in values.items()}
        if merged["t_max"] < merged["t_min"]:
            raise RequestError(f"t_max ({merged['t_max']}) must be >= t_min ({merged['t_min']})")
        return ResolvedParams(
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            stop=self.stop,
            sampler=self.sampler,
            confidence=self.confidence,
            eos_token_ids=() if self.ignore_eos else defaults.eos_token_ids,
            **{k: v for k, v in merged.items() if k != "eos_token_ids"},
        )


_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


@dataclass(frozen=True, kw_only=True)
class ResolvedParams:
    """SamplingParams with every default applied (what the engine runs)."""

    max_new_tokens: int | None
    seed: int | None
    stop: tuple[str, ...]
    sampler: str
    confidence: float
    eos_token_ids: tuple[int, ...]
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise RequestError(f"{name} must be >= {minimum}, got {value}")


def _check_float(
    name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"> {low}" if low_open else f">= {low}"
        raise RequestError(
            f"{name} must be {bound}" + (f" and <= {high}" if high is not None else "") + f", got {value}"
        )
