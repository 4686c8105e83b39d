"""dgemma: run, serve and fine-tune DiffusionGemma, Google DeepMind's block-diffusion Gemma 4.

Public API: `LLM` (generation), `SamplingParams`, the research API `DiffusionGemma`
(`from_pretrained`, `new_cache`, `encode`, `denoise`), outputs and errors. Importing dgemma does no work
(no CUDA init, no downloads).
"""

from dgemma.api import LLM
from dgemma.errors import (
    CapacityError,
    CheckpointError,
    ConfigError,
    DataError,
    DgemmaError,
    EngineDeadError,
    RequestError,
)
from dgemma.model.config import ModelConfig
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.outputs import Draft, GenerationOutput, GenerationStats, TextDelta
from dgemma.params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CapacityError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DgemmaError",
    "DiffusionGemma",
    "Draft",
    "EngineDeadError",
    "GenerationOutput",
    "GenerationStats",
    "ModelConfig",
    "RequestError",
    "SamplingParams",
    "TextDelta",
    "__version__",
]
