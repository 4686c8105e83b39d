"""GPU kernels (Triton), each beside the pure-torch code it is tested against.

Nothing here is imported unless a kernel is used: `triton` is optional (the CPU install has none)."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
