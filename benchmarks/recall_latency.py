"""What the retrieval memory costs a request: ``RecallSession.generate`` with ``rag=end`` vs
``rag=off`` after a long document, on a GPU with CUDA-graph decoding, beside full attention.

    PYTHONPATH=src python benchmarks/recall_latency.py --preset 760m --variants e2e full \\
        --contexts 8192 32768 131072 --out OUT/recall_latency_760m
    PYTHONPATH=src python benchmarks/recall_latency.py --model runs/smol-e2e/final \\
        --model smol-full --contexts 32768 --out OUT/recall_latency_smollm2

A random model of ``--preset`` in each of ``--variants`` (official vocabulary), or each saved
``--model`` folder, reads a document of random tokens (``--contexts`` tokens), then answers
``--requests`` requests in turn, each a prompt of 96 tokens whose last 32 repeat a span of the
document's first window (so that recall finds it and quotes passages, up to a quarter of the
window) followed by exactly ``--new-tokens`` greedy tokens (no stop token). Per request: the wall
time, the part spent in the memory (index build + search, host side), and the tokens read
(quoted passages included), split into the time to the first new token and the decoding after
it per token. The per-token decode step is the engine's either way: the memory
records tokens on the host and is searched once per request. A full-attention model keeps the
whole document in its cache and has no memory (rag=off only).

``--profile``: one more request per row, reading its prompt and its first new token under
``torch.profiler``: per row the wall time, the device's busy time, the kernel and graph launches,
and (in ``OUT_profile.txt``) the operators by self device time, then by self host time: where
the time to the first token goes when it is not the device's work.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tttlm import TTTConfig, TTTForCausalLM
from tttlm.bench import environment, write_report
from tttlm.eval.common import default_label
from tttlm.inference import Engine
from tttlm.memory.memory import ContextMemory
from tttlm.memory.recall import RecallSession

COLUMNS = ("model", "context", "rag", "requests", "request_s_median", "memory_s_median",
           "read_tokens", "new_tokens", "ms_per_new_token", "first_token_s",
           "decode_ms_per_token", "ratio_vs_off", "ratio_vs_full", "decode_vs_full",
           "index_mib", "document_read_s")


class TimedRecall:
    """Adds up the time spent in :meth:`ContextMemory.recall` (index build + search)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = ContextMemory.recall

    def __enter__(self) -> TimedRecall:
        timer, original = self, self._original

        def recall(memory: ContextMemory, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(memory, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        ContextMemory.recall = recall  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ContextMemory.recall = self._original  # type: ignore[method-assign]


def sync() -> None:
    """Wait for the GPU (timings end when its work does); nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PlainSession:
    """A full-attention model's session: the whole document stays in its cache (no memory)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.state = engine, engine.new_state(1)
        self.last_recall: list[Any] = []
        self.memory = None

    def read(self, tokens: list[int]) -> None:
        _, self.state = self.engine.prefill([tokens], self.state)

    def stream(self, prompt: list[int], max_new_tokens: int, **sampling: Any) -> Any:
        stream = self.engine.stream([prompt], max_new_tokens, state=self.state, **sampling)
        self.state = stream.state  # which the stream advances in place as it decodes
        return stream


def measure(engine: Engine, context: int, rag: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(context)
    document = torch.randint(3, vocab, (context,), generator=gen).tolist()
    session: RecallSession | PlainSession = (
        PlainSession(engine) if engine.window is None else RecallSession(engine, rag))
    start = time.perf_counter()
    session.read(document)
    sync()
    read_s = time.perf_counter() - start
    rows = []
    # The first requests warm up, not counted: the engine captures a graph per piece length
    # as the prompts and quotes bring new ones.
    for r in range(args.warmup + args.requests):
        head = torch.randint(3, vocab, (64,), generator=gen).tolist()
        at = 32 * (r + 1)
        prompt = head + document[at:at + 32]
        with TimedRecall() as timer:
            sync()
            start = time.perf_counter()
            stream = session.stream(prompt, args.new_tokens, temperature=0.0, stop=())
            next(stream)  # a Python int: the device has finished the prompt
            first = time.perf_counter() - start
            for _ in stream:
                pass
            sync()
            wall = time.perf_counter() - start
        new = stream.tokens[0]
        quoted = sum(len(p.tokens) + 1 for p in session.last_recall)
        rows.append((wall, timer.seconds, len(prompt) + quoted + (1 if quoted else 0), len(new),
                     first))
    timed = rows[args.warmup:]
    profile = first_token_profile(session, gen, vocab, document) if args.profile else None
    decode_ms = [1000 * (w - f) / max(1, n - 1) for w, _, _, n, f in timed]
    index_mib = None
    if session.memory is not None:
        session.memory.recall(prompt[-32:], 1)  # (re)builds the index, to report its size
        index_mib = round(session.memory.index.nbytes() / 2**20, 2)
    return {"context": context, "rag": rag, "requests": len(timed),
            "request_s_median": round(statistics.median(w for w, *_ in timed), 4),
            "memory_s_median": round(statistics.median(m for _, m, *_ in timed), 4),
            "read_tokens": timed[-1][2], "new_tokens": timed[-1][3],
            "ms_per_new_token": round(1000 * statistics.median(w for w, *_ in timed)
                                      / args.new_tokens, 3),
            "first_token_s": round(statistics.median(r[4] for r in timed), 4),
            "decode_ms_per_token": round(statistics.median(decode_ms), 3),
            "index_mib": index_mib,
            "document_read_s": round(read_s, 2),
            "request_times": [round(w, 4) for w, *_ in rows],
            **({"profile": profile} if profile is not None else {})}


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def first_token_profile(session: Any, gen: torch.Generator, vocab: int,
                        document: list[int]) -> dict[str, Any]:
    """One more request, up to its first new token (recall, reading the prompt and the quoted
    passages, sampling), under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    prompt = torch.randint(3, vocab, (64,), generator=gen).tolist() + document[:32]
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        stream = session.stream(prompt, 1, temperature=0.0, stop=())
        next(stream)
        wall = time.perf_counter() - start
    for _ in stream:  # the session takes its state when the stream ends
        pass
    events = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", None)
                     or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    # (an operator's self device time is its kernels' too: count the kernels alone)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]

    by_device = sorted(events, key=device_us, reverse=True)[:25]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    table = ["operator | calls | self device ms | self host ms"]
    for title, chosen in (("by self device time", by_device), ("by self host time", by_host)):
        table += [f"-- {title}"] + [
            f"{e.key} | {e.count} | {device_us(e) / 1e3:.3f} | {e.self_cpu_time_total / 1e3:.3f}"
            for e in chosen]
    return {"wall_s": round(wall, 4),
            "device_busy_s": round(sum(device_us(e) for e in kernels) / 1e6, 4),
            "kernel_launches": sum(e.count for e in events if e.key in LAUNCHES),
            "graph_launches": sum(e.count for e in events if e.key == "cudaGraphLaunch"),
            "table": table}


def models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
           ) -> list[tuple[str, TTTForCausalLM]]:
    """(label, model) for each ``--model`` folder, else ``--preset`` in each of ``--variants``
    (random weights)."""
    if args.model:
        return [(default_label(path),
                 TTTForCausalLM.from_pretrained(path, device=device, dtype=dtype).eval())
                for path in args.model]
    overrides = {} if args.preset != "tiny" else {"window": 64, "chunk_size": 16}
    out = []
    for variant in args.variants:
        torch.manual_seed(0)
        config = TTTConfig.from_preset(args.preset, variant, **overrides)
        out.append((f"{args.preset} {variant}", TTTForCausalLM(config).to(device, dtype).eval()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="760m")
    p.add_argument("--variants", nargs="+", default=["e2e"],
                   help="variants of --preset to measure (e2e, swa, full)")
    p.add_argument("--model", action="append", type=Path,
                   help="a saved model folder (repeat for several; replaces --preset)")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="requests before the timed ones")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-graphs", dest="graphs", action="store_false")
    p.add_argument("--profile", action="store_true",
                   help="profile one more request's first token per row (OUT_profile.txt)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    graphs = False
    for label, model in models(args, device, dtype):
        engine = Engine(model, cuda_graphs=args.graphs and device.type == "cuda")
        graphs = engine.cuda_graphs
        for context in args.contexts:
            modes = ("off",) if engine.window is None else ("off", "end")
            for rag in modes:
                rows.append({"model": label, **measure(engine, context, rag, args)})
                print(rows[-1], flush=True)
            if len(modes) == 2:
                off, end = rows[-2], rows[-1]
                end["ratio_vs_off"] = round(end["request_s_median"] / off["request_s_median"], 3)
        del engine, model
        torch.cuda.empty_cache() if device.type == "cuda" else None
    for full in [r for r in rows if r["index_mib"] is None]:
        for row in rows:
            if row is not full and row["context"] == full["context"]:
                row["ratio_vs_full"] = round(row["request_s_median"] / full["request_s_median"], 3)
                row["decode_vs_full"] = round(row["decode_ms_per_token"]
                                              / full["decode_ms_per_token"], 3)
    if args.profile:
        lines = []
        for row in rows:
            prof = row["profile"]
            lines += ["", f"## {row['model']}, context {row['context']}, rag={row['rag']}: "
                      f"first token {prof['wall_s']} s, device busy {prof['device_busy_s']} s, "
                      f"{prof['kernel_launches']} kernel and {prof['graph_launches']} graph "
                      "launches", *prof.pop("table")]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}_profile.txt").write_text("\n".join(lines).lstrip() + "\n")
    env = environment(device)
    env["command"] = "python benchmarks/recall_latency.py " + shlex.join(sys.argv[1:])
    names = ", ".join(dict.fromkeys(r["model"] for r in rows))
    write_report(args.out, f"Retrieval memory: request latency, {names}", env, rows,
                 COLUMNS, notes=[
                     f"A request = a 96-token prompt + {args.new_tokens} greedy tokens "
                     f"(CUDA graphs: {graphs}), after a document of "
                     "`context` random tokens; median of the timed requests (after "
                     f"{args.warmup} that warm up). memory_s = time inside "
                     "ContextMemory.recall (index update with the passages that left the "
                     "window since the last search, and the search); read_tokens = prompt + "
                     "quoted passages; first_token_s = from the "
                     "request to its first new token (recall, reading the prompt and the quoted "
                     "passages); decode_ms_per_token = the rest of the request per further "
                     "token; ratio_vs_full / decode_vs_full = this row's request time / decode "
                     "time per token over the full-attention model's at the same context "
                     "(full attention keeps the whole document in its cache: no memory)."])


if __name__ == "__main__":
    main()
