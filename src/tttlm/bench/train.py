"""Training-step throughput: e2e meta-training (exact second order) vs full-attention
pretraining, random weights, bf16 autocast with fp32 weights, one AdamW step included."""

from __future__ import annotations

import functools
import gc
from typing import Any

import torch

from tttlm.bench.common import median, peak_memory_gib, reset_peak_memory, time_call
from tttlm.config import TTTConfig


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, ttt: bool,
          checkpoint_chunks: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        out = model(x[:, :-1], labels=x[:, 1:], ttt=ttt, checkpoint_chunks=checkpoint_chunks)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train_step(device: torch.device, preset: str = "125m", seq_len: int = 8192,
                     batches: tuple[int, ...] = (1,), variants: tuple[str, ...] = ("e2e", "full"),
                     checkpoint_chunks: bool = False, repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds per step, tokens/s and peak memory of forward + backward + AdamW."""
    from tttlm.model.model import TTTForCausalLM

    rows: list[dict[str, Any]] = []
    for variant in variants:
        config = TTTConfig.from_preset(preset, variant=variant)
        torch.manual_seed(0)
        with device:  # initialise on the card
            model = TTTForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                      fused=device.type == "cuda")
        ttt = variant == "e2e"
        for batch in batches:
            g = torch.Generator(device="cpu").manual_seed(batch)
            x = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g).to(device)

            row: dict[str, Any] = {"preset": preset, "variant": variant, "seq_len": seq_len,
                                   "batch": batch, "checkpoint_chunks": checkpoint_chunks and ttt}
            reset_peak_memory(device)
            try:
                times = time_call(functools.partial(_step, model, optimizer, x, ttt,
                                                    checkpoint_chunks and ttt),
                                  device, repeats, warmup=1)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                rows.append({**row, "error": "OOM"})
                print(rows[-1], flush=True)
                continue
            sec = median(times)
            row.update(s_median=sec, tokens_per_s=batch * seq_len / sec,
                       peak_gib=peak_memory_gib(device), times=times)
            rows.append(row)
            print(row, flush=True)
        del model, optimizer
        gc.collect()
        reset_peak_memory(device)
    best_full = max((r.get("tokens_per_s", 0.0) for r in rows if r["variant"] == "full"),
                    default=0.0)
    for r in rows:
        if r["variant"] == "e2e" and r.get("tokens_per_s") and best_full:
            r["ratio_vs_best_full"] = r["tokens_per_s"] / best_full
    return rows
