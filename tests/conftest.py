"""Test-session settings."""

from collections.abc import Iterator

import pytest
import torch

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
