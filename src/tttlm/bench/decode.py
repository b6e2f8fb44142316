"""Decode latency per token of the inference engine at long context (random weights).

For every preset x variant x context length, a decode state is built whose caches are full
(random contents, never zeros) as if the context had been read, then single-token
``Engine.step`` calls are timed (each followed by the host reading the argmax, as generation
does) and, for ``e2e``, the inner step that completes a chunk. The per-token figure for ``e2e``
includes the inner step amortised over its chunk: ``step + inner_step / chunk_size``.

``e2e`` keeps a k-token cache, so its state has the same size at every context: that is the
point being measured. ``full`` attends to a cache of the whole context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tttlm.bench.common import median, sync
from tttlm.config import TTTConfig
from tttlm.errors import UserError
from tttlm.inference import Engine, State
from tttlm.inference.state import rope_slots
from tttlm.model import TTTForCausalLM


def filled_state(engine: Engine, context: int, extra: int, generator: torch.Generator) -> State:
    """A batch-1 state that has read ``context`` tokens, with random caches."""
    state = engine.new_state(1)
    config = engine.config
    b = config.chunk_size

    def rand(t: torch.Tensor, slots: int | None = None) -> torch.Tensor:
        shape = t.shape if slots is None else (*t.shape[:2], slots, *t.shape[3:])
        return torch.randn(shape, generator=generator, device=t.device, dtype=t.dtype)

    # Full attention keeps the whole context: caches of context + extra slots (the engine
    # reads a state's capacity off its buffers); a sliding window keeps its fixed ring.
    slots = [context + extra if w is None else None for w in engine.layer_windows]
    state.prefix_keys = [rand(t, s) for t, s in zip(state.prefix_keys, slots)]
    state.prefix_values = [rand(t, s) for t, s in zip(state.prefix_values, slots)]
    state.lengths = [context]
    if engine.is_e2e:
        # One token into the current chunk, so the timed steps complete no chunk.
        state.chunks_done = [context // b]
        state.lengths = [state.chunks_done[0] * b + 1]
        state.ttt_keys = [rand(t) for t in state.ttt_keys]
        state.ttt_values = [rand(t) for t in state.ttt_values]
        state.ttt_keys_rope = [rope_slots(k, config) for k in state.ttt_keys]
        assert state.pending_hidden is not None
        state.pending_hidden = rand(state.pending_hidden)
    return state


def graph_check(model: TTTForCausalLM, context: int, generator: torch.Generator) -> float:
    """Max |logit difference| between eager and graph steps from the same state (engines of
    their own, dropped at the end with their graph's memory)."""
    engines = {mode: _engine(model, mode) for mode in ("eager", "graph")}
    base = filled_state(engines["eager"], context, 16, generator)
    logits = {}
    for mode, engine in engines.items():
        state, token, out = base.clone(), torch.tensor([3]), []
        for _ in range(3):
            lg, state = engine.step(state, token)
            token = lg.argmax(-1).cpu()
            out.append(lg.float())
        logits[mode] = torch.stack(out)
    return (logits["eager"] - logits["graph"]).abs().max().item()


def _engine(model: TTTForCausalLM, mode: str) -> Engine:
    return Engine(model, cuda_graphs=mode == "graph")


def time_steps(engine: Engine, state: State, steps: int, warmup: int,
               device: torch.device) -> list[float]:
    import time

    token = torch.tensor([3])
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        logits, state = engine.step(state, token)
        token = logits.argmax(-1).cpu()  # the host needs the token, as in generation
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_inner_step(engine: Engine, state: State, reps: int, device: torch.device) -> list[float]:
    import time

    times = []
    target = torch.tensor([3], device=state.device)
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            engine.finish_chunk(state, [0], target)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def bench_decode(device: torch.device, *, presets: Sequence[str] = ("125m", "760m"),
                 variants: Sequence[str] = ("e2e", "full"),
                 contexts: Sequence[int] = (8192, 32768, 131072),
                 modes: Sequence[str] = ("graph",), steps: int = 32, warmup: int = 4,
                 inner_reps: int = 3, dtype: torch.dtype = torch.bfloat16,
                 log: Any = print) -> list[dict[str, Any]]:
    """Rows of per-token decode latency; ``modes``: ``eager`` and/or ``graph`` (CUDA graphs)."""
    if "graph" in modes and device.type != "cuda":
        raise UserError("the graph mode replays CUDA graphs, which need a CUDA device; use "
                        "--modes eager on a CPU")
    modes = list(dict.fromkeys(modes))
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for preset in presets:
        for variant in variants:
            config = TTTConfig.from_preset(preset, variant)
            torch.manual_seed(0)
            with torch.device(device):
                model = TTTForCausalLM(config).to(dtype).eval()
            if set(modes) == {"eager", "graph"}:
                diff = graph_check(model, contexts[0], generator)
                log(f"{preset} {variant}: graph vs eager max |logit diff| over 3 steps: "
                    f"{diff:.3g}")
            first: dict[str, float] = {}
            for context in contexts:
                for mode in modes:
                    # A fresh engine per context: the last one's CUDA graph (and its memory
                    # pool) goes with it.
                    engine = _engine(model, mode)
                    state = filled_state(engine, context, warmup + steps + 8, generator)
                    step_s = median(time_steps(engine, state, steps, warmup, device))
                    inner_s = 0.0
                    if engine.ttt:
                        inner_s = median(time_inner_step(engine, state, inner_reps, device))
                    per_token = (step_s + inner_s / config.chunk_size) * 1e3
                    first.setdefault(mode, per_token)
                    rows.append(dict(preset=preset, variant=variant, mode=mode, context=context,
                                     step_ms=step_s * 1e3, inner_step_ms=inner_s * 1e3,
                                     per_token_ms=per_token, vs_shortest=per_token / first[mode],
                                     state_mib=state.nbytes() / 2**20))
                    log(str(rows[-1]))
                    del state, engine
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
