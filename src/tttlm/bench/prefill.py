"""Prefill throughput: reading a prompt of T tokens with random weights, bf16 autocast.

``e2e`` prefill is the meta forward pass without outer gradient: prefix blocks over the whole
prompt (sliding window), then the TTT blocks chunk by chunk with one inner SGD step after each
full chunk. ``full`` is the full-attention baseline's forward pass. Both compute the next-token
loss (chunked, no ``[T, V]`` logits), as a prefill that scores the prompt does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from tttlm.bench.common import (
    environment,
    median,
    peak_flops,
    peak_memory_gib,
    reset_peak_memory,
    sync,
    time_call,
)
from tttlm.bench.names import BLOCKS_LABEL, GRAPH_CHUNKS
from tttlm.config import TTTConfig, Variant
from tttlm.devices import autocast

if TYPE_CHECKING:
    from tttlm.model.model import TTTForCausalLM


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
    # Recurrent blocks (TTT-KVB, Gated DeltaNet, Mamba 2) mix tokens through a d x d state per
    # head instead: per token about 3 d^2 (read, write, update) and 2 c d within a chunk
    H, d, c = config.num_heads, config.head_dim or D // config.num_heads, config.chunk_size
    attention = sum(2 * T * H * d * (3 * d + 2 * c) if config.is_recurrent_layer(i)
                    else 4 * D * _attended_pairs(T, config.layer_window(i)) for i in range(L))
    total = float(matmul + attention)
    if config.variant is Variant.E2E:
        b = config.chunk_size
        updated = T - min(b, T)  # tokens of the chunks followed by an update
        suffix = 2 * updated * (S * (block + prime) + V * D) + 4 * D * S * updated * window
        total += 2 * suffix
    return total


def _prefill(model: torch.nn.Module, x: torch.Tensor, ttt: bool, micro_batch: int,
             path: str = "model") -> None:
    """``model``: the forward pass that scores the prompt (the training forward without outer
    gradient); ``engine``: ``Engine.prefill``, which reads the prompt into a decoding state
    (caches, fast weights, pending chunk) and returns the next token's logits;
    ``engine-graphs``: the same with ``cuda_graphs=True`` (e2e: the chunks learned one by one,
    the inner step replayed as a CUDA graph once the TTT caches are full)."""
    from tttlm.inference import Engine

    with torch.inference_mode(), autocast(x.device):  # bf16 on a GPU
        for i in range(0, x.shape[0], micro_batch):
            part = x[i:i + micro_batch]
            if path.startswith("engine"):
                Engine(model, ttt=ttt, cuda_graphs=path == "engine-graphs").prefill(
                    part[:, :-1])
            else:
                model(part[:, :-1], labels=part[:, 1:], ttt=ttt)


def scoring_case(preset: str, tokens: int, batch: int, device: torch.device,
                 compiled: bool = True) -> tuple[TTTForCausalLM, Callable[[], float]]:
    """A seeded ``preset`` e2e model (compiled blocks unless ``compiled=False``) and one timed
    scoring forward of ``batch`` random sequences of ``tokens``, run as :func:`bench_prefill`
    runs it (inference mode, bf16 autocast on a GPU): the call returns its wall seconds,
    synchronised. For benchmarks that probe inside a prefill step."""
    from tttlm.model.model import TTTForCausalLM

    config = TTTConfig.from_preset(preset, variant="e2e")
    torch.manual_seed(0)
    with device:
        model = TTTForCausalLM(config).eval()
    model.compile_blocks = compiled
    x = torch.randint(0, config.vocab_size, (batch, tokens + 1), device=device)

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        _prefill(model, x, True, batch)
        sync(device)
        return time.perf_counter() - start

    return model, step


def probe_main(argv: list[str] | None, doc: str, script: str,
               run_case: Callable[[str, int], dict[str, Any]], env_key: str = "env") -> int:
    """The command line of a script that probes inside 3b scoring steps: ``cases``
    (``tokens:batch``), ``--repeats``, ``--out``; on a CUDA GPU only (one line and exit 2
    without one). Writes ``{env_key: environment, "cases": [run_case(case, repeats)...]}`` as
    ``OUT.json``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("cases", nargs="+", help="tokens:batch, e.g. 131072:1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{script}: error: needs a CUDA GPU; run it on one", file=sys.stderr)
        return 2
    report: dict[str, Any] = {env_key: environment(torch.device("cuda")), "cases": []}
    for case in args.cases:
        report["cases"].append(run_case(case, args.repeats))
        torch.cuda.empty_cache()  # (the case's model is gone: its cached blocks too)
    pathlib.Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _sdpa_backends(device: torch.device, variant: str) -> list[str | None]:
    """SDPA backends to time for a variant: ``full`` on CUDA tries flash and cuDNN (the issue
    asks for the faster of the two); everything else runs PyTorch's default choice."""
    if variant == "full" and device.type == "cuda":
        return ["flash", "cudnn"]
    return [None]


@contextlib.contextmanager
def _sdpa(backend: str | None) -> Iterator[None]:
    if backend is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    with sdpa_kernel([chosen]):
        yield


def _time_fitting(model: torch.nn.Module, x: torch.Tensor, ttt: bool, backend: str | None,
                  device: torch.device, repeats: int,
                  path: str = "model") -> tuple[list[float], int]:
    """Time the prefill of all of ``x``; when the whole batch does not fit in memory, run it
    as consecutive micro-batches (halving until it fits). Returns the times and the size."""
    micro = x.shape[0]
    while True:
        reset_peak_memory(device)
        try:
            with _sdpa(backend):
                fn = functools.partial(_prefill, model, x, ttt, micro, path)
                # Two warm-up runs: the first compiles and makes the steady chunk graph, the
                # second (a repeat) the graphs of the chunks while the caches fill; the timed
                # runs are then what a server's later prompts of this batch size run.
                return time_call(fn, device, repeats, warmup=2), micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
        # After the handler, not in it: its exception holds the failed attempt's frames and
        # their tensors until the handler ends.
        micro //= 2
        gc.collect()


def prefill_batch(T: int, tokens_per_step: int) -> int:
    """Sequences per step so that a step holds ``tokens_per_step`` tokens (at least one)."""
    return max(1, tokens_per_step // T)


def bench_prefill(device: torch.device, preset: str = "3b",
                  variants: tuple[str, ...] = ("e2e", "full"),
                  lengths: tuple[int, ...] = (8192,), batch: int | None = None,
                  tokens_per_step: int = 131072, repeats: int = 3,
                  compile_modes: tuple[bool | str, ...] = (False,),
                  paths: tuple[str, ...] = ("model",),
                  attention: tuple[str, ...] = ("auto",),
                  ttt_groups: tuple[int | str | None, ...] = ("auto",)
                  ) -> list[dict[str, Any]]:
    """Seconds per prefill and per 1K tokens, tokens/s, estimated MFU and peak memory.

    ``batch=None`` sizes each step to ``tokens_per_step`` tokens (the paper's 128K), so short
    prompts are timed at the batch a server would run them at. ``full`` is timed with SDPA's
    flash and cuDNN backends on CUDA; ``speedup_vs_full`` compares with the fastest ``full``
    row. ``compile_modes`` lists eager (False) and/or compiled blocks
    (``TTTForCausalLM.compile_blocks``, True), both with the model's default for CUDA graphs
    of the TTT chunks over full caches (``TTTForCausalLM.graph_chunks = None``), and/or
    compiled with those graphs always (``"graphed"``) or never (``"launched"``); a row's two
    warm-up runs compile and capture.
    A step that does not fit in memory runs as consecutive micro-batches (``micro_batch``):
    the same tokens per step, in fewer sequences at a time. ``paths``: ``model`` (the forward
    pass that scores the prompt) and/or ``engine`` (``Engine.prefill``, what ``tttlm generate``
    runs; ``engine-graphs`` with the engine's CUDA graphs). ``attention``: attention backends
    to time (:func:`tttlm.ops.attention.attention_backend` names, e.g. ``first-order``).
    ``ttt_groups``: e2e's TTT chunks for at most this many sequences at a time
    (``TTTForCausalLM.ttt_group``; ``None``: the whole step's batch; ``"auto"``: the model's
    default, recorded as the number it resolves to).
    """
    from tttlm.model.model import TTTForCausalLM
    from tttlm.ops.attention import attention_backend

    rows: list[dict[str, Any]] = []
    peak = peak_flops(device)
    for variant in variants:
        config = TTTConfig.from_preset(preset, variant=variant)
        torch.manual_seed(0)
        with device:  # initialise on the card: seconds instead of a minute at 3b on a CPU
            model = TTTForCausalLM(config).eval()
        for T in lengths:
            if any(compile_modes):
                # Each length starts from fresh compiled graphs, as a run of one shape would:
                # three lengths (three batch sizes, the last batch 1) in one process exceed
                # torch.compile's recompile limit (8 graphs per function), and the last length
                # silently fell back to eager for the TTT blocks' output (e2e at 128K).
                torch.compiler.reset()
            B = batch if batch is not None else prefill_batch(T, tokens_per_step)
            g = torch.Generator(device="cpu").manual_seed(T)
            x = torch.randint(0, config.vocab_size, (B, T + 1), generator=g).to(device)
            groups = ttt_groups if variant == "e2e" else (None,)
            for path, compiled, attn, group, backend in itertools.product(
                    paths, compile_modes, attention, groups, _sdpa_backends(device, variant)):
                model.compile_blocks = bool(compiled)
                model.graph_chunks = GRAPH_CHUNKS.get(compiled)
                model.ttt_group = group
                group = model.resolved_ttt_group()
                row: dict[str, Any] = {"preset": preset, "variant": variant, "path": path,
                                       "tokens": T, "batch": B, "sdpa": backend or "default",
                                       "attention": attn,
                                       "ttt_group": "all" if group is None else group,
                                       "blocks": BLOCKS_LABEL[compiled]}
                try:
                    with attention_backend(attn):
                        times, micro = _time_fitting(model, x, variant == "e2e", backend,
                                                     device, repeats, path)
                except torch.OutOfMemoryError:
                    rows.append({**row, "error": "OOM"})
                    continue
                except RuntimeError as err:  # a backend the card or shape does not support
                    rows.append({**row, "error": str(err).splitlines()[0][:200]})
                    continue
                row["micro_batch"] = micro
                sec = median(times)
                flops = prefill_flops(config, T) * B
                row.update(s_median=sec, s_per_1k_tokens=sec / (B * T / 1024),
                           tokens_per_s=B * T / sec, tflops=flops / sec / 1e12,
                           mfu=flops / sec / peak if peak else None,
                           peak_gib=peak_memory_gib(device), times=times)
                rows.append(row)
                print(row, flush=True)
            del x
        del model
        gc.collect()
        reset_peak_memory(device)
    best_full: dict[int, float] = {}
    for r in rows:
        if r["variant"] == "full" and r.get("s_median"):
            best_full[r["tokens"]] = min(best_full.get(r["tokens"], math.inf),
                                         r["s_per_1k_tokens"])
    for r in rows:
        if r["variant"] != "full" and r.get("s_median") and r["tokens"] in best_full:
            r["speedup_vs_full"] = best_full[r["tokens"]] / r["s_per_1k_tokens"]
    return rows
