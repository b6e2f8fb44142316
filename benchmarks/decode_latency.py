"""Decode latency per token of the inference engine at long context (random weights).

For every preset x variant x context length, builds a decode state whose caches are full
(random contents, never zeros) as if the context had been read, then times single-token
``Engine.step`` calls (each followed by the host reading the argmax, as generation does) and,
for ``e2e``, the inner step that completes a chunk. The reported per-token figure for ``e2e``
includes the inner step amortised over its chunk: ``step + inner_step / chunk_size``.

``e2e`` keeps a k-token cache, so its state has the same size at every context: that is the
point being measured. ``full`` attends to a cache of the whole context.

    python benchmarks/decode_latency.py --presets 125m 760m --variants e2e full \
        --contexts 8192 32768 131072 --out benchmarks/results/decode
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tttlm import TTTConfig, TTTForCausalLM
from tttlm.inference import Engine, State
from tttlm.inference.state import rope_slots


def filled_state(engine: Engine, context: int, extra: int, generator: torch.Generator) -> State:
    """A batch-1 state that has read ``context`` tokens, with random caches."""
    state = engine.new_state(1)
    config = engine.config
    b = config.chunk_size

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)

    if engine.window is None:
        engine._grow(state, context + extra)
    state.prefix_keys = [rand(t) for t in state.prefix_keys]
    state.prefix_values = [rand(t) for t in state.prefix_values]
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


def graph_check(engines: dict[str, Engine], context: int,
                generator: torch.Generator) -> float:
    """Max |logit difference| between eager and graph steps from the same state."""
    base = filled_state(engines["eager"], context, 16, generator)
    logits = {}
    for mode, engine in engines.items():
        state, token, out = base.clone(), torch.tensor([3]), []
        for _ in range(3):
            lg, state = engine.step(state, token)
            token = lg.argmax(-1).cpu()
            out.append(lg.float())
        logits[mode] = torch.stack(out)
        engine._graph = None
    return (logits["eager"] - logits["graph"]).abs().max().item()


def time_steps(engine: Engine, state: State, steps: int, warmup: int) -> list[float]:
    token = torch.tensor([3])
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, state = engine.step(state, token)
        token = logits.argmax(-1).cpu()  # the host needs the token, as in generation
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_inner_step(engine: Engine, state: State, reps: int) -> list[float]:
    times = []
    target = torch.tensor([3], device=state.device)
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            engine._finish_chunk(state, [0], target)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["125m", "760m"])
    parser.add_argument("--variants", nargs="+", default=["e2e", "full"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--inner-reps", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["eager", "graph"],
                        choices=["eager", "graph"],
                        help="eager Engine.step, and/or the step replayed as a CUDA graph")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", default="benchmarks/results/decode")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_latency: error: needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device="cuda")
    generator.manual_seed(0)
    rows = []
    for preset in args.presets:
        for variant in args.variants:
            config = TTTConfig.from_preset(preset, variant)
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = TTTForCausalLM(config).to(dtype).eval()
            engines = {mode: Engine(model, cuda_graphs=mode == "graph") for mode in args.modes}
            if len(engines) == 2:
                print(f"{preset} {variant}: graph vs eager max |logit diff| over 3 steps: "
                      f"{graph_check(engines, args.contexts[0], generator):.3g}", flush=True)
            for context in args.contexts:
                for mode, engine in engines.items():
                    state = filled_state(engine, context, args.warmup + args.steps + 8,
                                         generator)
                    step_s = statistics.median(time_steps(engine, state, args.steps,
                                                          args.warmup))
                    inner_s = 0.0
                    if engine.ttt:
                        inner_s = statistics.median(time_inner_step(engine, state,
                                                                    args.inner_reps))
                    row = dict(preset=preset, variant=variant, mode=mode, context=context,
                               step_ms=step_s * 1e3, inner_step_ms=inner_s * 1e3,
                               per_token_ms=(step_s + inner_s / config.chunk_size) * 1e3,
                               state_mib=state.nbytes() / 2**20)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del state
                    engine._graph = None
            del engines, model
            torch.cuda.empty_cache()

    for preset in args.presets:
        for variant in args.variants:
            for mode in args.modes:
                sel = [r for r in rows if (r["preset"], r["variant"], r["mode"]) ==
                       (preset, variant, mode)]
                first, last = sel[0]["per_token_ms"], sel[-1]["per_token_ms"]
                for r in sel:
                    r["vs_shortest"] = r["per_token_ms"] / first
                print(f"{preset} {variant} {mode}: {first:.2f} -> {last:.2f} ms/token "
                      f"({last / first - 1:+.1%} from {sel[0]['context']} to "
                      f"{sel[-1]['context']})")

    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), dtype=args.dtype,
                batch=1, steps=args.steps, warmup=args.warmup, inner_reps=args.inner_reps,
                command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                method=("median wall time of Engine.step (synchronised, argmax read on the "
                        "host) over `steps` steps after `warmup`; e2e adds the median inner "
                        "step (Engine._finish_chunk) divided by chunk_size"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    lines = [f"# Decode latency per token ({meta['card']}, torch {meta['torch']}, {args.dtype}, "
             "batch 1, random weights)", "", f"Command: `{meta['command']}`", "",
             f"Method: {meta['method']}.", "",
             "| preset | variant | mode | context | step ms | inner step ms | per token ms "
             "| vs shortest | state MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['variant']} | {r['mode']} | {r['context']} | "
                     f"{r['step_ms']:.2f} | "
                     f"{r['inner_step_ms']:.1f} | {r['per_token_ms']:.2f} | "
                     f"{r['vs_shortest']:.2f}x | {r['state_mib']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
