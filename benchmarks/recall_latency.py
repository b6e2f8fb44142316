"""What the retrieval memory costs a request: ``RecallSession.generate`` with ``rag=end`` vs
``rag=off`` after a long document, on a GPU with CUDA-graph decoding.

    PYTHONPATH=src python benchmarks/recall_latency.py --preset 760m \\
        --contexts 8192 32768 131072 --out OUT/recall_latency_760m

A random model of ``--preset`` (official vocabulary) reads a document of random tokens
(``--contexts`` tokens), then answers ``--requests`` requests in turn, each a prompt of 96
tokens whose last 32 repeat a span of the document's first window (so that recall finds it and
quotes passages, up to a quarter of the window) followed by ``--new-tokens`` greedy tokens. Per
request: the wall time, the part spent in the memory (index build + search, host side), and the
tokens read (quoted passages included). The per-token decode step is the engine's either way:
the memory records tokens on the host and is searched once per request.
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
from tttlm.inference import Engine
from tttlm.memory.memory import ContextMemory
from tttlm.memory.recall import RecallSession

COLUMNS = ("context", "rag", "requests", "request_s_median", "memory_s_median",
           "read_tokens", "new_tokens", "ms_per_new_token", "ratio_vs_off", "index_mib",
           "document_read_s")


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


def measure(engine: Engine, context: int, rag: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(context)
    document = torch.randint(3, vocab, (context,), generator=gen).tolist()
    session = RecallSession(engine, rag)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = time.perf_counter()
    session.read(document)
    sync()
    read_s = time.perf_counter() - start
    rows = []
    for r in range(args.requests + 1):  # the first one warms up (graph capture), not counted
        head = torch.randint(3, vocab, (64,), generator=gen).tolist()
        at = 32 * (r + 1)
        prompt = head + document[at:at + 32]
        with TimedRecall() as timer:
            sync()
            start = time.perf_counter()
            new = session.generate(prompt, args.new_tokens, temperature=0.0)
            sync()
            wall = time.perf_counter() - start
        quoted = sum(len(p.tokens) + 1 for p in session.last_recall)
        rows.append((wall, timer.seconds, len(prompt) + quoted + (1 if quoted else 0), len(new)))
    timed = rows[1:]
    session.memory.recall(prompt[-32:], 1)  # (re)builds the index, to report its size
    return {"context": context, "rag": rag, "requests": len(timed),
            "request_s_median": round(statistics.median(w for w, *_ in timed), 4),
            "memory_s_median": round(statistics.median(m for _, m, *_ in timed), 4),
            "read_tokens": timed[-1][2], "new_tokens": timed[-1][3],
            "ms_per_new_token": round(1000 * statistics.median(w for w, *_ in timed)
                                      / args.new_tokens, 3),
            "index_mib": round(session.memory.index.nbytes() / 2**20, 2),
            "document_read_s": round(read_s, 2),
            "request_times": [round(w, 4) for w, *_ in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="760m")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-graphs", dest="graphs", action="store_false")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    overrides = {} if args.preset != "tiny" else {"window": 64, "chunk_size": 16}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TTTForCausalLM(TTTConfig.from_preset(args.preset, **overrides)).to(device, dtype)
    engine = Engine(model, cuda_graphs=args.graphs and device.type == "cuda")
    rows = []
    for context in args.contexts:
        for rag in ("off", "end"):
            rows.append(measure(engine, context, rag, args))
            print(rows[-1], flush=True)
        off, end = rows[-2], rows[-1]
        end["ratio_vs_off"] = round(end["request_s_median"] / off["request_s_median"], 3)
    env = environment(device)
    env["command"] = "python benchmarks/recall_latency.py " + shlex.join(sys.argv[1:])
    write_report(args.out, f"Retrieval memory: request latency, {args.preset} e2e", env, rows,
                 COLUMNS, notes=[
                     f"A request = a 96-token prompt + {args.new_tokens} greedy tokens "
                     f"(CUDA-graph decoding: {engine.cuda_graphs}), after a document of "
                     "`context` random tokens; median of the timed requests (a first one "
                     "warms up). memory_s = time inside ContextMemory.recall (BM25 index "
                     "build over the passages that left the window since the last search, "
                     "and the search); read_tokens = prompt + quoted passages."])


if __name__ == "__main__":
    main()
