"""Test-session settings."""

import torch

# The suite runs many tiny models: one thread avoids OpenMP spin-waits that make small ops
# many times slower on a 2-core machine under load.
torch.set_num_threads(1)
