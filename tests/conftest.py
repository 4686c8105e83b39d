from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# without a GPU, Triton kernels run in its interpreter on CPU tensors (tests/test_kernels.py); set before
# anything imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import write_tiny_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint written by dgemma (release-style config, tokenizer, chat template)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def llm(tiny_dir):
    from dgemma import LLM

    return LLM(tiny_dir, device="cpu")
