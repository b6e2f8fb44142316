"""Training-step throughput: e2e meta-training (exact second order) vs full-attention
pretraining, random weights, bf16 autocast with fp32 weights, one AdamW step included.

Step modes: ``eager``; ``compiled`` (``TTTForCausalLM.compile_blocks``: the whole-sequence
blocks compiled, the meta-gradient's chunks eager); ``graph`` (the whole step captured as one
CUDA graph, :class:`tttlm.train.graphs.GraphedStep`); ``compiled-graph`` (both).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from tttlm.bench.common import median, peak_flops, peak_memory_gib, reset_peak_memory, time_call
from tttlm.bench.names import STEP_MODES
from tttlm.bench.prefill import prefill_flops
from tttlm.config import TTTConfig
from tttlm.devices import autocast
from tttlm.errors import UserError


def train_flops(config: TTTConfig, seq_len: int) -> float:
    """Model FLOPs of one training sequence (an estimate): three times the forward pass
    (forward, then the backward's two products per matmul). For e2e the "forward" is the meta
    forward with its inner steps (:func:`prefill_flops`), and the outer backward differentiates
    the inner backward too, so the same factor of three applies to it."""
    return 3.0 * prefill_flops(config, seq_len)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, ttt: bool,
          checkpoint_chunks: bool) -> torch.Tensor:
    # Gradients are set to None first, so that under a CUDA graph capture the backward pass
    # allocates them in the graph's memory (replays then overwrite them in place).
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, cache_enabled=False):  # bf16 on a GPU
        out = model(x[:, :-1], labels=x[:, 1:], ttt=ttt, checkpoint_chunks=checkpoint_chunks)
    out.loss.backward()
    optimizer.step()
    return out.loss.detach()


def _make_step(model: torch.nn.Module, x: torch.Tensor, ttt: bool, checkpoint_chunks: bool,
               mode: str) -> Callable[[], Any]:
    from tttlm.train.graphs import GraphedStep

    graphed = mode.endswith("graph")
    model.compile_blocks = mode.startswith("compiled")
    # A captured step needs an optimizer whose state and step count live on the device.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=x.is_cuda,
                                  capturable=graphed)
    if not graphed:
        return lambda: _step(model, optimizer, x, ttt, checkpoint_chunks)
    step = GraphedStep(lambda ids: _step(model, optimizer, ids, ttt, checkpoint_chunks), x)
    return lambda: step(x)


def bench_train_step(device: torch.device, preset: str = "125m", seq_len: int = 8192,
                     batches: tuple[int, ...] = (1,), variants: tuple[str, ...] = ("e2e", "full"),
                     checkpoint_chunks: bool = False, repeats: int = 3,
                     modes: tuple[str, ...] = ("eager",)) -> list[dict[str, Any]]:
    """Seconds per step, tokens/s and peak memory of forward + backward + AdamW."""
    from tttlm.model.model import TTTForCausalLM

    unknown = sorted(set(modes) - set(STEP_MODES))
    if unknown:
        raise UserError(f"unknown step modes {unknown}; choose from {list(STEP_MODES)}")
    if device.type != "cuda" and any(m.endswith("graph") for m in modes):
        raise UserError(f"step modes {list(modes)}: graph modes replay CUDA graphs, which need "
                        "a CUDA device; use eager or compiled on a CPU")
    rows: list[dict[str, Any]] = []
    for variant in variants:
        config = TTTConfig.from_preset(preset, variant=variant)
        ttt = variant == "e2e"
        for mode in modes:
            torch.manual_seed(0)
            with device:  # initialise on the card
                model = TTTForCausalLM(config)
            for batch in batches:
                g = torch.Generator(device="cpu").manual_seed(batch)
                x = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g)
                x = x.to(device)
                row: dict[str, Any] = {"preset": preset, "variant": variant, "mode": mode,
                                       "seq_len": seq_len, "batch": batch,
                                       "checkpoint_chunks": checkpoint_chunks and ttt}
                reset_peak_memory(device)
                try:
                    fn = _make_step(model, x, ttt, checkpoint_chunks and ttt, mode)
                    times = time_call(fn, device, repeats, warmup=1)
                except torch.OutOfMemoryError:
                    rows.append({**row, "error": "OOM"})
                    print(rows[-1], flush=True)
                    continue
                finally:
                    fn = None  # type: ignore[assignment]  # frees a graph's memory pool
                    model.zero_grad(set_to_none=True)
                    gc.collect()
                sec = median(times)
                flops = train_flops(config, seq_len) * batch
                row.update(s_median=sec, tokens_per_s=batch * seq_len / sec,
                           tflops=flops / sec / 1e12,
                           mfu=flops / sec / peak if (peak := peak_flops(device)) else None,
                           peak_gib=peak_memory_gib(device), times=times)
                rows.append(row)
                print(row, flush=True)
            del model
            gc.collect()
            reset_peak_memory(device)
    best_full = max((r.get("tokens_per_s", 0.0) for r in rows if r["variant"] == "full"),
                    default=0.0)
    for r in rows:
        if r["variant"] == "e2e" and r.get("tokens_per_s") and best_full:
            r["ratio_vs_best_full"] = r["tokens_per_s"] / best_full
    return rows
