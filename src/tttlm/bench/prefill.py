"""Prefill throughput: reading a prompt of T tokens with random weights, bf16 autocast.

``e2e`` prefill is the meta forward pass without outer gradient: prefix blocks over the whole
prompt (sliding window), then the TTT blocks chunk by chunk with one inner SGD step after each
full chunk. ``full`` is the full-attention baseline's forward pass. Both compute the next-token
loss (chunked, no ``[T, V]`` logits), as a prefill that scores the prompt does.
"""

from __future__ import annotations

import functools
import gc
from typing import Any

import torch

from tttlm.bench.common import (
    median,
    peak_flops,
    peak_memory_gib,
    reset_peak_memory,
    time_call,
)
from tttlm.config import TTTConfig, Variant


def _attended_pairs(T: int, window: int | None) -> int:
    """Number of (query, key) pairs causal (windowed) attention computes over T tokens."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def prefill_flops(config: TTTConfig, T: int) -> float:
    """Model FLOPs of one prefill of ``T`` tokens (matmuls and attention; an estimate).

    e2e adds the inner steps: the backward of the TTT blocks and the head (about twice their
    forward) for every chunk but the last.
    """
    D, V, L = config.hidden_size, config.vocab_size, config.num_layers
    S = config.num_ttt_layers or 0
    block = 4 * D * D + 3 * D * config.intermediate_size
    prime = 3 * D * (config.prime_intermediate_size or 0)
    matmul = 2 * T * (L * block + S * prime + V * D)
    window = config.window if config.uses_window else None
    attention = 4 * D * L * _attended_pairs(T, window)
    total = float(matmul + attention)
    if config.variant is Variant.E2E:
        b = config.chunk_size
        updated = T - min(b, T)  # tokens of the chunks followed by an update
        suffix = 2 * updated * (S * (block + prime) + V * D) + 4 * D * S * updated * window
        total += 2 * suffix
    return total


def _prefill(model: torch.nn.Module, x: torch.Tensor, ttt: bool) -> None:
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16,
                                                enabled=x.device.type == "cuda"):
        model(x[:, :-1], labels=x[:, 1:], ttt=ttt)


def bench_prefill(device: torch.device, preset: str = "3b",
                  variants: tuple[str, ...] = ("e2e", "full"),
                  lengths: tuple[int, ...] = (8192,), batch: int = 1,
                  repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds per prefill and per 1K tokens, tokens/s, estimated MFU and peak memory."""
    from tttlm.model.model import TTTForCausalLM

    rows: list[dict[str, Any]] = []
    peak = peak_flops(device)
    for variant in variants:
        config = TTTConfig.from_preset(preset, variant=variant)
        torch.manual_seed(0)
        model = TTTForCausalLM(config).to(device).eval()
        for T in lengths:
            g = torch.Generator(device="cpu").manual_seed(T)
            x = torch.randint(0, config.vocab_size, (batch, T + 1), generator=g).to(device)

            row: dict[str, Any] = {"preset": preset, "variant": variant, "tokens": T,
                                   "batch": batch}
            reset_peak_memory(device)
            try:
                times = time_call(functools.partial(_prefill, model, x, variant == "e2e"),
                                  device, repeats, warmup=1)
            except torch.OutOfMemoryError:
                rows.append({**row, "error": "OOM"})
                continue
            sec = median(times)
            flops = prefill_flops(config, T) * batch
            row.update(s_median=sec, s_per_1k_tokens=sec / (batch * T / 1024),
                       tokens_per_s=batch * T / sec, tflops=flops / sec / 1e12,
                       mfu=flops / sec / peak if peak else None,
                       peak_gib=peak_memory_gib(device), times=times)
            rows.append(row)
            print(row, flush=True)
        del model
        gc.collect()
        reset_peak_memory(device)
    full = {r["tokens"]: r.get("s_median") for r in rows if r["variant"] == "full"}
    for r in rows:
        if r["variant"] == "e2e" and r.get("s_median") and full.get(r["tokens"]):
            r["speedup_vs_full"] = full[r["tokens"]] / r["s_median"]
    return rows
