"""Test-session settings."""

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET when a function is decorated, and its standard library
    # (tl.zeros, ...) is decorated when triton.language is first imported. Test modules that
    # import transformers or lm-eval import Triton during collection, before the kernel tests
    # could set it, so it is set here, before any test module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs many tiny models: one thread avoids OpenMP spin-waits that make small ops
# many times slower on a 2-core machine under load.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Every test starts on one thread, and a test that changes the count (a trainer's
    ``num_threads``, the quickstart) gives it back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
