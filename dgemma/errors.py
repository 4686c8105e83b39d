"""The one exception hierarchy of dgemma: every error a caller can act on derives from DgemmaError."""

from __future__ import annotations


class DgemmaError(Exception):
    """Base class of every error dgemma raises on purpose."""


class ConfigError(DgemmaError):
    """An engine or model configuration value is invalid."""


class CheckpointError(DgemmaError):
    """A checkpoint is missing, malformed, or does not match its config (names the file or tensor)."""


class RequestError(DgemmaError):
    """A request is invalid: bad parameter, unsupported input (maps to HTTP 400)."""


class DataError(DgemmaError):
    """Training data is malformed (names the file, the line and what is wrong)."""


class CapacityError(RequestError):
    """A request can never fit (prompt plus output longer than the context or the cache)."""


class QueueFullError(DgemmaError):
    """The engine's waiting queue is full: try again later (maps to HTTP 503 with Retry-After)."""


class EngineDeadError(DgemmaError):
    """The engine stopped and cannot serve requests any more (maps to HTTP 503)."""
