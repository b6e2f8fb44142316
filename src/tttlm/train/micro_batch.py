"""``micro_batch_size=auto``: the largest micro-batch whose training step fits the GPU.

An e2e step runs every chunk's inner step, forward and double backward, as many small kernels
(``benchmarks/op_count.py``: about 4.8K per chunk with 7 TTT blocks), and their number does
not depend on how many sequences a micro-batch holds: at micro-batch 1 a 135M model's step
is bound by kernel launches, not by the card. A larger micro-batch divides the launches, until
memory runs out. ``auto`` measures that limit once, at the start of a run: one forward and
backward per candidate (the divisors of the per-process batch, largest first) on random
tokens, keeping room for AdamW's state, which is allocated at the first step. The choice is
written to the run's ``train_config.json``, and a resumed run takes it from there: the
micro-batch changes the order of the gradient sums, so a resume must not choose again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tttlm.errors import UserError

AUTO = "auto"
# The share of the card a probe's peak plus the optimizer's state may take: the rest is for
# fragmentation, a CUDA graph's pool and library workspaces.
HEADROOM = 0.9


def candidates(local_batch: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the divisors of the per-process batch."""
    return [m for m in range(local_batch, 0, -1) if local_batch % m == 0]


def choose(local_batch: int, peak_bytes: Callable[[int], int | None], capacity: int,
           reserve: int, seq_len: int) -> int:
    """The largest candidate ``m`` with ``peak_bytes(m) + reserve <= HEADROOM * capacity``;
    ``peak_bytes`` returns ``None`` when the step ran out of memory. Returns 0 (the whole
    batch at once) when the whole batch fits."""
    tried = []
    for m in candidates(local_batch):
        peak = peak_bytes(m)
        tried.append(f"{m}: " + ("out of memory" if peak is None else f"{peak / 2**30:.1f} GiB"))
        if peak is not None and peak + reserve <= HEADROOM * capacity:
            return 0 if m == local_batch else m
    raise UserError(f"micro_batch_size=auto: not even one sequence of {seq_len} tokens fits "
                    f"({'; '.join(tried)}; {reserve / 2**30:.1f} GiB kept for the optimizer, "
                    f"{capacity / 2**30:.1f} GiB on the card); lower seq_len, or set "
                    "activation_checkpointing=true")


def probe(device: torch.device, step: Callable[[int], None]
          ) -> tuple[Callable[[int], int | None], int] | None:
    """``(peak_bytes, capacity)`` for :func:`choose` on a CUDA device: ``peak_bytes(m)`` runs
    ``step(m)`` and reads the peak of allocated memory (``None`` when it ran out of memory).
    ``None`` on other devices, which give no out-of-memory signal to measure by."""
    if device.type != "cuda":
        return None

    def peak(m: int) -> int | None:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(m)
            torch.cuda.synchronize(device)
        except torch.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device)

    return peak, torch.cuda.get_device_properties(device).total_memory
